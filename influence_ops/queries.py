"""Preconditioned queries (docs/design.md section 2, "Query" and "Low-rank queries").

Symbols: Q queries, L tracked layers, d_out, d_in', r rank.

For a query (prompt, completion) the measurement is f = log p(completion | prompt)
summed over completion tokens. Its NLL gradient q_l = grad(-f) on layer l is
preconditioned, P_l = (G_l + lambda_l I)^-1 q_l (EK-FAC, ``apply_inverse``), and
kept dense [Q, d_out, d_in'] or as a rank-r truncated SVD (left [Q, d_out, r],
right [Q, d_in', r]) with its relative error per query and layer. The steps
(rotation, damping, low rank in the eigenbasis), their costs and the choice of
precision are in ``query_prep.py``.

Each query's self-influence q^T (G + lambda I)^-1 q, summed over layers, is kept
too: for rank-r queries from the stored factors (``self_influence.stored_query_self_influence``),
for dense ones from the damped rotated gradient M (``query_prep.dense_self_influence``, equal
to rotating the stored P back but without its cost): the cosine normalization divides by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .factors import EKFACFactors
from .fingerprint import check_same_model
from .gradients import backward_pass, per_sequence_gradients
from .layers import TrackedLayer, layers_by_name
from .objectives import Fisher, LanguageModelObjective, Objective
from .query_prep import QueryPrep, damped_middle, dense_self_influence, prepare_layer
from .self_influence import stored_query_self_influence


@dataclass
class LayerQuery:
    """One layer's preconditioned queries: ``dense`` [Q, d_out, d_in'] or ``left``/``right``."""

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError("a LayerQuery holds either dense or (left, right)")

    @property
    def num_queries(self) -> int:
        return int((self.dense if self.dense is not None else self.left).shape[0])

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[-1])

    def to_dense(self) -> torch.Tensor:
        """[Q, d_out, d_in']."""
        if self.dense is not None:
            return self.dense
        return self.left @ self.right.transpose(-1, -2)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerQuery:
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype))
        return LayerQuery(move(self.dense), move(self.left), move(self.right))


@dataclass
class PreconditionedQueries:
    """Preconditioned NLL gradients of Q queries on every tracked layer.

    Attributes:
        layers: name -> LayerQuery, in tracked-layer order.
        measurement: [Q] f = log p(completion | prompt) (summed over completion tokens).
        truncation_error: [Q, L] relative Frobenius error of the rank-r truncation (0 if dense).
        rank: r, or None for dense queries.
        fingerprint: model fingerprint of the factors used.
        factor_tokens: N_tok of those factors (used to normalize scores).
        damping: name -> the damping value used.
        query_ids: optional Q ids.
        self_influence: [Q] float64 q^T (G + lambda I)^-1 q over the layers, for
            the stored (dense or rank-r) P; None for queries saved without it.
    """

    layers: dict[str, LayerQuery]
    measurement: torch.Tensor
    truncation_error: torch.Tensor
    rank: int | None
    fingerprint: str
    factor_tokens: int
    damping: dict[str, float]
    query_ids: list[str] | None = field(default=None)
    self_influence: torch.Tensor | None = field(default=None)

    @property
    def num_queries(self) -> int:
        return int(self.measurement.shape[0])

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def check_model(self, layers: list[TrackedLayer]) -> None:
        """Raise ValueError unless ``layers`` are those of the model these queries were built on.

        ``score_batch`` does not repeat this check on every batch (hashing the
        weights costs time); call it once where the model and queries are loaded.
        """
        check_same_model(layers, self.layer_names, self.fingerprint, "queries", "built on")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PreconditionedQueries:
        return PreconditionedQueries({n: q.to(device, dtype) for n, q in self.layers.items()}, self.measurement,
                                     self.truncation_error, self.rank, self.fingerprint, self.factor_tokens,
                                     self.damping, self.query_ids, self.self_influence)

    def select(self, index: list[int]) -> PreconditionedQueries:
        """The queries at positions ``index`` (in that order): every [Q, ...] tensor indexed on its first axis."""
        i = torch.as_tensor(index, dtype=torch.long)
        pick = (lambda t: None if t is None else t[i])
        layers = {n: LayerQuery(pick(q.dense), pick(q.left), pick(q.right)) for n, q in self.layers.items()}
        ids = None if self.query_ids is None else [self.query_ids[j] for j in index]
        return PreconditionedQueries(layers, self.measurement[i], self.truncation_error[i], self.rank,
                                     self.fingerprint, self.factor_tokens, self.damping, ids, pick(self.self_influence))

    def concat(self, other: PreconditionedQueries) -> PreconditionedQueries:
        """Queries of ``self`` followed by those of ``other`` (same layers, rank and factors)."""
        if self.layer_names != other.layer_names or self.rank != other.rank or self.fingerprint != other.fingerprint:
            raise ValueError("cannot concatenate queries built with different layers, ranks or factors")
        cat = (lambda a, b: None if a is None else torch.cat([a, b]))
        layers = {n: LayerQuery(cat(q.dense, other.layers[n].dense), cat(q.left, other.layers[n].left),
                                cat(q.right, other.layers[n].right)) for n, q in self.layers.items()}
        ids = None if self.query_ids is None or other.query_ids is None else self.query_ids + other.query_ids
        self_inf = None if self.self_influence is None or other.self_influence is None else \
            torch.cat([self.self_influence, other.self_influence])
        return PreconditionedQueries(layers, torch.cat([self.measurement, other.measurement]),
                                     torch.cat([self.truncation_error, other.truncation_error]), self.rank,
                                     self.fingerprint, self.factor_tokens, self.damping, ids, self_inf)


def query_gradients(model: nn.Module, layers: list[TrackedLayer], batch: Any, objective: Objective,
                    autocast_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """NLL gradients of each query: (name -> [B, d_out, d_in'], measurement f [B])."""
    out = backward_pass(model, layers, objective, batch, Fisher.EMPIRICAL, None, autocast_dtype)
    return per_sequence_gradients(out.captured), -out.losses


def precondition_queries(
    model: nn.Module,
    factors: EKFACFactors,
    query_batches: Iterable[Any],
    rank: int | None = None,
    damping: float | None = None,
    objective: Objective | None = None,
    autocast_dtype: torch.dtype | None = None,
    query_ids: list[str] | None = None,
    prep: QueryPrep | None = None,
) -> PreconditionedQueries:
    """Preconditioned query gradients, dense (rank=None) or rank-r.

    Args:
        model: the model the factors were fitted on (checked by fingerprint).
        factors: EK-FAC factors.
        query_batches: batches whose labels cover completion tokens only
            (``query_batch``).
        rank: r for low-rank queries, None for dense.
        damping: absolute damping, None for 0.1 x mean(Lambda) per layer.
        query_ids: optional ids, one per query in batch order.
        prep: precision and low-rank method (``query_prep.QueryPrep``); default float64, exact SVD.
    """
    objective = objective or LanguageModelObjective()
    layers = layers_by_name(model, list(factors.layers))
    factors.check_model(layers)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    parts: dict[str, list[LayerQuery]] = {l.name: [] for l in layers}
    measurements, errors, self_infs = [], [], []
    prep = prep or QueryPrep()
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for batch in query_batches:
        out = backward_pass(model, layers, objective, batch, Fisher.EMPIRICAL, None, autocast_dtype)
        measurements.append((-out.losses).to("cpu", torch.float64))
        batch_errors = []
        batch_self = torch.zeros(out.losses.shape[0], dtype=torch.float64)
        for layer in layers:
            lf = factors.layers[layer.name]
            a, g = out.captured.activations[layer.name], out.captured.output_grads[layer.name]
            cast = (lambda t: None if t is None else t.to(dtype))
            if rank is None:  # dense: the self-influence from M, with no rotation of P back
                middle, q_s, q_a, denom = damped_middle(lf, a, g, damping, prep)
                query = LayerQuery(cast(q_s @ middle @ q_a.T), None, None)
                err = torch.zeros(middle.shape[0], dtype=torch.float64)
                batch_self += dense_self_influence(middle, denom).to("cpu")
                del middle
            else:
                _, left, right, err = prepare_layer(lf, a, g, rank, damping, prep)
                query = LayerQuery(None, cast(left), cast(right))
                # the P that scores use (rank-r, in the stored dtype)
                batch_self += stored_query_self_influence(lf, None, query.left, query.right,
                                                          lf.damping(damping)).to("cpu")
            parts[layer.name].append(query)
            batch_errors.append(err)
        del out
        errors.append(torch.stack(batch_errors, dim=1))  # (B, L)
        self_infs.append(batch_self)
    if not measurements:
        raise ValueError("precondition_queries got no query batches")
    cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
    merged = {n: LayerQuery(cat([q.dense for q in qs]), cat([q.left for q in qs]), cat([q.right for q in qs]))
              for n, qs in parts.items()}
    measurement = torch.cat(measurements)
    if query_ids is not None and len(query_ids) != measurement.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {measurement.shape[0]} queries")
    first = next(iter(factors.layers.values()))
    return PreconditionedQueries(
        layers=merged, measurement=measurement, truncation_error=torch.cat(errors),
        rank=None if rank is None else max(q.rank for q in merged.values()),
        fingerprint=factors.fingerprint, factor_tokens=first.tokens,
        damping={n: f.damping(damping) for n, f in factors.layers.items()}, query_ids=query_ids,
        self_influence=torch.cat(self_infs))
