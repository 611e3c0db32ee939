"""Normalizations of influence scores (``score_batch(normalize=...)``; DESIGN.md section 2).

Symbols: Q queries, B training sequences; H = G + lambda I the damped EK-FAC
Gauss-Newton matrix (block diagonal over the tracked layers).

    NONE        I(q, m)                                   the paper's raw influence
    COSINE      I(q, m) / sqrt(self_inf(q) self_inf(m))    RelatIF / TrackStar: both
                gradients unit-normalized in the H^-1 metric; in [-1, 1]
    TRAIN_NORM  I(q, m) / ||g_m||                          Euclidean norm of the training
                gradient over the tracked layers

self_inf(m) = g_m^T H^-1 g_m (``self_influence.py``); self_inf(q) is computed
when the queries are built (``PreconditionedQueries.self_influence``), from the
stored (rank-r or dense) preconditioned query, so that a rank-r query is the
same approximated query in the numerator and the denominator. A zero
denominator (a sequence with no loss tokens) gives a score of 0.
Per-layer and per-token scores are divided by the same per-(q, m) factor, so
they still add up to the score.
"""

from __future__ import annotations

import enum

import torch


class Normalize(str, enum.Enum):
    NONE = "none"
    COSINE = "cosine"
    TRAIN_NORM = "train_norm"


def normalizer(normalize: Normalize, query_self_influence: torch.Tensor | None,
               train_self_influence: torch.Tensor | None, train_norm: torch.Tensor | None) -> torch.Tensor | None:
    """The divisor [Q, B] (float64) of each score, or None for NONE.

    Args:
        query_self_influence: [Q] (COSINE).
        train_self_influence: [B] (COSINE).
        train_norm: [B] ||g_m|| (TRAIN_NORM).
    """
    if normalize == Normalize.NONE:
        return None
    if normalize == Normalize.COSINE:
        if query_self_influence is None:
            raise ValueError("normalize = cosine needs the queries' self-influence; rebuild the queries "
                             "(precondition_queries stores it)")
        q = query_self_influence.to(train_self_influence.device, torch.float64).clamp_min(0)
        return torch.sqrt(q[:, None] * train_self_influence.to(torch.float64).clamp_min(0)[None, :])
    return train_norm.to(torch.float64)[None, :]


def divide(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """x / divisor with 0 where divisor is 0. x: [Q, B, ...], divisor: [Q, B] -> x's shape and dtype."""
    d = divisor.to(x.device).reshape(divisor.shape + (1,) * (x.ndim - 2))
    safe = torch.where(d > 0, d, torch.ones_like(d))
    return torch.where(d > 0, x.to(torch.float64) / safe, torch.zeros_like(safe)).to(x.dtype)
