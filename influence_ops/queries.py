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
too, computed in the eigenbasis before any rotation back (``query_prep.dense_self_influence``
from the damped rotated gradient M, ``query_prep.lowrank_self_influence`` from the rank-r
factors; equal to rotating the stored P back but without its cost): the cosine normalization
divides by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .factors import EKFACFactors, LayerFactors
from .fingerprint import check_same_model
from .gradients import backward_pass, per_sequence_gradients
from .layers import TrackedLayer, layers_by_name
from .fisher import Fisher
from .objectives import LanguageModelObjective, Objective
from .query_basis import Basis, choose_basis
from .query_prep import QueryPrep, damped_middle, dense_self_influence, lowrank_factors, lowrank_self_influence
from .self_influence import damped_eigenvalues


@dataclass
class LayerQuery:
    """One layer's preconditioned queries: ``dense`` [Q, d_out, d_in'] or ``left``/``right``.

    With ``q_s`` [d_out, d_out] and ``q_a`` [d_in', d_in'] (the layer's eigenbases) the tensors
    are in the eigenbasis (``query_basis.py``): ``dense`` is M, ``left``/``right`` are
    U_r diag(sv_r) / V_r, and P = Q_S (left right^T) Q_A^T; scoring then rotates the training side.
    """

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    q_s: torch.Tensor | None = None
    q_a: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError("a LayerQuery holds either dense or (left, right)")
        if (self.q_s is None) != (self.q_a is None):
            raise ValueError("a LayerQuery in the eigenbasis needs both q_s and q_a")

    @property
    def num_queries(self) -> int:
        return int((self.dense if self.dense is not None else self.left).shape[0])

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[-1])

    @property
    def in_eigenbasis(self) -> bool:
        return self.q_s is not None

    def coordinates(self) -> LayerQuery:
        """The stored tensors alone, in whichever basis they are (no ``q_s``/``q_a``)."""
        return LayerQuery(self.dense, self.left, self.right)

    def to_weight_basis(self) -> LayerQuery:
        """The same queries in the weight basis (``self`` if already there).

        Cost per query: d_out^2 d_in' + d_out d_in'^2 (dense), r (d_out^2 + d_in'^2) (rank r).
        """
        if not self.in_eigenbasis:
            return self
        if self.dense is not None:
            return LayerQuery(self.q_s @ self.dense @ self.q_a.T)
        return LayerQuery(None, self.q_s @ self.left, self.q_a @ self.right)

    def to_dense(self) -> torch.Tensor:
        """[Q, d_out, d_in'], in the basis the tensors are stored in (see ``coordinates``)."""
        if self.dense is not None:
            return self.dense
        return self.left @ self.right.transpose(-1, -2)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerQuery:
        move = (lambda t: None if t is None else t.to(device=device, dtype=dtype or t.dtype))
        return LayerQuery(move(self.dense), move(self.left), move(self.right), move(self.q_s), move(self.q_a))


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

    @property
    def bases(self) -> dict[str, Basis]:
        """name -> the basis that layer's queries are kept in (``query_basis.py``)."""
        return {n: Basis.EIGEN if q.in_eigenbasis else Basis.WEIGHT for n, q in self.layers.items()}

    def to_weight_basis(self) -> PreconditionedQueries:
        """The same queries with every layer in the weight basis (what ``save_queries`` writes)."""
        return replace(self, layers={n: q.to_weight_basis() for n, q in self.layers.items()})

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
        layers = {n: LayerQuery(pick(q.dense), pick(q.left), pick(q.right), q.q_s, q.q_a)
                  for n, q in self.layers.items()}
        ids = None if self.query_ids is None else [self.query_ids[j] for j in index]
        return PreconditionedQueries(layers, self.measurement[i], self.truncation_error[i], self.rank,
                                     self.fingerprint, self.factor_tokens, self.damping, ids, pick(self.self_influence))

    def concat(self, other: PreconditionedQueries) -> PreconditionedQueries:
        """Queries of ``self`` followed by those of ``other`` (same layers, rank and factors)."""
        if self.layer_names != other.layer_names or self.rank != other.rank or self.fingerprint != other.fingerprint:
            raise ValueError("cannot concatenate queries built with different layers, ranks or factors")
        if self.bases != other.bases:  # both from the same factors (fingerprint), so the same eigenbases
            self, other = self.to_weight_basis(), other.to_weight_basis()
        cat = (lambda a, b: None if a is None else torch.cat([a, b]))
        layers = {n: LayerQuery(cat(q.dense, other.layers[n].dense), cat(q.left, other.layers[n].left),
                                cat(q.right, other.layers[n].right), q.q_s, q.q_a) for n, q in self.layers.items()}
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
    basis: Basis | str = Basis.WEIGHT,
    train_tokens: int | None = None,
    train_sequences: int | None = None,
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
        basis: where the queries are kept (``query_basis.py``): WEIGHT (default; what is saved
            and what the pipelines score), EIGEN (``score_batch`` rotates the training side),
            or AUTO: per layer the cheaper for scoring ``train_tokens`` tokens in
            ``train_sequences`` sequences (optional) with these queries. Scores agree to rounding.
    """
    objective = objective or LanguageModelObjective()
    basis = Basis(basis)
    if basis is Basis.AUTO and train_tokens is None:
        raise ValueError("basis = auto needs train_tokens (the number of training tokens to be scored)")
    layers = layers_by_name(model, list(factors.layers))
    factors.check_model(layers)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    # per layer: the batches' parts (stored LayerQuery, or the eigenbasis tensors still in the
    # preparation dtype while AUTO waits for Q), their self-influence [B] (None: not yet known)
    parts: dict[str, list[tuple[LayerQuery, torch.Tensor | None]]] = {l.name: [] for l in layers}
    rotations: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    measurements, errors = [], []
    prep = prep or QueryPrep()
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for batch in query_batches:
        out = backward_pass(model, layers, objective, batch, Fisher.EMPIRICAL, None, autocast_dtype)
        measurements.append((-out.losses).to("cpu", torch.float64))
        batch_errors = []
        for layer in layers:
            lf = factors.layers[layer.name]
            a, g = out.captured.activations[layer.name], out.captured.output_grads[layer.name]
            middle, q_s, q_a, denom = damped_middle(lf, a, g, damping, prep)
            rotations[layer.name] = (q_s, q_a)
            if rank is None:  # dense: the self-influence from M, with no rotation of P back
                part = LayerQuery(middle)
                err = torch.zeros(middle.shape[0], dtype=torch.float64)
                self_inf = dense_self_influence(middle, denom).to("cpu")
            else:
                left, right, err = lowrank_factors(middle, rank, prep)
                part = LayerQuery(None, left, right)
                self_inf = None
            del middle
            if basis is not Basis.AUTO:
                part, self_inf = _store(part, self_inf, basis, q_s, q_a, lf, lf.damping(damping), dtype)
            parts[layer.name].append((part, self_inf))
            batch_errors.append(err.to("cpu"))
        del out
        errors.append(torch.stack(batch_errors, dim=1))  # (B, L)
    if not measurements:
        raise ValueError("precondition_queries got no query batches")
    measurement = torch.cat(measurements)
    Q = int(measurement.shape[0])
    if query_ids is not None and len(query_ids) != Q:
        raise ValueError(f"{len(query_ids)} query ids for {Q} queries")
    merged: dict[str, LayerQuery] = {}
    self_influence = torch.zeros(Q, dtype=torch.float64)
    for name, layer_parts in parts.items():
        q_s, q_a = rotations[name]
        chosen = basis if basis is not Basis.AUTO else \
            choose_basis(Q, q_s.shape[0], q_a.shape[0], rank, train_tokens, train_sequences)
        if basis is Basis.AUTO:
            lf = factors.layers[name]
            layer_parts = [_store(p, s, chosen, q_s, q_a, lf, lf.damping(damping), dtype) for p, s in layer_parts]
        cat = (lambda ts: None if ts[0] is None else torch.cat(ts))
        stored = [p for p, _ in layer_parts]
        eigen = (q_s.to(dtype), q_a.to(dtype)) if chosen is Basis.EIGEN else (None, None)
        merged[name] = LayerQuery(cat([p.dense for p in stored]), cat([p.left for p in stored]),
                                  cat([p.right for p in stored]), *eigen)
        self_influence += torch.cat([s for _, s in layer_parts])
    first = next(iter(factors.layers.values()))
    return PreconditionedQueries(
        layers=merged, measurement=measurement, truncation_error=torch.cat(errors),
        rank=None if rank is None else max(q.rank for q in merged.values()),
        fingerprint=factors.fingerprint, factor_tokens=first.tokens,
        damping={n: f.damping(damping) for n, f in factors.layers.items()}, query_ids=query_ids,
        self_influence=self_influence)


def _store(part: LayerQuery, self_inf: torch.Tensor | None, basis: Basis, q_s: torch.Tensor, q_a: torch.Tensor,
           factors: LayerFactors, damping: float, dtype: torch.dtype) -> tuple[LayerQuery, torch.Tensor]:
    """One batch's eigenbasis tensors (preparation dtype) -> the stored tensors in ``basis`` and ``dtype``,
    with the query self-influence [B] (float64, CPU): given for dense, else that of the stored P_r."""
    if self_inf is None:  # rank r, still in the eigenbasis: Q_S^T P_r Q_A = left right^T
        self_inf = lowrank_self_influence(part.left, part.right, damped_eigenvalues(factors, damping))
    if basis is Basis.WEIGHT:
        part = LayerQuery(part.dense, part.left, part.right, q_s, q_a).to_weight_basis()
    probe = part.dense if part.dense is not None else part.left
    part = part.to(probe.device, dtype)
    return part, self_inf.to("cpu")
