"""Influence scores of training sequences on preconditioned queries (docs/design.md section 2).

Symbols: Q queries, B training sequences, T tokens, L layers, d_out, d_in', r rank.

    I(q, m) = - grad f_q^T H^-1 grad L(z_m) = sum_l < P_l, G_{m,l} >_F

with P_l the preconditioned gradient of the query's NLL and G_{m,l} the gradient
of the training sequence's summed NLL (true labels). Positive: training on m
lowers the query's loss (makes the completion more likely).

Per-token: c_t = sum_l g_{t,l}^T P_l a_{t,l}; sum_t c_t = I(q, m) exactly.
Per-layer: the terms of the sum over l.
Two strategies (``strategy.py``) give the same numbers; the cost model picks one
per layer. Queries kept in the eigenbasis (``query_basis.py``) score the rotated
training side, <M, Q_S^T G_m Q_A>, the same numbers to rounding. With ``factors``, every sequence's self-influence g^T (G + lambda I)^-1 g
is computed too (``self_influence.py``), by the cheapest exact way per layer;
``normalize`` divides the scores as in ``normalize.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .gradients import backward_pass, sequence_gradient
from .factors import EKFACFactors
from .layers import layers_by_name
from .normalize import Normalize, divide, normalizer
from .fisher import Fisher
from .objectives import LanguageModelObjective, Objective
from .queries import LayerQuery, PreconditionedQueries
from .self_influence import damped_eigenvalues, gram_norm_sq, rotate_gradient, rotate_tokens, rotated_self_influence
from .strategy import Strategy, norm_costs, plan


@dataclass
class ScoreResult:
    """Scores of one training batch.

    Attributes:
        scores: [Q, B] raw influence (paper sign).
        per_layer: [Q, B, L] or None; sums to ``scores`` over L.
        per_token: [Q, B, T] or None; sums to ``scores`` over T (0 at padding).
        losses: [B] training loss of each sequence (summed NLL).
        strategies: name -> the strategy used for that layer.
        self_influence: [B] float64 g^T (G + lambda I)^-1 g over the layers, or
            None (computed when ``factors`` is given).
        train_norm: [B] float64 ||g|| (Euclidean, over the layers), or None
            (computed with self-influence or for TRAIN_NORM).
        rotations: name -> how that layer's rotated gradient was formed.
    """

    scores: torch.Tensor
    per_layer: torch.Tensor | None
    per_token: torch.Tensor | None
    losses: torch.Tensor
    strategies: dict[str, Strategy]
    self_influence: torch.Tensor | None = None
    train_norm: torch.Tensor | None = None
    rotations: dict[str, str] = field(default_factory=dict)


def score_materialized(a: torch.Tensor, g: torch.Tensor, query: LayerQuery,
                       G: torch.Tensor | None = None) -> torch.Tensor:
    """<P_q, G_b> for all q, b via materialized G. a: [B, T, d_in'], g: [B, T, d_out] -> [Q, B]."""
    G = sequence_gradient(a, g) if G is None else G  # (B, d_out, d_in')
    P = query.to_dense()  # (Q, d_out, d_in')
    return P.reshape(P.shape[0], -1) @ G.reshape(G.shape[0], -1).T  # (Q, B)


def score_per_token(a: torch.Tensor, g: torch.Tensor, query: LayerQuery) -> torch.Tensor:
    """c_t = g_t^T P_q a_t for all q, b, t. a: [B, T, d_in'], g: [B, T, d_out] -> [Q, B, T]."""
    B, T, d_in = a.shape
    d_out = g.shape[-1]
    a2 = a.reshape(B * T, d_in)  # (B*T, d_in')
    g2 = g.reshape(B * T, d_out)  # (B*T, d_out)
    if query.dense is not None:
        P = query.dense  # (Q, d_out, d_in')
        Q = P.shape[0]
        pa = (a2 @ P.reshape(Q * d_out, d_in).T).reshape(B * T, Q, d_out)  # (B*T, Q, d_out)
        c = torch.einsum("nqo,no->nq", pa, g2)  # (B*T, Q)
    else:
        Q, _, r = query.left.shape
        gu = (g2 @ query.left.permute(1, 0, 2).reshape(d_out, Q * r)).reshape(B * T, Q, r)  # (B*T, Q, r)
        av = (a2 @ query.right.permute(1, 0, 2).reshape(d_in, Q * r)).reshape(B * T, Q, r)  # (B*T, Q, r)
        c = (gu * av).sum(-1)  # (B*T, Q)
    return c.T.reshape(Q, B, T)


def score_batch(
    model: nn.Module,
    queries: PreconditionedQueries,
    train_batch: Any,
    per_layer: bool = False,
    per_token: bool = False,
    strategy: Strategy = Strategy.AUTO,
    objective: Objective | None = None,
    autocast_dtype: torch.dtype | None = None,
    factors: EKFACFactors | None = None,
    normalize: Normalize = Normalize.NONE,
) -> ScoreResult:
    """Influence of every sequence of ``train_batch`` on every query.

    Args:
        model: the model (no parameter .grad is written).
        queries: preconditioned queries, ideally already on the model's device
            and in float32 (``queries.to(device)``); cast here otherwise.
        train_batch: a batch for ``objective`` (``TokenBatch`` by default),
            scored with its true labels.
        per_layer: also return [Q, B, L].
        per_token: also return [Q, B, T] (forces the PER_TOKEN strategy).
        strategy: AUTO (cost model per layer), MATERIALIZE or PER_TOKEN.
        autocast_dtype: bf16/fp16 autocast of forward/backward; products in float32.
        factors: the EK-FAC factors the queries were built with; when given,
            ``self_influence`` (and ``train_norm``) of every sequence is computed,
            with the queries' damping. Required for COSINE.
        normalize: NONE (raw influence), COSINE or TRAIN_NORM (``normalize.py``);
            scores, per-layer and per-token scores are all divided.
    """
    objective = objective or LanguageModelObjective()
    normalize = Normalize(normalize)
    if normalize == Normalize.COSINE and factors is None:
        raise ValueError("normalize = cosine needs the factors (score_batch(factors=...))")
    want_self = factors is not None
    want_norm = want_self or normalize == Normalize.TRAIN_NORM
    layers = layers_by_name(model, queries.layer_names)
    if per_token and strategy == Strategy.MATERIALIZE:
        raise ValueError("per-token scores need strategy PER_TOKEN or AUTO, not MATERIALIZE")
    out = backward_pass(model, layers, objective, train_batch, Fisher.EMPIRICAL, None, autocast_dtype)
    Q = queries.num_queries
    layer_scores: list[torch.Tensor] = []
    token_total: torch.Tensor | None = None
    used: dict[str, Strategy] = {}
    rotations: dict[str, str] = {}
    self_inf: torch.Tensor | None = None
    norm_sq: torch.Tensor | None = None
    for layer in layers:
        a = out.captured.activations[layer.name]  # (B, T, d_in')
        g = out.captured.output_grads[layer.name]  # (B, T, d_out)
        query = queries.layers[layer.name]
        if query.num_queries != Q:
            raise ValueError(f"layer {layer.name} holds {query.num_queries} queries, expected {Q}")
        probe = query.dense if query.dense is not None else query.left
        if probe.device != a.device or probe.dtype != a.dtype:
            query = query.to(a.device, a.dtype)
        B, T, d_in = a.shape
        q_shape = tuple(query.dense.shape[1:]) if query.dense is not None else \
            (query.left.shape[1], query.right.shape[1])
        if q_shape != (g.shape[-1], d_in):
            raise ValueError(f"layer {layer.name}: queries have shape {q_shape}, the layer {(g.shape[-1], d_in)}")
        rotated = query.in_eigenbasis
        chosen = plan(B, T, Q, g.shape[-1], d_in, query.rank, per_token, want_self, strategy, rotated)
        used[layer.name] = chosen.strategy
        G = None  # in the eigenbasis: G~ = Q_S^T G Q_A = R
        if rotated:
            q_s, q_a, query = query.q_s, query.q_a, query.coordinates()
            if chosen.rotation == "rotate_gradient":  # MATERIALIZE only
                G = q_s.T @ sequence_gradient(a, g) @ q_a  # (B, d_out, d_in')
            else:
                a, g = a @ q_a, g @ q_s  # (B, T, d_in'), (B, T, d_out): a~_t, g~_t
        if chosen.strategy == Strategy.PER_TOKEN:
            contrib = score_per_token(a, g, query)  # (Q, B, T)
            layer_scores.append(contrib.sum(-1))
            if per_token:
                token_total = contrib if token_total is None else token_total + contrib
        else:
            G = sequence_gradient(a, g) if G is None else G  # (B, d_out, d_in')
            layer_scores.append(score_materialized(a, g, query, G))
        if want_self:
            lf = factors.layers[layer.name]
            if rotated:  # a and g, or G, are already rotated
                R = sequence_gradient(a, g) if G is None else G
            elif chosen.rotation == "rotate_tokens":
                R = rotate_tokens(lf, a, g)
            else:
                R = rotate_gradient(lf, sequence_gradient(a, g) if G is None else G)
            rotations[layer.name] = chosen.rotation
            part = rotated_self_influence(R, damped_eigenvalues(lf, queries.damping[layer.name]))
            self_inf = part if self_inf is None else self_inf + part
            sq = R.to(torch.float64).pow(2).sum((-2, -1))  # ||R||_F = ||G||_F
        elif want_norm:
            if G is None:
                costs = norm_costs(B, T, g.shape[-1], d_in)
                G = sequence_gradient(a, g) if costs["materialize"] <= costs["gram"] else None
            sq = gram_norm_sq(a, g) if G is None else G.to(torch.float64).pow(2).sum((-2, -1))
        if want_norm:
            norm_sq = sq if norm_sq is None else norm_sq + sq
    stacked = torch.stack(layer_scores, dim=-1)  # (Q, B, L)
    train_norm = None if norm_sq is None else norm_sq.sqrt()
    scores = stacked.sum(-1)
    divisor = normalizer(normalize, queries.self_influence, self_inf, train_norm)
    if divisor is not None:
        scores, stacked = divide(scores, divisor), divide(stacked, divisor)
        token_total = None if token_total is None else divide(token_total, divisor)
    return ScoreResult(
        scores=scores,
        per_layer=stacked if per_layer else None,
        per_token=token_total if per_token else None,
        losses=out.losses,
        strategies=used,
        self_influence=self_inf,
        train_norm=train_norm,
        rotations=rotations,
    )
