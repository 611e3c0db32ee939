"""``passes = p``: a stage's k label draws summed into p backward passes (float64).

Backpropagation is linear in the loss, so the output gradients of a summed pass
are the sums of the draws' own output gradients (exactly, same seed). The
statistics built from them (g g^T per token, (Q_S^T G_n Q_A)^2 per sequence) then
carry cross terms between draws, which vanish in expectation (independent
random signs for topm, independent zero-mean draws for sampled): the mean over
many seeds approaches the expected Fisher as the one-pass-per-draw fit does,
while the same sums with a wrong weight (a summed pass counted as k draws, or
as one of k) stay far from it.
"""

from __future__ import annotations

import pytest
import torch

import influence_ops as ops
from influence_ops.covariance import make_generator
from influence_ops.eigenvalue_correction import rotated_sequence_gradient
from influence_ops.gradients import draw_passes
from influence_ops.fisher import effective_passes, summed_draws
from influence_ops.storage import load_factors, save_factors
from tests.ops_helpers import assert_close, peaked_tiny_lm


@pytest.fixture(scope="module")
def setup():
    return peaked_tiny_lm()


def _draw_grads(model, layers, batch, fisher, k, seed, passes=None) -> list[dict[str, torch.Tensor]]:
    """Output gradients [B, T, d_out] per layer of every backward pass, in order."""
    gen = make_generator(seed, torch.device("cpu"))
    obj = ops.LanguageModelObjective()
    return [{l.name: cap.output_grads[l.name].clone() for l in layers}
            for cap, _ in draw_passes(model, layers, obj, batch, fisher, gen, k, passes=passes)]


@pytest.mark.parametrize("fisher,k,passes,groups", [
    (ops.Fisher.TOPM, 4, 1, [[0, 1, 2, 3]]),
    (ops.Fisher.TOPM, 4, 2, [[0, 2], [1, 3]]),
    (ops.Fisher.TOPM, 5, 3, [[0, 3], [1, 4], [2]]),
    (ops.Fisher.SAMPLED, 3, 1, [[0, 1, 2]]),
])
def test_a_summed_pass_gives_the_sum_of_its_draws_gradients(setup, fisher, k, passes, groups):
    model, layers, batch, _ = setup
    each = _draw_grads(model, layers, batch, fisher, k, 3)
    summed = _draw_grads(model, layers, batch, fisher, k, 3, passes)
    assert len(each) == k and len(summed) == len(groups)
    for got, group in zip(summed, groups):
        for l in layers:
            want = sum(each[j][l.name] for j in group)
            assert_close(got[l.name], want, rtol=1e-10, atol=1e-14, name=f"{fisher.value} pass {group} {l.name}")


def test_stage_sums_of_summed_passes_are_those_of_the_summed_gradients(setup):
    model, layers, batch, eigen = setup
    k, seed = 4, 11
    each = _draw_grads(model, layers, batch, ops.Fisher.TOPM, k, seed)
    cap = ops.backward_pass(model, layers, ops.LanguageModelObjective(), batch, ops.Fisher.EMPIRICAL).captured
    cov = ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.TOPM, seed=seed, samples=k, passes=2)
    lam = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.TOPM, seed=seed, samples=k, passes=1)
    lam_seed_of_cov = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.TOPM, seed=seed, samples=k)
    assert (cov.samples, cov.passes, lam.samples, lam.passes, lam_seed_of_cov.passes) == (k, 2, k, 1, None)
    for l in layers:
        g_pass = [each[0][l.name] + each[2][l.name], each[1][l.name] + each[3][l.name]]  # round-robin into 2
        s_want = sum(g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) for g in g_pass)
        assert_close(cov.layers[l.name].s_sum, s_want, rtol=1e-10, atol=1e-14, name=f"S {l.name}")
        a = cap.activations[l.name]
        rot = rotated_sequence_gradient(a, sum(e[l.name] for e in each), eigen[l.name])
        assert_close(lam.sums[l.name], (rot ** 2).sum(dim=0), rtol=1e-10, atol=1e-14, name=f"Lambda {l.name}")
        a2 = a.reshape(-1, a.shape[-1])
        assert_close(cov.layers[l.name].a_sum, a2.T @ a2, rtol=1e-10, atol=1e-14, name=f"A {l.name}")
        # the cross terms are there: one pass per draw gives other Lambda sums from the same draws
        assert not torch.allclose(lam.sums[l.name], lam_seed_of_cov.sums[l.name])


def _rel(a: dict, b: dict, scale: float = 1.0) -> float:
    return max(float((a[n] / scale - b[n]).norm() / b[n].norm()) for n in b)


@pytest.mark.parametrize("fisher,k", [(ops.Fisher.TOPM, 3), (ops.Fisher.SAMPLED, 3)])
def test_summed_passes_are_unbiased(setup, fisher, k):
    """R copies of the batch with their own seeds: the sums / R are the mean of R independent fits."""
    model, layers, batch, eigen = setup
    copies = 300
    exp_s = {n: c.s_sum for n, c in ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.EXPECTED).layers.items()}
    exp_lam = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.EXPECTED).sums
    many = ops.collate([[int(t) for t in row[:int(n)]] for row, n in zip(batch.input_ids, batch.attention_mask.sum(1))]
                       * copies)
    many.seeds = torch.arange(many.input_ids.shape[0])
    cov = ops.fit_covariances(model, layers, [many], fisher=fisher, seed=0, samples=k, passes=1)
    lam = ops.fit_lambda(model, layers, eigen, [many], fisher=fisher, seed=0, samples=k, passes=1)
    s, lam_sums = {n: c.s_sum for n, c in cov.layers.items()}, lam.sums
    tol = 0.15  # measured at 300 copies: topm 0.047, sampled 0.055 / 0.082 (one pass per draw: 0.03-0.05)
    assert _rel(s, exp_s, copies) < tol and _rel(lam_sums, exp_lam, copies) < tol
    # the weights matter: a summed pass counted as k draws' worth (or as one draw of k) is off by far more
    wrong = k if fisher == ops.Fisher.TOPM else 1 / k
    assert _rel(s, exp_s, copies * wrong) > 3 * tol and _rel(lam_sums, exp_lam, copies * wrong) > 3 * tol


def test_passes_are_recorded_saved_and_checked(setup, tmp_path):
    model, layers, batch, _ = setup
    f = ops.fit_ekfac(model, layers, [batch], fisher=ops.Fisher.TOPM, samples=5, lambda_samples=2, passes=3,
                      lambda_passes=1)
    assert (f.samples, f.lambda_samples, f.passes, f.lambda_passes) == (5, 2, 3, 1)
    back = load_factors(save_factors(f, tmp_path / "f"))
    assert (back.samples, back.lambda_samples, back.passes, back.lambda_passes) == (5, 2, 3, 1)
    default = ops.fit_ekfac(model, layers, [batch])  # one backward pass per draw unless asked
    assert (default.passes, default.lambda_passes) == (None, None)
    assert (load_factors(save_factors(default, tmp_path / "d")).passes, default.lambda_passes) == (None, None)
    # p >= k is one pass per draw: the same numbers as not asking
    same = ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.TOPM, seed=2, samples=3, passes=3)
    plain = ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.TOPM, seed=2, samples=3)
    assert same.passes is None and all(torch.equal(same.layers[n].s_sum, c.s_sum) for n, c in plain.layers.items())
    with pytest.raises(ValueError, match="summed into 2 and None passes"):
        ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.TOPM, samples=3, passes=2).merge(plain)
    # a Fisher without random draws has nothing to sum: passes do not apply
    assert effective_passes(ops.Fisher.EMPIRICAL, 1, 1) is None and effective_passes(ops.Fisher.EXPECTED, 1, 1) is None
    with pytest.raises(ValueError, match="gaussian probes summed into 2 passes are 2 probes"):
        effective_passes(ops.Fisher.GAUSSIAN, 4, 2)
    assert effective_passes(ops.Fisher.GAUSSIAN, 4, 4) is None  # one pass per probe: allowed
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="fisher passes must be an integer >= 1"):
            effective_passes(ops.Fisher.TOPM, 5, bad)
    assert [float(x) for x in summed_draws([torch.tensor(float(i)) for i in range(5)], 2)] == [0 + 2 + 4, 1 + 3]
