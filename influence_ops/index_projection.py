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

Preconditioner in the projected space: EK-FAC of the projected problem. Its Kronecker
eigenbasis is that of S~ and A~, which the rows of R_out and R_in already are, so
the preconditioner is diagonal there, with the projected eigenvalue correction

    Lambda~ = (U o U) Lambda (V o V)^T,   U = R_out Q_S [k_out, d_out],  V = R_in Q_A [k_in, d_in']

(o: elementwise product): Lambda~_ab = sum_ij Lambda_ij (r_out,a . q_s,i)^2 (r_in,b . q_a,j)^2, the
diagonal of R H R^T in that basis for the fitted EK-FAC H = (Q_S x Q_A) diag(Lambda) (Q_S x Q_A)^T.
A query gradient q becomes P~ = (R_out q R_in^T) / (Lambda~ + lambda) and its influence on a
sequence is the plain inner product

    I~(q, m) = sum_l < P~_l, G~_{m,l} >_F .

What is exact: for ``eigen``, U and V select rows of the identity, Lambda~ is the
restriction of Lambda and I~ is the fitted EK-FAC score restricted to the kept
eigen-directions (H is diagonal there, so restricting H^-1 and inverting the
restricted H agree); with k = full widths I~ equals the EK-FAC score exactly. The
same holds for any orthogonal full-width projection (U, V are then signed
permutations). With k < d and ``random``, I~ is the EK-FAC of the projected gradients,
an approximation; the damping lambda is the fitted layer's.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .factors import EKFACFactors, LayerFactors
from .storage import write_json_atomic

INDEX_FORMAT = "influence-index-projection-1"
TENSORS, META = "projection.safetensors", "projection.json"


class ProjectionKind(str, enum.Enum):
    EIGEN = "eigen"
    RANDOM = "random"


@dataclass
class LayerProjection:
    """One layer's projection. r_out: [k_out, d_out], r_in: [k_in, d_in'] (orthonormal rows);
    lam: [k_out, k_in] float64 Lambda~; damping: the layer's lambda."""

    r_out: torch.Tensor
    r_in: torch.Tensor
    lam: torch.Tensor
    damping: float

    @property
    def width(self) -> int:
        """k_out * k_in: this layer's entries of an index row."""
        return int(self.r_out.shape[0] * self.r_in.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerProjection:
        move = (lambda t: t.to(device=device, dtype=dtype or t.dtype))
        return LayerProjection(move(self.r_out), move(self.r_in), self.lam.to(device), self.damping)


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


def project_layer(lf: LayerFactors, kind: ProjectionKind, k_out: int, k_in: int, generator: torch.Generator,
                  damping: float | None = None) -> LayerProjection:
    """One layer's projection (float64); k_out, k_in are clipped to d_out, d_in'."""
    eig = lf.eigen
    q_s, e_s, q_a, e_a = (t.to("cpu", torch.float64) for t in (eig.q_s, eig.e_s, eig.q_a, eig.e_a))
    k_out, k_in = min(k_out, q_s.shape[0]), min(k_in, q_a.shape[0])
    if kind == ProjectionKind.EIGEN:
        r_out = q_s[:, torch.argsort(e_s, descending=True)[:k_out]].T.contiguous()  # (k_out, d_out)
        r_in = q_a[:, torch.argsort(e_a, descending=True)[:k_in]].T.contiguous()  # (k_in, d_in')
    else:
        r_out = _rotate_to_eigenbasis(_orthonormal_rows(q_s.shape[0], k_out, generator), q_s, e_s)
        r_in = _rotate_to_eigenbasis(_orthonormal_rows(q_a.shape[0], k_in, generator), q_a, e_a)
    return LayerProjection(r_out, r_in, projected_eigenvalues(r_out, r_in, lf), lf.damping(damping))


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
                                 factors.layers[n].damping(damping)) for n, p in proj.layers.items()}
    return IndexProjection(layers, proj.kind, proj.fingerprint)


def make_projection(factors: EKFACFactors, kind: ProjectionKind | str = ProjectionKind.EIGEN, k_out: int = 16,
                    k_in: int = 16, seed: int = 0, damping: float | None = None) -> IndexProjection:
    """The index projection of every layer of ``factors``.

    Args:
        kind: EIGEN (top eigenvectors of S and A) or RANDOM (seeded Gaussian).
        k_out, k_in: projected widths (clipped per layer to d_out, d_in').
        seed: seed of RANDOM (one generator, layers drawn in order).
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
    """P~ = G~ / (Lambda~ + lambda) per layer. rows: [Q, D] compressed query gradients -> [Q, D] float64."""
    denom = torch.cat([(p.lam + p.damping).flatten() for p in proj.layers.values()]).to(rows.device)
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
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    write_json_atomic(out / META, {"format": INDEX_FORMAT, "kind": proj.kind.value, "layers": list(proj.layers),
                                   "damping": [p.damping for p in proj.layers.values()],
                                   "model_fingerprint": proj.fingerprint, "width": proj.width, **(extra or {})})
    return out


def load_projection(directory: str | os.PathLike, device: torch.device | str = "cpu") -> IndexProjection:
    path = Path(directory) / META
    if not path.exists():
        raise FileNotFoundError(f"{path}: no projection.json; the index projection is missing or incomplete")
    meta = json.loads(path.read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {INDEX_FORMAT!r}; rebuild the index")
    t = load_file(str(Path(directory) / TENSORS), device=str(device))
    layers = {n: LayerProjection(t[f"{i}.r_out"], t[f"{i}.r_in"], t[f"{i}.lam"], float(meta["damping"][i]))
              for i, n in enumerate(meta["layers"])}
    return IndexProjection(layers, ProjectionKind(meta["kind"]), meta["model_fingerprint"])
