"""Contracts without Ray: shard checks, job-file validation, sampling, callables on dict batches, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from influence_ops import Fisher, collate, fit_ekfac, precondition_queries, query_batch, save_queries
from pipelines import ConfigError, config_from_dict, load_config
from pipelines.cli import main
from pipelines.config import ModelConfig
from pipelines.io.model_loading import load_model
from pipelines.io.shards import ShardError, read_rows
from pipelines.io.storage import parquet_metadata
from pipelines.stages.sampling import plan_units, sample_rows
from pipelines.stages.score import ShardScorer

VOCAB = 11


def write_shard(path, doc_ids, input_ids, **extra):
    cols = {"doc_id": pa.array(doc_ids, pa.string()), "input_ids": pa.array(input_ids, pa.list_(pa.int32())), **extra}
    pq.write_table(pa.table(cols), path)
    return str(path)


GOOD_IDS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 1], [2, 3, 4]]


@pytest.mark.parametrize("case, row, field, words", [
    ("missing", None, "input_ids", "missing"),
    ("wrong_type", None, "doc_id", "expected string"),
    ("empty", 2, "input_ids", "empty"),
    ("vocab", 1, "input_ids", "token id 11"),
    ("duplicate", 3, "doc_id", "duplicate"),
    ("mask", 4, "loss_mask", "entries"),
    ("mask_value", 2, "loss_mask", "value 2 at position 1: must be 0 or 1"),
])
def test_shard_contract_errors_name_file_row_and_field(tmp_path, case, row, field, words):
    path = tmp_path / f"{case}.parquet"
    ids = [f"d{i}" for i in range(5)]
    tokens = [list(x) for x in GOOD_IDS]
    if case == "missing":
        pq.write_table(pa.table({"doc_id": ids}), path)
    elif case == "wrong_type":
        pq.write_table(pa.table({"doc_id": list(range(5)), "input_ids": pa.array(tokens, pa.list_(pa.int32()))}), path)
    elif case == "empty":
        tokens[2] = []
        write_shard(path, ids, tokens)
    elif case == "vocab":
        tokens[1] = [3, VOCAB]
        write_shard(path, ids, tokens)
    elif case == "duplicate":
        ids[3] = "d0"
        write_shard(path, ids, tokens)
    elif case == "mask_value":
        masks = [[1] * len(t) for t in tokens]
        masks[2] = [1, 2, 1, 1]
        write_shard(path, ids, tokens, loss_mask=pa.array(masks, pa.list_(pa.int8())))
    elif case == "mask":
        masks = [[1] * len(t) for t in tokens]
        masks[4] = [1]
        write_shard(path, ids, tokens, loss_mask=pa.array(masks, pa.list_(pa.int8())))
    with pytest.raises(ShardError) as info:
        read_rows(str(path), None, VOCAB)
    msg = str(info.value)
    assert str(path) in msg and f"field {field!r}" in msg and words in msg
    assert (f"row {row}" in msg) if row is not None else ("schema" in msg)


def test_duplicate_doc_id_found_across_read_windows(tmp_path):
    from pipelines.io.shards import iter_shard

    path = write_shard(tmp_path / "s.parquet", ["a", "b", "c", "a"], GOOD_IDS[:4])
    with pytest.raises(ShardError, match="row 3, field 'doc_id'"):
        list(iter_shard(path, VOCAB, rows_per_read=2))


BASE = {"model": {"path": "/m"}, "data": {"corpus": "/c", "queries": "/q.jsonl", "output": "/o"}}


@pytest.mark.parametrize("patch, words", [
    ({"factors": {"fisher": "bogus"}},
     "factors.fisher = 'bogus': must be one of ['sampled', 'empirical', 'expected', 'gaussian', 'topm']"),
    ({"scoring": {"top_k": 0}}, "scoring.top_k = 0"),
    ({"scoring": {"topk": 3}}, "scoring.topk = 3: unknown key"),
    ({"factors": {"sample_sequences": 5, "sample_tokens": 100}}, "give at most one"),
    ({"factors": {"lambda_passes": 0}}, "factors.lambda_passes = 0: must be an integer >= 1"),
    ({"factors": {"fisher_passes": "2"}}, "factors.fisher_passes = '2': must be an integer >= 1"),
    ({"factors": {"fisher": "gaussian", "fisher_samples": 4, "fisher_passes": 2}}, "set the draws to 2 instead"),
    ({"model": {"path": "/m", "factory": "a:b"}}, "exactly one"),
    ({"model": {"factory": "no_colon"}}, "model.factory = 'no_colon'"),
    ({"resources": {"gpus_per_actor": -1}}, "resources.gpus_per_actor = -1"),
    ({"model": {"path": "/m", "dtype": "int8"}}, "model.dtype = 'int8'"),
    ({"run_id": "a/b"}, "run_id = 'a/b'"),
    ({"scoring": {"normalize": "l2"}}, "scoring.normalize = 'l2': must be one of ['none', 'cosine', 'train_norm']"),
    ({"scoring": {"self_influence": "yes"}}, "scoring.self_influence = 'yes'"),
    ({"model": {"path": "/m", "track": "attention"}}, "model.track = 'attention'"),
    ({"model": {"path": "/m", "track": "mlp+attention", "layer_pattern": "mlp"}}, "not both"),
])
def test_config_errors_name_key_and_value(patch, words):
    raw = {**BASE, **patch}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert words in str(info.value)


def test_config_file_resolves_relative_paths_and_defaults(tmp_path):
    (tmp_path / "job.toml").write_text('[model]\npath = "model"\n[data]\ncorpus = "s3://b/shards/"\n'
                                       'queries = "q.jsonl"\noutput = "out"\n[scoring]\nrank = 0\n')
    cfg = load_config(tmp_path / "job.toml")
    assert cfg.model.path == str(tmp_path / "model") and cfg.data.corpus == "s3://b/shards/"
    assert cfg.scoring.rank is None and cfg.factors.fisher == Fisher.TOPM
    assert json.loads(json.dumps(cfg.to_dict()))["factors"]["fisher"] == "topm"


def test_config_accepts_the_topm_fisher():
    cfg = config_from_dict({**BASE, "factors": {"fisher": "topm", "fisher_samples": 4, "lambda_samples": 4}})
    assert cfg.factors.fisher == Fisher.TOPM and cfg.factors.fisher_samples == 4
    assert cfg.to_dict()["factors"]["fisher"] == "topm"
    assert (cfg.factors.fisher_passes, cfg.factors.lambda_passes) == (None, None)  # one backward pass per draw
    cfg = config_from_dict({**BASE, "factors": {"fisher_passes": 3, "lambda_passes": 1}})
    assert (cfg.factors.fisher_passes, cfg.factors.lambda_passes) == (3, 1)


def test_cli_reports_bad_config(tmp_path):
    (tmp_path / "job.toml").write_text('[model]\npath = "m"\n[data]\ncorpus = "c"\nqueries = "q"\noutput = "o"\n'
                                       '[factors]\nfisher = "bogus"\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "job.toml")])
    assert result.exit_code == 1 and "factors.fisher = 'bogus'" in result.output
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert all(c in help_text for c in ("tokenize", "fit-factors", "build-queries", "score", "merge", "run", "demo"))
    start = help_text.split("Start here:", 1)[1]  # the first steps, in the order a new user takes them
    assert [start.index(f"influence {c}") for c in ("demo", "init", "validate", "run", "show")] == sorted(
        start.index(f"influence {c}") for c in ("demo", "init", "validate", "run", "show"))


def test_sample_is_seeded_and_cut_into_units(tmp_path):
    shards = [write_shard(tmp_path / f"{s}.parquet", [f"{s}-{i}" for i in range(10)], [[1, 2, 3]] * 10)
              for s in "abc"]
    rows = sample_rows(shards, 12, None, seed=5)
    assert np.array_equal(rows, sample_rows(shards, 12, None, seed=5)) and len(set(rows)) == 12
    assert not np.array_equal(rows, sample_rows(shards, 12, None, seed=6))
    by_tokens = sample_rows(shards, None, 10, seed=5)
    assert len(by_tokens) == 4  # 3 tokens each: the 4th reaches the budget
    units = plan_units(shards, rows, unit_sequences=3)
    assert sum(len(u.rows) for u in units) == 12 and all(len(u.rows) <= 3 for u in units)
    assert [u.index for u in units] == list(range(len(units)))


class TinyLM(torch.nn.Module):
    """A plain torch model for the ``module:factory`` path: forward(input_ids) -> logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
        self.out = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.out(h + self.mlp(h))


def make_tiny_lm() -> TinyLM:
    return TinyLM()


def test_shard_scorer_called_directly_on_a_dict_batch(tmp_path):
    model_cfg = ModelConfig(factory=f"{__name__}:make_tiny_lm", layer_pattern=r"^mlp\.")
    m = load_model(model_cfg)
    factors = fit_ekfac(m.model, m.layers, [collate(GOOD_IDS)], fisher=Fisher.EMPIRICAL)
    queries = precondition_queries(m.model, factors, [query_batch([[1, 2]], [[3, 4]])], rank=2, query_ids=["q1"])
    save_queries(queries, tmp_path / "queries")
    good = write_shard(tmp_path / "good.parquet", [f"d{i}" for i in range(5)], GOOD_IDS)
    bad = write_shard(tmp_path / "bad.parquet", ["x", "y"], [[1, 2], [3, VOCAB + 4]])
    scorer = ShardScorer(model_cfg, str(tmp_path / "queries"), top_k=2, batch_size=2, sort_window=3)
    units = [{"shard": s, "output": str(tmp_path / f"out-{i}.parquet"), "key": "k"} for i, s in enumerate([good, bad])]
    out = scorer({"unit": np.array([json.dumps(u) for u in units], dtype=object)})
    assert list(out["status"]) == ["scored", "failed"] and "row 1, field 'input_ids'" in out["error"][1]
    table = pq.read_table(tmp_path / "out-0.parquet").to_pylist()
    assert parquet_metadata(str(tmp_path / "out-0.parquet"))["influence.key"] == "k"
    assert [(r["sign"], r["shard_rank"]) for r in table] == [("top", 1), ("top", 2), ("bottom", 1), ("bottom", 2)]
    assert int(out["sequences"][0]) == 5 and not (tmp_path / "out-1.parquet").exists()


@pytest.mark.parametrize("normalize", ["cosine", "train_norm"])
def test_shard_scorer_normalizes_and_writes_self_influence(tmp_path, normalize):
    from influence_ops import save_factors, score_batch

    model_cfg = ModelConfig(factory=f"{__name__}:make_tiny_lm", layer_pattern=r"^mlp\.")
    m = load_model(model_cfg)
    factors = fit_ekfac(m.model, m.layers, [collate(GOOD_IDS)], fisher=Fisher.EMPIRICAL)
    save_factors(factors, tmp_path / "out" / "factors")
    queries = precondition_queries(m.model, factors, [query_batch([[1, 2]], [[3, 4]])], rank=2, query_ids=["q1"])
    save_queries(queries, tmp_path / "queries")
    good = write_shard(tmp_path / "good.parquet", [f"d{i}" for i in range(5)], GOOD_IDS)
    scorer = ShardScorer(model_cfg, str(tmp_path / "queries"), top_k=5, batch_size=2, sort_window=3,
                         normalize=normalize, factors_url=str(tmp_path / "out" / "factors"))
    unit = {"shard": good, "output": str(tmp_path / "out" / "scores" / "good.parquet"), "key": "k"}
    assert list(scorer({"unit": np.array([json.dumps(unit)], dtype=object)})["status"]) == ["scored"]
    want = score_batch(m.model, queries, collate(GOOD_IDS), factors=factors, normalize=normalize)
    rows = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out" / "scores" / "good.parquet").to_pylist()
            if r["sign"] == "top"}
    for i in range(5):
        assert rows[f"d{i}"]["score"] == pytest.approx(float(want.scores[0, i]), rel=1e-5, abs=1e-9)
        scale = 1 if normalize == "cosine" else queries.factor_tokens
        assert rows[f"d{i}"]["score_normalized"] == pytest.approx(rows[f"d{i}"]["score"] / scale)
    self_inf = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out" / "self_influence" / "good.parquet").to_pylist()}
    assert sorted(self_inf) == [f"d{i}" for i in range(5)]
    for i, ids in enumerate(GOOD_IDS):
        r = self_inf[f"d{i}"]
        assert r["self_influence"] == pytest.approx(float(want.self_influence[i]), rel=1e-5)
        assert (r["tokens"], r["shard"]) == (len(ids), good)


def test_tokenizer_callable_chunks_long_documents(tiny_world):
    from transformers import AutoTokenizer

    from pipelines.stages.tokenize import MIN_TOKENS, Tokenizer

    tok = Tokenizer(ModelConfig(path=str(tiny_world / "model")), max_length=5, text_column="text", id_column="id")
    table = tok.tokenize_file(str(tiny_world / "raw" / "part0.jsonl")).to_pylist()
    hf = AutoTokenizer.from_pretrained(str(tiny_world / "model"))
    raw = [json.loads(line) for line in (tiny_world / "raw" / "part0.jsonl").read_text().splitlines()]
    for doc in raw:
        chunks = [r for r in table if r["doc_id"].split(":")[0] == doc["id"]]
        ids = hf(doc["text"])["input_ids"]
        kept = [ids[i:i + 5] for i in range(0, len(ids), 5) if len(ids[i:i + 5]) >= MIN_TOKENS]
        assert [c["input_ids"] for c in chunks] == kept
        assert [c["doc_id"] for c in chunks] == [f"{doc['id']}:{i}" for i in range(len(kept))]
        assert all(hf(c["text"])["input_ids"] == c["input_ids"] for c in chunks)


def test_tokenizer_refuses_a_missing_or_repeated_document_id(tiny_world, tmp_path):
    """A raw file whose id repeats (or is null or empty) is refused naming the file, row and field: it would
    give two shard rows one doc_id."""
    from pipelines.io.raw_files import document_ids
    from pipelines.stages.tokenize import Tokenizer

    assert document_ids("f", ["a", 7, "b"], "id") == ["a", "7", "b"]
    tok = Tokenizer(ModelConfig(path=str(tiny_world / "model")), max_length=16, text_column="text", id_column="id")
    cases = {"dup": (["a", "b", "a"], "row 2, field 'id': id 'a' is also in row 0"),
             "null": (["a", None, "c"], "row 1, field 'id': the document id is missing"),
             "empty": (["a", "b", ""], "row 2, field 'id': the document id is empty")}
    for name, (ids, message) in cases.items():
        raw = tmp_path / f"{name}.jsonl"
        raw.write_text("".join(json.dumps({"id": i, "text": "the cat sits"}) + "\n" for i in ids))
        with pytest.raises(ValueError) as err:
            tok.tokenize_file(str(raw))
        assert str(err.value) == f"{raw}: {message}" + (" (document ids must be unique)" if name == "dup" else "")


def test_demo_corpus_plants_two_sources_per_fact():
    from pipelines.demo.corpus import make_corpus, make_queries

    docs, facts = make_corpus(countries=4, filler_docs=10)
    sources = [d["source_of"] for d in docs if d["source_of"]]
    assert sorted(sources) == sorted(f.key for f in facts for _ in range(2))
    for q in make_queries(facts, n=3):
        stated = [d["text"] for d in docs if d["source_of"] == q["query_id"]]
        assert any(f"{q['prompt']} {q['completion']}" in t for t in stated)


def test_sampled_fisher_units_are_seeded_independently_of_grouping(tiny_world, tmp_path):
    """Stage-1 partial sums per unit do not depend on which worker call (actor) gets which unit."""
    from pipelines.io.payloads import covariances_from_bytes
    from pipelines.stages.factor_units import CovarianceWorker
    from pipelines.stages.sampling import Unit

    path = write_shard(tmp_path / "s.parquet", [f"d{i}" for i in range(6)], [[1, 2, 3, 4]] * 3 + [[5, 6, 7]] * 3)
    units = [{**Unit(i, path, rows).to_json(), "partial": str(tmp_path / f"unit{i}.safetensors"), "key": "k"}
             for i, rows in enumerate([(0, 1, 2), (3, 4), (5,)])]
    worker = CovarianceWorker(model=ModelConfig(path=str(tiny_world / "model")), fisher="sampled", seed=4,
                              batch_size=2)

    def total(groups):
        merged = None
        for group in groups:
            out = worker({"unit": np.array([json.dumps(units[i]) for i in group], dtype=object)})
            for i in out["index"]:  # each unit's partial sums are in its own file
                part = covariances_from_bytes(Path(units[i]["partial"]).read_bytes())
                merged = part if merged is None else merged.merge(part)
        return merged

    a, b = total([[0, 1, 2]]), total([[2], [1, 0]])
    for name, cov in a.layers.items():
        torch.testing.assert_close(cov.a_sum, b.layers[name].a_sum, rtol=1e-6, atol=1e-6)
        # float32 sums added in another order: rounding only (other labels would differ by far more)
        torch.testing.assert_close(cov.s_sum, b.layers[name].s_sum, rtol=1e-5, atol=1e-7)
    assert a.sequences == b.sequences == 6


def test_storage_on_memory_urls():
    from pipelines.io import storage

    root = "memory://influence-test/run"
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_parquet(storage.join(root, "a", "t.parquet"), pa.table({"v": [1, 2]}))
    storage.write_bytes(storage.join(root, "_marker"), b"done")
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert storage.read_json(storage.join(root, "missing.json")) is None
    assert storage.list_files(root) == [f"{root}/a/t.parquet", f"{root}/a/x.json"]  # '_' and '.' names hidden
    assert storage.read_parquet(storage.join(root, "a", "t.parquet")).column("v").to_pylist() == [1, 2]
    storage.remove(storage.join(root, "a"))
    assert storage.list_files(root) == []


def test_influence_ops_imports_no_pipeline_dependencies():
    import subprocess
    import sys

    code = ("import sys, influence_ops; bad = [m for m in ('ray', 'pyarrow', 'fsspec', 'pipelines') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("corpus, shard, name", [
    ("s3://b/shards", "s3://b/shards/part-1.parquet", "part-1"),
    ("s3://b/shards/", "s3://b/shards/2024/part-1.parquet", "2024__part-1"),
    ("/data/shards/part-*.parquet", "/data/shards/part-7.parquet", "part-7"),
    ("/data/shards/x.parquet", "/data/shards/x.parquet", "x"),
])
def test_shard_output_names(corpus, shard, name):
    from pipelines.io.shards import shard_name

    assert shard_name(shard, corpus) == name


def test_fit_worker_draws_k_labels_from_its_unit_seed(tiny_world, tmp_path):
    """A unit's stage-1 partial with fisher_samples = 3 equals fit_covariances on that unit, seed per unit."""
    from influence_ops import fit_covariances
    from pipelines.io.payloads import covariances_from_bytes
    from pipelines.stages.factor_units import CovarianceWorker, unit_seed
    from pipelines.stages.sampling import Unit

    path = write_shard(tmp_path / "s.parquet", ["a", "b", "c"], [[1, 2, 3, 4], [5, 6, 7], [2, 3]])
    unit = {**Unit(2, path, (0, 1, 2)).to_json(), "partial": str(tmp_path / "unit.safetensors"), "key": "k"}
    cfg = ModelConfig(path=str(tiny_world / "model"))
    worker = CovarianceWorker(model=cfg, fisher="sampled", seed=4, batch_size=2, samples=3)
    worker({"unit": np.array([json.dumps(unit)], dtype=object)})
    got = covariances_from_bytes(Path(unit["partial"]).read_bytes())
    _, batches, _ = worker._batches(Unit.from_json(unit))  # the worker's own batching (sorted by length)
    want = fit_covariances(worker.m.model, worker.m.layers, batches, Fisher.SAMPLED, unit_seed(4, 1, 2), samples=3)
    one = fit_covariances(worker.m.model, worker.m.layers, batches, Fisher.SAMPLED, unit_seed(4, 1, 2), samples=1)
    assert got.samples == want.samples == 3
    for name, cov in want.layers.items():
        torch.testing.assert_close(got.layers[name].s_sum, cov.s_sum, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(got.layers[name].s_sum, one.layers[name].s_sum)


def test_fit_worker_sums_its_draws_into_the_passes_asked(tiny_world, tmp_path):
    """fisher_passes reaches the stage-1 worker: its partial is fit_covariances with those passes, and says so."""
    from influence_ops import fit_covariances
    from pipelines.io.payloads import covariances_from_bytes
    from pipelines.stages.factor_units import CovarianceWorker, unit_seed
    from pipelines.stages.sampling import Unit

    path = write_shard(tmp_path / "s.parquet", ["a", "b", "c"], [[1, 2, 3, 4], [5, 6, 7], [2, 3]])
    unit = {**Unit(0, path, (0, 1, 2)).to_json(), "partial": str(tmp_path / "unit.safetensors"), "key": "k"}
    worker = CovarianceWorker(model=ModelConfig(path=str(tiny_world / "model")), fisher="topm", seed=4, batch_size=2,
                              samples=3, passes=1)
    worker({"unit": np.array([json.dumps(unit)], dtype=object)})
    got = covariances_from_bytes(Path(unit["partial"]).read_bytes())
    _, batches, _ = worker._batches(Unit.from_json(unit))
    seed = unit_seed(4, 1, 0)
    want = fit_covariances(worker.m.model, worker.m.layers, batches, Fisher.TOPM, seed, samples=3, passes=1)
    each = fit_covariances(worker.m.model, worker.m.layers, batches, Fisher.TOPM, seed, samples=3)
    assert (got.samples, got.passes, each.passes) == (3, 1, None)
    for name, cov in want.layers.items():
        torch.testing.assert_close(got.layers[name].s_sum, cov.s_sum, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(got.layers[name].s_sum, each.layers[name].s_sum)


def test_performance_settings_never_change_the_factors_key(tiny_world, tmp_path):
    """Batch size, actors, threads and sort window are performance settings: fitted factors stay valid."""
    from pipelines.config import config_from_dict
    from pipelines.stages.factor_refit import factors_key

    shard = write_shard(tmp_path / "s.parquet", ["a", "b"], [[1, 2, 3], [4, 5]])
    base = {"model": {"path": str(tiny_world / "model")},
            "data": {"corpus": shard, "queries": "q.jsonl", "output": str(tmp_path / "o")}}
    prints = [(shard, 100)]
    key = factors_key(config_from_dict(base), prints)
    for section, values in (("resources", {"batch_size": 32, "actors": 3, "threads_per_actor": 1}),
                            ("scoring", {"sort_window": 64, "top_k": 3}), ("factors", {"refit_growth": 0.5})):
        assert factors_key(config_from_dict({**base, section: values}), prints) == key, section
    assert factors_key(config_from_dict({**base, "factors": {"seed": 1}}), prints) != key  # the fit's own inputs do
    assert factors_key(config_from_dict({**base, "factors": {"lambda_passes": 1}}), prints) != key
    pinned = {**base, "factors": {"refit": "on_corpus_change"}}
    assert factors_key(config_from_dict(pinned), prints) != factors_key(config_from_dict(pinned), [(shard, 101)])


def test_on_growth_keeps_factors_while_the_corpus_only_grows_a_little():
    """factors.refit = "on_growth": every fitted shard unchanged and at most refit_growth more sequences (rows of
    the added shards, from their footers; an unreadable one adds none)."""
    from pipelines.stages.factor_refit import keeps_factors

    fitted = [("s/a.parquet", 400, 40), ("s/b.parquet", 600, 60)]  # (name, bytes, rows)
    rows = {"s/c.parquet": 25, "s/d.parquet": 1, "s/bad.parquet": 0}.__getitem__
    now = [(n, size) for n, size, _ in fitted]
    assert keeps_factors(fitted, now, 0.25, rows) == (
        True, "kept: the corpus grew by 0 sequences (0.0%) since the fit (refit above 25%)")
    grown = now + [("s/c.parquet", 9999)]  # a large file of few rows: its rows count, not its bytes
    assert keeps_factors(fitted, grown, 0.25, rows) == (
        True, "kept: the corpus grew by 25 sequences (25.0%) since the fit (refit above 25%)")  # at the limit
    assert keeps_factors(fitted, grown + [("s/d.parquet", 1)], 0.25, rows) == (
        False, "refit: the corpus grew by 26 sequences (26.0%) since the fit (factors.refit_growth = 25%)")
    assert keeps_factors(fitted, now + [("s/bad.parquet", 5000)], 0.0, rows)[0] is True  # unreadable: no rows
    assert keeps_factors(fitted, [("s/a.parquet", 400), ("s/b.parquet", 601)], 0.25, rows) == (
        False, "refit: shard 's/b.parquet' changed since the fit")  # a shard replaced
    assert keeps_factors(fitted, [("s/a.parquet", 400), ("s/c.parquet", 600)], 0.25, rows) == (
        False, "refit: shard 's/b.parquet' was removed since the fit")
    assert keeps_factors(None, now, 0.25, rows) == (
        False, "refit: the factors did not record the shards they were fitted on")
    assert keeps_factors(fitted, grown, 0.0, rows)[0] is False
    legacy = [("s/a.parquet", 400), ("s/b.parquet", 600)]  # a marker from before rows were recorded: bytes
    assert keeps_factors(legacy, now + [("s/c.parquet", 250)], 0.25, rows) == (
        True, "kept: the corpus grew by 250 bytes (25.0%) since the fit (refit above 25%)")


def test_a_refit_reads_each_added_shards_footer_once(tmp_path, monkeypatch):
    """The on_growth check reads the added shards' footers; the refit that follows reuses those counts instead of
    reading the footers again (one GET each on object storage); a footer that did not read is read (and reported)
    by the refit itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.runtime.failures import FailureLog
    from pipelines.stages import fit_factors as ff

    urls = {}
    for name, n in (("a", 3), ("b", 5)):
        urls[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"doc_id": [f"{name}{i}" for i in range(n)]}), urls[name])
    urls["bad"] = str(tmp_path / "bad.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    reads: list[str] = []
    real = ff.row_counts
    monkeypatch.setattr(ff, "row_counts", lambda shards: (reads.extend(shards), real(shards))[1])
    footers: dict[str, int] = {}
    rows = ff._footer_rows(urls, footers)
    assert (rows("a"), rows("b"), rows("bad")) == (3, 5, 0)
    assert footers == {urls["a"]: 3, urls["b"]: 5}
    reads.clear()
    failures = FailureLog("fit-factors", "skip")
    assert ff.readable_shards(list(urls.values()), failures, footers) == {urls["a"]: 3, urls["b"]: 5}
    assert reads == [urls["bad"]]  # only the footer that did not read before
    assert [r["file"] for r in failures.rows] == [urls["bad"]]
