"""Contracts of the public API: clear errors on bad input, no side effects on the
model, exact save/load, mergeable partial results, and invariances (batch size,
batch composition, padding, merge order).

Tiny float64 models; factors fitted with the empirical Fisher (deterministic).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from ops_helpers import (
    ARCHITECTURES,
    F64_ATOL,
    F64_RTOL,
    MLP_PATTERN,
    VOCAB,
    assert_close,
    batches_of,
    random_queries,
    random_sequences,
    tiny_gpt2,
    tiny_mlp,
)
from torch import nn

from influence_ops import (
    EKFACFactors,
    Fisher,
    LayerQuery,
    PreconditionedQueries,
    Strategy,
    TokenBatch,
    TopKAccumulator,
    TrackedLayer,
    capture,
    collate,
    eigendecompose,
    find_mlp_layers,
    fit_covariances,
    fit_ekfac,
    fit_lambda,
    load_factors,
    load_queries,
    model_fingerprint,
    precondition_queries,
    query_batch,
    save_factors,
    save_queries,
    score_batch,
)
from influence_ops.storage import MANIFEST

# Low-rank queries at full rank are the same matrices up to SVD rounding.
FULL_RANK_RTOL = 1e-9
# Relative truncation error of a full-rank SVD.
FULL_RANK_ERROR_ATOL = 1e-12
# Modules a pure-math import must not load (docs/contributing.md, "One direction of imports"). Not tqdm:
# torch itself imports it (torch.hub).
FORBIDDEN_IMPORTS = ("ray", "pyarrow", "fsspec", "s3fs", "click", "duckdb", "transformers")


@dataclass
class Setup:
    model: nn.Module
    layers: list[TrackedLayer]
    fit_batches: list[TokenBatch]
    factors: EKFACFactors
    queries: PreconditionedQueries


def fit_setup(model: nn.Module, pattern: str | None = None) -> Setup:
    layers = find_mlp_layers(model, pattern)
    fit_batches = batches_of(random_sequences(8, seed=1), batch_size=4)
    factors = fit_ekfac(model, layers, fit_batches, fisher=Fisher.EMPIRICAL)
    queries = precondition_queries(model, factors, [random_queries(3, seed=2)], query_ids=["q0", "q1", "q2"])
    return Setup(model, layers, fit_batches, factors, queries)


@pytest.fixture(scope="module")
def gpt2() -> Setup:
    return fit_setup(tiny_gpt2())


def no_hooks(layers: list[TrackedLayer]) -> bool:
    return all(len(l.module._forward_hooks) == 0 for l in layers)


# ---------------------------------------------------------------- bad inputs


def test_token_batch_shape_mismatch():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape("attention_mask has shape (2, 4), input_ids (2, 5)")):
        TokenBatch(ids, torch.ones(2, 4, dtype=torch.long), ids.clone())
    with pytest.raises(ValueError, match=re.escape("labels has shape (3, 5), input_ids (2, 5)")):
        TokenBatch(ids, torch.ones_like(ids), torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("input_ids must be [B, T], got shape (5,)")):
        TokenBatch(ids[0], ids[0], ids[0])


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    empty = torch.zeros(0, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="empty batch"):
        TokenBatch(empty, empty, empty)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        collate([[1, 2], []])
    model = tiny_mlp()
    with pytest.raises(ValueError, match="fit_covariances got no batches"):
        fit_covariances(model, find_mlp_layers(model, MLP_PATTERN), [], fisher=Fisher.EMPIRICAL)


def test_sequence_without_loss_tokens():
    with pytest.raises(ValueError, match="sequence 1 has no token in the loss"):
        collate([[1, 2, 3], [4, 5, 6]], loss_masks=[[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="sequence 0 has no token in the loss"):
        collate([[7]])  # one token: nothing before it predicts it
    with pytest.raises(ValueError, match="sequence 0: loss_mask has 2 entries, input_ids 3"):
        collate([[1, 2, 3]], loss_masks=[[1, 1]])
    with pytest.raises(ValueError, match="query 1: empty completion"):
        query_batch([[1, 2], [3, 4]], [[5], []])


def test_nan_in_factor_names_layer(gpt2):
    cov = fit_covariances(gpt2.model, gpt2.layers, gpt2.fit_batches, fisher=Fisher.EMPIRICAL)
    name = gpt2.layers[1].name
    cov.layers[name].a_sum[0, 1] = float("nan")
    with pytest.raises(ValueError, match=re.escape(f"layer {name} activation factor A: covariance has 1 NaN/Inf")):
        eigendecompose(cov)
    cov = fit_covariances(gpt2.model, gpt2.layers, gpt2.fit_batches, fisher=Fisher.EMPIRICAL)
    cov.layers[name].s_sum[2, 2] = float("inf")
    with pytest.raises(ValueError, match=re.escape(f"layer {name} gradient factor S")):
        eigendecompose(cov)


def test_factors_refuse_a_different_model(gpt2, tmp_path):
    save_factors(gpt2.factors, tmp_path)
    other = tiny_gpt2(seed=1)  # same names and shapes, different weights
    other_layers = find_mlp_layers(other)
    with pytest.raises(ValueError, match=r"different model \(fingerprint [0-9a-f]{32}, this model [0-9a-f]{32}\)"):
        load_factors(tmp_path, other_layers)
    with pytest.raises(ValueError, match="fitted on a different model"):
        precondition_queries(other, gpt2.factors, [random_queries(1)])
    mlp = tiny_mlp()
    with pytest.raises(ValueError, match=re.escape("the model tracks ['1', '3']")):
        load_factors(tmp_path, find_mlp_layers(mlp, MLP_PATTERN))
    assert load_factors(tmp_path, gpt2.layers).fingerprint == model_fingerprint(gpt2.layers)


def _rewrite_json(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_incompatible_format_version(gpt2, tmp_path):
    save_factors(gpt2.factors, tmp_path / "factors")
    _rewrite_json(tmp_path / "factors" / MANIFEST, format="ekfac-factors/0")
    with pytest.raises(ValueError, match=r"factor format 'ekfac-factors/0' .* is not the format 'ekfac-factors/1'"):
        load_factors(tmp_path / "factors")
    save_queries(gpt2.queries, tmp_path / "queries")
    _rewrite_json(tmp_path / "queries" / "queries.json", format="preconditioned-queries/99")
    with pytest.raises(ValueError, match="query format 'preconditioned-queries/99' is not"):
        load_queries(tmp_path / "queries")


def test_missing_or_incomplete_directories(gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest; the factor directory is missing or incomplete"):
        load_factors(tmp_path / "absent")
    save_factors(gpt2.factors, tmp_path / "factors")
    (tmp_path / "factors" / MANIFEST).unlink()  # as if the writer died before the manifest landed
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_factors(tmp_path / "factors")
    save_factors(gpt2.factors, tmp_path / "factors")
    next((tmp_path / "factors").glob("001_*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"factor file of layer {gpt2.layers[1].name} is missing")):
        load_factors(tmp_path / "factors")
    with pytest.raises(FileNotFoundError, match="no queries.json"):
        load_queries(tmp_path / "absent")


def test_no_matching_layers_lists_module_names():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"matches pattern 'attn'; module names seen: 0, 1, 2, 3$"):
        find_mlp_layers(model, "attn")
    with pytest.raises(ValueError, match="module names seen: 0, 1, 2, 3"):
        find_mlp_layers(model, r"^2$")  # the ReLU matches but is not a linear layer
    with pytest.raises(ValueError, match="no MLP layer pattern is known for model type None"):
        find_mlp_layers(model)


def test_invalid_regex():
    with pytest.raises(ValueError, match=re.escape("invalid layer pattern 'mlp.(c_fc'")):
        find_mlp_layers(tiny_mlp(), "mlp.(c_fc")


def test_dropout_active_model_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(8, VOCAB)).double().train()
    layers = find_mlp_layers(model, r"^(1|4)$")
    batches = batches_of(random_sequences(2), 2)
    with pytest.raises(ValueError, match=r"active dropout \(\['3'\]\.\.\.\); call model\.eval\(\) first"):
        fit_covariances(model, layers, batches, fisher=Fisher.EMPIRICAL)
    assert model.training, "the engine must not flip the model's mode"
    assert no_hooks(layers)
    model.eval()
    cov = fit_covariances(model, layers, batches, fisher=Fisher.EMPIRICAL)
    assert cov.sequences == 2
    assert not model.training


def test_invalid_arguments(gpt2):
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit_ekfac(gpt2.model, gpt2.layers, iter(gpt2.fit_batches), fisher=Fisher.EMPIRICAL)
    with pytest.raises(ValueError, match="damping must be >= 0, got -1.0"):
        precondition_queries(gpt2.model, gpt2.factors, [random_queries(1)], damping=-1.0)
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        precondition_queries(gpt2.model, gpt2.factors, [random_queries(1)], rank=0)
    with pytest.raises(ValueError, match="2 query ids for 3 queries"):
        precondition_queries(gpt2.model, gpt2.factors, [random_queries(3)], query_ids=["a", "b"])
    with pytest.raises(ValueError, match="precondition_queries got no query batches"):
        precondition_queries(gpt2.model, gpt2.factors, [])
    batch = collate(random_sequences(2))
    with pytest.raises(ValueError, match="per-token scores need strategy PER_TOKEN or AUTO"):
        score_batch(gpt2.model, gpt2.queries, batch, per_token=True, strategy=Strategy.MATERIALIZE)
    with pytest.raises(ValueError, match="has no Linear/Conv1D module named 'transformer.h.0.mlp.c_fc'"):
        score_batch(tiny_mlp(), gpt2.queries, batch)
    with pytest.raises(ValueError, match="holds either dense or"):
        LayerQuery()


# ---------------------------------------------------------------- side effects


def test_hooks_removed_even_when_body_raises(gpt2):
    batch = collate(random_sequences(2))
    with pytest.raises(RuntimeError, match="boom"):
        with capture(gpt2.layers, batch.token_mask):
            assert all(len(l.module._forward_hooks) == 1 for l in gpt2.layers)
            gpt2.model(input_ids=batch.input_ids)
            raise RuntimeError("boom")
    assert no_hooks(gpt2.layers)
    bad = collate([[1, 2, VOCAB + 5]])  # token id outside the vocabulary: the forward pass raises
    with pytest.raises(IndexError):
        score_batch(gpt2.model, gpt2.queries, bad)
    assert no_hooks(gpt2.layers)
    score_batch(gpt2.model, gpt2.queries, batch, per_token=True)
    assert no_hooks(gpt2.layers)


def test_no_parameter_grad_and_no_weight_change():
    s = fit_setup(tiny_gpt2(seed=3))
    fingerprint = model_fingerprint(s.layers)
    cov = fit_covariances(s.model, s.layers, s.fit_batches, fisher=Fisher.SAMPLED, seed=0)
    fit_lambda(s.model, s.layers, eigendecompose(cov), s.fit_batches, fisher=Fisher.SAMPLED)
    for strategy in (Strategy.MATERIALIZE, Strategy.PER_TOKEN):
        score_batch(s.model, s.queries, collate(random_sequences(3)), per_layer=True, strategy=strategy)
    params = dict(s.model.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    with_grad = [n for n, p in params.items() if p.grad is not None]
    assert with_grad == [], f"parameters with .grad written: {with_grad[:5]}"
    assert model_fingerprint(s.layers) == fingerprint


def test_import_does_not_load_pipeline_dependencies():
    code = ("import sys, influence_ops; "
            f"print(','.join(m for m in {FORBIDDEN_IMPORTS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing influence_ops imported {out.stdout.strip()}"


# ---------------------------------------------------------------- save / load


def test_factors_roundtrip(gpt2, tmp_path):
    save_factors(gpt2.factors, tmp_path)
    loaded = load_factors(tmp_path, gpt2.layers)
    f = gpt2.factors
    assert (loaded.fingerprint, loaded.fisher, loaded.covariance_sequences, loaded.blocks, loaded.shapes) == \
        (f.fingerprint, f.fisher, f.covariance_sequences, f.blocks, f.shapes)
    assert list(loaded.layers) == list(f.layers)
    for name, lf in f.layers.items():
        got = loaded.layers[name]
        assert (got.tokens, got.sequences) == (lf.tokens, lf.sequences)
        pairs = {"a_sum": (got.a_sum, lf.a_sum), "s_sum": (got.s_sum, lf.s_sum),
                 "lambda_sum": (got.lambda_sum, lf.lambda_sum)}
        pairs.update({k: (getattr(got.eigen, k), getattr(lf.eigen, k)) for k in ("q_a", "e_a", "q_s", "e_s")})
        for key, (a, b) in pairs.items():
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}.{key} changed in the roundtrip"
    again = precondition_queries(gpt2.model, loaded, [random_queries(3, seed=2)])
    for name, q in gpt2.queries.layers.items():
        assert torch.equal(again.layers[name].dense, q.dense)


@pytest.mark.parametrize("rank", [None, 2])
def test_queries_roundtrip(gpt2, tmp_path, rank):
    queries = precondition_queries(gpt2.model, gpt2.factors, [random_queries(3, seed=2)], rank=rank,
                                   query_ids=["a", "b", "c"])
    save_queries(queries, tmp_path)
    loaded = load_queries(tmp_path)
    assert (loaded.rank, loaded.fingerprint, loaded.factor_tokens, loaded.damping, loaded.query_ids) == \
        (queries.rank, queries.fingerprint, queries.factor_tokens, queries.damping, ["a", "b", "c"])
    assert torch.equal(loaded.measurement, queries.measurement)
    assert torch.equal(loaded.truncation_error, queries.truncation_error)
    for name, q in queries.layers.items():
        for part in ("dense", "left", "right"):
            a, b = getattr(loaded.layers[name], part), getattr(q, part)
            assert (a is None and b is None) or torch.equal(a, b), f"{name}.{part} changed in the roundtrip"
    batch = collate(random_sequences(3, seed=4))
    before = score_batch(gpt2.model, queries, batch, per_layer=True)
    after = score_batch(gpt2.model, loaded, batch, per_layer=True)
    assert torch.equal(after.scores, before.scores) and torch.equal(after.per_layer, before.per_layer)


def test_factors_roundtrip_keeps_blocks(gpt2, tmp_path):
    factors = fit_ekfac(gpt2.model, gpt2.layers, gpt2.fit_batches, fisher=Fisher.EMPIRICAL, blocks=2)
    save_factors(factors, tmp_path)
    loaded = load_factors(tmp_path, gpt2.layers)
    assert loaded.blocks == 2
    q_a = loaded.layers[gpt2.layers[0].name].eigen.q_a  # (17, 17), blocks [0:8] and [8:17]
    assert torch.equal(q_a, factors.layers[gpt2.layers[0].name].eigen.q_a)
    assert bool((q_a[:8, 8:] == 0).all() and (q_a[8:, :8] == 0).all())


# ---------------------------------------------------------------- determinism and query batching


def test_sampled_fisher_is_seeded(gpt2):
    def s_sums(seed):
        cov = fit_covariances(gpt2.model, gpt2.layers, gpt2.fit_batches, fisher=Fisher.SAMPLED, seed=seed)
        return {n: c.s_sum for n, c in cov.layers.items()}

    first, again, other = s_sums(0), s_sums(0), s_sums(1)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name}: same seed, different sampled labels"
    assert any(not torch.equal(first[n], other[n]) for n in first), "the seed has no effect"


def test_queries_independent_of_query_batching(gpt2):
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]
    completions = [[13, 14], [15], [16, 17, 18]]
    together = precondition_queries(gpt2.model, gpt2.factors, [query_batch(prompts, completions)], rank=2)
    split = precondition_queries(gpt2.model, gpt2.factors, [query_batch(prompts[:2], completions[:2])], rank=2).concat(
        precondition_queries(gpt2.model, gpt2.factors, [query_batch(prompts[2:], completions[2:])], rank=2))
    two_batches = precondition_queries(gpt2.model, gpt2.factors, [query_batch(prompts[:1], completions[:1]),
                                                                  query_batch(prompts[1:], completions[1:])], rank=2)
    for other, how in ((split, "concat"), (two_batches, "two batches")):
        assert_close(other.measurement, together.measurement, name=f"measurement, {how}")
        assert_close(other.truncation_error, together.truncation_error, name=f"truncation error, {how}")
        for name, q in together.layers.items():
            dense = q.to_dense()
            assert_close(other.layers[name].to_dense(), dense, atol=F64_RTOL * float(dense.abs().max()),
                         name=f"{name} queries, {how}")


# ---------------------------------------------------------------- top-k


def _sorted_reference(scores: np.ndarray, ids: list[str], k: int, largest: bool):
    """Per query: the first k of a full sort by (score desc or asc, doc_id asc)."""
    out_scores, out_ids = [], []
    for row in scores:
        order = sorted(range(len(ids)), key=lambda j: (-row[j] if largest else row[j], ids[j]))[:k]
        out_scores.append([row[j] for j in order])
        out_ids.append([ids[j] for j in order])
    return np.array(out_scores), out_ids


def _random_accumulator(scores: np.ndarray, ids: list[str], k: int, rng: random.Random) -> TopKAccumulator:
    """Split the docs into random parts, feed each in random batches and order, merge in random order."""
    perm = list(range(len(ids)))
    rng.shuffle(perm)
    cuts = sorted(rng.sample(range(1, len(ids)), rng.randint(0, 4)))
    parts = [perm[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(ids)])]
    accs = []
    for part in parts:
        acc = TopKAccumulator(scores.shape[0], k)
        i = 0
        while i < len(part):
            step = rng.randint(1, 7)
            cols = part[i:i + step]
            acc.update(scores[:, cols], [ids[j] for j in cols])
            i += step
        accs.append(acc)
    rng.shuffle(accs)
    merged = accs[0]
    for acc in accs[1:]:
        merged = merged.merge(acc)
    return merged


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 5, 100])
def test_topk_merge_equals_full_sort(seed, k):
    rng = random.Random(seed)
    n, num_queries = 40, 3
    # Few distinct values: many ties, also across the k-th place.
    scores = np.array([[float(rng.randint(-3, 3)) for _ in range(n)] for _ in range(num_queries)])
    scores[0, :] = 1.0  # one query where every doc ties
    ids = [f"doc{i}" for i in rng.sample(range(1000), n)]  # unpadded: string order, "doc10" < "doc9"
    acc = _random_accumulator(scores, ids, k, rng)
    assert acc.seen == n
    for side, largest in ((acc.top, True), (acc.bottom, False)):
        exp_scores, exp_ids = _sorted_reference(scores, ids, k, largest)
        np.testing.assert_array_equal(side.scores, exp_scores)
        assert side.ids.tolist() == exp_ids


def test_topk_errors():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        TopKAccumulator(2, 0)
    acc = TopKAccumulator(2, 3)
    with pytest.raises(ValueError, match=re.escape("scores have shape (2, 3), expected (2, 2)")):
        acc.update(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(FloatingPointError, match=re.escape("non-finite influence scores for doc_ids ['b']")):
        acc.update(np.array([[0.0, np.nan], [1.0, 2.0]]), ["a", "b"])
    with pytest.raises(ValueError, match="cannot merge top-k"):
        acc.merge(TopKAccumulator(2, 4))


def test_topk_invariant_to_batch_size(gpt2):
    sequences = random_sequences(10, min_len=2, max_len=12, seed=6)
    ids = [f"s{i}" for i in range(len(sequences))]
    results = {}
    for batch_size in (1, 3, 10):
        acc = TopKAccumulator(gpt2.queries.num_queries, k=4)
        for i, batch in enumerate(batches_of(sequences, batch_size)):
            acc.update(score_batch(gpt2.model, gpt2.queries, batch).scores,
                       ids[i * batch_size:(i + 1) * batch_size])
        results[batch_size] = acc
    for batch_size in (3, 10):
        for side in ("top", "bottom"):
            got, ref = getattr(results[batch_size], side), getattr(results[1], side)
            assert got.ids.tolist() == ref.ids.tolist(), f"{side}-k ids differ with batch size {batch_size}"
            assert_close(torch.from_numpy(got.scores), torch.from_numpy(ref.scores),
                         name=f"{side}-k scores, batch size {batch_size} vs 1")


# ---------------------------------------------------------------- low rank


def test_lowrank_full_rank_equals_dense(gpt2):
    batches = [random_queries(3, seed=2)]
    full_rank = max(min(l.shape) for l in gpt2.layers)
    full = precondition_queries(gpt2.model, gpt2.factors, batches, rank=full_rank)
    assert full.rank == full_rank
    assert float(full.truncation_error.abs().max()) <= FULL_RANK_ERROR_ATOL
    batch = collate(random_sequences(4, seed=7))
    dense_scores = score_batch(gpt2.model, gpt2.queries, batch).scores
    for strategy in (Strategy.MATERIALIZE, Strategy.PER_TOKEN):
        got = score_batch(gpt2.model, full, batch, strategy=strategy).scores
        assert_close(got, dense_scores, rtol=FULL_RANK_RTOL, atol=F64_ATOL,
                     name=f"full-rank low-rank scores ({strategy.value}) vs dense")


def test_rank_one_error_is_the_frobenius_error(gpt2):
    one = precondition_queries(gpt2.model, gpt2.factors, [random_queries(3, seed=2)], rank=1)
    assert one.rank == 1
    assert bool((one.truncation_error > 0).all())
    for j, name in enumerate(one.layer_names):
        dense = gpt2.queries.layers[name].dense  # (Q, d_out, d_in')
        approx = one.layers[name].to_dense()
        expected = (dense - approx).flatten(1).norm(dim=1) / dense.flatten(1).norm(dim=1)
        assert_close(one.truncation_error[:, j], expected, rtol=FULL_RANK_RTOL, atol=F64_ATOL,
                     name=f"{name} truncation error")


# ---------------------------------------------------------------- merging


def test_covariance_and_lambda_merge_equal_one_pass(gpt2):
    sequences = random_sequences(9, seed=8)
    whole = batches_of(sequences, 5)
    first, second = batches_of(sequences[:4], 3), batches_of(sequences[4:], 2)  # other batch sizes and padding
    one = fit_covariances(gpt2.model, gpt2.layers, whole, fisher=Fisher.EMPIRICAL)
    merged = fit_covariances(gpt2.model, gpt2.layers, first, fisher=Fisher.EMPIRICAL).merge(
        fit_covariances(gpt2.model, gpt2.layers, second, fisher=Fisher.EMPIRICAL))
    assert (merged.sequences, merged.tokens) == (one.sequences, one.tokens) == (9, sum(map(len, sequences)))
    for name, c in one.layers.items():
        assert merged.layers[name].tokens == c.tokens
        assert_close(merged.layers[name].a_sum, c.a_sum, name=f"{name} a_sum")
        assert_close(merged.layers[name].s_sum, c.s_sum, name=f"{name} s_sum")

    eigen = eigendecompose(one)
    lam_one = fit_lambda(gpt2.model, gpt2.layers, eigen, whole, fisher=Fisher.EMPIRICAL)
    lam_merged = fit_lambda(gpt2.model, gpt2.layers, eigen, second, fisher=Fisher.EMPIRICAL).merge(
        fit_lambda(gpt2.model, gpt2.layers, eigen, first, fisher=Fisher.EMPIRICAL))
    assert lam_merged.sequences == lam_one.sequences == 9
    for name, s in lam_one.sums.items():
        assert_close(lam_merged.sums[name], s, name=f"{name} Lambda sum")

    sampled = fit_covariances(gpt2.model, gpt2.layers, first, fisher=Fisher.SAMPLED)
    with pytest.raises(ValueError, match="cannot merge empirical and sampled covariances"):
        one.merge(sampled)
    mlp = tiny_mlp()
    other = fit_covariances(mlp, find_mlp_layers(mlp, MLP_PATTERN), first, fisher=Fisher.EMPIRICAL)
    with pytest.raises(ValueError, match="cannot merge covariances of layers"):
        one.merge(other)


# ---------------------------------------------------------------- invariance


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "opt"])
def test_scores_invariant_to_batch_composition_and_padding(arch):
    build, pattern = ARCHITECTURES[arch]
    s = fit_setup(build(), pattern)
    short, long1, long2 = random_sequences(3, min_len=4, max_len=4, seed=9)[0], *random_sequences(
        2, min_len=11, max_len=12, seed=10)
    alone = score_batch(s.model, s.queries, collate([short]), per_layer=True, per_token=True)
    mixed = score_batch(s.model, s.queries, collate([long1, short, long2]), per_layer=True, per_token=True)
    swapped = score_batch(s.model, s.queries, collate([long2, long1, short]), per_layer=True)
    scale = float(alone.per_token.abs().max())
    atol = F64_RTOL * scale
    assert_close(mixed.scores[:, 1], alone.scores[:, 0], atol=atol, name=f"{arch} score, padded vs alone")
    assert_close(mixed.per_layer[:, 1], alone.per_layer[:, 0], atol=atol, name=f"{arch} per-layer, padded vs alone")
    assert_close(mixed.per_token[:, 1, :4], alone.per_token[:, 0], atol=atol, name=f"{arch} per-token, padded")
    assert bool((mixed.per_token[:, 1, 4:] == 0).all())
    assert_close(mixed.losses[1], alone.losses[0], name=f"{arch} loss, padded vs alone")
    assert_close(swapped.scores[:, [1, 0, 2]], mixed.scores[:, [0, 2, 1]], atol=atol,
                 name=f"{arch} scores, batch order")
