"""Fitting cost of the Fisher settings on a wider GPT-2 than the accuracy suites use.

The accuracy suites (``influence eval stability``, ``benchmarks/facts_fisher.py``) price each Fisher
setting on tiny models (width 64), where per-fit overheads weigh more than on a real model. This
fits the same settings with ``influence_ops.fit_ekfac`` on a GPT-2 of a chosen size (random weights:
the cost does not depend on them), interleaved over rounds, on one torch thread, and reports the
least CPU seconds of each setting and its ratio to sampled k=1 (1 / 1), the cost reference of issue 8.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/fit_cost.py \\
        --width 512 --layers 4 --vocab 8192 --tokens 128 --sequences 32 --rounds 2

The settings are named as in ``benchmarks/facts_fisher.py`` (``--settings topm3l2,topm4l2,topm5l2``).

Writes ``--out`` (JSON, default bench_output/fit_cost.json) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import influence_ops as ops
from benchmarks.facts_fisher import VARIANTS
from pipelines.eval.facts import OLD_DEFAULT
from pipelines.eval.stability import Case, Variant, interleaved_fit_seconds


def label(v: Variant) -> str:
    return f"{v.fisher.value} {v.samples} / {v.stage3_samples}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="topm3l2,topm4l2,topm5l2",
                        help=f"names from benchmarks/facts_fisher.py ({', '.join(VARIANTS)}); sampled 1 / 1 is added")
    parser.add_argument("--out", default="bench_output/fit_cost.json")
    args = parser.parse_args()
    variants = [OLD_DEFAULT, *(VARIANTS[n] for n in args.settings.split(","))]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=args.width, n_layer=args.layers, n_head=max(1, args.width // 64),
                        vocab_size=args.vocab, n_positions=args.tokens)
    model = GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, args.vocab, (args.tokens,), generator=generator).tolist()
                 for _ in range(args.sequences)]
    batches = [ops.collate(sequences[i:i + args.batch]) for i in range(0, len(sequences), args.batch)]
    case = Case(model, ops.find_mlp_layers(model), batches, batches[0], len(sequences), "")  # queries unused
    load_before = os.getloadavg()
    cpu, _ = interleaved_fit_seconds(case, variants, args.rounds, lambda line: print(line, flush=True))
    base = min(cpu[OLD_DEFAULT.label])
    rows = [{"setting": label(v), "fit_cpu_seconds_min": round(min(cpu[v.label]), 2),
             "vs_sampled_1": round(min(cpu[v.label]) / base, 2)} for v in variants]
    result = {"model": f"GPT-2 width {args.width}, {args.layers} layers, vocab {args.vocab}, random weights",
              "fit": f"{args.sequences} sequences x {args.tokens} tokens, batches of {args.batch}, MLP layers",
              "rounds": args.rounds, "torch_threads": 1, "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.platform()}, {os.cpu_count()} CPUs",
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{result['model']}; {result['fit']}; least CPU seconds over {args.rounds} round(s)\n")
    print("| setting | fit CPU seconds | vs sampled 1 / 1 |\n|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['fit_cpu_seconds_min']:.2f} | {row['vs_sampled_1']:.2f}x |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
