"""Influence scores of training sequences on preconditioned queries (docs/design.md section 2).

Symbols: Q queries, B training sequences, T tokens, L layers, d_out, d_in', r rank.

    I(q, m) = - grad f_q^T H^-1 grad L(z_m) = sum_l < P_l, G_{m,l} >_F

with P_l the preconditioned gradient of the query's NLL and G_{m,l} the gradient
of the training sequence's summed NLL (true labels). Positive: training on m
lowers the query's loss (makes the completion more likely).

Per-token: c_t = sum_l g_{t,l}^T P_l a_{t,l}; sum_t c_t = I(q, m) exactly.
Per-layer: the terms of the sum over l.
Two strategies (``strategy.py``) give the same numbers; the cost model picks one
per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gradients import backward_pass, sequence_gradient
from .layers import layers_by_name
from .objectives import Fisher, LanguageModelObjective, Objective
from .queries import LayerQuery, PreconditionedQueries
from .strategy import Strategy, choose_strategy


@dataclass
class ScoreResult:
    """Scores of one training batch.

    Attributes:
        scores: [Q, B] raw influence (paper sign).
        per_layer: [Q, B, L] or None; sums to ``scores`` over L.
        per_token: [Q, B, T] or None; sums to ``scores`` over T (0 at padding).
        losses: [B] training loss of each sequence (summed NLL).
        strategies: name -> the strategy used for that layer.
    """

    scores: torch.Tensor
    per_layer: torch.Tensor | None
    per_token: torch.Tensor | None
    losses: torch.Tensor
    strategies: dict[str, Strategy]


def score_materialized(a: torch.Tensor, g: torch.Tensor, query: LayerQuery) -> torch.Tensor:
    """<P_q, G_b> for all q, b via materialized G. a: [B, T, d_in'], g: [B, T, d_out] -> [Q, B]."""
    G = sequence_gradient(a, g)  # (B, d_out, d_in')
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
    """
    objective = objective or LanguageModelObjective()
    layers = layers_by_name(model, queries.layer_names)
    if per_token and strategy == Strategy.MATERIALIZE:
        raise ValueError("per-token scores need strategy PER_TOKEN or AUTO, not MATERIALIZE")
    out = backward_pass(model, layers, objective, train_batch, Fisher.EMPIRICAL, None, autocast_dtype)
    Q = queries.num_queries
    layer_scores: list[torch.Tensor] = []
    token_total: torch.Tensor | None = None
    used: dict[str, Strategy] = {}
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
        chosen = strategy
        if chosen == Strategy.AUTO:
            chosen = choose_strategy(B, T, Q, g.shape[-1], d_in, query.rank, per_token)
        used[layer.name] = chosen
        if chosen == Strategy.PER_TOKEN:
            contrib = score_per_token(a, g, query)  # (Q, B, T)
            layer_scores.append(contrib.sum(-1))
            if per_token:
                token_total = contrib if token_total is None else token_total + contrib
        else:
            layer_scores.append(score_materialized(a, g, query))
    stacked = torch.stack(layer_scores, dim=-1)  # (Q, B, L)
    return ScoreResult(
        scores=stacked.sum(-1),
        per_layer=stacked if per_layer else None,
        per_token=token_total if per_token else None,
        losses=out.losses,
        strategies=used,
    )
