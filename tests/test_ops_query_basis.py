"""Queries kept in the eigenbasis (``influence_ops.query_basis``): the same scores as the weight basis.

Brute force (float64, tiny GPT-2): query gradients and training gradients by one-sequence
autograd, P from the dense damped Kronecker inverse (``torch.kron``), rank-r P from its full
SVD; scores sum_l <P_l, G_l>.
"""

from __future__ import annotations

import pytest
import torch

import influence_ops as ops
from influence_ops.factors import LayerFactors
from influence_ops.query_basis import Basis, choose_basis, eigen_basis_cost, weight_basis_cost
from influence_ops.strategy import Strategy, plan
from ops_helpers import assert_close, batches_of, random_sequences, tiny_gpt2

# Same math in another order (float64).
RTOL, ATOL = 1e-9, 1e-12
PROMPTS = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
COMPLETIONS = [[11, 12], [13, 14, 15], [16], [17, 18]]


def autograd_gradient(model, layer: ops.TrackedLayer, batch) -> torch.Tensor:
    """G [d_out, d_in'] of a one-sequence batch from .grad of W and b."""
    model.zero_grad(set_to_none=True)
    ops.LanguageModelObjective().sequence_losses(model, batch, ops.Fisher.EMPIRICAL, None).sum().backward()
    w = layer.module.weight.grad
    w = w.T if layer.transposed else w
    g = torch.cat([w, layer.module.bias.grad[:, None]], dim=1) if layer.has_bias else w.clone()
    model.zero_grad(set_to_none=True)
    return g


def kron_precondition(lf: LayerFactors, damping: float, grads: torch.Tensor) -> torch.Tensor:
    """(G + lambda I)^-1 q with the dense (Q_S kron Q_A) diag(1 / (Lambda + lambda)) (Q_S kron Q_A)^T."""
    q = torch.kron(lf.eigen.q_s, lf.eigen.q_a)
    inverse = q @ torch.diag(1.0 / (lf.eigenvalues.flatten() + damping)) @ q.T
    return (inverse @ grads.reshape(grads.shape[0], -1).T).T.reshape(grads.shape)


@pytest.fixture(scope="module")
def world():
    model = tiny_gpt2()
    layers = ops.find_mlp_layers(model)
    factors = ops.fit_ekfac(model, layers, batches_of(random_sequences(12, seed=3), 4), fisher=ops.Fisher.EMPIRICAL)
    train = random_sequences(10, seed=4, min_len=3, max_len=9)
    return model, layers, factors, train


def brute_force_scores(world, rank: int | None) -> torch.Tensor:
    """[Q, N] sum_l <P_l, G_l> (rank r: P_l truncated by a full SVD)."""
    model, layers, factors, train = world
    total = torch.zeros(len(PROMPTS), len(train), dtype=torch.float64)
    for layer in layers:
        lf = factors.layers[layer.name]
        q = torch.stack([autograd_gradient(model, layer, ops.query_batch([p], [c]))
                         for p, c in zip(PROMPTS, COMPLETIONS)])
        P = kron_precondition(lf, lf.damping(None), q)  # (Q, d_out, d_in')
        if rank is not None:
            u, sv, vh = torch.linalg.svd(P, full_matrices=False)
            P = (u[..., :rank] * sv[..., None, :rank]) @ vh[..., :rank, :]
        G = torch.stack([autograd_gradient(model, layer, ops.collate([s])) for s in train])  # (N, d_out, d_in')
        total += torch.einsum("qoi,noi->qn", P, G)
    return total


@pytest.mark.parametrize("rank", [None, 3], ids=["dense", "rank-3"])
def test_eigenbasis_scores_equal_weight_basis_and_brute_force(world, rank):
    model, layers, factors, train = world
    batch = [ops.query_batch(PROMPTS[:2], COMPLETIONS[:2]), ops.query_batch(PROMPTS[2:], COMPLETIONS[2:])]
    weight = ops.precondition_queries(model, factors, batch, rank=rank)
    eigen = ops.precondition_queries(model, factors, batch, rank=rank, basis="eigen")
    assert set(weight.bases.values()) == {Basis.WEIGHT} and set(eigen.bases.values()) == {Basis.EIGEN}
    assert_close(eigen.self_influence, weight.self_influence, RTOL, ATOL, name="query self-influence")
    for name in weight.layer_names:
        assert_close(eigen.layers[name].to_weight_basis().to_dense(), weight.layers[name].to_dense(), RTOL, ATOL,
                     name=f"P {name}")
        assert not torch.allclose(eigen.layers[name].to_dense(), weight.layers[name].to_dense()), \
            "the eigenbasis tensors must differ from P, else the test compares nothing"
    want = brute_force_scores(world, rank)
    tb = ops.collate(train)
    for strategy in (Strategy.MATERIALIZE, Strategy.PER_TOKEN):
        ref = ops.score_batch(model, weight, tb, per_layer=True, strategy=strategy, factors=factors)
        got = ops.score_batch(model, eigen, tb, per_layer=True, strategy=strategy, factors=factors)
        assert_close(ref.scores, want, 1e-8, ATOL, name=f"weight basis vs brute force ({strategy.value})")
        assert_close(got.scores, want, 1e-8, ATOL, name=f"eigenbasis vs brute force ({strategy.value})")
        assert_close(got.per_layer, ref.per_layer, RTOL, ATOL, name=f"per-layer ({strategy.value})")
        assert_close(got.self_influence, ref.self_influence, RTOL, ATOL, name=f"self-influence ({strategy.value})")
        assert_close(got.train_norm, ref.train_norm, RTOL, ATOL, name=f"train norm ({strategy.value})")
    ref = ops.score_batch(model, weight, tb, per_token=True, normalize=ops.Normalize.COSINE, factors=factors)
    got = ops.score_batch(model, eigen, tb, per_token=True, normalize=ops.Normalize.COSINE, factors=factors)
    assert_close(got.per_token, ref.per_token, RTOL, ATOL, name="per-token cosine scores")
    # the materialized G, rotated once per sequence (long sequences), gives the same scores
    rotated_g = ops.score_batch(model, eigen, tb, strategy=Strategy.MATERIALIZE)
    assert_close(rotated_g.scores, want, 1e-8, ATOL, name="eigenbasis, no self-influence")


def test_saved_eigenbasis_queries_load_in_the_weight_basis(world, tmp_path):
    model, _, factors, _ = world
    batch = [ops.query_batch(PROMPTS, COMPLETIONS)]
    eigen = ops.precondition_queries(model, factors, batch, rank=2, basis=Basis.EIGEN)
    weight = ops.precondition_queries(model, factors, batch, rank=2)
    loaded = ops.load_queries(ops.save_queries(eigen, tmp_path / "q"))
    assert set(loaded.bases.values()) == {Basis.WEIGHT}
    for name in weight.layer_names:
        assert_close(loaded.layers[name].to_dense(), weight.layers[name].to_dense(), RTOL, ATOL, name=name)
    both = eigen.concat(weight)  # mixed bases: concatenated in the weight basis
    assert set(both.bases.values()) == {Basis.WEIGHT} and both.num_queries == 2 * len(PROMPTS)
    picked = eigen.select([2, 0])
    assert set(picked.bases.values()) == {Basis.EIGEN}
    assert_close(picked.layers[name].to_weight_basis().to_dense(), weight.layers[name].to_dense()[[2, 0]],
                 RTOL, ATOL, name="selected")


def test_cost_model_picks_each_basis_on_its_side_of_the_break_even():
    d_out, d_in, Q, r = 3072, 769, 32, 32
    # dense: N (d_out^2 + d_in^2) against Q d_out d_in (d_out + d_in); break-even about 905 Q tokens here
    even = weight_basis_cost(Q, d_out, d_in, None) / (d_out ** 2 + d_in ** 2)
    assert 900 * Q < even < 910 * Q
    assert choose_basis(Q, d_out, d_in, None, int(even) - 1) is Basis.EIGEN
    assert choose_basis(Q, d_out, d_in, None, int(even) + 1) is Basis.WEIGHT
    assert choose_basis(Q, d_out, d_in, None, 64 * 128) is Basis.EIGEN  # the benchmark's 64 x 128 tokens
    assert choose_basis(Q, d_out, d_in, None, 512 * 128) is Basis.WEIGHT  # 512 x 128
    # rank r: break-even at N = Q r
    assert choose_basis(Q, d_out, d_in, r, Q * r - 1) is Basis.EIGEN
    assert choose_basis(Q, d_out, d_in, r, Q * r) is Basis.WEIGHT
    # long sequences: rotating each G beats rotating its tokens, which moves the break-even
    tokens = 4 * int(even)
    assert choose_basis(Q, d_out, d_in, None, tokens) is Basis.WEIGHT
    assert eigen_basis_cost(tokens, d_out, d_in, sequences=Q - 1) < eigen_basis_cost(tokens, d_out, d_in)
    assert choose_basis(Q, d_out, d_in, None, tokens, train_sequences=Q - 1) is Basis.EIGEN
    with pytest.raises(ValueError, match="train_tokens"):
        choose_basis(Q, d_out, d_in, None, -1)


def test_auto_basis_follows_the_cost_model_per_layer(world):
    model, layers, factors, _ = world
    batch = [ops.query_batch(PROMPTS, COMPLETIONS)]
    Q = len(PROMPTS)
    for layer in layers:
        d_out, d_in = layer.shape
        even = weight_basis_cost(Q, d_out, d_in, None) / (d_out ** 2 + d_in ** 2)
        for tokens, want in ((int(even) - 1, Basis.EIGEN), (int(even) + 1, Basis.WEIGHT)):
            got = ops.precondition_queries(model, factors, batch, basis="auto", train_tokens=tokens)
            assert got.bases[layer.name] is want, (layer.name, tokens)
    with pytest.raises(ValueError, match="basis = auto needs train_tokens"):
        ops.precondition_queries(model, factors, batch, basis="auto")


def test_plan_counts_the_training_side_rotation_for_eigenbasis_queries():
    B, T, Q, d_out, d_in = 4, 128, 32, 3072, 769
    weight = plan(B, T, Q, d_out, d_in, None)
    eigen = plan(B, T, Q, d_out, d_in, None, rotated=True)
    assert eigen.strategy is weight.strategy is Strategy.MATERIALIZE
    assert eigen.cost - weight.cost == B * T * (d_out ** 2 + d_in ** 2) and eigen.rotation == "rotate_tokens"
    # with self-influence, R is G~ in the eigenbasis: nothing more than the rotation
    with_self = plan(B, T, Q, d_out, d_in, None, self_influence=True, rotated=True)
    assert with_self.cost == eigen.cost
    assert plan(B, T, Q, d_out, d_in, None, self_influence=True).cost > with_self.cost  # the weight basis pays B T d_out d_in more
    # long sequences: rotating G once is cheaper than rotating 4096 tokens
    assert plan(B, 4096, Q, d_out, d_in, None, rotated=True).rotation == "rotate_gradient"
