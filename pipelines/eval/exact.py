"""`influence eval exact`: approximations against exact influence on tiny models, over several trained models.

Symbols: N training examples, Q queries, P tracked parameters (a few thousand), S model seeds.

Exact influence: I(q, n) = grad NLL_q^T (F + D)^-1 grad L_n with F the exact
Gauss-Newton matrix of the tracked layers (the true Fisher, an expectation over
the softmax; ``ggn.py``), averaged over training sequences as EK-FAC's Lambda is
(F = (1/N) sum_n J_n^T H_n J_n), and D the per-layer damping
lambda_l = 0.1 x trace(F_ll) / P_l (= 0.1 x mean(Lambda) of the exact
eigenvalue correction), used by every method alike. The second reference keeps
F's blocks within layers and drops those between layers (what every per-layer
method approximates), so the Kronecker-eigenbasis approximation is measured
apart from the layer-wise split.

The methods differ only in the curvature: EK-FAC fitted with k sampled label
draws (k = 1, 2, 4, 8), with k Gaussian probes (k = 1 and 4, in both stages),
with k top-m terms (k = 2, 3, 4 in both stages, and the job's default: 3 in
stage 1, 2 for Lambda), with the expected Fisher, with
the empirical Fisher; K-FAC (the Kronecker eigenvalues e_S e_A instead of
Lambda, scaled by tokens per sequence to approximate the same per-sequence
matrix, expected Fisher); and the identity (the plain gradient dot product).
All gradients are the same brute force ones, so the table measures the
curvature approximation alone. Per query, Pearson and Spearman over the N
training examples against each reference; every model seed (``exact_models.py``)
trains its own model, fits every method once (fit seed = model seed) and brings
its own exact influence. Comparisons between methods are paired by (model seed,
query), with a two-level bootstrap interval (``metrics.nested_paired_interval``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import influence_ops as ops

from ..config import FactorConfig
from ..runtime.threads import torch_threads
from .blocks import block_diagonal, block_errors, kfac_layer
from .exact_models import Setup, classifier_setup, lm_setup
from .ggn import exact_ggn, layer_slices, split_layers
from .metrics import nested_paired_interval, pearson, spearman
from .report import Progress, write_table

__all__ = ["Setup", "block_diagonal", "classifier_setup", "exact_scores", "factor_scores", "kfac_layer",
           "layer_damping", "lm_setup", "run_exact"]

SAMPLES = (1, 2, 4, 8)
MODEL_SEEDS = tuple(range(20))
QUICK_MODEL_SEEDS = (0, 1)
EXPECTED = "EK-FAC expected"
_JOB = FactorConfig()
DEFAULT_FIT = (_JOB.fisher, _JOB.fisher_samples, _JOB.lambda_samples)  # a job's default: (fisher, stage 1, stage 3)
DEFAULT = f"EK-FAC {_JOB.fisher.value} {_JOB.fisher_samples} / {_JOB.lambda_samples} (default)"
TOPM3 = "EK-FAC topm k=3"
KFAC = "K-FAC expected (no eigenvalue correction)"
IDENTITY = "identity (gradient dot product)"
BLOCK = "exact GGN, layer-block-diagonal (the bound for per-layer methods)"
REFERENCES = {"exact": "", "block-diagonal exact": "_bd"}  # reference -> column suffix
COMPARISONS = ((EXPECTED, KFAC), (DEFAULT, KFAC), (DEFAULT, IDENTITY), (DEFAULT, TOPM3))  # (a, b): a - b


def layer_damping(ggn: torch.Tensor, layers: list[ops.TrackedLayer]) -> dict[str, float]:
    """lambda_l = 0.1 x trace(F_ll) / P_l."""
    return {name: 0.1 * float(torch.diagonal(ggn[sl, sl]).mean()) for name, sl in layer_slices(layers).items()}


def exact_scores(s: Setup, ggn: torch.Tensor, damping: dict[str, float]) -> torch.Tensor:
    """[Q, N] grad NLL_q^T (F + D)^-1 grad L_n."""
    d = torch.cat([torch.full((l.d_out * l.d_in_h,), damping[l.name], dtype=torch.float64) for l in s.layers])
    solved = torch.linalg.solve(ggn + torch.diag(d), s.query_grads.T.to(torch.float64))  # (P, Q)
    return solved.T @ s.train_grads.to(torch.float64).T


def factor_scores(s: Setup, factors: ops.EKFACFactors, damping: dict[str, float], kfac: bool = False) -> torch.Tensor:
    """[Q, N] with the EK-FAC (or K-FAC) inverse of ``factors``."""
    q = split_layers(s.query_grads.to(torch.float64), s.layers)
    g = split_layers(s.train_grads.to(torch.float64), s.layers)
    total = 0.0
    for layer in s.layers:
        lf = factors.layers[layer.name]
        lf = kfac_layer(lf) if kfac else lf
        p = ops.apply_inverse(lf, q[layer.name], damping=damping[layer.name])  # (Q, d_out, d_in')
        total = total + torch.einsum("qoi,noi->qn", p, g[layer.name])
    return total


def _methods(quick: bool = False) -> list[tuple[str, ops.Fisher, int, int]]:
    """(label, fisher, samples in stage 1, samples in stage 3) of the fitted methods."""
    return ([(f"EK-FAC sampled k={k}", ops.Fisher.SAMPLED, k, k) for k in (SAMPLES[:2] if quick else SAMPLES)]
            + [(f"EK-FAC gaussian k={k}", ops.Fisher.GAUSSIAN, k, k) for k in ((4,) if quick else (1, 4))]
            + [(f"EK-FAC topm k={k}", ops.Fisher.TOPM, k, k) for k in ((3,) if quick else (2, 3, 4))]
            + [(DEFAULT, *DEFAULT_FIT), (EXPECTED, ops.Fisher.EXPECTED, 1, 1),
               ("EK-FAC empirical", ops.Fisher.EMPIRICAL, 1, 1)])


@dataclass
class SeedResult:
    """One trained model's results.

    Attributes:
        correlations: (method, reference, "pearson" | "spearman") -> [Q] per query.
        seconds: method -> seconds of its fit.
        blocks: "F" (the curvature) or "(F + D)^-1" (its damped inverse) -> layer name or "all" -> label ->
            relative Frobenius error (``blocks.block_errors``).
    """

    correlations: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def add(self, method: str, scores: torch.Tensor, references: dict[str, torch.Tensor], seconds: float) -> None:
        for ref, exact in references.items():
            self.correlations[method, ref, "pearson"] = pearson(scores, exact)
            self.correlations[method, ref, "spearman"] = spearman(scores, exact)
        self.seconds[method] = seconds


def evaluate(s: Setup, fit_seed: int, progress: Progress, quick: bool = False) -> SeedResult:
    """Every method against both references on one trained model."""
    start = time.perf_counter()
    ggn = exact_ggn(s.examples, s.layers) / len(s.examples)
    damping = layer_damping(ggn, s.layers)
    refs = {"exact": exact_scores(s, ggn, damping),
            "block-diagonal exact": exact_scores(s, block_diagonal(ggn, s.layers), damping)}
    progress.step(f"{s.name}: exact GGN {ggn.shape[0]} x {ggn.shape[0]} and its inverse", start)
    out = SeedResult()
    fitted = {}
    for label, fisher, k, k_lambda in _methods(quick):
        t0 = time.perf_counter()
        fitted[label] = ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=fisher, seed=fit_seed,
                                      objective=s.objective, samples=k, lambda_samples=k_lambda)
        scores = factor_scores(s, fitted[label], damping)
        out.add(label, scores, refs, time.perf_counter() - t0)
        progress.step(f"{s.name}: {label}", t0)
    t0 = time.perf_counter()
    out.add(KFAC, factor_scores(s, fitted[EXPECTED], damping, kfac=True), refs, 0.0)
    out.add(IDENTITY, s.query_grads.double() @ s.train_grads.double().T, refs, 0.0)
    out.add(BLOCK, refs["block-diagonal exact"], refs, 0.0)
    curvatures = {EXPECTED: fitted[EXPECTED].layers, DEFAULT: fitted[DEFAULT].layers,
                  KFAC: {n: kfac_layer(lf) for n, lf in fitted[EXPECTED].layers.items()}}
    out.blocks = {"F": block_errors(ggn, s.layers, curvatures),
                  "(F + D)^-1": block_errors(ggn, s.layers, curvatures, damping)}
    progress.step(f"{s.name}: K-FAC, identity, block-diagonal exact, curvature blocks", t0)
    return out


def summary_rows(name: str, results: Sequence[SeedResult]) -> list[dict[str, Any]]:
    """Per method: mean over model seeds and queries (and the worst query) against each reference."""
    rows = []
    for method in results[0].seconds:
        row: dict[str, Any] = {"model": name, "method": method, "model_seeds": len(results)}
        for ref, suffix in REFERENCES.items():
            for metric in ("pearson", "spearman"):
                v = torch.stack([r.correlations[method, ref, metric] for r in results])  # (S, Q)
                row[metric + suffix] = float(v.mean())
                if not suffix:
                    row[metric + "_min"] = float(v.min())
        row["fit_seconds"] = round(sum(r.seconds[method] for r in results) / len(results), 3)
        rows.append(row)
    return rows


def paired_rows(name: str, results: Sequence[SeedResult]) -> list[dict[str, Any]]:
    """Per comparison a - b and reference: mean difference over (model seed, query) pairs with 95% intervals."""
    rows = []
    for ref in REFERENCES:
        for a, b in COMPARISONS:
            row: dict[str, Any] = {"model": name, "reference": ref, "comparison": f"{a} - {b}"}
            for metric in ("spearman", "pearson"):
                va = torch.stack([r.correlations[a, ref, metric] for r in results])  # (S, Q)
                vb = torch.stack([r.correlations[b, ref, metric] for r in results])
                mean, lo, hi = nested_paired_interval(vb, va)
                row.update({f"{metric}_diff": mean, f"{metric}_low": lo, f"{metric}_high": hi})
                if metric == "spearman":
                    _, lo_fixed, hi_fixed = nested_paired_interval(vb, va, resample_groups=False)
                    per_seed = (va - vb).mean(dim=1)  # (S,)
                    row.update({"spearman_low_fixed_models": lo_fixed, "spearman_high_fixed_models": hi_fixed,
                                "seeds_a_better": f"{int((per_seed > 0).sum())}/{len(results)}"})
            rows.append(row)
    return rows


def block_rows(name: str, s: Setup, results: Sequence[SeedResult]) -> list[dict[str, Any]]:
    """Per matrix (F, its damped inverse) and layer (and "all"): relative Frobenius errors, mean over model seeds."""
    sizes = {l.name: l.d_out * l.d_in_h for l in s.layers}
    rows = []
    for matrix, per_layer in results[0].blocks.items():
        for layer, labels in per_layer.items():
            row: dict[str, Any] = {"model": name, "matrix": matrix, "layer": layer,
                                   "params": sizes.get(layer, sum(sizes.values()))}
            errors = [r.blocks[matrix][layer] for r in results]
            for label in labels:
                row[label] = sum(e[label] for e in errors) / len(errors)
            wins = sum(e[EXPECTED] < e[KFAC] for e in errors)
            row["seeds_ekfac_expected_below_kfac"] = f"{wins}/{len(results)}"
            rows.append(row)
    return rows


NOTES = """
Correlation of approximate influence with exact influence (exact damped Gauss-Newton matrix of the tracked
layers = true Fisher, float64, inverted), over {seeds} trained models per model kind (model seeds {seed_list}:
initialization and, for GPT-2, minibatch order; the same data). Per query over all training examples, then the
mean over model seeds and queries (`*_min`: the worst query of any model). Every fitted method is fitted once
per model, with fit seed = model seed (topm k: the k - 1 most probable labels enumerated, one tail draw; k / k':
k' draws in stage 3). Same
gradients and same per-layer damping (0.1 x trace(F_ll)/P_l) for every method; only the curvature differs.
`*_bd` columns: against the exact influence of the layer-block-diagonal GGN (the exact within-layer blocks, none
between layers), which is what EK-FAC, K-FAC and every per-layer method approximate: there the gap to 1.0 is
what the Kronecker-eigenbasis approximation costs, apart from the layer-wise split. The last row is that
layer-block-diagonal exact influence against full exact influence (the bound for per-layer methods).
`fit_seconds`: one fit (tiny models, so this mostly measures per-pass overhead; the machine's load moves it).
"""

PAIRED_NOTES = """
Paired differences (method a - method b) of the per-query correlations, per reference, mean over (model seed,
query) pairs. `*_low` / `*_high`: 95% two-level bootstrap interval (10,000 draws: the model seeds resampled with
replacement, then the queries within each drawn model seed), an interval for models trained like these. With
{seeds} model seeds it is only as good as {seeds} clusters allow. `spearman_*_fixed_models`: the queries
resampled within each model seed, the seeds kept (an interval for these {seeds} models). `seeds_a_better`: model
seeds whose mean difference is > 0.
"""

BLOCK_NOTES = """
Curvature matrices against the exact GGN (per sequence, as Lambda), relative Frobenius error, mean over model
seeds. `F`: ||F_hat - F||_F / ||F||_F; `(F + D)^-1`: the same for the damped inverses (the suite's damping D),
which is what influence applies to a gradient. Per layer: the layer's block F_ll. `all`: the block-diagonal
matrix of all layers against the whole GGN (cross-layer blocks count as error; `exact GGN, block-diagonal` is
the error of dropping them alone). EK-FAC's Lambda (expected Fisher) is the Frobenius-optimal diagonal in the
K-FAC eigenbasis, so for `F` EK-FAC expected <= K-FAC expected per layer always (tested); for the inverse no
such ordering holds. `seeds_ekfac_expected_below_kfac`: model seeds where EK-FAC expected's error is the smaller.
"""


def run_exact(out: str | Path, quick: bool = False, command: str = "influence eval exact",
              echo: Callable[[str], Any] = print, model_seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Run the suite on one torch thread: on models this small, intra-op threads only add synchronization, and on a
    loaded machine they cost 100x and more (measured: the GPT-2 expected-Fisher fit 0.75 s on 1 thread, 175 s on 2
    at load average 8)."""
    with torch_threads(1):
        return _run(out, quick, command, echo, tuple(model_seeds) if model_seeds else None)


def _run(out: str | Path, quick: bool, command: str, echo: Callable[[str], Any],
         model_seeds: tuple[int, ...] | None) -> list[dict[str, Any]]:
    started = time.perf_counter()
    seeds = model_seeds or (QUICK_MODEL_SEEDS if quick else MODEL_SEEDS)
    progress = Progress(2 * len(seeds) * (len(_methods(quick)) + 2), echo)
    rows: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    for make in (classifier_setup, lm_setup):
        results, s = [], None
        for seed in seeds:
            s = make(quick, seed)
            results.append(evaluate(s, seed, progress, quick))
        rows += summary_rows(s.name, results)
        paired += paired_rows(s.name, results)
        blocks += block_rows(s.name, s, results)
    fmt = {"seeds": len(seeds), "seed_list": _seed_list(seeds)}
    parquet, md = write_table(out, "exact", rows, command, NOTES.format(**fmt), started,
                              sections=[("paired", PAIRED_NOTES.format(**fmt), paired),
                                        ("blocks", BLOCK_NOTES.format(**fmt), blocks)])
    echo(f"wrote {md}, {parquet}, exact_paired.parquet and exact_blocks.parquet")
    return rows + paired + blocks


def _seed_list(seeds: Sequence[int]) -> str:
    """Seeds as text: "0-19" for consecutive seeds, else "0, 3, 5"."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))
