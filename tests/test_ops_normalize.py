"""Self-influence and the score normalizations against brute force (float64, tiny models).

References: per-sequence gradients from ``loss.backward()`` one sequence at a
time, and per layer the dense damped EK-FAC matrix
H_l = (Q_S kron Q_A) diag(vec(Lambda + lambda)) (Q_S kron Q_A)^T built with
``torch.kron`` and solved densely.
"""

from __future__ import annotations

import pytest
import torch
from test_ops_numerics import assert_close, autograd_gradient, loss_masks, reference_gradients, sequences, tiny_model

import influence_ops as ops
from influence_ops.self_influence import rotate_gradient, rotate_tokens, rotated_self_influence
from influence_ops.strategy import Strategy, materialize_cost, per_token_cost, plan, rotation_costs

PROMPTS = [[1, 2, 3], [4, 5], [7, 8, 9, 10]]
COMPLETIONS = [[6, 7], [8], [11, 3, 2]]


def dense_h(layer_factors: ops.LayerFactors, damping: float) -> torch.Tensor:
    """[D, D] with D = d_out d_in' (row-major vec of [d_out, d_in'])."""
    e = layer_factors.eigen
    K = torch.kron(e.q_s, e.q_a)
    return K @ torch.diag((layer_factors.eigenvalues + damping).flatten()) @ K.T


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model = tiny_model(request.param)
    layers = ops.find_mlp_layers(model)
    seqs = sequences(7, seed=3)
    masks = loss_masks(seqs, seed=4)
    batches = [ops.collate(seqs[:4], masks[:4]), ops.collate(seqs[4:], masks[4:])]
    factors = ops.fit_ekfac(model, layers, batches, fisher=ops.Fisher.EMPIRICAL, seed=0)
    train = reference_gradients(model, layers, seqs, masks)  # name -> [N, d_out, d_in']
    query = {l.name: torch.stack([autograd_gradient(model, l, ops.query_batch([p], [c]))
                                  for p, c in zip(PROMPTS, COMPLETIONS)]) for l in layers}
    return model, layers, batches, factors, train, query


def queries_of(model, factors, rank):
    return ops.precondition_queries(model, factors, [ops.query_batch(PROMPTS, COMPLETIONS)], rank=rank)


def score_all(model, queries, batches, **kw):
    results = [ops.score_batch(model, queries, b, **kw) for b in batches]
    return results, torch.cat([r.scores for r in results], dim=1)


def brute(setup, queries):
    """Per layer: H_l, the stored P_l [Q, D] and q_l = H_l P_l; g_l [N, D]."""
    _, layers, _, factors, train, _ = setup
    out = {}
    for l in layers:
        H = dense_h(factors.layers[l.name], queries.damping[l.name])
        P = queries.layers[l.name].to_dense().flatten(1)
        out[l.name] = (H, P, P @ H, train[l.name].flatten(1))
    return out


def test_self_influence_against_dense_inverse_per_layer_and_summed(setup):
    model, layers, batches, factors, train, _ = setup
    queries = queries_of(model, factors, rank=None)
    total = torch.zeros(train[layers[0].name].shape[0], dtype=torch.float64)
    for l in layers:
        lf, lam = factors.layers[l.name], queries.damping[l.name]
        g = train[l.name].flatten(1)  # (N, D)
        want = torch.einsum("nd,nd->n", g, torch.linalg.solve(dense_h(lf, lam), g.T).T)
        got = rotated_self_influence(rotate_gradient(lf, train[l.name]), lf.eigenvalues + lam)
        assert_close(got, want, f"{l.name} self-influence")
        total += want
    for strategy in (Strategy.MATERIALIZE, Strategy.PER_TOKEN):
        results, _ = score_all(model, queries, batches, factors=factors, strategy=strategy)
        assert_close(torch.cat([r.self_influence for r in results]), total, f"summed self-influence ({strategy})")
        norms = torch.sqrt(sum(train[l.name].flatten(1).pow(2).sum(1) for l in layers))
        assert_close(torch.cat([r.train_norm for r in results]), norms, "||g|| from the rotated gradient")
    assert bool((total > 0).all())


def test_both_rotations_agree(setup):
    model, layers, batches, factors, _, _ = setup
    out = ops.backward_pass(model, layers, ops.LanguageModelObjective(), batches[0])
    for l in layers:
        a, g = out.captured.activations[l.name], out.captured.output_grads[l.name]
        G = ops.per_sequence_gradients(out.captured)[l.name]
        assert_close(rotate_tokens(factors.layers[l.name], a, g), rotate_gradient(factors.layers[l.name], G),
                     f"{l.name} rotated gradient")


@pytest.mark.parametrize("rank", [None, 2])
def test_query_self_influence(setup, rank):
    model, layers, _, factors, _, query = setup
    queries = queries_of(model, factors, rank)
    parts = brute(setup, queries)
    if rank is None:  # q^T H^-1 q with the autograd query gradient
        want = sum(torch.einsum("qd,qd->q", query[n].flatten(1),
                                torch.linalg.solve(H, query[n].flatten(1).T).T) for n, (H, *_) in parts.items())
    else:  # the approximated query q_r = H P_r: q_r^T H^-1 q_r = P_r^T H P_r
        want = sum(torch.einsum("qd,qd->q", P @ H, P) for H, P, _, _ in parts.values())
    assert_close(queries.self_influence, want, f"query self-influence (rank {rank})")


@pytest.mark.parametrize("rank", [None, 2])
def test_normalizations_against_formulas(setup, rank):
    model, layers, batches, factors, _, _ = setup
    queries = queries_of(model, factors, rank)
    parts = brute(setup, queries)
    raw = sum(q @ torch.linalg.solve(H, g.T) for H, _, q, g in parts.values())  # (Q, N): q^T H^-1 g
    self_q = sum(torch.einsum("qd,qd->q", q, torch.linalg.solve(H, q.T).T) for H, _, q, _ in parts.values())
    self_m = sum(torch.einsum("nd,nd->n", g, torch.linalg.solve(H, g.T).T) for H, _, _, g in parts.values())
    norm_m = torch.sqrt(sum(g.pow(2).sum(1) for *_, g in parts.values()))
    want = {"none": raw, "cosine": raw / torch.sqrt(self_q[:, None] * self_m[None, :]), "train_norm": raw / norm_m}
    for name, expected in want.items():
        for kw in ({"factors": factors}, {}) if name != "cosine" else ({"factors": factors},):
            results, got = score_all(model, queries, batches, normalize=ops.Normalize(name), per_token=True,
                                     per_layer=True, **kw)
            assert_close(got, expected, f"{name} scores (rank {rank}, factors {bool(kw)})")
            for r in results:  # per-token and per-layer parts are divided alike and still add up
                assert_close(r.per_token.sum(-1), r.scores, f"{name} per-token sum")
                assert_close(r.per_layer.sum(-1), r.scores, f"{name} per-layer sum")
    _, cos = score_all(model, queries, batches, normalize="cosine", factors=factors)
    assert bool((cos.abs() <= 1 + 1e-12).all())


def test_train_norm_without_factors_both_paths(setup):
    model, layers, batches, factors, train, _ = setup
    queries = queries_of(model, factors, None)
    norms = torch.sqrt(sum(train[l.name].flatten(1).pow(2).sum(1) for l in layers))
    for strategy in (Strategy.MATERIALIZE, Strategy.PER_TOKEN):  # ||G|| from G, or from G or the Gram form
        results, _ = score_all(model, queries, batches, normalize="train_norm", strategy=strategy)
        assert_close(torch.cat([r.train_norm for r in results]), norms, f"||g|| ({strategy})")
        assert all(r.self_influence is None for r in results)


def test_cosine_needs_factors_and_query_self_influence(setup):
    model, _, batches, factors, _, _ = setup
    queries = queries_of(model, factors, None)
    with pytest.raises(ValueError, match="factors"):
        ops.score_batch(model, queries, batches[0], normalize="cosine")
    queries.self_influence = None  # queries saved before it was stored
    with pytest.raises(ValueError, match="rebuild the queries"):
        ops.score_batch(model, queries, batches[0], normalize="cosine", factors=factors)


def test_query_self_influence_is_saved(setup, tmp_path):
    model, _, _, factors, _, _ = setup
    queries = queries_of(model, factors, 2)
    ops.save_queries(queries, tmp_path)
    assert torch.equal(ops.load_queries(tmp_path).self_influence, queries.self_influence)
    assert torch.equal(queries.concat(queries).self_influence, torch.cat([queries.self_influence] * 2))


@pytest.mark.parametrize("B, T, Q, d_out, d_in, rank", [
    (8, 512, 4, 3072, 769, 32), (8, 16, 4, 3072, 769, 32), (8, 4096, 1, 64, 17, None), (2, 8, 64, 16, 9, None)])
def test_plan_is_the_cheapest_pair(B, T, Q, d_out, d_in, rank):
    best = plan(B, T, Q, d_out, d_in, rank, self_influence=True)
    pairs = {}
    for s, base in ((Strategy.PER_TOKEN, per_token_cost(B, T, Q, d_out, d_in, rank)),
                    (Strategy.MATERIALIZE, materialize_cost(B, T, Q, d_out, d_in, rank))):
        for rot, extra in rotation_costs(B, T, d_out, d_in, s == Strategy.MATERIALIZE).items():
            pairs[(s, rot)] = base + extra
    assert best.cost == min(pairs.values()) and pairs[(best.strategy, best.rotation)] == best.cost
    assert plan(B, T, Q, d_out, d_in, rank, per_token=True, self_influence=True).strategy == Strategy.PER_TOKEN
    # rotating tokens wins below T = d_out d_in' (d_out + d_in') / (d_out^2 + d_in'^2 + d_out d_in')
    t_star = d_out * d_in * (d_out + d_in) / (d_out ** 2 + d_in ** 2 + d_out * d_in)
    costs = rotation_costs(B, T, d_out, d_in, materialized=True)
    assert (costs["rotate_tokens"] < costs["rotate_gradient"]) == (T < t_star)
