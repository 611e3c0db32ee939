"""Query preparation in the eigenbasis (``influence_ops.query_prep``) against today's float64 path.

The old path: materialize G, ``apply_inverse`` (rotate in, damp, rotate back), ``lowrank.truncate``
(full SVD of P). The new one rotates per token, damps, and factors M in the eigenbasis.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from influence_ops import (
    Fisher,
    LowRankMethod,
    Precision,
    QueryPrep,
    find_mlp_layers,
    fit_ekfac,
    model_fingerprint,
    precondition_queries,
    query_batch,
    score_batch,
)
from influence_ops.eigen import LayerEigen
from influence_ops.factors import LayerFactors
from influence_ops.ihvp import apply_inverse
from influence_ops.lowrank import truncate
from influence_ops.query_prep import per_token_rotation, prepare_layer
from ops_helpers import assert_close, batches_of, random_queries, random_sequences, tiny_gpt2

# Same math in another order (float64): P, its factors and singular values agree to rounding.
PREP_RTOL, PREP_ATOL = 1e-9, 1e-12
# Randomized SVD on a spectrum halving at every index, k = r + 8 columns, 2 power iterations.
RANDOMIZED_RTOL = 1e-8
# float32 preparation against float64 (issue 10: per-query Spearman of the scores).
MIN_SPEARMAN = 0.999
EXACT = QueryPrep()
FAST = QueryPrep(precision=Precision.FLOAT32, lowrank=LowRankMethod.RANDOMIZED)


def random_layer(d_out: int, d_in: int, seed: int) -> LayerFactors:
    gen = torch.Generator().manual_seed(seed)
    q_s = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)).Q
    q_a = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)).Q
    lam = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.01
    eigen = LayerEigen(q_a=q_a, e_a=torch.ones(d_in), q_s=q_s, e_s=torch.ones(d_out))
    return LayerFactors(torch.zeros(0), torch.zeros(0), 1, eigen, lam * 7, 7)


def per_token(B: int, T: int, d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, d_in, generator=gen, dtype=torch.float64),
            torch.randn(B, T, d_out, generator=gen, dtype=torch.float64))


def singular_values(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """[B, r]: left = U diag(sv) with orthonormal right, so sv are the column norms of left."""
    assert_close(right.mT @ right, torch.eye(right.shape[-1], dtype=right.dtype).expand(right.shape[0], -1, -1),
                 rtol=0, atol=1e-10, name="right^T right")
    return left.norm(dim=-2)


@pytest.mark.parametrize("T", [3, 60], ids=["per-token rotation", "materialized rotation"])
def test_eigenbasis_svd_equals_svd_of_p(T):
    d_out, d_in, rank, damping = 20, 13, 5, 0.05
    f = random_layer(d_out, d_in, seed=1)
    a, g = per_token(4, T, d_out, d_in, seed=2)
    assert per_token_rotation(T, d_out, d_in) == (T == 3)
    p = apply_inverse(f, torch.einsum("bto,bti->boi", g, a), damping)  # the old path: (B, d_out, d_in')
    left, right, error = truncate(p, rank)
    dense, *_ = prepare_layer(f, a, g, None, damping, EXACT)
    _, new_left, new_right, new_error = prepare_layer(f, a, g, rank, damping, EXACT)
    assert_close(dense, p, PREP_RTOL, PREP_ATOL, name="dense P")
    assert_close(singular_values(new_left, new_right), singular_values(left, right), PREP_RTOL, PREP_ATOL,
                 name="singular values")
    assert_close(new_left @ new_right.mT, left @ right.mT, PREP_RTOL, PREP_ATOL, name="rank-r P")
    assert_close(new_error, error, PREP_RTOL, PREP_ATOL, name="truncation error")
    assert bool((error > 0.01).all()), "the rank-r truncation must drop something for this test to mean anything"


def test_randomized_svd_equals_exact_on_a_decaying_spectrum():
    d_out, d_in, rank = 40, 30, 4
    f = random_layer(d_out, d_in, seed=3)
    f.lambda_sum = torch.ones(d_out, d_in, dtype=torch.float64) * f.sequences  # Lambda = 1: M = rotated G / (1 + d)
    gen = torch.Generator().manual_seed(4)
    # G = sum_t 2^-t u_t v_t^T with orthonormal u, v: singular values 2^-t
    u = torch.linalg.qr(torch.randn(2, d_out, d_out, generator=gen, dtype=torch.float64)).Q[:, :, :20]
    v = torch.linalg.qr(torch.randn(2, d_in, d_in, generator=gen, dtype=torch.float64)).Q[:, :, :20]
    scale = 0.5 ** torch.arange(20, dtype=torch.float64)
    g, a = (u * scale).mT, v.mT  # (B, T, d_out), (B, T, d_in')
    prep = QueryPrep(lowrank=LowRankMethod.RANDOMIZED)
    _, left, right, error = prepare_layer(f, a, g, rank, 0.0, EXACT)
    _, r_left, r_right, r_error = prepare_layer(f, a, g, rank, 0.0, prep)
    assert_close(r_left @ r_right.mT, left @ right.mT, RANDOMIZED_RTOL, 1e-12, name="rank-r P")
    assert_close(r_error, error, RANDOMIZED_RTOL, 1e-12, name="truncation error")
    again = prepare_layer(f, a, g, rank, 0.0, prep)[1]
    assert torch.equal(again, r_left), "the randomized SVD is seeded: the same queries give the same factors"


@pytest.mark.parametrize("prep", [EXACT, QueryPrep(lowrank=LowRankMethod.RANDOMIZED)], ids=["exact", "randomized"])
def test_batched_equals_one_query_at_a_time(prep):
    """In float64: one batch of 4 queries (padded) == 4 batches of one (the randomized sketch is seeded per call)."""
    model = tiny_gpt2()
    layers = find_mlp_layers(model)
    factors = fit_ekfac(model, layers, batches_of(random_sequences(8, seed=1), 4), fisher=Fisher.EMPIRICAL)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11, 12]]
    completions = [[13], [14, 15, 16], [17, 18], [19, 20, 21, 22]]
    together = precondition_queries(model, factors, [query_batch(prompts, completions)], rank=3, prep=prep)
    alone = precondition_queries(model, factors, [query_batch([p], [c]) for p, c in zip(prompts, completions)],
                                 rank=3, prep=prep)
    for name in together.layer_names:
        assert_close(together.layers[name].to_dense(), alone.layers[name].to_dense(), PREP_RTOL, PREP_ATOL, name=name)
    assert_close(together.truncation_error, alone.truncation_error, PREP_RTOL, PREP_ATOL, name="truncation error")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = (v.argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_float32_randomized_scores_rank_like_float64():
    model64, model32 = tiny_gpt2(), tiny_gpt2(dtype=torch.float32)
    factors = fit_ekfac(model64, find_mlp_layers(model64), batches_of(random_sequences(16, seed=1), 4),
                        fisher=Fisher.EMPIRICAL)
    factors32 = dataclasses.replace(factors, fingerprint=model_fingerprint(find_mlp_layers(model32)))
    queries = [random_queries(4, seed=s) for s in (5, 6)]
    ref = precondition_queries(model64, factors, queries, rank=4)
    fast = precondition_queries(model32, factors32, queries, rank=4, prep=FAST)
    assert fast.layers[ref.layer_names[0]].left.dtype == torch.float32
    fast = dataclasses.replace(fast.to("cpu", torch.float64), fingerprint=ref.fingerprint)
    train = batches_of(random_sequences(64, seed=7, min_len=4, max_len=12), 16)
    s_ref = torch.cat([score_batch(model64, ref, b).scores for b in train], dim=1)  # (Q, N)
    s_fast = torch.cat([score_batch(model64, fast, b).scores for b in train], dim=1)
    rho = [spearman(s_ref[q], s_fast[q]) for q in range(s_ref.shape[0])]
    assert min(rho) >= MIN_SPEARMAN, f"per-query Spearman {rho}"
    assert not torch.equal(s_ref, s_fast), "the two paths must differ in rounding, else this test compares nothing"


def test_build_queries_on_actors_equals_in_process(ray_local, tiny_world, tmp_path):
    from influence_ops import load_factors, load_queries
    from pipelines import config_from_dict
    from pipelines.io.model_loading import load_model, load_tokenizer
    from pipelines.run import run_job
    from pipelines.stages.build_queries import precondition, query_prep, tokenize_queries

    cfg = config_from_dict({
        "model": {"path": str(tiny_world / "model"), "dtype": "float64"},
        "data": {"raw": str(tiny_world / "raw"), "corpus": str(tmp_path / "shards"),
                 "queries": str(tiny_world / "queries.jsonl"), "output": str(tmp_path / "out")},
        "factors": {"fisher": "empirical", "sample_sequences": 12, "unit_sequences": 12},
        # float64 and the randomized SVD: a rank-r truncation amplifies rounding by 1 / (sv_r - sv_r+1), so
        # float32 runs on differently threaded processes differ more than "the same queries" should
        "scoring": {"rank": 4, "query_batches_per_unit": 1, "query_precision": "float64"},
        "resources": {"actors": 2, "batch_size": 1, "cpus_per_actor": 0.5},
    })
    record = run_job(cfg, stages=("tokenize", "fit-factors", "build-queries"))
    assert record["stages"]["build-queries"]["units"] == 3  # 3 queries, one per unit, over 2 actors
    m = load_model(cfg.model)
    rows = tokenize_queries(cfg.data.queries, load_tokenizer(cfg.model), m.vocab_size, m.context)
    factors = load_factors(tmp_path / "out" / "factors", m.layers)
    want = precondition(m, factors, rows, 4, None, batch_size=1, prep=query_prep(cfg))
    got = load_queries(tmp_path / "out" / "queries")
    assert got.query_ids == ["q-cat", "q-fish", "q-dog"] and got.rank == 4
    assert not (tmp_path / "out" / "queries" / "parts").exists()
    for name in want.layer_names:
        assert_close(got.layers[name].to_dense(), want.layers[name].to_dense(), 1e-8, 1e-11, name=name)
    assert_close(got.truncation_error, want.truncation_error, 1e-8, 1e-11, name="truncation error")


def test_job_file_checks_the_query_options():
    from pipelines.config import ConfigError, ScoringConfig

    assert ScoringConfig().query_precision is Precision.FLOAT32  # the default: Spearman >= 0.999 (RESULTS.md 4)
    assert ScoringConfig(query_precision="float64", query_lowrank="exact").query_lowrank is LowRankMethod.EXACT
    with pytest.raises(ConfigError, match="scoring.query_precision.*float16"):
        ScoringConfig(query_precision="float16")
    with pytest.raises(ConfigError, match="scoring.query_lowrank"):
        ScoringConfig(query_lowrank="lanczos")
    with pytest.raises(ConfigError, match="scoring.query_batches_per_unit"):
        ScoringConfig(query_batches_per_unit=0)
