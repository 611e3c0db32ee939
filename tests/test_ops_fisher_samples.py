"""``samples = k`` sampled label draws and the expected Fisher, against explicit per-draw sums (float64).

The brute force draws the same labels with the same generator, one draw at a
time, and fits each draw as if its labels were the data's (EMPIRICAL on a
relabeled batch); the expected Fisher is rebuilt position by position and label
by label, each term weighted by its probability.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import influence_ops as ops
from influence_ops.label_draws import sample_labels
from influence_ops.objectives import model_logits
from tests.ops_helpers import assert_close, batches_of, random_sequences, tiny_gpt2


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(seed=1)
    layers = ops.find_mlp_layers(model)
    batches = batches_of(random_sequences(4, min_len=3, max_len=5, seed=4), 2)
    cov = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.EMPIRICAL)
    return model, layers, batches, ops.eigendecompose(cov)


def _relabeled(batch: ops.TokenBatch, labels: torch.Tensor) -> ops.TokenBatch:
    return dataclasses.replace(batch, labels=labels)


def _per_draw_sums(model, layers, eigen, batches, k: int, seed: int):
    """(S sums, A sums, Lambda sums) averaged over k draws, computed one draw at a time."""
    gen = torch.Generator().manual_seed(seed)
    s = {l.name: 0.0 for l in layers}
    lam = {l.name: 0.0 for l in layers}
    a = {l.name: 0.0 for l in layers}
    for batch in batches:
        with torch.no_grad():
            logits = model_logits(model, batch.input_ids, batch.attention_mask)
        draws = [sample_labels(logits, batch.labels, gen) for _ in range(k)]
        for j, labels in enumerate(draws):
            one = [_relabeled(batch, labels)]
            cov = ops.fit_covariances(model, layers, one, fisher=ops.Fisher.EMPIRICAL)
            lsum = ops.fit_lambda(model, layers, eigen, one, fisher=ops.Fisher.EMPIRICAL)
            for l in layers:
                s[l.name] = s[l.name] + cov.layers[l.name].s_sum / k
                lam[l.name] = lam[l.name] + lsum.sums[l.name] / k
                if j == 0:
                    a[l.name] = a[l.name] + cov.layers[l.name].a_sum
    return s, a, lam


@pytest.mark.parametrize("k", [1, 3])
def test_k_sample_sums_equal_explicit_per_draw_sums(setup, k):
    model, layers, batches, eigen = setup
    cov = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=5, samples=k)
    lam = ops.fit_lambda(model, layers, eigen, batches, fisher=ops.Fisher.SAMPLED, seed=5, samples=k)
    s_ref, a_ref, lam_ref = _per_draw_sums(model, layers, eigen, batches, k, seed=5)
    assert cov.samples == k and lam.samples == k
    for l in layers:
        assert_close(cov.layers[l.name].s_sum, s_ref[l.name], name=f"S sum {l.name}, k={k}")
        assert_close(cov.layers[l.name].a_sum, a_ref[l.name], name=f"A sum {l.name}, k={k}")
        assert_close(lam.sums[l.name], lam_ref[l.name], name=f"Lambda sum {l.name}, k={k}")
    assert cov.tokens == sum(int(b.token_mask.sum()) for b in batches)  # tokens are not counted k times


def test_k1_is_the_single_draw_sampled_fisher(setup):
    model, layers, batches, _ = setup
    today = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=2)
    one = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=2, samples=1)
    two = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=2, samples=2)
    for l in layers:
        assert torch.equal(today.layers[l.name].s_sum, one.layers[l.name].s_sum)
        assert not torch.allclose(one.layers[l.name].s_sum, two.layers[l.name].s_sum)


def test_k_samples_are_seeded(setup):
    model, layers, batches, _ = setup
    fits = [ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=s, samples=4)
            for s in (7, 7, 8)]
    name = layers[0].name
    assert torch.equal(fits[0].layers[name].s_sum, fits[1].layers[name].s_sum)
    assert not torch.allclose(fits[0].layers[name].s_sum, fits[2].layers[name].s_sum)


def test_two_workers_merge_to_the_explicit_sums_of_their_units(setup):
    """Each worker's unit has its own seed (as in the pipeline); the merged sums equal the per-draw brute force."""
    model, layers, batches, eigen = setup
    parts = [ops.fit_covariances(model, layers, [b], fisher=ops.Fisher.SAMPLED, seed=10 + i, samples=2)
             for i, b in enumerate(batches)]
    lams = [ops.fit_lambda(model, layers, eigen, [b], fisher=ops.Fisher.SAMPLED, seed=10 + i, samples=2)
            for i, b in enumerate(batches)]
    merged, merged_lam = parts[0].merge(parts[1]), lams[0].merge(lams[1])
    refs = [_per_draw_sums(model, layers, eigen, [b], 2, seed=10 + i) for i, b in enumerate(batches)]
    for l in layers:
        assert_close(merged.layers[l.name].s_sum, refs[0][0][l.name] + refs[1][0][l.name], name="merged S")
        assert_close(merged_lam.sums[l.name], refs[0][2][l.name] + refs[1][2][l.name], name="merged Lambda")
    assert merged.sequences == 4 and merged.samples == 2
    other = ops.fit_covariances(model, layers, [batches[0]], fisher=ops.Fisher.SAMPLED, seed=1, samples=3)
    with pytest.raises(ValueError, match="2 and 3 label samples"):
        merged.merge(other)


def test_expected_fisher_equals_the_probability_weighted_sum_over_labels():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=12,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double().eval()
    layers = ops.find_mlp_layers(model)
    batch = ops.collate([[3, 6, 4, 1], [7, 2]])  # 4 label positions x 8 labels, with padding
    eigen = ops.eigendecompose(ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.EMPIRICAL))
    cov = ops.fit_covariances(model, layers, [batch], fisher=ops.Fisher.EXPECTED)
    lam = ops.fit_lambda(model, layers, eigen, [batch], fisher=ops.Fisher.EXPECTED)
    with torch.no_grad():
        probs = torch.softmax(model_logits(model, batch.input_ids, batch.attention_mask), -1)  # (B, T, V)
    s_ref = {l.name: 0.0 for l in layers}
    lam_ref = {l.name: 0.0 for l in layers}
    B, T = batch.labels.shape
    for t in range(1, T):
        for v in range(probs.shape[-1]):
            labels = torch.full_like(batch.labels, -100)
            labels[:, t] = torch.where(batch.labels[:, t] != -100, v, -100)
            if bool((labels[:, t] == -100).all()):
                continue
            out = ops.backward_pass(model, layers, ops.LanguageModelObjective(), _relabeled(batch, labels))
            p = probs[:, t - 1, v]  # (B,)
            for l in layers:
                g = out.captured.output_grads[l.name]  # (B, T, d_out)
                s_ref[l.name] = s_ref[l.name] + torch.einsum("b,bto,btp->op", p, g, g)
                rot = ops.eigenvalue_correction.rotated_sequence_gradient(out.captured.activations[l.name], g,
                                                                          eigen[l.name])
                lam_ref[l.name] = lam_ref[l.name] + torch.einsum("b,boi->oi", p, rot ** 2)
    for l in layers:
        assert_close(cov.layers[l.name].s_sum, s_ref[l.name], rtol=1e-9, atol=1e-12, name=f"expected S {l.name}")
        assert_close(lam.sums[l.name], lam_ref[l.name], rtol=1e-9, atol=1e-12, name=f"expected Lambda {l.name}")


def test_bad_sample_counts_are_refused(setup):
    model, layers, batches, _ = setup
    with pytest.raises(ValueError, match="fisher samples must be an integer >= 1, got 0"):
        ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, samples=0)


def test_fit_ekfac_draws_stage_3_separately_and_saves_both_counts(setup, tmp_path):
    model, layers, batches, _ = setup
    f = ops.fit_ekfac(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=4, samples=1, lambda_samples=3)
    cov = ops.fit_covariances(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=4, samples=1)
    lam = ops.fit_lambda(model, layers, ops.eigendecompose(cov), batches, fisher=ops.Fisher.SAMPLED, seed=5,
                         samples=3)
    for l in layers:
        assert torch.equal(f.layers[l.name].lambda_sum, lam.sums[l.name])
    ops.save_factors(f, tmp_path)
    loaded = ops.load_factors(tmp_path, layers)
    assert (loaded.samples, loaded.lambda_samples) == (1, 3)
    same = ops.fit_ekfac(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=4, same_lambda_draws=True)
    lam_same = ops.fit_lambda(model, layers, ops.eigendecompose(cov), batches, fisher=ops.Fisher.SAMPLED, seed=4)
    assert torch.equal(same.layers[layers[0].name].lambda_sum, lam_same.sums[layers[0].name])


def test_fit_ekfac_defaults_to_the_jobs_fit_topm_5_2(setup):
    """A bare ``fit_ekfac`` is the job's default fit (TOPM, 5 draws in stage 1, 2 in stage 3; the job's side is
    asserted in test_eval.py), not one sampled draw."""
    model, layers, batches, eigen = setup
    assert (ops.DEFAULT_FISHER, *ops.DEFAULT_DRAWS[ops.DEFAULT_FISHER]) == (ops.Fisher.TOPM, 5, 2)
    bare = ops.fit_ekfac(model, layers, batches, seed=3)
    explicit = ops.fit_ekfac(model, layers, batches, fisher=ops.Fisher.TOPM, seed=3, samples=5, lambda_samples=2)
    assert (bare.fisher, bare.samples, bare.lambda_samples) == (ops.Fisher.TOPM, 5, 2)
    for l in layers:
        for field in ("s_sum", "a_sum", "lambda_sum"):
            assert torch.equal(getattr(bare.layers[l.name], field), getattr(explicit.layers[l.name], field))
    cov, lam = ops.fit_covariances(model, layers, batches, seed=3), ops.fit_lambda(model, layers, eigen, batches)
    assert (cov.fisher, cov.samples, lam.samples) == (ops.Fisher.TOPM, 5, 2)  # the stage functions: the same defaults
    one = ops.fit_ekfac(model, layers, batches, fisher=ops.Fisher.SAMPLED, seed=3)  # other Fishers: 1 and 1
    assert (one.samples, one.lambda_samples) == (1, 1)
    assert ops.default_draws(ops.Fisher.TOPM, 3) == (3, 3) and ops.default_draws(ops.Fisher.TOPM, None, 4) == (5, 4)
    with pytest.raises(ValueError, match="fisher samples"):
        ops.default_draws(ops.Fisher.TOPM, 0)


@pytest.mark.parametrize("fisher", [ops.Fisher.SAMPLED, ops.Fisher.GAUSSIAN, ops.Fisher.TOPM])
def test_per_sequence_seeds_make_the_draws_independent_of_batching(setup, fisher):
    """With ``TokenBatch.seeds`` the sums are the same for any batch size and order (to float rounding)."""
    model, layers, _, eigen = setup
    seqs = random_sequences(6, min_len=3, max_len=7, seed=9)
    seeds = [1000 + 7 * i for i in range(len(seqs))]

    def batched(size, order):
        out = []
        for lo in range(0, len(order), size):
            rows = order[lo:lo + size]
            b = ops.collate([seqs[i] for i in rows])
            b.seeds = torch.tensor([seeds[i] for i in rows], dtype=torch.int64)
            out.append(b)
        return out

    fits = []
    for size, order in ((2, [0, 1, 2, 3, 4, 5]), (4, [5, 3, 1, 0, 2, 4]), (6, [2, 0, 1, 5, 4, 3])):
        cov = ops.fit_covariances(model, layers, batched(size, order), fisher=fisher, seed=size, samples=2)
        lam = ops.fit_lambda(model, layers, eigen, batched(size, order), fisher=fisher, seed=size, samples=3)
        fits.append((cov, lam))
    for cov, lam in fits[1:]:
        for l in layers:
            assert_close(cov.layers[l.name].s_sum, fits[0][0].layers[l.name].s_sum, rtol=1e-9, atol=1e-12)
            assert_close(lam.sums[l.name], fits[0][1].sums[l.name], rtol=1e-9, atol=1e-12)
    # and the seeds matter: other seeds give other sums
    other = batched(2, [0, 1, 2, 3, 4, 5])
    for b in other:
        b.seeds = b.seeds + 1
    cov = ops.fit_covariances(model, layers, other, fisher=fisher, seed=2, samples=2)
    name = layers[0].name
    assert not torch.allclose(cov.layers[name].s_sum, fits[0][0].layers[name].s_sum)
