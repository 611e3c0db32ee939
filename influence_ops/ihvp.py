"""Damped inverse-Hessian-vector products with EK-FAC (docs/design.md section 2).

For V of shape [..., d_out, d_in']:

    H^-1 V ~= Q_S [ (Q_S^T V Q_A) / (Lambda + lambda) ] Q_A^T

(paper Eq. 21). Cost per matrix: 2 d_out^2 d_in' + 2 d_out d_in'^2.
"""

from __future__ import annotations

import torch

from .factors import LayerFactors


def apply_inverse(factors: LayerFactors, v: torch.Tensor, damping: float | None = None) -> torch.Tensor:
    """(G + lambda I)^-1 v for one layer, computed in float64.

    Args:
        factors: the layer's factors.
        v: [..., d_out, d_in'].
        damping: absolute damping; None = 0.1 x mean(Lambda).

    Returns:
        [..., d_out, d_in'] in v's dtype.
    """
    lam = factors.eigenvalues.to(v.device)
    if tuple(v.shape[-2:]) != tuple(lam.shape):
        raise ValueError(f"vector has trailing shape {tuple(v.shape[-2:])}, layer expects {tuple(lam.shape)}")
    q_a = factors.eigen.q_a.to(v.device)
    q_s = factors.eigen.q_s.to(v.device)
    denom = lam + factors.damping(damping)
    if bool((denom <= 0).any()):
        raise ValueError("Lambda + damping has non-positive entries; use a positive damping")
    rotated = q_s.T @ v.to(torch.float64) @ q_a  # (..., d_out, d_in')
    return (q_s @ (rotated / denom) @ q_a.T).to(v.dtype)
