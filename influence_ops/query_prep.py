"""Preparing preconditioned queries in the EK-FAC eigenbasis (DESIGN.md section 2, "Query").

Symbols: B queries in a batch, T tokens, layer [d_out, d_in'], r rank, k = r + oversample.

For a query gradient G = sum_t g_t a_t^T (paper Eq. 21):

    P = Q_S [ (Q_S^T G Q_A) / (Lambda + lambda) ] Q_A^T = Q_S M Q_A^T

Steps and their multiply-adds per query:

- rotate in, MATERIALIZED: form G (T d_out d_in'), then Q_S^T G Q_A
  (d_out^2 d_in' + d_out d_in'^2).
- rotate in, PER_TOKEN: rotate each token, g~_t = Q_S^T g_t, a~_t = Q_A^T a_t
  (T (d_out^2 + d_in'^2)), then M = sum_t g~_t a~_t^T (T d_out d_in'). Cheaper
  whenever T (d_out^2 + d_in'^2) < d_out d_in' (d_out + d_in'), i.e. for every
  query shorter than about min(d_out, d_in') tokens. Picked by that rule.
- damp: M = (rotated) / (Lambda + lambda), d_out d_in'.
- low rank in the eigenbasis: since Q_S and Q_A are orthogonal, the SVD
  M = U diag(sv) V^T gives P = (Q_S U) diag(sv) (Q_A V)^T, an SVD of P, and
  ||P - P_r||_F = ||M - M_r||_F: left = Q_S U_r diag(sv_r) [d_out, r],
  right = Q_A V_r [d_in', r] (d_out^2 r + d_in'^2 r), with no rotation back.
  EXACT: full SVD of M. RANDOMIZED: range finder with k columns and ``power``
  subspace iterations (Halko et al. 2011, Alg. 4.4), about
  (2 power + 2) k d_out d_in', seeded so the same queries give the same factors.
- dense queries rotate back: P = Q_S M Q_A^T (d_out^2 d_in' + d_out d_in'^2), unless they
  are kept in the eigenbasis for scoring (``query_basis.py``).

The relative truncation error ||M - U_r diag(sv_r) V_r^T||_F / ||M||_F of the returned
factors comes from the singular values (``truncation_error``); forming the residual
matrix instead took about a third of the low-rank step's time.
Precision FLOAT32 runs every step in float32 (TF32 on GPUs where the caller
enables it); FLOAT64 is the reference.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .factors import LayerFactors


class Precision(str, enum.Enum):
    FLOAT64 = "float64"
    FLOAT32 = "float32"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self is Precision.FLOAT64 else torch.float32


class LowRankMethod(str, enum.Enum):
    EXACT = "exact"
    RANDOMIZED = "randomized"


@dataclass(frozen=True)
class QueryPrep:
    """How queries are prepared: precision, low-rank method and its parameters."""

    precision: Precision = Precision.FLOAT64
    lowrank: LowRankMethod = LowRankMethod.EXACT
    oversample: int = 8
    power: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision(self.precision))
        object.__setattr__(self, "lowrank", LowRankMethod(self.lowrank))
        if self.oversample < 0 or self.power < 0:
            raise ValueError(f"oversample and power must be >= 0, got {self.oversample}, {self.power}")


def per_token_rotation(T: int, d_out: int, d_in: int) -> bool:
    """True when rotating each token is cheaper than rotating the materialized G (d_in means d_in')."""
    return T * (d_out * d_out + d_in * d_in) < d_out * d_in * (d_out + d_in)


def rotate_in(q_s: torch.Tensor, q_a: torch.Tensor, activations: torch.Tensor,
              output_grads: torch.Tensor) -> torch.Tensor:
    """Q_S^T G Q_A for G = sum_t g_t a_t^T, in the dtype of ``q_s``.

    Args:
        q_s: [d_out, d_out]; q_a: [d_in', d_in'].
        activations: a, [B, T, d_in']; output_grads: g, [B, T, d_out].

    Returns:
        [B, d_out, d_in'].
    """
    a = activations.to(q_a.dtype)
    g = output_grads.to(q_s.dtype)
    if per_token_rotation(a.shape[1], q_s.shape[0], q_a.shape[0]):
        return torch.einsum("bto,bti->boi", g @ q_s, a @ q_a)
    grads = torch.einsum("bto,bti->boi", g, a)  # (B, d_out, d_in')
    return q_s.T @ grads @ q_a


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y).Q


def svd_lowrank_batched(m: torch.Tensor, k: int, power: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Approximate top-k SVD of each matrix by a seeded randomized range finder.

    Args:
        m: [B, d_out, d_in']; k <= min(d_out, d_in').

    Returns:
        u [B, d_out, k], sv [B, k], vh [B, k, d_in'].
    """
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[-1], k, generator=gen, device=m.device, dtype=m.dtype)  # (d_in', k)
    basis = _orthonormal(m @ omega)  # (B, d_out, k)
    mt = m.transpose(-1, -2)
    for _ in range(power):
        basis = _orthonormal(m @ _orthonormal(mt @ basis))
    u_small, sv, vh = torch.linalg.svd(basis.transpose(-1, -2) @ m, full_matrices=False)  # (B, k, k), (B, k), (B, k, d_in')
    return basis @ u_small, sv, vh


def lowrank_factors(middle: torch.Tensor, rank: int, prep: QueryPrep = QueryPrep()
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factors of M itself (the eigenbasis): M_r = left right^T.

    Args:
        middle: M, [B, d_out, d_in'].
        rank: r >= 1 (capped at min(d_out, d_in')).

    Returns:
        left = U_r diag(sv_r) [B, d_out, r'], right = V_r [B, d_in', r'],
        relative Frobenius error ||M - M_r|| / ||M|| [B] (float64).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    full = min(middle.shape[-2:])
    r = min(rank, full)
    k = min(r + prep.oversample, full)
    if prep.lowrank is LowRankMethod.RANDOMIZED and k < full:
        u, sv, vh = svd_lowrank_batched(middle, k, prep.power, prep.seed)
    else:
        u, sv, vh = torch.linalg.svd(middle, full_matrices=False)
    u_r = u[..., :r] * sv[..., None, :r]  # (B, d_out, r)
    v_r = vh[..., :r, :].transpose(-1, -2)  # (B, d_in', r)
    return u_r, v_r, truncation_error(middle, sv.to(torch.float64), r)


def truncation_error(middle: torch.Tensor, sv: torch.Tensor, r: int) -> torch.Tensor:
    """||M - M_r||_F / ||M||_F [B] float64, without forming the d_out x d_in' residual.

    Both methods return M_r = U_r U_r^T M, an orthogonal projection of M, so
    ||M - M_r||^2 = ||M||^2 - ||sv_r||^2. When ``sv`` holds every singular value
    (full SVD) the tail sum ||sv_{r+1:}||^2 gives it without cancellation; after the
    randomized SVD (k < min(d_out, d_in') values) the difference is taken in float64
    (row norms in M's dtype, summed in float64), which in float32 leaves an absolute
    rounding of about 1e-3 on errors near 0.

    Args:
        middle: M, [B, d_out, d_in']; sv: [B, k] float64 singular values, descending.
    """
    if sv.shape[-1] == min(middle.shape[-2:]):
        total = (sv ** 2).sum(-1)
        dropped = (sv[..., r:] ** 2).sum(-1)
    else:
        total = (torch.linalg.vector_norm(middle, dim=-1).to(torch.float64) ** 2).sum(-1)  # rows, then float64
        dropped = (total - (sv[..., :r] ** 2).sum(-1)).clamp_min(0.0)
    return torch.where(total > 0, torch.sqrt(dropped / total.clamp_min(1e-300)), torch.zeros_like(total))


def lowrank_in_eigenbasis(middle: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor, rank: int,
                          prep: QueryPrep = QueryPrep()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r factors of P = Q_S M Q_A^T from an SVD of M (``lowrank_factors``, rotated to the weight basis).

    Args:
        middle: M, [B, d_out, d_in'].
        q_s: [d_out, d_out]; q_a: [d_in', d_in'].
        rank: r >= 1 (capped at min(d_out, d_in')).

    Returns:
        left [B, d_out, r'], right [B, d_in', r'], relative Frobenius error [B] (float64).
    """
    u_r, v_r, error = lowrank_factors(middle, rank, prep)
    return q_s @ u_r, q_a @ v_r, error


def damped_middle(factors: LayerFactors, activations: torch.Tensor, output_grads: torch.Tensor,
                  damping: float | None, prep: QueryPrep = QueryPrep()
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = (Q_S^T G Q_A) / (Lambda + lambda) from per-token a [B, T, d_in'] and g [B, T, d_out].

    Returns (M [B, d_out, d_in'], Q_S [d_out, d_out], Q_A [d_in', d_in'], in the precision's dtype;
    Lambda + lambda [d_out, d_in'] as stored).
    """
    dtype = prep.precision.dtype
    device = activations.device
    lam = factors.eigenvalues.to(device)
    if tuple(lam.shape) != (output_grads.shape[-1], activations.shape[-1]):
        raise ValueError(f"gradients of shape {(output_grads.shape[-1], activations.shape[-1])}, "
                         f"layer expects {tuple(lam.shape)}")
    denom = lam + factors.damping(damping)
    if bool((denom <= 0).any()):
        raise ValueError("Lambda + damping has non-positive entries; use a positive damping")
    q_s = factors.eigen.q_s.to(device=device, dtype=dtype)
    q_a = factors.eigen.q_a.to(device=device, dtype=dtype)
    middle = rotate_in(q_s, q_a, activations, output_grads) / denom.to(dtype)  # (B, d_out, d_in')
    return middle, q_s, q_a, denom


def dense_self_influence(middle: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """q^T (G + lambda I)^-1 q of dense queries P = Q_S M Q_A^T: sum M^2 (Lambda + lambda) -> [B] float64.

    Since Q_S^T P Q_A = M, no rotation is needed (``self_influence.query_self_influence``
    rotates a stored P back, 2 (d_out^2 d_in' + d_out d_in'^2) multiply-adds per query).
    """
    return (middle.to(torch.float64) ** 2 * denom.to(middle.device, torch.float64)).sum((-2, -1))


def lowrank_self_influence(left: torch.Tensor, right: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """q^T (G + lambda I)^-1 q of rank-r queries P_r = Q_S left right^T Q_A^T -> [B] float64.

    In the eigenbasis Q_S^T P_r Q_A = left right^T, so the sum of its squares times
    Lambda + lambda needs no rotation: B d_out d_in' r multiply-adds, one query at a time
    (rotating the stored weight-basis factors back cost about r (d_out^2 + d_in'^2) more per query).

    Args:
        left: [B, d_out, r]; right: [B, d_in', r] (eigenbasis, ``lowrank_factors``);
        denom: Lambda + lambda [d_out, d_in'].
    """
    d = denom.to(left.device, left.dtype)
    out = torch.zeros(left.shape[0], dtype=torch.float64, device=left.device)
    for i, (l, r) in enumerate(zip(left, right)):  # rows summed in the factors' dtype, then float64
        R = l @ r.T  # (d_out, d_in')
        out[i] = R.mul_(R).mul_(d).sum(-1).to(torch.float64).sum()
    return out


def prepare_layer(factors: LayerFactors, activations: torch.Tensor, output_grads: torch.Tensor,
                  rank: int | None, damping: float | None, prep: QueryPrep = QueryPrep()
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """One layer's preconditioned queries from per-token a and g.

    Args:
        activations: [B, T, d_in']; output_grads: [B, T, d_out].

    Returns:
        (dense [B, d_out, d_in'] or None, left [B, d_out, r'] or None, right [B, d_in', r'] or None,
        truncation error [B] float64 on the CPU), in the precision's dtype.
    """
    middle, q_s, q_a, _ = damped_middle(factors, activations, output_grads, damping, prep)
    if rank is None:
        return q_s @ middle @ q_a.T, None, None, torch.zeros(middle.shape[0], dtype=torch.float64)
    left, right, error = lowrank_in_eigenbasis(middle, q_s, q_a, rank, prep)
    return None, left, right, error.to("cpu")
