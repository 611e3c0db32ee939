"""The influence index's math (``influence_ops.index_projection``) against brute force, float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from influence_ops import Fisher, backward_pass, find_mlp_layers, fit_ekfac, precondition_queries, score_batch
from influence_ops.gradients import sequence_gradient
from influence_ops.index_projection import (
    ProjectionKind,
    compress,
    compress_layer,
    load_projection,
    make_projection,
    precondition,
    project_gradient,
    refit_preconditioner,
    save_projection,
    whitening_damping,
)
from influence_ops.objectives import LanguageModelObjective
from ops_helpers import assert_close, batches_of, random_queries, random_sequences, tiny_gpt2

# Same sums in another order (float64).
EXACT_RTOL, EXACT_ATOL = 1e-9, 1e-12
# Full-width random projection: the projected eigenbasis comes from a second eigh (float64).
ROTATED_RTOL, ROTATED_ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def fitted():
    model = tiny_gpt2(seed=1)
    layers = find_mlp_layers(model)
    batches = batches_of(random_sequences(60, seed=2, min_len=6, max_len=12), 10)
    factors = fit_ekfac(model, layers, batches, fisher=Fisher.EMPIRICAL)
    return model, layers, factors


def captured(model, layers, batch):
    return backward_pass(model, layers, LanguageModelObjective(), batch, Fisher.EMPIRICAL).captured


def test_compressed_gradient_equals_projected_materialized_gradient(fitted):
    model, layers, factors = fitted
    proj = make_projection(factors, ProjectionKind.RANDOM, k_out=5, k_in=3, seed=4)
    cap = captured(model, layers, batches_of(random_sequences(6, seed=9), 6)[0])
    for layer in layers:
        a, g = cap.activations[layer.name], cap.output_grads[layer.name]
        p = proj.layers[layer.name]
        got = compress_layer(p, a, g)  # (B, 5, 3)
        assert got.shape == (6, 5, 3)
        assert_close(got, project_gradient(p, sequence_gradient(a, g)), EXACT_RTOL, EXACT_ATOL, layer.name)
    rows = compress(proj, cap.activations, cap.output_grads)
    assert rows.shape == (6, proj.width) and proj.width == len(layers) * 15


@pytest.mark.parametrize("kind", list(ProjectionKind))
def test_projected_preconditioner_equals_dense_formula(fitted, kind):
    """Lambda~ is the diagonal of R H R^T (dense, torch.kron) in the projected eigenbasis, which the rows are."""
    _, _, factors = fitted
    proj = make_projection(factors, kind, k_out=4, k_in=3, seed=5)
    for name, lf in factors.layers.items():
        p = proj.layers[name]
        q = torch.kron(lf.eigen.q_s, lf.eigen.q_a)  # (d_out d_in', d_out d_in')
        H = q @ torch.diag(lf.eigenvalues.flatten()) @ q.T  # fitted EK-FAC, dense
        R = torch.kron(p.r_out, p.r_in)  # (k_out k_in, d_out d_in')
        # orthonormal rows; whitened: O K^(-1/2) with O orthonormal, K = (S + d_S I) x (A + d_A I), i.e.
        # R K R^T = I; weighted: O K^(1/2), R K^-1 R^T = I
        K = {ProjectionKind.WHITENED: lambda: _damped_kron(lf),
             ProjectionKind.WEIGHTED: lambda: torch.linalg.inv(_damped_kron(lf))}.get(
            kind, lambda: torch.eye(R.shape[1], dtype=R.dtype))()
        assert_close(R @ K @ R.T, torch.eye(12, dtype=R.dtype), 1e-9, 1e-12, f"{name} orthonormal rows")
        Hp = R @ H @ R.T
        assert_close(p.lam.flatten(), torch.diagonal(Hp), 1e-8, 1e-12, f"{name} Lambda~")
        # the rows are the eigenbasis of the projected factors: S~ and A~ are diagonal
        for r, qm, e in ((p.r_out, lf.eigen.q_s, lf.eigen.e_s), (p.r_in, lf.eigen.q_a, lf.eigen.e_a)):
            c = (r @ qm) * e @ (r @ qm).T
            off = c - torch.diag(torch.diagonal(c))
            assert float(off.abs().max()) <= 1e-9 * float(c.abs().max()), f"{name}: projected factor not diagonal"
        # preconditioning = diagonal solve; for eigen projections = the dense projected inverse
        v = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        one = type(proj)({name: p}, proj.kind, proj.fingerprint)
        got = precondition(one, v)
        # D = diag(R (H + lambda I) R^T) / c (orthonormal rows: Lambda~ + lambda)
        want = torch.linalg.solve(torch.diag(torch.diagonal(Hp + p.damping * R @ R.T)) / p.scale, v.T).T
        assert_close(got, want, 1e-9, EXACT_ATOL, f"{name} P~")
        if kind == ProjectionKind.EIGEN:
            dense = torch.linalg.solve(Hp + p.damping * torch.eye(12, dtype=Hp.dtype), v.T).T
            assert_close(got, dense, 1e-8, 1e-12, f"{name} P~ vs (R H R^T + lambda I)^-1")


@pytest.mark.parametrize("kind", list(ProjectionKind))
def test_full_width_index_scores_equal_exact_ekfac_scores(fitted, kind, tmp_path):
    model, layers, factors = fitted
    wide = 10_000  # clipped to every layer's full width: an orthogonal projection
    proj = make_projection(factors, kind, k_out=wide, k_in=wide, seed=7)
    save_projection(proj, tmp_path)
    proj = load_projection(tmp_path)
    assert proj.width == sum(d_out * d_in for d_out, d_in in factors.shapes.values())
    qb = random_queries(4, seed=11)
    pq = precondition_queries(model, factors, [qb], rank=None)
    qc = captured(model, layers, qb)
    P = precondition(proj, compress(proj, qc.activations, qc.output_grads))  # (Q, D)
    train = batches_of(random_sequences(7, seed=12), 7)[0]
    tc = captured(model, layers, train)
    X = compress(proj, tc.activations, tc.output_grads)  # (B, D)
    want = score_batch(model, pq, train).scores  # (Q, B)
    tol = (EXACT_RTOL, EXACT_ATOL) if kind == ProjectionKind.EIGEN else (ROTATED_RTOL, ROTATED_ATOL)
    assert_close(P @ X.T, want, *tol, name=f"{kind.value} index scores")


def _damped_kron(lf, damping=None):
    """(S + delta_S I) x (A + delta_A I) [d_out d_in', d_out d_in'] dense (torch.kron), the whitened split."""
    d_s, d_a = whitening_damping(lf, damping)
    S = lf.eigen.q_s * lf.eigen.e_s.clamp_min(0) @ lf.eigen.q_s.T
    A = lf.eigen.q_a * lf.eigen.e_a.clamp_min(0) @ lf.eigen.q_a.T
    return torch.kron(S + d_s * torch.eye(len(S), dtype=S.dtype), A + d_a * torch.eye(len(A), dtype=A.dtype))


def test_full_width_whitened_inner_product_is_the_split_damped_kfac_influence(fitted, tmp_path):
    """k = d: <G~_q, G~_m> (no preconditioner) = vec(q)^T [(S + d_S I) x (A + d_A I)]^-1 vec(m), dense."""
    model, layers, factors = fitted
    proj = make_projection(factors, ProjectionKind.WHITENED, k_out=10_000, k_in=10_000, seed=3)
    qb, train = random_queries(3, seed=31), batches_of(random_sequences(5, seed=32), 5)[0]
    qc, tc = captured(model, layers, qb), captured(model, layers, train)
    for layer in layers:
        name, lf, p = layer.name, factors.layers[layer.name], proj.layers[layer.name]
        assert p.scale == 1.0 and p.r_out.shape[0] == p.r_out.shape[1] and p.r_in.shape[0] == p.r_in.shape[1]
        got = torch.einsum("qoi,boi->qb", compress_layer(p, qc.activations[name], qc.output_grads[name]),
                           compress_layer(p, tc.activations[name], tc.output_grads[name]))
        gq = sequence_gradient(qc.activations[name], qc.output_grads[name]).flatten(1)  # (Q, d_out d_in')
        gm = sequence_gradient(tc.activations[name], tc.output_grads[name]).flatten(1)  # (B, d_out d_in')
        want = gq @ torch.linalg.solve(_damped_kron(lf), gm.T)
        assert_close(got, want, 1e-8, 1e-12, f"{name} split-damped K-FAC")


def test_whitened_projection_scale_and_save_load(fitted, tmp_path):
    """k < d: the score scale c = d_out d_in' / (k_out k_in) (unbiased JL estimate) survives save / load."""
    _, _, factors = fitted
    proj = make_projection(factors, ProjectionKind.WHITENED, k_out=4, k_in=3, seed=8)
    save_projection(proj, tmp_path)
    back = load_projection(tmp_path)
    assert back.kind == ProjectionKind.WHITENED
    for name, (d_out, d_in) in factors.shapes.items():
        p, b = proj.layers[name], back.layers[name]
        assert p.scale == d_out * d_in / 12 and b.scale == p.scale
        assert_close(b.denominator(), p.denominator(), EXACT_RTOL, EXACT_ATOL, f"{name} D after load")
        assert float((p.denominator() - (p.lam + p.damping)).abs().max()) > 0  # not the orthonormal formula


def test_truncated_eigen_projection_is_the_restricted_score(fitted):
    """k < d with eigen rows: the index score is the EK-FAC score over the kept eigen-directions only."""
    model, layers, factors = fitted
    proj = make_projection(factors, ProjectionKind.EIGEN, k_out=6, k_in=5)
    qb, train = random_queries(3, seed=21), batches_of(random_sequences(5, seed=22), 5)[0]
    qc, tc = captured(model, layers, qb), captured(model, layers, train)
    got = precondition(proj, compress(proj, qc.activations, qc.output_grads)) @ \
        compress(proj, tc.activations, tc.output_grads).T
    want = torch.zeros_like(got)
    for layer in layers:
        lf, name = factors.layers[layer.name], layer.name
        keep_s = torch.argsort(lf.eigen.e_s, descending=True)[:6]
        keep_a = torch.argsort(lf.eigen.e_a, descending=True)[:5]
        rot = (lambda G: (lf.eigen.q_s.T @ G @ lf.eigen.q_a)[..., keep_s[:, None], keep_a[None, :]])
        qr = rot(sequence_gradient(qc.activations[name], qc.output_grads[name]))
        gr = rot(sequence_gradient(tc.activations[name], tc.output_grads[name]))
        lam = lf.eigenvalues[keep_s[:, None], keep_a[None, :]] + lf.damping(None)
        want += torch.einsum("qoi,boi->qb", qr / lam, gr)
    assert_close(got, want, EXACT_RTOL, EXACT_ATOL, "restricted EK-FAC score")


def test_refit_preconditioner_keeps_the_rows_and_follows_the_factors(fitted):
    _, _, factors = fitted
    proj = make_projection(factors, ProjectionKind.RANDOM, k_out=4, k_in=3, seed=2)
    same = refit_preconditioner(proj, factors)
    for name, p in proj.layers.items():
        assert_close(same.layers[name].lam, p.lam, EXACT_RTOL, EXACT_ATOL, f"{name} Lambda~")
        assert same.layers[name].r_out is p.r_out and same.layers[name].damping == p.damping
    scaled = dataclasses.replace(factors, layers={n: dataclasses.replace(lf, lambda_sum=lf.lambda_sum * 2)
                                                  for n, lf in factors.layers.items()})
    moved = refit_preconditioner(proj, scaled, damping=0.5)
    for name, p in proj.layers.items():
        assert_close(moved.layers[name].lam, 2 * p.lam, EXACT_RTOL, EXACT_ATOL, f"{name} Lambda~ x 2")
        assert moved.layers[name].damping == 0.5


def test_index_projection_job_key_accepts_every_kind():
    from pipelines.config import ConfigError, IndexConfig

    assert IndexConfig(projection="whitened").projection == ProjectionKind.WHITENED
    with pytest.raises(ConfigError, match="index.projection.*eigen.*random.*whitened"):
        IndexConfig(projection="pca")
