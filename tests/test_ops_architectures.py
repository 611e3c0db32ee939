"""Every supported architecture runs the whole engine, and its layers are found exactly.

Per architecture (GPT-2 with Conv1D, GPT-NeoX, Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3, OPT, a plain
nn.Sequential MLP with a user pattern), tiny and float64: fit EK-FAC with the
empirical Fisher, precondition dense and rank-r queries, score a padded
training batch with both strategies, and check the decompositions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from ops_helpers import (
    ARCHITECTURES,
    F64_ATOL,
    F64_RTOL,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    VOCAB,
    assert_close,
    batches_of,
    random_queries,
    random_sequences,
    tiny_gpt2,
)
from torch import nn

from influence_ops import (
    IGNORE_INDEX,
    EKFACFactors,
    Fisher,
    PreconditionedQueries,
    Strategy,
    TokenBatch,
    TrackedLayer,
    backward_pass,
    collate,
    find_mlp_layers,
    fit_ekfac,
    per_sequence_gradients,
    precondition_queries,
    score_batch,
)
from influence_ops.objectives import LanguageModelObjective

RANK = 2
NUM_QUERIES = 3


def _block_names(prefix: str, suffixes: list[str]) -> list[str]:
    return [f"{prefix}.{i}.{s}" for i in range(2) for s in suffixes]


# The gated MLP of Llama, Qwen2, Qwen3, Mistral and Gemma: names and shapes.
GATED = (_block_names("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
         [(INTERMEDIATE, HIDDEN, False, False), (INTERMEDIATE, HIDDEN, False, False),
          (HIDDEN, INTERMEDIATE, False, False)])

# Exact tracked layer names, in module order, and (d_out, d_in', has_bias, transposed) of each block's layers.
EXPECTED_LAYERS: dict[str, tuple[list[str], list[tuple[int, int, bool, bool]]]] = {
    "gpt2": (_block_names("transformer.h", ["mlp.c_fc", "mlp.c_proj"]),
             [(INTERMEDIATE, HIDDEN + 1, True, True), (HIDDEN, INTERMEDIATE + 1, True, True)]),
    "gpt_neox": (_block_names("gpt_neox.layers", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
                 [(INTERMEDIATE, HIDDEN + 1, True, False), (HIDDEN, INTERMEDIATE + 1, True, False)]),
    "llama": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
    "mistral": GATED,
    "gemma": GATED,
    "phi3": (_block_names("model.layers", ["mlp.gate_up_proj", "mlp.down_proj"]),
             [(2 * INTERMEDIATE, HIDDEN, False, False), (HIDDEN, INTERMEDIATE, False, False)]),
    "opt": (_block_names("model.decoder.layers", ["fc1", "fc2"]),
            [(INTERMEDIATE, HIDDEN + 1, True, False), (HIDDEN, INTERMEDIATE + 1, True, False)]),
    "mlp": (["1", "3"], [(INTERMEDIATE, HIDDEN + 1, True, False), (VOCAB, INTERMEDIATE + 1, True, False)]),
}


@dataclass
class Fitted:
    """One architecture taken through fitting and query preconditioning."""

    model: nn.Module
    layers: list[TrackedLayer]
    factors: EKFACFactors
    dense: PreconditionedQueries
    lowrank: PreconditionedQueries
    train: TokenBatch


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def fitted(request) -> Fitted:
    build, pattern = ARCHITECTURES[request.param]
    model = build()
    layers = find_mlp_layers(model, pattern)
    fit_batches = batches_of(random_sequences(8, min_len=3, max_len=10, seed=1), batch_size=4)
    factors = fit_ekfac(model, layers, fit_batches, fisher=Fisher.EMPIRICAL)
    queries = [random_queries(NUM_QUERIES, seed=2)]
    dense = precondition_queries(model, factors, queries)
    lowrank = precondition_queries(model, factors, queries, rank=RANK)
    train = collate(random_sequences(4, min_len=3, max_len=11, seed=3))
    assert not bool(train.attention_mask.all()), "the training batch must contain padding"
    return Fitted(model, layers, factors, dense, lowrank, train)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_find_mlp_layers_exact_names(arch):
    build, pattern = ARCHITECTURES[arch]
    layers = find_mlp_layers(build(), pattern)
    names, per_block = EXPECTED_LAYERS[arch]
    assert [l.name for l in layers] == names
    assert [(l.d_out, l.d_in_h, l.has_bias, l.transposed) for l in layers] == per_block * (len(names) // len(per_block))


@pytest.mark.parametrize("arch, attention", [
    ("gpt2", [("attn.c_attn", 3 * HIDDEN, HIDDEN + 1), ("attn.c_proj", HIDDEN, HIDDEN + 1)]),
    ("llama", [(f"self_attn.{p}", HIDDEN, HIDDEN) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]),
    ("phi3", [("self_attn.o_proj", HIDDEN, HIDDEN), ("self_attn.qkv_proj", 3 * HIDDEN, HIDDEN)]),
])
def test_track_mlp_attention_adds_the_attention_projections(arch, attention):
    build, _ = ARCHITECTURES[arch]
    model = build()
    mlp = find_mlp_layers(model)
    both = find_mlp_layers(model, track="mlp+attention")
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    want_attention = [f"{prefix}.{i}.{name}" for i in range(LAYERS) for name, _, _ in attention]
    assert [l.name for l in both if l.name not in {m.name for m in mlp}] == want_attention
    assert {l.name for l in mlp} <= {l.name for l in both} and len(both) == len(mlp) + len(want_attention)
    shapes = {l.name: (l.d_out, l.d_in_h) for l in both}
    assert all(shapes[f"{prefix}.{i}.{n}"] == (o, d) for i in range(LAYERS) for n, o, d in attention)
    assert [l.name for l in find_mlp_layers(model, track="mlp")] == [l.name for l in mlp]
    with pytest.raises(ValueError, match="not both"):
        find_mlp_layers(model, r"mlp", track="mlp+attention")
    # the attention layers are scored like any other: the per-layer scores add up
    seqs = collate(random_sequences(3, seed=5))
    factors = fit_ekfac(model, both, [seqs], fisher=Fisher.EMPIRICAL)
    queries = precondition_queries(model, factors, [random_queries(2)])
    result = score_batch(model, queries, seqs, per_layer=True)
    assert result.per_layer.shape[-1] == len(both) and bool(result.per_layer.abs().sum((0, 1)).gt(0).all())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_weight_matrix_reproduces_layer_output(arch):
    """s = W' [x; 1] for every tracked layer: the layout of W' (Conv1D transposed) is right."""
    build, pattern = ARCHITECTURES[arch]
    torch.manual_seed(4)
    for layer in find_mlp_layers(build(), pattern):
        x = torch.randn(5, layer.d_in, dtype=torch.float64)
        a = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], dim=1) if layer.has_bias else x  # (5, d_in')
        with torch.no_grad():
            assert_close(a @ layer.weight_matrix().T, layer.module(x), name=f"{arch} {layer.name} output")


def test_factors_and_queries_shapes(fitted):
    names = [l.name for l in fitted.layers]
    assert list(fitted.factors.layers) == names
    assert fitted.factors.shapes == {l.name: l.shape for l in fitted.layers}
    assert fitted.factors.fisher == Fisher.EMPIRICAL
    assert fitted.factors.covariance_sequences == 8
    assert fitted.dense.layer_names == names and fitted.lowrank.layer_names == names
    assert fitted.dense.rank is None and fitted.lowrank.rank == RANK
    for l in fitted.layers:
        assert tuple(fitted.dense.layers[l.name].dense.shape) == (NUM_QUERIES, *l.shape)
        assert tuple(fitted.lowrank.layers[l.name].left.shape) == (NUM_QUERIES, l.d_out, RANK)
        assert tuple(fitted.lowrank.layers[l.name].right.shape) == (NUM_QUERIES, l.d_in_h, RANK)
    assert tuple(fitted.lowrank.truncation_error.shape) == (NUM_QUERIES, len(names))
    assert bool((fitted.lowrank.truncation_error > 0).all())
    assert bool((fitted.dense.measurement < 0).all()), "log p(completion | prompt) is negative"


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_strategies_agree(fitted, kind):
    queries = getattr(fitted, kind)
    mat = score_batch(fitted.model, queries, fitted.train, per_layer=True, strategy=Strategy.MATERIALIZE)
    tok = score_batch(fitted.model, queries, fitted.train, per_layer=True, strategy=Strategy.PER_TOKEN)
    assert set(mat.strategies.values()) == {Strategy.MATERIALIZE}
    assert set(tok.strategies.values()) == {Strategy.PER_TOKEN}
    assert tuple(mat.scores.shape) == (NUM_QUERIES, len(fitted.train))
    assert bool((mat.scores.abs() > 0).all()), "scores of a random model are not exactly 0"
    assert_close(tok.scores, mat.scores, name=f"{kind} scores, PER_TOKEN vs MATERIALIZE")
    assert_close(tok.per_layer, mat.per_layer, name=f"{kind} per-layer scores, PER_TOKEN vs MATERIALIZE")


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_decompositions_sum_to_total(fitted, kind):
    queries = getattr(fitted, kind)
    res = score_batch(fitted.model, queries, fitted.train, per_layer=True, per_token=True)
    B, T = fitted.train.input_ids.shape
    assert tuple(res.per_layer.shape) == (NUM_QUERIES, B, len(fitted.layers))
    assert tuple(res.per_token.shape) == (NUM_QUERIES, B, T)
    materialized = score_batch(fitted.model, queries, fitted.train, strategy=Strategy.MATERIALIZE).scores
    assert_close(res.per_layer.sum(-1), res.scores, name="sum of per-layer scores")
    assert_close(res.per_token.sum(-1), materialized, name="sum of per-token scores vs materialized G")
    padding = ~fitted.train.attention_mask.bool()  # (B, T)
    assert bool((res.per_token[:, padding] == 0).all()), "per-token scores must be exactly 0 at padding"
    real = res.per_token[:, ~padding]
    assert bool((real != 0).any())
    losses = LanguageModelObjective().sequence_losses(fitted.model, fitted.train, Fisher.EMPIRICAL, None)
    assert_close(res.losses, losses.detach(), name="training losses")


def test_auto_strategy_with_per_token_uses_per_token(fitted):
    res = score_batch(fitted.model, fitted.lowrank, fitted.train, per_token=True)
    assert set(res.strategies.values()) == {Strategy.PER_TOKEN}


def test_conv1d_per_sequence_gradient_matches_autograd():
    """G of one sequence = autograd weight.grad (transposed for Conv1D) with the bias column = bias.grad."""
    model = tiny_gpt2()
    layers = find_mlp_layers(model)
    assert all(l.transposed and l.has_bias for l in layers)
    seq = random_sequences(1, min_len=9, max_len=9, seed=5)
    batch = collate(seq, loss_masks=[[1, 1, 0, 1, 1, 1, 0, 1, 1]])  # some tokens out of the loss
    out = backward_pass(model, layers, LanguageModelObjective(), batch)
    grads = per_sequence_gradients(out.captured)

    logits = model(input_ids=batch.input_ids).logits  # (1, T, V)
    labels = batch.labels[:, 1:]
    assert int((labels == IGNORE_INDEX).sum()) == 2
    loss = F.cross_entropy(logits[0, :-1], labels[0], ignore_index=IGNORE_INDEX, reduction="sum")
    params = [p for l in layers for p in (l.module.weight, l.module.bias)]
    auto = torch.autograd.grad(loss, params)
    for i, layer in enumerate(layers):
        w_grad, b_grad = auto[2 * i], auto[2 * i + 1]
        assert tuple(w_grad.shape) == (layer.d_in, layer.d_out), "Conv1D stores its weight as [d_in, d_out]"
        G = grads[layer.name][0]  # (d_out, d_in + 1)
        assert_close(G[:, :-1], w_grad.T, F64_RTOL, F64_ATOL, name=f"{layer.name} weight gradient")
        assert_close(G[:, -1], b_grad, F64_RTOL, F64_ATOL, name=f"{layer.name} bias gradient")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_per_sequence_gradients_match_autograd(arch):
    """Every architecture: G of each sequence of a padded batch = autograd's weight (and bias) gradient of
    that sequence's summed loss, computed alone without padding (Conv1D weights transposed)."""
    build, pattern = ARCHITECTURES[arch]
    model = build()
    layers = find_mlp_layers(model, pattern)
    seqs = random_sequences(3, min_len=4, max_len=10, seed=7)
    batch = collate(seqs)
    assert not bool(batch.attention_mask.all()), "the batch must contain padding"
    grads = per_sequence_gradients(backward_pass(model, layers, LanguageModelObjective(), batch).captured)
    for b, seq in enumerate(seqs):
        one = collate([seq])
        logits = model(one.input_ids).logits if hasattr(model, "config") else model(one.input_ids)
        loss = F.cross_entropy(logits[0, :-1], one.labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
        for layer in layers:
            params = [layer.module.weight] + ([layer.module.bias] if layer.has_bias else [])
            auto = torch.autograd.grad(loss, params, retain_graph=True)
            w_grad = auto[0].T if layer.transposed else auto[0]  # (d_out, d_in)
            G = grads[layer.name][b]  # (d_out, d_in')
            assert_close(G[:, :w_grad.shape[1]], w_grad, F64_RTOL, F64_ATOL, name=f"{arch} {layer.name} seq {b}")
            if layer.has_bias:
                assert_close(G[:, -1], auto[1], F64_RTOL, F64_ATOL, name=f"{arch} {layer.name} bias seq {b}")

