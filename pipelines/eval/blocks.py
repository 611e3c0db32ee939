"""Per-layer curvature blocks of EK-FAC and K-FAC as matrices, against the exact Gauss-Newton block.

Symbols: P_l = d_out * d_in' parameters of layer l, laid out as ``ggn.py`` lays
them out (the [d_out, d_in'] matrix W' flattened row-major).

With K = Q_S (x) Q_A (``torch.kron``; vec_row(Q_S^T W Q_A) = K^T vec_row(W)) the
per-layer methods' curvature blocks are

    EK-FAC:  F_hat_ll = K diag(vec Lambda) K^T,      Lambda = lambda_sum / N_seq
    K-FAC:   F_hat_ll = K diag(vec(e_S e_A^T) * N_tok / N_seq) K^T = (S (x) A) * N_tok / N_seq

For a fixed eigenbasis K, the diagonal D minimizing ||K D K^T - F_ll||_F is
D = diag(K^T F_ll K) (K is orthogonal), and with the expected Fisher EK-FAC's
Lambda is exactly that diagonal for the exact F_ll (the sum over label
positions t and classes v of the squared rotated gradients of sqrt(p_tv) NLL_t(v)
is diag(K^T J^T H J K)); so ||F_hat - F||_F of EK-FAC (expected) <= that of
K-FAC (expected), which shares its eigenbasis. Both ignore the blocks between
layers. Influence applies the damped inverse (F_hat + D)^-1, for which no such
ordering holds (the Frobenius norm weighs the large eigenvalues, the inverse the
small ones); ``block_errors(..., damping=...)`` measures it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

import influence_ops as ops

from .ggn import layer_slices


def kfac_layer(lf: ops.LayerFactors) -> ops.LayerFactors:
    """Kronecker eigenvalues e_S e_A (per token), scaled by tokens per sequence, in place of Lambda."""
    kron = torch.outer(lf.eigen.e_s, lf.eigen.e_a).to(torch.float64)  # (d_out, d_in')
    return dataclasses.replace(lf, lambda_sum=kron * lf.tokens)


def layer_curvature(lf: ops.LayerFactors) -> torch.Tensor:
    """[P_l, P_l] K diag(vec Lambda) K^T, float64 (pass ``kfac_layer(lf)`` for K-FAC)."""
    k = torch.kron(lf.eigen.q_s.to(torch.float64), lf.eigen.q_a.to(torch.float64))  # (P_l, P_l)
    return (k * lf.eigenvalues.reshape(1, -1)) @ k.T


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F."""
    return float(torch.linalg.matrix_norm(approx - exact) / torch.linalg.matrix_norm(exact))


def block_diagonal(ggn: torch.Tensor, layers: Sequence[ops.TrackedLayer]) -> torch.Tensor:
    """[P, P] ``ggn`` with the blocks between different layers zeroed (what any per-layer method assumes)."""
    out = torch.zeros_like(ggn)
    for sl in layer_slices(layers).values():
        out[sl, sl] = ggn[sl, sl]
    return out


def block_errors(ggn: torch.Tensor, layers: Sequence[ops.TrackedLayer], methods: dict[str, dict[str, ops.LayerFactors]],
                 damping: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Relative Frobenius error of each method's curvature, per layer block and over the whole matrix.

    Args:
        ggn: [P, P] the exact Gauss-Newton matrix (per sequence, as Lambda: divided by N).
        layers: the tracked layers, in the order of ``ggn``.
        methods: label -> layer name -> factors (``kfac_layer(lf)`` for K-FAC).
        damping: layer name -> lambda_l: compare the damped inverses (F_hat + D)^-1 with (F + D)^-1
            instead (what influence applies to a gradient); None: the matrices themselves.

    Returns:
        layer name, or "all" (the block-diagonal approximation against the whole ``ggn``,
        cross-layer blocks included) -> label -> error; "all" also has "exact GGN, block-diagonal".
    """
    slices = layer_slices(layers)
    d = None if damping is None else torch.cat([torch.full((sl.stop - sl.start,), damping[name], dtype=ggn.dtype)
                                                for name, sl in slices.items()])  # (P,)

    def seen(m: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        return m if d is None else torch.linalg.inv(m + torch.diag(d[sl]))

    out: dict[str, dict[str, float]] = {name: {} for name in slices}
    whole = {label: torch.zeros_like(ggn) for label in methods}
    for label, factors in methods.items():
        for name, sl in slices.items():
            block = layer_curvature(factors[name])
            out[name][label] = relative_error(seen(block, sl), seen(ggn[sl, sl], sl))
            whole[label][sl, sl] = block
    exact = seen(ggn)
    out["all"] = {label: relative_error(seen(m), exact) for label, m in whole.items()}
    out["all"]["exact GGN, block-diagonal"] = relative_error(seen(block_diagonal(ggn, layers)), exact)
    return out
