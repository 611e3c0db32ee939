"""bf16 autocast on CPU: the layers run in bfloat16, every captured tensor and every
accumulation stays float32, and scores track the float32 ones."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import ARCHITECTURES, batches_of, random_queries, random_sequences

from influence_ops import (
    Fisher,
    LanguageModelObjective,
    backward_pass,
    collate,
    find_mlp_layers,
    fit_covariances,
    fit_ekfac,
    fit_lambda,
    precondition_queries,
    score_batch,
)

# bf16 has an 8-bit mantissa: scores are not equal, only strongly correlated.
MIN_PEARSON = 0.95


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # nn.Linear and Conv1D (addmm) under autocast
def setup(request):
    build, pattern = ARCHITECTURES[request.param]
    model = build(dtype=torch.float32)
    layers = find_mlp_layers(model, pattern)
    fit_batches = batches_of(random_sequences(8, seed=1), batch_size=4)
    factors = fit_ekfac(model, layers, fit_batches, fisher=Fisher.EMPIRICAL)
    queries = precondition_queries(model, factors, [random_queries(4, seed=2)])
    return model, layers, fit_batches, factors, queries


def test_layers_run_in_bf16_and_captures_are_float32(setup):
    model, layers, *_ = setup
    seen: dict[str, torch.dtype] = {}
    handles = [l.module.register_forward_hook(lambda _m, _i, out, name=l.name: seen.__setitem__(name, out.dtype))
               for l in layers]
    try:
        out = backward_pass(model, layers, LanguageModelObjective(), collate(random_sequences(3)),
                            autocast_dtype=torch.bfloat16)
    finally:
        for h in handles:
            h.remove()
    assert set(seen.values()) == {torch.bfloat16}, "autocast must run the tracked layers in bf16"
    for l in layers:
        assert out.captured.activations[l.name].dtype == torch.float32
        assert out.captured.output_grads[l.name].dtype == torch.float32
    assert out.losses.dtype == torch.float32


def test_accumulations_are_float32(setup):
    model, layers, fit_batches, factors, _ = setup
    cov = fit_covariances(model, layers, fit_batches, fisher=Fisher.EMPIRICAL, autocast_dtype=torch.bfloat16)
    eigen = {n: f.eigen for n, f in factors.layers.items()}
    lam = fit_lambda(model, layers, eigen, fit_batches, fisher=Fisher.EMPIRICAL, autocast_dtype=torch.bfloat16)
    for l in layers:
        assert cov.layers[l.name].a_sum.dtype == torch.float32
        assert cov.layers[l.name].s_sum.dtype == torch.float32
        assert lam.sums[l.name].dtype == torch.float32
        assert bool(torch.isfinite(cov.layers[l.name].a_sum).all() and torch.isfinite(lam.sums[l.name]).all())


def test_bf16_scores_correlate_with_float32(setup):
    model, _, _, _, queries = setup
    batch = collate(random_sequences(12, min_len=4, max_len=12, seed=3))
    ref = score_batch(model, queries, batch, per_token=True)
    bf16 = score_batch(model, queries, batch, per_token=True, autocast_dtype=torch.bfloat16)
    assert bf16.scores.dtype == torch.float32 and bf16.per_token.dtype == torch.float32
    assert not torch.equal(bf16.scores, ref.scores), "autocast had no effect"
    pearson = float(torch.corrcoef(torch.stack([bf16.scores.flatten(), ref.scores.flatten()]))[0, 1])
    assert pearson > MIN_PEARSON, f"Pearson correlation of bf16 and float32 scores is {pearson:.4f}"
