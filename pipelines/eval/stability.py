"""`influence eval stability`: do two fits that differ only in the label-sampling seed give the same answers?

The planted-fact corpus and tiny GPT-2 of the demo (``pipelines/demo``) are
built and trained here; then, for each Fisher variant (k = 1, 2, 4, 8 sampled
label draws per position, ``factors.fisher_samples``; k = 1 with Lambda fitted
on the same draws as the covariances; Gaussian probes; top-m labels enumerated
plus a tail draw (``topm``), also with a different k in stage 3
(``factors.lambda_samples``); the empirical Fisher as the deterministic
reference), factors are fitted with seeds 0, 1 and 2 on the whole corpus with
``influence_ops.fit_ekfac``, every query is scored against every document (dense
queries, damping 0.1 x mean(Lambda)), and every pair of seeds' score vectors is
compared per query: Spearman over all documents and the overlap of the top-10
sets, averaged over pairs and queries. Fitting cost: CPU seconds of the three
stages per fitted token on one torch thread, relative to sampled k = 1 (same
machine, same run).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import influence_ops as ops

from ..demo.corpus import make_corpus, make_queries
from ..demo.model import build_tokenizer, tiny_gpt2, train
from ..runtime.threads import torch_threads
from .metrics import spearman, top_overlap
from .report import Progress, write_table

SAMPLES = (1, 2, 4, 8)
TOP = 10


@dataclass(frozen=True)
class Variant:
    """A way to fit: label mode, draws in stage 1 (covariances) and stage 3 (Lambda), shared draws or not."""

    label: str
    fisher: ops.Fisher
    samples: int = 1
    lambda_samples: int | None = None  # None: the same k as stage 1
    same_lambda_draws: bool = False
    passes: int | None = None  # stage 1's draws summed into this many backward passes; None: one per draw
    lambda_passes: int | None = None  # the same in stage 3

    @property
    def stage3_samples(self) -> int:
        """The draws of stage 3 (Lambda): ``lambda_samples``, or stage 1's k when that is None."""
        return self.samples if self.lambda_samples is None else self.lambda_samples

    def fit(self, case: Case, seed: int) -> ops.EKFACFactors:
        return ops.fit_ekfac(case.model, case.layers, case.batches, fisher=self.fisher, seed=seed,
                             samples=self.samples, lambda_samples=self.lambda_samples,
                             same_lambda_draws=self.same_lambda_draws, passes=self.passes,
                             lambda_passes=self.lambda_passes)


VARIANTS = ([Variant(f"sampled k={k}", ops.Fisher.SAMPLED, k) for k in SAMPLES]
            + [Variant("sampled k=1, Lambda on the covariances' draws", ops.Fisher.SAMPLED, 1, None, True),
               Variant("sampled k=4, Lambda on the covariances' draws", ops.Fisher.SAMPLED, 4, None, True),
               Variant("sampled k=1 in stage 1, k=4 in stage 3 (Lambda)", ops.Fisher.SAMPLED, 1, 4),
               Variant("sampled k=1 in stage 1, k=8 in stage 3 (Lambda)", ops.Fisher.SAMPLED, 1, 8),
               Variant("sampled k=4 in stage 1, k=1 in stage 3 (Lambda)", ops.Fisher.SAMPLED, 4, 1)]
            + [Variant(f"gaussian k={k}", ops.Fisher.GAUSSIAN, k) for k in (1, 2, 4)]
            + [Variant("gaussian k=1 in stage 1, k=4 in stage 3 (Lambda)", ops.Fisher.GAUSSIAN, 1, 4)]
            + [Variant(f"topm k={k}", ops.Fisher.TOPM, k) for k in (2, 3, 4)]
            + [Variant("topm k=3 in stage 1, k=2 in stage 3 (Lambda)", ops.Fisher.TOPM, 3, 2),
               Variant("topm k=2 in stage 1, k=3 in stage 3 (Lambda)", ops.Fisher.TOPM, 2, 3),
               Variant("topm k=3 in stage 1, k=1 in stage 3 (Lambda)", ops.Fisher.TOPM, 3, 1),
               Variant("topm k=4 in stage 1, k=2 in stage 3 (Lambda)", ops.Fisher.TOPM, 4, 2),
               Variant("topm k=5 in stage 1, k=2 in stage 3 (Lambda)", ops.Fisher.TOPM, 5, 2),
               # the same draws summed into fewer backward passes (stage 1 + stage 3; ``fisher.effective_passes``)
               Variant("topm 5 / 2, Lambda's draws in 1 backward pass (5 + 1 passes)", ops.Fisher.TOPM, 5, 2,
                       lambda_passes=1),
               Variant("topm 5 / 2 in 3 + 1 backward passes", ops.Fisher.TOPM, 5, 2, passes=3, lambda_passes=1),
               Variant("topm 5 / 2 in 1 + 1 backward passes", ops.Fisher.TOPM, 5, 2, passes=1, lambda_passes=1)]
            + [Variant("empirical (data labels)", ops.Fisher.EMPIRICAL)])
SEEDS = (0, 1, 2)
QUICK = ("sampled k=1", "sampled k=2", "sampled k=1 in stage 1, k=4 in stage 3 (Lambda)", "gaussian k=1",
         "empirical (data labels)")


@dataclass
class Case:
    model: torch.nn.Module
    layers: list[ops.TrackedLayer]
    batches: list[ops.TokenBatch]
    queries: ops.TokenBatch
    documents: int
    description: str


def build_case(quick: bool, echo: Callable[[str], Any]) -> Case:
    countries, filler, queries, width, blocks, epochs, cap = ((3, 12, 3, 16, 1, 4, 20.0) if quick
                                                              else (16, 320, 16, 64, 2, 80, float("inf")))
    docs, facts = make_corpus(countries=countries, filler_docs=filler, seed=0)
    chosen = make_queries(facts, n=queries)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer([d["text"] for d in docs], tmp)
    model = tiny_gpt2(len(tok), context=64, width=width, layers=blocks, heads=4 if width >= 32 else 2)
    seqs = [tok(d["text"])["input_ids"][:64] for d in docs]
    stats = train(model, seqs, epochs=epochs, max_seconds=cap)
    echo(f"trained a tiny GPT-2 on {len(docs)} documents: {stats['epochs']} epochs in {stats['seconds']:.0f} s, "
         f"loss {stats['loss']:.3f}")
    qb = ops.query_batch([tok(q["prompt"])["input_ids"] for q in chosen],
                         [tok(q["completion"])["input_ids"] for q in chosen])
    batches = [ops.collate(seqs[i:i + 16]) for i in range(0, len(seqs), 16)]
    description = (f"demo planted-fact corpus, {len(docs)} documents, {sum(len(s) for s in seqs)} tokens; "
                   f"GPT-2 width {width}, {blocks} block(s), trained {stats['epochs']} epochs; {len(chosen)} queries")
    return Case(model, ops.find_mlp_layers(model), batches, qb, len(docs), description)


def all_scores(case: Case, factors: ops.EKFACFactors) -> torch.Tensor:
    """[Q, N] scores of every query against every document."""
    pq = ops.precondition_queries(case.model, factors, [case.queries], rank=None, damping=None)
    return torch.cat([ops.score_batch(case.model, pq, b).scores for b in case.batches], dim=1)


def measure(case: Case, v: Variant, progress: Progress, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Agreement over every pair of seeds; cost = the least CPU time of a fit (robust to other jobs' load)."""
    scores, cpu, tokens = [], [], 0
    for seed in seeds:
        t0, c0 = time.perf_counter(), time.process_time()
        factors = v.fit(case, seed)
        cpu.append(time.process_time() - c0)
        tokens = factors.tokens
        scores.append(all_scores(case, factors))
        progress.step(f"{v.label}, seed {seed}: fit {cpu[-1]:.2f} s CPU", t0)
    pairs = list(itertools.combinations(range(len(seeds)), 2))
    rho = torch.stack([spearman(scores[i], scores[j]) for i, j in pairs])  # (pairs, Q)
    top = torch.stack([top_overlap(scores[i], scores[j], TOP) for i, j in pairs])
    return {"variant": v.label, "fisher": v.fisher.value, "samples": v.samples,
            "lambda_samples": v.stage3_samples,
            "spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
            f"top{TOP}_overlap_mean": float(top.mean()), f"top{TOP}_overlap_min": float(top.min()),
            "fit_cpu_seconds": round(min(cpu), 3), "us_per_token": round(1e6 * min(cpu) / tokens, 2)}


def interleaved_fit_seconds(case: Case, variants: list[Variant], rounds: int,
                            echo: Callable[[str], Any] = print) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(CPU seconds, wall seconds) of every fit, by variant label: each variant fitted once per round, round by
    round, so a change in the machine's load hits every variant alike (compare the least of each)."""
    cpu: dict[str, list[float]] = {v.label: [] for v in variants}
    wall: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            v.fit(case, r)
            cpu[v.label].append(time.process_time() - c0)
            wall[v.label].append(time.perf_counter() - t0)
            echo(f"round {r}: {v.label}: {cpu[v.label][-1]:.2f} s CPU, {wall[v.label][-1]:.2f} s wall")
    return cpu, wall


def run_stability(out: str | Path, quick: bool = False, command: str = "influence eval stability",
                  echo: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Run the suite on one torch thread (``runtime.threads``): the demo's model is this small."""
    started = time.perf_counter()
    with torch_threads(1):
        case = build_case(quick, echo)
        seeds = SEEDS[:2] if quick else SEEDS
        variants = [v for v in VARIANTS if v.label in QUICK] if quick else VARIANTS
        progress = Progress(len(seeds) * len(variants), echo)
        rows = [measure(case, v, progress, seeds) for v in variants]
        base = rows[0]["us_per_token"]
        for r in rows:
            r["cost_vs_k1"] = round(r["us_per_token"] / base, 2)
        notes = (f"Seed-to-seed agreement of the scores ({case.description}). Each variant is fitted "
                 f"{len(seeds)} times (label-sampling seeds {', '.join(map(str, seeds))}) on the whole corpus; for "
                 f"every pair of fits and every query, Spearman over all {case.documents} documents and the overlap "
                 f"of the two top-{TOP} sets; mean and worst over pairs and queries. `samples` / `lambda_samples`: "
                 "label draws per position in stage 1 / stage 3. `cost_vs_k1`: fitting CPU time per token (the least "
                 "over the seeds, both stages; one forward and k backward passes per batch) relative to k=1. "
                 "Targets (issue 8): Spearman >= 0.95 and top-10 overlap >= 0.9 at <= 2x cost.")
        parquet, md = write_table(out, "stability", rows, command, notes, started)  # torch_threads as run
    echo(f"wrote {md} and {parquet}")
    return rows
