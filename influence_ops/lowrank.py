"""Rank-r truncation of preconditioned query gradients (paper section 3.2.2).

P [d_out, d_in'] ~= U_r diag(sv_r) V_r^T; stored as left = U_r diag(sv_r)
[d_out, r] and right = V_r [d_in', r]. Relative error in Frobenius norm:
||P - P_r||_F / ||P||_F = sqrt(sum_{i>r} sv_i^2 / sum_i sv_i^2).
"""

from __future__ import annotations

import torch


def truncate(p: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factors of a batch of matrices, via SVD in float64.

    Args:
        p: [Q, d_out, d_in'].
        rank: r >= 1 (capped at min(d_out, d_in')).

    Returns:
        left [Q, d_out, r'], right [Q, d_in', r'], relative error [Q] (r' = capped rank).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u, sv, vh = torch.linalg.svd(p.to(torch.float64), full_matrices=False)  # (Q, d_out, k), (Q, k), (Q, k, d_in')
    r = min(rank, sv.shape[-1])
    left = u[..., :r] * sv[..., None, :r]  # (Q, d_out, r)
    right = vh[..., :r, :].transpose(-1, -2)  # (Q, d_in', r)
    total = (sv ** 2).sum(-1)
    tail = (sv[..., r:] ** 2).sum(-1)
    error = torch.where(total > 0, torch.sqrt(tail / total.clamp_min(1e-300)), torch.zeros_like(total))
    return left, right, error
