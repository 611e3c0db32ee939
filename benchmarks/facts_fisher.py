"""Seed-to-seed stability of Fisher estimators on the facts suite's corpus and model, in one run.

Usage:

    python benchmarks/facts_fisher.py [--out benchmarks/eval] [--variants topm4,topm3] [--model-seeds 0,1,2]
    python benchmarks/facts_fisher.py --cost 3 [--variants ...]   # fitting cost only

Builds the world of ``influence eval facts`` (``pipelines.eval.facts.build_world``,
the FULL size: planted-fact corpus, tiny GPT-2 trained here), tokenizes it with
the pipeline's tokenize stage only, and runs the in-process stability rows of
``facts_stability`` (``stability.measure``: ``fit_ekfac`` on the whole corpus,
dense queries, fitting seeds 0 and 1, or ``--seeds``) for the chosen variants, on
the model of each ``--model-seeds`` seed (default 0). The old default (sampled
k=1) is always measured first: ``cost_vs_old_default`` is each row's fitting CPU
seconds per token relative to it, in the same run. Writes
``<out>/facts_fisher.md`` and ``.parquet`` with the machine, load and command.

``--cost R``: the fitting cost only (it does not depend on the weights): the same
corpus and model size, trained for one epoch, every variant fitted R times,
interleaved (round after round, so that a change of the machine's load hits
every variant alike); the least CPU and wall seconds per variant, relative to
sampled k=1. Writes ``<out>/facts_fisher_cost.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import influence_ops as ops
from pipelines.eval.facts import FULL, OLD_DEFAULT, TOP, build_world, in_process, in_process_row, job
from pipelines.eval.report import Progress, write_table
from pipelines.eval.stability import Case, Variant, interleaved_fit_seconds, measure

VARIANTS = {
    "gaussian4": Variant("gaussian k=4 (4 / 4)", ops.Fisher.GAUSSIAN, 4, 4),
    "gaussian8": Variant("gaussian k=8 (8 / 8)", ops.Fisher.GAUSSIAN, 8, 8),
    "topm2": Variant("topm k=2 (1 top label + 1 tail draw; 2 / 2)", ops.Fisher.TOPM, 2, 2),
    "topm3": Variant("topm k=3 (2 top labels + 1 tail draw; 3 / 3)", ops.Fisher.TOPM, 3, 3),
    "topm4": Variant("topm k=4 (3 top labels + 1 tail draw; 4 / 4)", ops.Fisher.TOPM, 4, 4),
    "sampled4": Variant("sampled k=4 (4 / 4)", ops.Fisher.SAMPLED, 4, 4),
    "topm3l2": Variant("topm k=3 in stage 1, k=2 in stage 3 (3 / 2)", ops.Fisher.TOPM, 3, 2),
    "topm4l2": Variant("topm k=4 in stage 1, k=2 in stage 3 (4 / 2)", ops.Fisher.TOPM, 4, 2),
    "topm4l3": Variant("topm k=4 in stage 1, k=3 in stage 3 (4 / 3)", ops.Fisher.TOPM, 4, 3),
    "topm5l2": Variant("topm k=5 in stage 1, k=2 in stage 3 (5 / 2)", ops.Fisher.TOPM, 5, 2),
    "topm6l2": Variant("topm k=6 in stage 1, k=2 in stage 3 (6 / 2)", ops.Fisher.TOPM, 6, 2),
    # the draws summed into fewer backward passes (``passes`` / ``lambda_passes``; stage 1 passes / stage 3 passes)
    "topm5l2_p5p1": Variant("topm 5 / 2, stage 3's 2 draws in 1 pass (5 + 1 backward passes)", ops.Fisher.TOPM, 5, 2,
                            passes=5, lambda_passes=1),
    "topm5l2_p4p1": Variant("topm 5 / 2, stage 1 in 4 passes, stage 3 in 1 (4 + 1)", ops.Fisher.TOPM, 5, 2,
                            passes=4, lambda_passes=1),
    "topm5l2_p3p1": Variant("topm 5 / 2, stage 1 in 3 passes, stage 3 in 1 (3 + 1)", ops.Fisher.TOPM, 5, 2,
                            passes=3, lambda_passes=1),
    "topm5l2_p1p1": Variant("topm 5 / 2, each stage's draws in 1 pass (1 + 1)", ops.Fisher.TOPM, 5, 2,
                            passes=1, lambda_passes=1),
    "topm6l2_p6p1": Variant("topm 6 / 2, stage 3's 2 draws in 1 pass (6 + 1)", ops.Fisher.TOPM, 6, 2,
                            passes=6, lambda_passes=1),
    "topm7l2_p7p1": Variant("topm 7 / 2, stage 3's 2 draws in 1 pass (7 + 1)", ops.Fisher.TOPM, 7, 2,
                            passes=7, lambda_passes=1),
    "topm6l4_p6p1": Variant("topm 6 / 4, stage 3's 4 draws in 1 pass (6 + 1)", ops.Fisher.TOPM, 6, 4,
                            passes=6, lambda_passes=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/eval")
    parser.add_argument("--variants", default="gaussian4,topm4,topm3")
    parser.add_argument("--cost", type=int, default=0, help="only the fitting cost, this many interleaved rounds")
    parser.add_argument("--model-seeds", default="0", help="trained models (facts suite's model_seed), comma-separated")
    parser.add_argument("--seeds", default="0,1", help="fitting seeds compared pairwise, comma-separated")
    args = parser.parse_args()
    chosen = [VARIANTS[v] for v in args.variants.split(",")]
    if args.cost:
        cost(args, chosen)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    model_seeds = [int(x) for x in args.model_seeds.split(",")]
    seeds = tuple(int(x) for x in args.seeds.split(","))
    progress = Progress(len(model_seeds) * (1 + len(seeds) * (1 + len(chosen))), print)
    rows = []
    from pipelines.run import run_job

    for model_seed in model_seeds:
        with tempfile.TemporaryDirectory(prefix="influence-facts-fisher-") as tmp:
            t0 = time.perf_counter()
            world = build_world(Path(tmp), FULL, model_seed)
            progress.step(f"model seed {model_seed}: trained a tiny GPT-2 on {len(world.docs)} documents: "
                          f"{world.training['epochs']} epochs, loss {world.training['loss']:.3f}; greedy recall corpus "
                          f"{world.recall['corpus']:.2f}", t0)
            cfg = job(world, "mlp", "mlp", "none")
            run_job(cfg, stages=("tokenize",))
            ip = in_process(world, cfg)
            case = Case(ip.model, ip.layers, ip.batches(), ip.query_batch(), len(ip.sequences), "")
            measured = [measure(case, v, progress, seeds) for v in [OLD_DEFAULT, *chosen]]
        rows += [{"model_seed": model_seed, **in_process_row(m, ", ".join(map(str, seeds)), measured[0])}
                 for m in measured]
    load_after = os.getloadavg()
    notes = f"""
Seed to seed on the planted-fact corpus of `influence eval facts` (same corpus, model size and training; see
facts.md; `model_seed`: the trained model), in process as the facts suite's in-process rows (`stability.measure`:
`fit_ekfac` on the whole corpus, dense queries, fitting seeds as listed, every pair; per query Spearman over all
{len(ip.sequences)} documents and top-{TOP} overlap; mean and worst query). `cost_vs_old_default`: fitting CPU
seconds per token (the least over the seeds) relative to
sampled k=1 on the same model. `topm` k: per position the k - 1 most probable labels enumerated exactly (weighted by
their probabilities) plus one draw from the remaining tail (weighted by its mass), random signs; k backward passes
like k sampled draws, unless the variant sums its draws into fewer backward passes (`passes` in its label: the
draws' losses added round-robin, one backward pass per sum; unbiased, the cross terms vanish in expectation over
the random signs). Load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after:
{' '.join(f'{x:.2f}' for x in load_after)} (2 CPUs shared with other jobs: CPU seconds, not wall seconds).
Targets (issue 8): Spearman >= 0.95 and top-10 overlap >= 0.9 at <= 2x the old fitting cost.
"""
    command = "python benchmarks/facts_fisher.py " + " ".join(sys.argv[1:])
    parquet, md = write_table(args.out, "facts_fisher", rows, command, notes, started)
    print(f"wrote {md} and {parquet}")


def cost(args: argparse.Namespace, chosen: list[Variant]) -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()
    variants = [OLD_DEFAULT, *chosen]
    with tempfile.TemporaryDirectory(prefix="influence-facts-cost-") as tmp:
        world = build_world(Path(tmp), dataclasses.replace(FULL, epochs=1))
        from pipelines.run import run_job

        cfg = job(world, "mlp", "mlp", "none")
        run_job(cfg, stages=("tokenize",))
        ip = in_process(world, cfg)
        case = Case(ip.model, ip.layers, ip.batches(), ip.query_batch(), len(ip.sequences), "")
        cpu, wall = interleaved_fit_seconds(case, variants, args.cost, lambda line: print(line, flush=True))
    base_cpu, base_wall = min(cpu[OLD_DEFAULT.label]), min(wall[OLD_DEFAULT.label])
    rows = [{"variant": v.label, "fisher": v.fisher.value, "samples": v.samples,
             "lambda_samples": v.stage3_samples,
             "fit_cpu_seconds_min": round(min(cpu[v.label]), 2), "fit_wall_seconds_min": round(min(wall[v.label]), 2),
             "cpu_vs_old_default": round(min(cpu[v.label]) / base_cpu, 2),
             "wall_vs_old_default": round(min(wall[v.label]) / base_wall, 2)} for v in variants]
    load_after = os.getloadavg()
    notes = f"""
Fitting cost (`fit_ekfac`: covariances, eigendecomposition, Lambda) on the facts corpus ({len(ip.sequences)}
documents) with the facts suite's model size, trained one epoch (the cost does not depend on the weights). Each
variant fitted {args.cost} times, interleaved round by round; the least CPU and wall seconds, relative to sampled
k=1. Load average (1, 5, 15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after:
{' '.join(f'{x:.2f}' for x in load_after)} (2 CPUs shared with other jobs).
"""
    command = "python benchmarks/facts_fisher.py " + " ".join(sys.argv[1:])
    parquet, md = write_table(args.out, "facts_fisher_cost", rows, command, notes, started)
    print(f"wrote {md} and {parquet}")


if __name__ == "__main__":
    main()
