"""The engine on a GPU against the float64 CPU reference (a check to run where a GPU is; not a test).

A small GPT-2-shaped model with random weights (width 256, 4 blocks, vocab 4096,
sequences of 64 tokens) is fitted and scored once on the CPU in float64 (the
reference) and then on the GPU in float32 (TF32 off), float32 with TF32 matmuls,
and bf16 autocast. Query preparation on the GPU uses the float32 path
(``QueryPrep(precision="float32", lowrank="randomized")``) as the pipeline does
by default. Reported per variant: the mean and worst per-query Spearman of the
scores against the reference, the largest relative score difference, and the
top-10 overlap; plus the seconds of each step on the GPU.

    python benchmarks/gpu_check.py --out bench_output/gpu_check.json

Needs only torch, transformers, safetensors, numpy (no Ray).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import influence_ops as ops  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = a.argsort().argsort().astype(float), b.argsort().argsort().astype(float)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.width, n_layer=args.layers,
                     n_head=max(1, args.width // 64), bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def data(args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    rng = random.Random(args.seed)
    train = [[rng.randrange(1, args.vocab) for _ in range(rng.randint(args.seq_len // 2, args.seq_len))]
             for _ in range(args.train)]
    prompts = [[rng.randrange(1, args.vocab) for _ in range(12)] for _ in range(args.queries)]
    completions = [[rng.randrange(1, args.vocab) for _ in range(4)] for _ in range(args.queries)]
    return train, prompts, completions


def run(model: torch.nn.Module, device: str, dtype: torch.dtype, autocast: torch.dtype | None,
        prep: ops.QueryPrep, train, prompts, completions, args) -> tuple[np.ndarray, dict[str, float]]:
    """Scores [Q, N] (float64 numpy) and the seconds of each step."""
    m = model.to(device=device, dtype=dtype)
    layers = ops.find_mlp_layers(m)
    batches = [ops.collate(train[i:i + args.batch]).to(device) for i in range(0, len(train), args.batch)]
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    times = {}
    sync()
    t = time.perf_counter()
    # empirical Fisher: deterministic, so the variants differ only by precision (sampled labels differ by device)
    factors = ops.fit_ekfac(m, layers, batches, fisher=ops.Fisher.EMPIRICAL, autocast_dtype=autocast)
    sync()
    times["fit_ekfac_s"] = time.perf_counter() - t
    qb = [ops.query_batch(prompts[i:i + args.batch], completions[i:i + args.batch]).to(device)
          for i in range(0, len(prompts), args.batch)]
    t = time.perf_counter()
    queries = ops.precondition_queries(m, factors, qb, rank=args.rank, autocast_dtype=autocast, prep=prep)
    sync()
    times["prepare_queries_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = [ops.score_batch(m, queries, b, autocast_dtype=autocast).scores for b in batches]
    sync()
    times["score_s"] = time.perf_counter() - t
    return torch.cat(scores, dim=1).to("cpu", torch.float64).numpy(), times


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    rho = [spearman(ref[q], got[q]) for q in range(ref.shape[0])]
    top = [len(set(np.argsort(-ref[q])[:10]) & set(np.argsort(-got[q])[:10])) / 10 for q in range(ref.shape[0])]
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    return {"spearman_mean": float(np.mean(rho)), "spearman_min": float(np.min(rho)),
            "top10_overlap_mean": float(np.mean(top)), "max_rel_diff": float(rel)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_output/gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    train, prompts, completions = data(args)
    model = build_model(args)
    ref, ref_times = run(model, "cpu", torch.float64, None, ops.QueryPrep(), train, prompts, completions, args)
    fast = ops.QueryPrep(precision="float32", lowrank="randomized")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
               "python": platform.python_version(), "cpu_float64_times": ref_times, "variants": {}}
    for name, dtype, autocast, tf32 in (("float32", torch.float32, None, False),
                                        ("float32+tf32", torch.float32, None, True),
                                        ("bf16 autocast", torch.float32, torch.bfloat16, False),
                                        ("float64", torch.float64, None, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        prep = ops.QueryPrep() if dtype == torch.float64 else fast
        run(model, "cuda", dtype, autocast, prep, train[:args.batch], prompts[:args.batch],
            completions[:args.batch], args)  # warm-up
        got, times = run(model, "cuda", dtype, autocast, prep, train, prompts, completions, args)
        results["variants"][name] = {**compare(ref, got), **times}
        print(name, json.dumps(results["variants"][name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
