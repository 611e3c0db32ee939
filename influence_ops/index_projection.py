"""Compressed training gradients for an influence index (many queries at the cost of one corpus pass).

Symbols: B sequences, T tokens, Q queries, d_out, d_in' (homogeneous input width),
k_out <= d_out and k_in <= d_in' the projected widths, D = sum over layers of k_out k_in.

Per layer, two fixed projections with orthonormal rows, R_out [k_out, d_out] and
R_in [k_in, d_in'], compress a sequence's gradient G = sum_t g_t a_t^T:

    G~ = R_out G R_in^T = sum_t (R_out g_t)(R_in a_t)^T          [k_out, k_in]

computed from the per-token tensors without materializing G (per token:
k_out d_out + k_in d_in' + k_out k_in multiply-adds; ``compress_layer``).

Projections (``make_projection``):
  - ``eigen`` (curvature-aware): the rows are the eigenvectors of the fitted S and
    A with the largest eigenvalues (columns of Q_S and Q_A).
  - ``random``: seeded Gaussian matrices, orthonormalized (QR), then rotated into
    the eigenbasis of the projected factors S~ = R_out S R_out^T, A~ = R_in A R_in^T.
  - ``whitened`` (curvature-aware over all directions): seeded orthonormal Gaussian
    rows O_out, O_in times the damped inverse square roots of the factors,

        R_out = O_out W_S,  W_S = (S + delta_S I)^(-1/2) = Q_S diag(e_s + delta_S)^(-1/2) Q_S^T
        R_in  = O_in W_A,   W_A = (A + delta_A I)^(-1/2)

    (O rotated into the eigenbasis of the projected factors, as ``random``). Then
    <G~_q, G~_m>_F = <O (W_S q W_A) O^T, O (W_S m W_A) O^T>, and since
    E[O^T O] = (k/d) I for random orthonormal rows, c <G~_q, G~_m> with
    c = d_out d_in' / (k_out k_in) (``scale``) is an unbiased (Johnson-Lindenstrauss)
    estimate of the K-FAC influence with split damping, q^T [(S + delta_S I) x (A + delta_A I)]^-1 m,
    summed over ALL eigen-directions. ``eigen`` keeps only the k_out k_in directions of
    largest Lambda, which the inverse down-weights most: each contributes
    q_ij m_ij / (Lambda_ij + lambda), so the many directions with Lambda near or above
    lambda that ``eigen`` drops carry most of the score. The split of the damping
    (pi-damping of Martens & Grosse with the scale of Lambda matched to e_s e_a):
    delta_S = sqrt(lambda / mean(Lambda)) mean(e_s), delta_A = sqrt(lambda / mean(Lambda)) mean(e_a),
    so delta_S delta_A / (mean(e_s) mean(e_a)) = lambda / mean(Lambda).
    The EK-FAC correction is then fitted in the projected space as for the other kinds
    (the denominator below), which makes the score exact EK-FAC at full width.
    Measured (benchmarks/RESULTS.md section 6): LOWER recall than ``eigen`` and ``random``:
    the JL estimate over ~50,000 directions per layer with k_out k_in = 256 samples is too
    noisy; the top training sequences differ from the rest mostly in the large-eigenvalue
    directions, which whitening flattens.
  - ``weighted`` (the opposite tilt): R_out = O_out (S + delta_S I)^(1/2),
    R_in = O_in (A + delta_A I)^(1/2) (same O, delta and rotation): random directions
    drawn with weight sqrt(e + delta) towards the top eigen-directions, a soft ``eigen``
    that still samples the rest. Score as ``random`` (c = 1, the projected EK-FAC
    denominator; any row scaling cancels in P~ . G~). Exact EK-FAC at full width as
    ``whitened``. Measured: the best recall of the four on the benchmark model.

Preconditioner in the projected space: EK-FAC of the projected problem. Its Kronecker
eigenbasis is that of S~ and A~, which the rows of R_out and R_in already are, so
the preconditioner is diagonal there, with the projected eigenvalue correction

    Lambda~ = (U o U) Lambda (V o V)^T,   U = R_out Q_S [k_out, d_out],  V = R_in Q_A [k_in, d_in']

(o: elementwise product): Lambda~_ab = sum_ij Lambda_ij (r_out,a . q_s,i)^2 (r_in,b . q_a,j)^2, the
diagonal of R H R^T in that basis for the fitted EK-FAC H = (Q_S x Q_A) diag(Lambda) (Q_S x Q_A)^T.
A query gradient q becomes P~ = (R_out q R_in^T) / D with the denominator

    D = (Lambda~ + lambda N) / c,   N_ab = |r_out,a|^2 |r_in,b|^2     [k_out, k_in]

the diagonal of R (H + lambda I) R^T over the score scale c (``LayerProjection.denominator``;
orthonormal rows, ``eigen`` and ``random``: N = 1, c = 1, D = Lambda~ + lambda), and its
influence on a sequence is the plain inner product

    I~(q, m) = sum_l < P~_l, G~_{m,l} >_F .

What is exact: for ``eigen``, U and V select rows of the identity, Lambda~ is the
restriction of Lambda and I~ is the fitted EK-FAC score restricted to the kept
eigen-directions (H is diagonal there, so restricting H^-1 and inverting the
restricted H agree); with k = full widths I~ equals the EK-FAC score exactly. The
same holds for any orthogonal full-width projection (U, V are then signed
permutations). With k < d and ``random``, I~ is the EK-FAC of the projected gradients,
an approximation; the damping lambda is the fitted layer's. For ``whitened`` with full
widths and c = 1, R = O W with O orthogonal and rotated into the eigenbasis, i.e. a signed
permutation of diag(e + delta)^(-1/2) Q^T per factor: D_ij = (Lambda_ij + lambda) w_s,i^2 w_a,j^2
and I~ is again the EK-FAC score exactly. With k < d it is the JL estimate above with the
EK-FAC correction D applied diagonally in the projected basis.
The rows of ``whitened`` and ``weighted`` use the factors and damping of the build; after a refit
(``refit_preconditioner``) only Lambda~, lambda and so D follow the new factors (N and c are the rows').
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .factors import EKFACFactors, LayerFactors
from .storage import read_meta, write_json_atomic

INDEX_FORMAT = "influence-index-projection-1"
TENSORS, META = "projection.safetensors", "projection.json"


class ProjectionKind(str, enum.Enum):
    EIGEN = "eigen"
    RANDOM = "random"
    WHITENED = "whitened"
    WEIGHTED = "weighted"


@dataclass
class LayerProjection:
    """One layer's projection. r_out: [k_out, d_out], r_in: [k_in, d_in'] (orthonormal rows except
    ``whitened`` and ``weighted``); lam: [k_out, k_in] float64 Lambda~ = diag(R H R^T); damping: the layer's lambda;
    norms: [k_out, k_in] float64 N = |r_out,a|^2 |r_in,b|^2, None for orthonormal rows (N = 1);
    scale: c, the score scale (1 except ``whitened``: d_out d_in' / (k_out k_in))."""

    r_out: torch.Tensor
    r_in: torch.Tensor
    lam: torch.Tensor
    damping: float
    norms: torch.Tensor | None = None
    scale: float = 1.0

    @property
    def width(self) -> int:
        """k_out * k_in: this layer's entries of an index row."""
        return int(self.r_out.shape[0] * self.r_in.shape[0])

    def denominator(self) -> torch.Tensor:
        """D = (Lambda~ + lambda N) / c [k_out, k_in] float64: a query's P~ = G~ / D."""
        damp = self.damping if self.norms is None else self.damping * self.norms.to(self.lam.device)
        return (self.lam + damp) / self.scale

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerProjection:
        move = (lambda t: t.to(device=device, dtype=dtype or t.dtype))
        norms = None if self.norms is None else self.norms.to(device)
        return LayerProjection(move(self.r_out), move(self.r_in), self.lam.to(device), self.damping, norms, self.scale)


@dataclass
class IndexProjection:
    """Projections of every tracked layer (tracked-layer order), and what made them."""

    layers: dict[str, LayerProjection]
    kind: ProjectionKind
    fingerprint: str

    @property
    def width(self) -> int:
        """D: entries of one index row (all layers, concatenated in layer order)."""
        return sum(p.width for p in self.layers.values())

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> IndexProjection:
        return IndexProjection({n: p.to(device, dtype) for n, p in self.layers.items()}, self.kind, self.fingerprint)


def _orthonormal_rows(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[k, d] Gaussian rows, orthonormalized (QR of the [d, k] transpose)."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64))  # (d, k)
    return q.T.contiguous()


def _rotate_to_eigenbasis(r: torch.Tensor, q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Rows of r [k, d] rotated into the eigenbasis of r C r^T, C = q diag(e) q^T (largest first)."""
    c = (r @ q) * e @ (r @ q).T  # (k, k)
    vals, vecs = torch.linalg.eigh((c + c.T) / 2)
    vecs = vecs[:, torch.argsort(vals, descending=True)]
    return vecs.T @ r  # (k, d)


def whitening_damping(lf: LayerFactors, damping: float | None = None) -> tuple[float, float]:
    """(delta_S, delta_A) of ``whitened`` and ``weighted``: lambda split between the factors.

    Pi-damping (Martens & Grosse) with Lambda's scale matched to e_s e_a:

    delta_S = sqrt(lambda / mean(Lambda)) mean(e_s), delta_A = sqrt(lambda / mean(Lambda)) mean(e_a): the
    product is lambda in the units of e_s e_a, shared in proportion to each factor's mean eigenvalue.
    """
    lam, mean = lf.damping(damping), float(lf.eigenvalues.mean())
    e_s, e_a = (t.to("cpu", torch.float64).clamp_min(0) for t in (lf.eigen.e_s, lf.eigen.e_a))
    f = math.sqrt(lam / mean) if mean > 0 else 1.0
    d_s, d_a = f * float(e_s.mean()), f * float(e_a.mean())
    if not (d_s > 0 and d_a > 0):
        raise ValueError(f"whitened / weighted projection: damping split ({d_s}, {d_a}) is not positive; "
                         "use a positive damping")
    return d_s, d_a


def _damped_power(q: torch.Tensor, e: torch.Tensor, delta: float, power: float) -> torch.Tensor:
    """(C + delta I)^power [d, d], C = q diag(e) q^T (e clamped at 0)."""
    return (q * (e.clamp_min(0) + delta).pow(power)) @ q.T


def project_layer(lf: LayerFactors, kind: ProjectionKind, k_out: int, k_in: int, generator: torch.Generator,
                  damping: float | None = None) -> LayerProjection:
    """One layer's projection (float64); k_out, k_in are clipped to d_out, d_in'."""
    eig = lf.eigen
    q_s, e_s, q_a, e_a = (t.to("cpu", torch.float64) for t in (eig.q_s, eig.e_s, eig.q_a, eig.e_a))
    k_out, k_in = min(k_out, q_s.shape[0]), min(k_in, q_a.shape[0])
    norms, scale = None, 1.0
    if kind == ProjectionKind.EIGEN:
        r_out = q_s[:, torch.argsort(e_s, descending=True)[:k_out]].T.contiguous()  # (k_out, d_out)
        r_in = q_a[:, torch.argsort(e_a, descending=True)[:k_in]].T.contiguous()  # (k_in, d_in')
    elif kind == ProjectionKind.RANDOM:
        r_out = _rotate_to_eigenbasis(_orthonormal_rows(q_s.shape[0], k_out, generator), q_s, e_s)
        r_in = _rotate_to_eigenbasis(_orthonormal_rows(q_a.shape[0], k_in, generator), q_a, e_a)
    else:  # O (C + delta I)^(-+1/2), O rotated into the eigenbasis of the projected factors
        power = -0.5 if kind == ProjectionKind.WHITENED else 0.5
        d_s, d_a = whitening_damping(lf, damping)
        w_s, w_a = _damped_power(q_s, e_s, d_s, power), _damped_power(q_a, e_a, d_a, power)  # (d_out,)*2, (d_in',)*2
        r_out = _rotate_to_eigenbasis(_orthonormal_rows(q_s.shape[0], k_out, generator) @ w_s, q_s, e_s)
        r_in = _rotate_to_eigenbasis(_orthonormal_rows(q_a.shape[0], k_in, generator) @ w_a, q_a, e_a)
        norms = torch.outer((r_out * r_out).sum(1), (r_in * r_in).sum(1))  # (k_out, k_in)
        if kind == ProjectionKind.WHITENED:
            scale = q_s.shape[0] * q_a.shape[0] / (k_out * k_in)
    return LayerProjection(r_out, r_in, projected_eigenvalues(r_out, r_in, lf), lf.damping(damping), norms, scale)


def projected_eigenvalues(r_out: torch.Tensor, r_in: torch.Tensor, lf: LayerFactors) -> torch.Tensor:
    """Lambda~ = (U o U) Lambda (V o V)^T [k_out, k_in] float64, U = R_out Q_S, V = R_in Q_A.

    Cost: k_out d_out^2 + k_in d_in'^2 (U, V) + k_out d_out d_in' (the product).
    """
    q_s, q_a = lf.eigen.q_s.to("cpu", torch.float64), lf.eigen.q_a.to("cpu", torch.float64)
    u, v = r_out.to("cpu", torch.float64) @ q_s, r_in.to("cpu", torch.float64) @ q_a  # (k_out, d_out), (k_in, d_in')
    return (u * u) @ lf.eigenvalues.to("cpu") @ (v * v).T  # (k_out, k_in)


def refit_preconditioner(proj: IndexProjection, factors: EKFACFactors, damping: float | None = None) -> IndexProjection:
    """The same (fixed) projections with Lambda~ and lambda taken from ``factors``.

    An index keeps its rows when the factors are refitted (e.g. after shards are added):
    only the preconditioner, which queries use, follows the new factors. With the factors
    the projection was made from, this returns the same numbers.
    """
    if list(factors.layers) != list(proj.layers):
        raise ValueError(f"the index projection is for layers {list(proj.layers)}, the factors have "
                         f"{list(factors.layers)}")
    layers = {n: LayerProjection(p.r_out, p.r_in, projected_eigenvalues(p.r_out, p.r_in, factors.layers[n]),
                                 factors.layers[n].damping(damping), p.norms, p.scale) for n, p in proj.layers.items()}
    return IndexProjection(layers, proj.kind, proj.fingerprint)


def make_projection(factors: EKFACFactors, kind: ProjectionKind | str = ProjectionKind.EIGEN, k_out: int = 16,
                    k_in: int = 16, seed: int = 0, damping: float | None = None) -> IndexProjection:
    """The index projection of every layer of ``factors``.

    Args:
        kind: EIGEN (top eigenvectors of S and A), RANDOM (seeded Gaussian), WHITENED (seeded
            Gaussian times (S + delta_S I)^(-1/2), (A + delta_A I)^(-1/2)) or WEIGHTED (times the
            square roots (S + delta_S I)^(1/2), (A + delta_A I)^(1/2)).
        k_out, k_in: projected widths (clipped per layer to d_out, d_in').
        seed: seed of RANDOM, WHITENED, WEIGHTED (one generator, layers drawn in order).
        damping: absolute damping, None = 0.1 x mean(Lambda) per layer (as the queries).
    """
    kind = ProjectionKind(kind)
    if k_out < 1 or k_in < 1:
        raise ValueError(f"k_out and k_in must be >= 1, got {k_out}, {k_in}")
    gen = torch.Generator().manual_seed(seed)
    layers = {n: project_layer(lf, kind, k_out, k_in, gen, damping) for n, lf in factors.layers.items()}
    return IndexProjection(layers, kind, factors.fingerprint)


def compress_layer(p: LayerProjection, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G~ = sum_t (R_out g_t)(R_in a_t)^T. a: [B, T, d_in'], g: [B, T, d_out] -> [B, k_out, k_in]."""
    ga = g @ p.r_out.to(g.dtype).T  # (B, T, k_out)
    aa = a @ p.r_in.to(a.dtype).T  # (B, T, k_in)
    return torch.einsum("bto,bti->boi", ga, aa)


def project_gradient(p: LayerProjection, G: torch.Tensor) -> torch.Tensor:
    """R_out G R_in^T of materialized gradients. G: [..., d_out, d_in'] -> [..., k_out, k_in]."""
    return p.r_out.to(G.dtype) @ G @ p.r_in.to(G.dtype).T


def compress(proj: IndexProjection, activations: dict[str, torch.Tensor],
             output_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Index rows of a batch: per layer ``compress_layer``, flattened and concatenated -> [B, D]."""
    parts = [compress_layer(p, activations[n], output_grads[n]).flatten(1) for n, p in proj.layers.items()]
    return torch.cat(parts, dim=1)


def precondition(proj: IndexProjection, rows: torch.Tensor) -> torch.Tensor:
    """P~ = G~ / D per layer (``LayerProjection.denominator``; Lambda~ + lambda for orthonormal rows).

    rows: [Q, D] compressed query gradients -> [Q, D] float64.
    """
    denom = torch.cat([p.denominator().flatten() for p in proj.layers.values()]).to(rows.device)
    if bool((denom <= 0).any()):
        raise ValueError("Lambda~ + damping has non-positive entries; use a positive damping")
    return rows.to(torch.float64) / denom


def save_projection(proj: IndexProjection, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``projection.safetensors`` and (last) ``projection.json`` to ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, p in enumerate(proj.layers.values()):
        tensors.update({f"{i}.r_out": p.r_out, f"{i}.r_in": p.r_in, f"{i}.lam": p.lam})
        if p.norms is not None:
            tensors[f"{i}.norms"] = p.norms
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    write_json_atomic(out / META, {"format": INDEX_FORMAT, "kind": proj.kind.value, "layers": list(proj.layers),
                                   "damping": [p.damping for p in proj.layers.values()],
                                   "scale": [p.scale for p in proj.layers.values()],
                                   "model_fingerprint": proj.fingerprint, "width": proj.width, **(extra or {})})
    return out


def load_projection(directory: str | os.PathLike, device: torch.device | str = "cpu") -> IndexProjection:
    meta = read_meta(Path(directory) / META, INDEX_FORMAT, "the index projection", "format", "rebuild the index")
    t = load_file(str(Path(directory) / TENSORS), device=str(device))
    scales = meta.get("scale", [1.0] * len(meta["layers"]))  # absent: written before ``whitened`` existed
    layers = {n: LayerProjection(t[f"{i}.r_out"], t[f"{i}.r_in"], t[f"{i}.lam"], float(meta["damping"][i]),
                                 t.get(f"{i}.norms"), float(scales[i])) for i, n in enumerate(meta["layers"])}
    return IndexProjection(layers, ProjectionKind(meta["kind"]), meta["model_fingerprint"])
