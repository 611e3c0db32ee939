"""`influence eval exact`: approximations against exact influence on tiny models.

Symbols: N training examples, Q queries, P tracked parameters (a few thousand).

Exact influence: I(q, n) = grad NLL_q^T (F + D)^-1 grad L_n with F the exact
Gauss-Newton matrix of the tracked layers (the true Fisher, an expectation over
the softmax; ``ggn.py``), averaged over training sequences as EK-FAC's Lambda is
(F = (1/N) sum_n J_n^T H_n J_n), and D the per-layer damping
lambda_l = 0.1 x trace(F_ll) / P_l (= 0.1 x mean(Lambda) of the exact
eigenvalue correction), used by every method alike. The methods differ only in
the curvature: EK-FAC fitted with k sampled label draws (k = 1, 2, 4, 8; the
mean over seeds), with k Gaussian probes (k = 1 and the default 4, in both
stages), with the expected Fisher, with the empirical Fisher; K-FAC
(the Kronecker eigenvalues e_S e_A instead of Lambda, scaled by tokens per
sequence to approximate the same per-sequence matrix, expected Fisher); and the
identity (the plain gradient dot product). All gradients are the same brute
force ones, so the table measures the curvature approximation alone. Per query,
Pearson and Spearman over the N training examples against exact; the table
gives the mean (and the minimum) over queries.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import influence_ops as ops
from influence_ops.objectives import token_nll

from .ggn import exact_ggn, flat_gradient, num_params, split_layers
from .metrics import per_query_correlations
from .report import Progress, write_table
from .tiny import (ClassBatch, ClassifierObjective, classifier_data, mlp_classifier, pattern_sequences,
                   tiny_lm, train_classifier, train_lm)

SAMPLES = (1, 2, 4, 8)


@dataclass
class Setup:
    """A tiny model with its data and the brute-force gradients.

    Attributes:
        train_grads: [N, P] gradients of the training losses (true labels).
        query_grads: [Q, P] gradients of the queries' NLL.
        examples: N callables returning an example's outputs [M, V] (for the GGN).
    """

    name: str
    model: nn.Module
    layers: list[ops.TrackedLayer]
    objective: Any
    fit_batches: list[Any]
    examples: list[Callable[[], torch.Tensor]]
    train_grads: torch.Tensor
    query_grads: torch.Tensor


def classifier_setup(quick: bool) -> Setup:
    n, d, hidden, classes, q = (16, 4, 6, 3, 4) if quick else (256, 6, 32, 5, 8)
    x, y = classifier_data(n + q, d, classes, seed=0)
    model = mlp_classifier(d, hidden, classes, seed=0)
    train_classifier(model, x[:n], y[:n], steps=30 if quick else 100)
    layers = ops.find_mlp_layers(model, pattern=r"^(0|2|4)$")
    ce = nn.functional.cross_entropy
    train_grads = torch.stack([flat_gradient(ce(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), layers)
                               for i in range(n)])
    query_grads = torch.stack([flat_gradient(ce(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), layers)
                               for i in range(n, n + q)])
    batches = [ClassBatch(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    examples = [lambda i=i: model(x[i:i + 1]) for i in range(n)]
    return Setup(f"MLP classifier ({num_params(layers)} tracked parameters, {n} examples)", model, layers,
                 ClassifierObjective(), batches, examples, train_grads, query_grads)


def lm_setup(quick: bool) -> Setup:
    vocab, width, inner, blocks, n, q = (12, 8, 8, 1, 8, 3) if quick else (32, 16, 32, 2, 48, 8)
    seqs = pattern_sequences(n, vocab, 5, 9, seed=0)
    model = tiny_lm(vocab, width, inner, blocks, seed=0)
    train_lm(model, pattern_sequences(4 * n, vocab, 5, 9, seed=1) + seqs, steps=20 if quick else 200)
    layers = ops.find_mlp_layers(model)
    train_grads = []
    for s in seqs:
        b = ops.collate([s])
        logits = model(input_ids=b.input_ids).logits
        train_grads.append(flat_gradient(token_nll(logits, b.labels).sum(), layers))
    held = pattern_sequences(q, vocab, 6, 8, seed=2)
    query_grads = []
    for s in held:
        b = ops.query_batch([s[:4]], [s[4:]])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        query_grads.append(flat_gradient(token_nll(logits, b.labels).sum(), layers))
    examples = [lambda s=s: model(input_ids=torch.tensor([s])).logits[0, :-1] for s in seqs]
    batches = [ops.collate(seqs[i:i + 16]) for i in range(0, n, 16)]
    return Setup(f"GPT-2, {blocks} block(s) ({num_params(layers)} tracked parameters, {n} sequences)", model,
                 layers, ops.LanguageModelObjective(), batches, examples, torch.stack(train_grads),
                 torch.stack(query_grads))


def layer_damping(ggn: torch.Tensor, layers: list[ops.TrackedLayer]) -> dict[str, float]:
    """lambda_l = 0.1 x trace(F_ll) / P_l."""
    out, lo = {}, 0
    for layer in layers:
        n = layer.d_out * layer.d_in_h
        out[layer.name] = 0.1 * float(torch.diagonal(ggn[lo:lo + n, lo:lo + n]).mean())
        lo += n
    return out


def exact_scores(s: Setup, ggn: torch.Tensor, damping: dict[str, float]) -> torch.Tensor:
    """[Q, N] grad NLL_q^T (F + D)^-1 grad L_n."""
    d = torch.cat([torch.full((l.d_out * l.d_in_h,), damping[l.name], dtype=torch.float64) for l in s.layers])
    solved = torch.linalg.solve(ggn + torch.diag(d), s.query_grads.T.to(torch.float64))  # (P, Q)
    return solved.T @ s.train_grads.to(torch.float64).T


def block_diagonal(ggn: torch.Tensor, layers: list[ops.TrackedLayer]) -> torch.Tensor:
    """[P, P] the exact GGN with the blocks between different layers zeroed (what any per-layer method assumes)."""
    out, lo = torch.zeros_like(ggn), 0
    for layer in layers:
        hi = lo + layer.d_out * layer.d_in_h
        out[lo:hi, lo:hi] = ggn[lo:hi, lo:hi]
        lo = hi
    return out


def kfac_layer(lf: ops.LayerFactors) -> ops.LayerFactors:
    """Kronecker eigenvalues e_S e_A (per token), scaled by tokens per sequence, in place of Lambda."""
    kron = torch.outer(lf.eigen.e_s, lf.eigen.e_a).to(torch.float64)  # (d_out, d_in')
    return dataclasses.replace(lf, lambda_sum=kron * lf.tokens)


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


def _methods(seeds: int, quick: bool = False) -> list[tuple[str, ops.Fisher, int, int]]:
    """(label, fisher, samples, seeds)."""
    return ([(f"EK-FAC sampled k={k}", ops.Fisher.SAMPLED, k, seeds) for k in (SAMPLES[:2] if quick else SAMPLES)]
            + [(f"EK-FAC gaussian k={k}", ops.Fisher.GAUSSIAN, k, seeds) for k in ((4,) if quick else (1, 4))]
            + [(f"EK-FAC topm k={k}" + (" (default)" if k == 3 else ""), ops.Fisher.TOPM, k, seeds)
               for k in ((3,) if quick else (2, 3, 4))]
            + [("EK-FAC expected", ops.Fisher.EXPECTED, 1, 1), ("EK-FAC empirical", ops.Fisher.EMPIRICAL, 1, 1)])


def evaluate(s: Setup, seeds: int, progress: Progress, quick: bool = False) -> list[dict[str, Any]]:
    start = time.perf_counter()
    n = len(s.examples)
    ggn = exact_ggn(s.examples, s.layers) / n
    damping = layer_damping(ggn, s.layers)
    exact = exact_scores(s, ggn, damping)
    progress.step(f"{s.name}: exact GGN {ggn.shape[0]} x {ggn.shape[0]} and its inverse", start)
    rows = []

    def row(method: str, scores: list[torch.Tensor], seconds: float) -> None:
        stats = [per_query_correlations(sc, exact) for sc in scores]
        mean = {k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}
        rows.append({"model": s.name, "method": method, "seeds": len(scores), **mean,
                     "fit_seconds": round(seconds / len(scores), 3)})

    expected = None
    for label, fisher, k, reps in _methods(seeds, quick):
        t0 = time.perf_counter()
        scores = []
        for seed in range(reps):
            f = ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=fisher, seed=seed, objective=s.objective,
                              samples=k)
            scores.append(factor_scores(s, f, damping))
            if fisher == ops.Fisher.EXPECTED:
                expected = f
        row(label, scores, time.perf_counter() - t0)
        progress.step(f"{s.name}: {label}", t0)
    t0 = time.perf_counter()
    row("K-FAC expected (no eigenvalue correction)", [factor_scores(s, expected, damping, kfac=True)], 0.0)
    row("identity (gradient dot product)", [s.query_grads.double() @ s.train_grads.double().T], 0.0)
    row("exact GGN, layer-block-diagonal (the bound for per-layer methods)",
        [exact_scores(s, block_diagonal(ggn, s.layers), damping)], 0.0)
    progress.step(f"{s.name}: K-FAC and identity", t0)
    return rows


NOTES = """
Correlation of approximate influence with exact influence (exact damped Gauss-Newton matrix of the tracked
layers = true Fisher, float64, inverted). Per query over all training examples, then averaged over queries
(`*_min`: the worst query). Sampled, Gaussian and topm rows: the mean over `seeds` fits (topm k: the k - 1
most probable labels enumerated, one tail draw). Same gradients and same
per-layer damping (0.1 x trace(F_ll)/P_l) for every method; only the curvature differs. `fit_seconds`: one fit (tiny models,
so this mostly measures per-pass overhead). The last row keeps the exact GGN but drops the blocks between
layers, as EK-FAC, K-FAC and every per-layer method do: the gap between it and 1.0 is what the layer-wise
assumption costs, the gap between EK-FAC and it what the Kronecker-eigenbasis approximation costs.
"""


def run_exact(out: str | Path, quick: bool = False, command: str = "influence eval exact",
              echo: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    started = time.perf_counter()
    seeds = 1 if quick else 3
    progress = Progress(2 * (len(_methods(seeds, quick)) + 2), echo)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for make in (classifier_setup, lm_setup):
        rows += evaluate(make(quick), seeds, progress, quick)
    parquet, md = write_table(out, "exact", rows, command, NOTES, started)
    echo(f"wrote {md} and {parquet}")
    return rows
