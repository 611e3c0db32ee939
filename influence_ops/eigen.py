"""Stage 2: eigendecomposition of the Kronecker factors (docs/design.md section 2).

    A = Q_A diag(e_A) Q_A^T,   S = Q_S diag(e_S) Q_S^T

computed with ``torch.linalg.eigh`` in float64 after normalizing (sums / N_tok),
checking for NaN/Inf and symmetrizing ((C + C^T) / 2).

Large layers (paper Appendix A): with ``blocks = O > 1`` each factor is
approximated by its O diagonal blocks (contiguous index ranges), each
decomposed on its own; Q is then block diagonal. Memory and time of ``eigh``
fall from d^3 to d^3 / O^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .covariance import Covariances, LayerCovariance


@dataclass
class LayerEigen:
    """Eigenbases of one layer, float64.

    q_a: [d_in', d_in'] (columns are eigenvectors), e_a: [d_in'],
    q_s: [d_out, d_out], e_s: [d_out].
    """

    q_a: torch.Tensor
    e_a: torch.Tensor
    q_s: torch.Tensor
    e_s: torch.Tensor


def _block_ranges(d: int, blocks: int) -> list[tuple[int, int]]:
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def symmetric_eigh(matrix: torch.Tensor, name: str, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [d], eigenvectors [d, d]) of a covariance, float64.

    Raises:
        ValueError: NaN/Inf in the matrix (names ``name``) or a failed solver.
    """
    c = matrix.to(torch.float64)
    if not torch.isfinite(c).all():
        bad = int((~torch.isfinite(c)).sum())
        raise ValueError(f"{name}: covariance has {bad} NaN/Inf entries; cannot eigendecompose")
    c = (c + c.T) / 2
    d = c.shape[0]
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    values = torch.zeros(d, dtype=torch.float64, device=c.device)
    vectors = torch.zeros(d, d, dtype=torch.float64, device=c.device)
    for lo, hi in _block_ranges(d, blocks):
        try:
            e, q = torch.linalg.eigh(c[lo:hi, lo:hi])
        except torch.linalg.LinAlgError as err:
            raise ValueError(f"{name}: eigh failed on block [{lo}:{hi}]: {err}") from err
        values[lo:hi] = e
        vectors[lo:hi, lo:hi] = q
    return values, vectors


def eigendecompose(covariances: Covariances, blocks: int = 1) -> dict[str, LayerEigen]:
    """Eigendecompose A and S of every layer.

    Args:
        covariances: stage-1 sums.
        blocks: O, number of diagonal blocks per factor (1 = exact factor).

    Returns:
        name -> LayerEigen (float64).
    """
    return {name: eigendecompose_layer(name, cov, blocks) for name, cov in covariances.layers.items()}


def eigendecompose_layer(name: str, cov: LayerCovariance, blocks: int = 1) -> LayerEigen:
    """Eigendecompose one layer's A and S (on the sums' device: a GPU runs float64 ``eigh`` there too)."""
    a, s = cov.normalized()
    e_a, q_a = symmetric_eigh(a, f"layer {name} activation factor A", blocks)
    e_s, q_s = symmetric_eigh(s, f"layer {name} gradient factor S", blocks)
    return LayerEigen(q_a=q_a, e_a=e_a, q_s=q_s, e_s=e_s)
