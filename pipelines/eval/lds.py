"""`influence eval lds`: do the scores predict what retraining on a subset does to a query's loss?

Symbols: N training examples, Q queries, M subsets, S retraining seeds.

For each setup (``lds_cases``: digits MLP, tiny GPT-2 LM): M random halves of
the training set; a model is trained from scratch on each half with S seeds and
the queries' losses are averaged over the seeds. Every method scores the
queries against the training set with the model trained on all of it, and the
linear datamodeling score (``datamodels.lds``) is the per-query Spearman, over
the M halves, between the subset sum of the scores and minus the measured loss.
The table gives the mean over queries with a 95% bootstrap interval (resampling
queries), and the paired difference to this project's default EK-FAC.

Methods (the same brute-force gradients; damping 0.1 x mean(Lambda) per layer
everywhere): EK-FAC with the job's default Fisher (``exact.DEFAULT_FIT``), with
top-m k = 3 in both stages, with Gaussian probes (4 draws in both stages), with
one sampled label, with the empirical Fisher; K-FAC (the default fit's
Kronecker eigenvalues in place of Lambda); the identity (gradient dot
product); kronfluence's EK-FAC when it imports (``kron.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import influence_ops as ops

from ..runtime.threads import torch_threads
from . import kron
from .datamodels import bootstrap_interval, lds, random_subsets
from .exact import DEFAULT, DEFAULT_FIT, TOPM3, factor_scores
from .lds_cases import LdsCase, digits_case, lm_case
from .report import Progress, write_table

KRONFLUENCE = "kronfluence EK-FAC (true Fisher, 1 sampled label)"
# (label, fisher, draws in stage 1, draws in stage 3)
FITS = ((DEFAULT, *DEFAULT_FIT), (TOPM3, ops.Fisher.TOPM, 3, 3),
        ("EK-FAC gaussian k=4", ops.Fisher.GAUSSIAN, 4, 4), ("EK-FAC sampled k=1", ops.Fisher.SAMPLED, 1, 1),
        ("EK-FAC empirical", ops.Fisher.EMPIRICAL, 1, 1))
KFAC = "K-FAC (the default fit's Kronecker eigenvalues; no eigenvalue correction)"
IDENTITY = "identity (gradient dot product)"
# setup -> (subsets M, retraining seeds S), full and --quick
SIZES = {"digits": ((100, 2), (8, 1)), "lm": ((50, 2), (6, 1))}


def method_scores(case: LdsCase, quick: bool, progress: Progress) -> dict[str, tuple[torch.Tensor | None, str, float]]:
    """label -> ([Q, N] scores or None, note, seconds)."""
    out: dict[str, tuple[torch.Tensor | None, str, float]] = {}
    damping = {layer.name: None for layer in case.layers}  # 0.1 x mean(Lambda) per layer
    for label, fisher, k, k_lambda in FITS:
        t0 = time.perf_counter()
        factors = ops.fit_ekfac(case.model, case.layers, case.fit_batches, fisher=fisher, seed=0,
                                objective=case.objective, samples=k, lambda_samples=k_lambda)
        out[label] = (factor_scores(case, factors, damping), "", time.perf_counter() - t0)
        if label == DEFAULT:
            t1 = time.perf_counter()
            out[KFAC] = (factor_scores(case, factors, damping, kfac=True), "", time.perf_counter() - t1)
        progress.step(f"{case.name}: {label}", t0)
    t0 = time.perf_counter()
    out[IDENTITY] = (case.query_grads.double() @ case.train_grads.double().T, "", time.perf_counter() - t0)
    version, t1 = kron.available(), time.perf_counter()
    if quick:
        out[KRONFLUENCE] = (None, "skipped with --quick", 0.0)
    elif version is None:
        out[KRONFLUENCE] = (None, "not installed (pip install 'corpus-influence[bench]')", 0.0)
    else:
        out[KRONFLUENCE] = (kron.kronfluence_scores(case.model, **case.kron), f"kronfluence {version}",
                            time.perf_counter() - t1)
    progress.step(f"{case.name}: identity and kronfluence", t0)
    return out


def retrained_losses(case: LdsCase, masks: torch.Tensor, seeds: int, echo: Callable[[str], Any]) -> torch.Tensor:
    """[Q, M] the queries' losses of models trained on each subset, mean over ``seeds`` retrainings."""
    t0, cols = time.perf_counter(), []
    for j, mask in enumerate(masks):
        cols.append(torch.stack([case.query_losses(case.retrain(mask, s)) for s in range(seeds)]).mean(0))
        if (j + 1) % 10 == 0:
            echo(f"  retrained on {j + 1}/{len(masks)} subsets x {seeds} seed(s) ({time.perf_counter() - t0:.0f} s)")
    return torch.stack(cols, dim=1)


def evaluate(setup: str, make: Callable[[bool], LdsCase], quick: bool, progress: Progress,
             echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    case = make(quick)
    m, seeds = SIZES[setup][1 if quick else 0]
    masks = random_subsets(case.train_grads.shape[0], m, 0.5, seed=0)
    losses = retrained_losses(case, masks, seeds, echo)
    progress.step(f"{case.name}: trained, and retrained on {m} halves x {seeds} seed(s)", t0)
    scores = method_scores(case, quick, progress)
    base = lds(scores[DEFAULT][0], masks, losses)
    rows = []
    for label, (sc, note, seconds) in scores.items():
        row: dict[str, Any] = {"model": case.name, "method": label, "subsets": m, "seeds": seeds,
                               "lds": None, "ci95_low": None, "ci95_high": None, "vs_default": None,
                               "vs_default_ci95_low": None, "vs_default_ci95_high": None,
                               "seconds": round(seconds, 2), "note": note}
        if sc is not None:
            per_query = lds(sc, masks, losses)
            lo, hi = bootstrap_interval(per_query)
            dlo, dhi = bootstrap_interval(per_query - base)
            row.update(lds=float(per_query.mean()), ci95_low=lo, ci95_high=hi,
                       vs_default=float((per_query - base).mean()), vs_default_ci95_low=dlo,
                       vs_default_ci95_high=dhi)
        rows.append(row)
    return rows


NOTES = """
Linear datamodeling score (LDS): for each query, the Spearman correlation over `subsets` random halves of the
training set between the sum of a method's scores over the half and minus the query's loss of models retrained
from scratch on that half (mean over `seeds` retraining seeds). Scores come from the model trained on the whole
set. `lds`: mean over queries, `ci95_*`: 95% bootstrap interval over queries; `vs_default`: the paired
difference to this project's default EK-FAC (the first row) with its 95% bootstrap interval (an
interval containing 0: no measurable difference). Every method uses the same gradients and the damping
0.1 x mean(Lambda) per layer (kronfluence: `damping_factor=None`, the same heuristic; its true Fisher draws one
label per position). `seconds`: fitting and scoring (tiny models; mostly per-pass overhead). One factor fit
per method (seed 0), so the interval does not include the fit's sampling noise.
"""


def run_lds(out: str | Path, quick: bool = False, command: str = "influence eval lds",
            echo: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    started = time.perf_counter()
    torch.manual_seed(0)
    setups = (("digits", digits_case), ("lm", lm_case))
    progress = Progress(len(setups) * (len(FITS) + 2), echo)
    rows: list[dict[str, Any]] = []
    with torch_threads(1):  # models this small train fastest on one thread (and ~50x slower on 2 busy cores)
        for setup, make in setups:
            rows += evaluate(setup, make, quick, progress, echo)
        parquet, md = write_table(out, "lds", rows, command, NOTES, started)  # torch_threads as run
    echo(f"wrote {md} and {parquet}")
    return rows
