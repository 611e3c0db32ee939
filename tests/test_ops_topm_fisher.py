"""``fisher = "topm"``: the m = k - 1 most probable labels enumerated, one draw from the tail (float64).

With m >= V - 1 the enumeration covers the whole vocabulary and, where each
sequence has one label position (no products of different positions), the
covariances and Lambda are the expected Fisher's to float64 rounding. With
several positions and small k the estimate is random (tail draw, signs) but
unbiased: its mean over many seeds approaches the expected Fisher, while the same
draws without the tail term (a biased estimator) stay away from it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import influence_ops as ops
from influence_ops.covariance import make_generator
from influence_ops.eigenvalue_correction import rotated_sequence_gradient
from influence_ops.gradients import draw_passes
from influence_ops.label_draws import topm_terms
from tests.ops_helpers import assert_close, peaked_tiny_lm, random_sequences

V = 8


@pytest.fixture(scope="module")
def setup():
    return peaked_tiny_lm(V)


def _one_label_per_sequence(batch: ops.TokenBatch) -> ops.TokenBatch:
    labels = torch.full_like(batch.labels, -100)
    labels[0, 2], labels[1, 1] = batch.labels[0, 2], batch.labels[1, 1]
    return dataclasses.replace(batch, labels=labels)


def test_terms_enumerate_the_top_labels_and_weigh_the_tail_by_its_mass():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(logits, -1)[0]
    labels, coef = topm_terms(logits, 3, torch.Generator().manual_seed(0))  # m = 2 + 1 tail draw
    assert labels.shape == coef.shape == (1, 3)
    assert labels[0, :2].tolist() == [0, 2] and int(labels[0, 2]) in (1, 3, 4)
    want = torch.stack([p[0], p[2], p[1] + p[3] + p[4]]).sqrt()
    assert_close(coef[0].abs(), want, rtol=1e-12, atol=1e-15, name="|coefficients|")
    tails = {int(topm_terms(logits, 3, torch.Generator().manual_seed(s))[0][0, 2]) for s in range(200)}
    assert tails == {1, 3, 4}  # every tail label is drawn, never a top one
    labels, coef = topm_terms(logits, 9, torch.Generator().manual_seed(0))  # m capped at V, empty tail
    assert labels.shape == (1, 6) and float(coef[0, 5]) == 0.0


@pytest.mark.parametrize("k", [V, V + 3])
def test_enumerating_the_vocabulary_gives_the_expected_fisher(setup, k):
    model, layers, batch, eigen = setup
    one = _one_label_per_sequence(batch)
    exp_cov = ops.fit_covariances(model, layers, [one], fisher=ops.Fisher.EXPECTED)
    exp_lam = ops.fit_lambda(model, layers, eigen, [one], fisher=ops.Fisher.EXPECTED)
    cov = ops.fit_covariances(model, layers, [one], fisher=ops.Fisher.TOPM, seed=3, samples=k)
    lam = ops.fit_lambda(model, layers, eigen, [one], fisher=ops.Fisher.TOPM, seed=4, samples=k)
    assert cov.samples == k and lam.samples == k
    for l in layers:
        assert_close(cov.layers[l.name].s_sum, exp_cov.layers[l.name].s_sum, rtol=1e-10, atol=1e-14, name="S")
        assert_close(cov.layers[l.name].a_sum, exp_cov.layers[l.name].a_sum, rtol=1e-12, atol=1e-14, name="A")
        assert_close(lam.sums[l.name], exp_lam.sums[l.name], rtol=1e-10, atol=1e-14, name="Lambda")


def test_k1_is_the_single_draw_sampled_fisher(setup):
    model, layers, batch, eigen = setup
    for fit in (lambda f: ops.fit_covariances(model, layers, [batch], fisher=f, seed=5,
                                              samples=1).layers[layers[1].name].s_sum,
                lambda f: ops.fit_lambda(model, layers, eigen, [batch], fisher=f, seed=5,
                                         samples=1).sums[layers[1].name]):
        assert torch.equal(fit(ops.Fisher.TOPM), fit(ops.Fisher.SAMPLED))


def _sums(model, layers, eigen, batch, k: int, seed: int | None, with_tail: bool):
    """(S sums, Lambda sums) of one TOPM fit, built draw by draw (optionally without the tail draw)."""
    s = {l.name: 0.0 for l in layers}
    lam = {l.name: 0.0 for l in layers}
    for i, (captured, weight) in enumerate(draw_passes(model, layers, ops.LanguageModelObjective(), batch,
                                                       ops.Fisher.TOPM, make_generator(seed, torch.device("cpu")),
                                                       samples=k)):
        assert weight == 1.0
        if i == k - 1 and not with_tail:
            continue
        for l in layers:
            g = captured.output_grads[l.name] * batch.token_mask.unsqueeze(-1)  # (B, T, d_out)
            g2 = g.reshape(-1, g.shape[-1])
            s[l.name] = s[l.name] + g2.T @ g2
            rot = rotated_sequence_gradient(captured.activations[l.name], g, eigen[l.name])
            lam[l.name] = lam[l.name] + (rot ** 2).sum(dim=0)
    return s, lam


def _rel(a: dict, b: dict, scale: float = 1.0) -> float:
    return max(float((a[n] / scale - b[n]).norm() / b[n].norm()) for n in b)


def test_mean_over_seeds_is_the_expected_fisher(setup):
    """R copies of the batch with their own seeds: the sums / R are the mean of R independent fits."""
    model, layers, batch, eigen = setup
    k, copies = 3, 300
    exp_s = {n: c.s_sum for n, c in ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.EXPECTED).layers.items()}
    exp_lam = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.EXPECTED).sums
    # the draw-by-draw sums are what fit_covariances / fit_lambda compute
    s1, lam1 = _sums(model, layers, eigen, batch, k, 7, True)
    cov = ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.TOPM, seed=7, samples=k)
    lam = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.TOPM, seed=7, samples=k)
    for l in layers:
        assert_close(cov.layers[l.name].s_sum, s1[l.name], rtol=1e-10, atol=1e-14, name="S")
        assert_close(lam.sums[l.name], lam1[l.name], rtol=1e-10, atol=1e-14, name="Lambda")
    many = ops.collate([[int(t) for t in row[:int(n)]] for row, n in zip(batch.input_ids, batch.attention_mask.sum(1))]
                       * copies)
    many.seeds = torch.arange(many.input_ids.shape[0])
    cov = ops.fit_covariances(model, layers, [many], fisher=ops.Fisher.TOPM, seed=0, samples=k)
    lam = ops.fit_lambda(model, layers, eigen, [many], fisher=ops.Fisher.TOPM, seed=0, samples=k)
    tol = 0.08  # measured: about 0.035 at 300 copies, shrinking as 1 / sqrt(copies); one fit is off by about 0.6
    assert _rel({n: c.s_sum for n, c in cov.layers.items()}, exp_s, copies) < tol
    assert _rel(lam.sums, exp_lam, copies) < tol
    no_tail = _sums(model, layers, eigen, many, k, 0, False)  # the same draws without the tail term: biased
    assert _rel(no_tail[0], exp_s, copies) > 3 * tol and _rel(no_tail[1], exp_lam, copies) > 3 * tol
    assert _rel(s1, exp_s) > tol and _rel(lam1, exp_lam) > tol  # one fit is not already the expectation


def test_two_workers_merge_to_one_fit(setup):
    model, layers, _, eigen = setup
    seqs = random_sequences(4, vocab=V, min_len=3, max_len=6, seed=9)
    batches = [ops.collate(seqs[:2]), ops.collate(seqs[2:])]
    for i, b in enumerate(batches):
        b.seeds = torch.tensor([100 + 2 * i, 101 + 2 * i], dtype=torch.int64)
    whole = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.TOPM, seed=0, samples=3)
    parts = [ops.fit_covariances(model, layers, [b], fisher=ops.Fisher.TOPM, seed=i, samples=3)
             for i, b in enumerate(batches)]
    merged = parts[0].merge(parts[1])
    lam_whole = ops.fit_lambda(model, layers, eigen, batches, fisher=ops.Fisher.TOPM, seed=0, samples=3)
    lam_parts = [ops.fit_lambda(model, layers, eigen, [b], fisher=ops.Fisher.TOPM, seed=i, samples=3)
                 for i, b in enumerate(batches)]
    lam_merged = lam_parts[0].merge(lam_parts[1])
    assert merged.fisher == ops.Fisher.TOPM and merged.samples == 3 and merged.sequences == 4
    for l in layers:
        assert_close(merged.layers[l.name].s_sum, whole.layers[l.name].s_sum, rtol=1e-10, atol=1e-14)
        assert_close(lam_merged.sums[l.name], lam_whole.sums[l.name], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="cannot merge topm and gaussian"):
        merged.merge(ops.fit_covariances(model, layers, [batches[0]], fisher=ops.Fisher.GAUSSIAN, samples=3))
