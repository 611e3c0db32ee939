"""Query preparation (issue 10, item 1): today's float64 path vs the new path, per query and step.

Today (``--old``): per query and tracked layer, materialize G = sum_t g_t a_t^T, rotate
into the eigenbasis in float64 (Q_S^T G Q_A), divide by Lambda + damping, rotate back
(P = Q_S M Q_A^T), then a full float64 SVD of P for the rank-r factors.
New (``influence_ops.query_prep``): rotate each token into the eigenbasis (cheaper than
rotating G while T < min(d_out, d_in')), divide, and take the rank-r factors from a
seeded randomized SVD of M in the eigenbasis (left = Q_S U diag(sv), right = Q_A V:
no rotation back), all in float32.

Part 1, timing: a GPT-2-shaped model (width --width, d_ff 4 x width, --layers blocks,
tracked c_fc and c_proj, vocab --vocab, random weights) gives real per-token a and g
for a batch of --batch queries of --tokens tokens (the last --completion labelled).
The factors are random of the right shapes (orthogonal Q_A, Q_S; Lambda a decaying
outer product plus noise): the cost does not depend on their values. The gradient pass
is timed on --grad-queries queries; the float64 path on --old-queries queries and the
new path on --new-queries queries, each repeating that batch's a and g, and every
time is extrapolated linearly to --queries (stated in the output).

Part 2, agreement: a tiny GPT-2 (width --tiny-width, 2 blocks) with EK-FAC fitted on
random token sequences; --tiny-queries rank-r queries prepared both ways (the float64
path from a float64 model, the new path from a float32 copy) score --tiny-train
training sequences (``score_batch`` in float64); reported: per-query Spearman of the
two score vectors (min and mean), the truncation errors of both.

Run (numbers in benchmarks/RESULTS.md section 4; about 22 min on 2 cores at load 30):
    PYTHONPATH=. .venv/bin/python benchmarks/index.py --queries 1000 --layers 2 --batch 4 \
        --old-queries 4 --new-queries 32 --grad-queries 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

import influence_ops as io
from influence_ops.eigen import LayerEigen
from influence_ops.lowrank import truncate
from influence_ops.query_prep import LowRankMethod, Precision, QueryPrep, lowrank_in_eigenbasis, rotate_in

NEW = QueryPrep(precision=Precision.FLOAT32, lowrank=LowRankMethod.RANDOMIZED)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Accumulates seconds per step name."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, defaultdict(float)
        self.name, self.start = None, 0.0

    def __call__(self, name: str) -> Timer:
        self.name = name
        return self

    def __enter__(self) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds[self.name] += time.perf_counter() - self.start


def gpt2(width: int, blocks: int, vocab: int, positions: int, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=width, n_layer=blocks, n_head=max(1, width // 64), vocab_size=vocab,
                     n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def random_queries(n: int, tokens: int, completion: int, vocab: int, seed: int) -> io.TokenBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, tokens), generator=gen).tolist()
    return io.query_batch([s[:-completion] for s in ids], [s[-completion:] for s in ids])


def random_factors(layers: list[io.TrackedLayer], device: str, seed: int) -> dict[str, io.LayerFactors]:
    """Orthogonal eigenbases (one per width, shared) and a decaying positive Lambda."""
    gen = torch.Generator().manual_seed(seed)
    bases: dict[int, torch.Tensor] = {}

    def basis(d: int) -> torch.Tensor:
        if d not in bases:
            bases[d] = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q.to(device)
        return bases[d]

    out = {}
    for l in layers:
        d_out, d_in = l.shape
        e_s = 1.0 / (1.0 + torch.arange(d_out, dtype=torch.float64)) ** 1.5
        e_a = 1.0 / (1.0 + torch.arange(d_in, dtype=torch.float64)) ** 1.5
        lam = torch.outer(e_s, e_a) * (0.5 + torch.rand(d_out, d_in, generator=gen, dtype=torch.float64))
        eigen = LayerEigen(q_a=basis(d_in), e_a=e_a.to(device), q_s=basis(d_out), e_s=e_s.to(device))
        out[l.name] = io.LayerFactors(a_sum=torch.zeros(0), s_sum=torch.zeros(0), tokens=1, eigen=eigen,
                                      lambda_sum=lam.to(device), sequences=1)
    return out


def old_path(f: io.LayerFactors, a: torch.Tensor, g: torch.Tensor, rank: int, timer: Timer) -> None:
    """Today's steps (``apply_inverse`` + ``lowrank.truncate``), timed one by one."""
    with timer("materialize G"):
        grads = torch.einsum("bto,bti->boi", g, a)  # (B, d_out, d_in')
    with timer("rotate in"):
        q_a, q_s = f.eigen.q_a, f.eigen.q_s
        rotated = q_s.T @ grads.to(torch.float64) @ q_a
    with timer("damp"):
        middle = rotated / (f.eigenvalues + f.damping(None))
    with timer("rotate back"):
        p = q_s @ middle @ q_a.T
    with timer("low rank (SVD)"):
        truncate(p, rank)


def new_path(f: io.LayerFactors, a: torch.Tensor, g: torch.Tensor, rank: int, timer: Timer,
             bases: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str) -> None:
    q_s, q_a = bases[name]
    with timer("rotate in"):
        rotated = rotate_in(q_s, q_a, a, g)
    with timer("damp"):
        middle = rotated / (f.eigenvalues + f.damping(None)).to(q_s.dtype)
    with timer("low rank (SVD)"):
        lowrank_in_eigenbasis(middle, q_s, q_a, rank, NEW)


def timing(args) -> dict:
    dev = args.device
    model = gpt2(args.width, args.layers, args.vocab, max(1024, args.tokens), args.seed, torch.float32).to(dev)
    layers = io.find_mlp_layers(model)
    batch = random_queries(args.batch, args.tokens, args.completion, args.vocab, args.seed + 1).to(dev)
    grad_timer = Timer(dev)
    out = None
    for _ in range(max(1, args.grad_queries // args.batch)):
        with grad_timer("gradients (forward + backward)"):
            out = io.backward_pass(model, layers, io.LanguageModelObjective(), batch)
    a = {l.name: out.captured.activations[l.name] for l in layers}
    g = {l.name: out.captured.output_grads[l.name] for l in layers}
    factors = random_factors(layers, dev, args.seed)
    bases = {n: (f.eigen.q_s.float(), f.eigen.q_a.float()) for n, f in factors.items()}
    result = {"shapes": {l.name: list(l.shape) for l in layers}, "paths": {}}
    for path, n in (("float64 (today)", args.old_queries), ("new", args.new_queries)):
        timer = Timer(dev)
        batches = max(1, n // args.batch)
        for _ in range(batches):
            for l in layers:
                if path == "new":
                    new_path(factors[l.name], a[l.name], g[l.name], args.rank, timer, bases, l.name)
                else:
                    old_path(factors[l.name], a[l.name], g[l.name], args.rank, timer)
        timed = batches * args.batch
        per_query = {k: v / timed for k, v in timer.seconds.items()}
        per_query.update({k: v / (max(1, args.grad_queries // args.batch) * args.batch)
                          for k, v in grad_timer.seconds.items()})
        per_query["total"] = sum(per_query.values())
        result["paths"][path] = {"timed_queries": timed, "seconds_per_query": per_query,
                                 "extrapolated_seconds": per_query["total"] * args.queries}
        print(f"{path}: {timed} queries timed; s/query " + ", ".join(f"{k} {v:.4f}" for k, v in per_query.items()),
              flush=True)
    old, new = (result["paths"][p]["seconds_per_query"] for p in ("float64 (today)", "new"))
    grads = "gradients (forward + backward)"
    result["speedup_total"] = old["total"] / new["total"]
    result["speedup_preparation_after_gradients"] = (old["total"] - old[grads]) / (new["total"] - new[grads])
    return result


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def agreement(args) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 2)
    vocab, length = 256, 32
    model64 = gpt2(args.tiny_width, 2, vocab, 64, args.seed, torch.float64)
    model32 = gpt2(args.tiny_width, 2, vocab, 64, args.seed, torch.float32)
    layers = io.find_mlp_layers(model64)
    fit = [io.collate(torch.randint(0, vocab, (8, length), generator=gen).tolist()) for _ in range(args.tiny_fit // 8)]
    factors = io.fit_ekfac(model64, layers, fit, fisher=io.Fisher.EMPIRICAL)
    queries = [random_queries(8, 24, 8, vocab, args.seed + 10 + i) for i in range(args.tiny_queries // 8)]
    train = [io.collate(torch.randint(0, vocab, (8, length), generator=gen).tolist())
             for _ in range(args.tiny_train // 8)]
    ref = io.precondition_queries(model64, factors, queries, rank=args.rank)
    # the same fitted factors, accepted for the float32 copy of the model (the new path casts the bases itself)
    factors32 = dataclasses.replace(factors, fingerprint=io.model_fingerprint(io.find_mlp_layers(model32)))
    new = io.precondition_queries(model32, factors32, queries, rank=args.rank, prep=NEW)
    new.fingerprint = ref.fingerprint
    new = new.to("cpu", torch.float64)
    s_ref = torch.cat([io.score_batch(model64, ref, b).scores for b in train], dim=1)  # (Q, N)
    s_new = torch.cat([io.score_batch(model64, new, b).scores for b in train], dim=1)
    rho = [spearman(s_ref[q], s_new[q]) for q in range(s_ref.shape[0])]
    res = {"queries": s_ref.shape[0], "train_sequences": s_ref.shape[1], "rank": args.rank,
           "width": args.tiny_width, "spearman_min": min(rho), "spearman_mean": sum(rho) / len(rho),
           "max_rel_score_diff": float(((s_new - s_ref).abs().amax(1) / s_ref.abs().amax(1)).max()),
           "truncation_error_float64_mean": float(ref.truncation_error.mean()),
           "truncation_error_new_mean": float(new.truncation_error.mean())}
    print("agreement: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()),
          flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000, help="N the times are reported for")
    p.add_argument("--old-queries", type=int, default=8, help="queries timed on the float64 path")
    p.add_argument("--new-queries", type=int, default=128, help="queries timed on the new path")
    p.add_argument("--grad-queries", type=int, default=16, help="queries whose gradient pass is timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (2 tracked layers each)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--completion", type=int, default=8)
    p.add_argument("--tiny-width", type=int, default=128)
    p.add_argument("--tiny-fit", type=int, default=128)
    p.add_argument("--tiny-queries", type=int, default=32)
    p.add_argument("--tiny-train", type=int, default=128)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_output/index.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    report = {"args": vars(args), "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    if not args.skip_agreement:
        report["agreement"] = agreement(args)
    if not args.skip_timing:
        report["timing"] = timing(args)
        t = report["timing"]
        print(f"speedup (gradients included) {t['speedup_total']:.1f}x, "
              f"preparation after gradients {t['speedup_preparation_after_gradients']:.1f}x", flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}; load average {report['machine']['loadavg_end']}")


if __name__ == "__main__":
    main()
