"""Self-influence and gradient norms of training sequences (DESIGN.md section 2).

Symbols: B sequences, T tokens, layer [d_out, d_in'], R the rotated gradient.

    self_inf(m) = sum_l g_{m,l}^T (G_l + lambda_l I)^-1 g_{m,l}
                = sum_l sum_ij (Q_S^T G_{m,l} Q_A)_ij^2 / (Lambda_l + lambda_l)_ij

with the EK-FAC eigenbases Q_A, Q_S, corrected eigenvalues Lambda_l and the
damping lambda_l of the queries. Since Q_A and Q_S are orthogonal,
||G_m||_F = ||R_m||_F: the Euclidean gradient norm comes with R for free.

R = Q_S^T G Q_A [B, d_out, d_in'] is computed one of two exact ways (the cost
model, ``strategy.rotation_costs`` within ``strategy.plan``, picks the cheaper):

    ROTATE_GRADIENT: R = Q_S^T G Q_A from the materialized G
        B T d_out d_in' (forming G; free when scoring materialized it)
        + B (d_out^2 d_in' + d_out d_in'^2)
    ROTATE_TOKENS:   R = sum_t (Q_S^T g_t)(Q_A^T a_t)^T, never forming G
        B T (d_out^2 + d_in'^2) + B T d_out d_in'

Query self-influence in the same metric: for a preconditioned query P (dense
or rank-r), q = (G + lambda I) P is the query gradient it stands for, and
q^T (G + lambda I)^-1 q = sum_ij (Q_S^T P Q_A)_ij^2 (Lambda + lambda)_ij. For a
dense P this is exactly the query's self-influence; for a rank-r P_r it is the
self-influence of the query that P_r preconditions, the same approximated query
that every score uses, so |cosine| <= 1 holds exactly (Cauchy-Schwarz).
"""

from __future__ import annotations

import torch

from .factors import LayerFactors


def _basis(factors: LayerFactors, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return factors.eigen.q_s.to(device, dtype), factors.eigen.q_a.to(device, dtype)


def damped_eigenvalues(factors: LayerFactors, damping: float) -> torch.Tensor:
    """Lambda + lambda, [d_out, d_in'] float64 (ValueError if an entry is not positive)."""
    denom = factors.eigenvalues + damping
    if bool((denom <= 0).any()):
        raise ValueError("Lambda + damping has non-positive entries; use a positive damping")
    return denom


def rotate_gradient(factors: LayerFactors, G: torch.Tensor) -> torch.Tensor:
    """R = Q_S^T G Q_A. G: [B, d_out, d_in'] -> [B, d_out, d_in'] (G's dtype)."""
    q_s, q_a = _basis(factors, G.device, G.dtype)
    return q_s.T @ G @ q_a


def rotate_tokens(factors: LayerFactors, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """R = sum_t (Q_S^T g_t)(Q_A^T a_t)^T. a: [B, T, d_in'], g: [B, T, d_out] -> [B, d_out, d_in']."""
    q_s, q_a = _basis(factors, a.device, a.dtype)
    return torch.einsum("bto,bti->boi", g @ q_s, a @ q_a)


def rotated_self_influence(R: torch.Tensor, damped: torch.Tensor) -> torch.Tensor:
    """sum_ij R_ij^2 / damped_ij. R: [B, d_out, d_in'], damped: [d_out, d_in'] -> [B] float64."""
    return (R.to(torch.float64) ** 2 / damped.to(R.device)).sum((-2, -1))


def query_self_influence(factors: LayerFactors, P: torch.Tensor, damping: float) -> torch.Tensor:
    """q^T (G + lambda I)^-1 q with q = (G + lambda I) P. P: [Q, d_out, d_in'] -> [Q] float64."""
    R = rotate_gradient(factors, P.to(torch.float64))
    return (R ** 2 * damped_eigenvalues(factors, damping).to(R.device)).sum((-2, -1))


def gram_norm_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||sum_t g_t a_t^T||_F^2 = sum_{t,u} (g_t . g_u)(a_t . a_u) without forming G. -> [B] float64.

    a: [B, T, d_in'], g: [B, T, d_out]; cost B T^2 (d_out + d_in').
    """
    return ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).to(torch.float64).sum((-2, -1))
