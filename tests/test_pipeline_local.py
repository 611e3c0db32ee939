"""The whole job on a local Ray (2 CPUs) against local paths, compared with the in-process library.

One pipeline run is shared by the tests of this module (Ray start-up and
dataset scheduling dominate the time of such tiny jobs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch

from influence_ops import load_factors, load_queries
from pipelines import config_from_dict
from pipelines.io.model_loading import load_model, load_tokenizer
from pipelines.run import run_job
from pipelines.stages.build_queries import precondition, query_prep, tokenize_queries


def job(world: Path, output: str, corpus: str) -> dict:
    return {
        "run_id": "test",
        "model": {"path": str(world / "model")},
        "data": {"raw": str(world / "raw"), "corpus": corpus, "queries": str(world / "queries.jsonl"),
                 "output": output},
        "factors": {"fisher": "empirical", "sample_sequences": 30, "seed": 7, "unit_sequences": 8},
        "scoring": {"top_k": 3, "rank": 4, "per_token": True, "query_precision": "float64"},
        "resources": {"actors": 2, "batch_size": 4, "cpus_per_actor": 0.5},
    }


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    cfg = config_from_dict(job(tiny_world, str(root / "out"), str(root / "shards")))
    record = run_job(cfg)
    return cfg, record, root


def test_factors_equal_in_process_fit(local_run, assert_factors_match_fit):
    cfg, record, _ = local_run
    assert record["stages"]["fit-factors"]["sequences"] == assert_factors_match_fit(cfg) == 30


def test_queries_equal_in_process(local_run, tiny_world):
    cfg, _, _ = local_run
    m = load_model(cfg.model)
    rows = tokenize_queries(cfg.data.queries, load_tokenizer(cfg.model), m.vocab_size, m.context)
    factors = load_factors(Path(cfg.data.output) / "factors", m.layers)
    want = precondition(m, factors, rows, rank=4, damping=None, batch_size=2, prep=query_prep(cfg))
    got = load_queries(Path(cfg.data.output) / "queries")
    assert got.query_ids == ["q-cat", "q-fish", "q-dog"] and got.rank == 4
    for name in want.layer_names:
        torch.testing.assert_close(got.layers[name].to_dense(), want.layers[name].to_dense(), rtol=1e-4, atol=1e-7)


def test_merged_topk_equals_brute_force(local_run, brute_force_topk, assert_topk_equal):
    cfg, record, _ = local_run
    qids, acc = brute_force_topk(cfg)
    table = pads.dataset(str(Path(cfg.data.output) / "topk"), partitioning="hive").to_table().to_pylist()
    assert record["counts"]["failed"] == 0 and record["counts"]["scored"] == 3
    assert_topk_equal(table, qids, acc)
    assert {r["found_by"] for r in table} == {"scan"}
    factor_tokens = record["stages"]["build-queries"]["factor_tokens"]
    for row in table:
        assert row["score_normalized"] * factor_tokens == pytest.approx(row["score"], rel=1e-12)


def test_token_scores_sum_to_scores(local_run):
    cfg, record, _ = local_run
    out = Path(cfg.data.output)
    tokens = pads.dataset(str(out / "token_scores"), partitioning="hive").to_table().to_pandas()
    topk = pads.dataset(str(out / "topk"), partitioning="hive").to_table().to_pandas()
    sums = tokens.groupby(["query_id", "doc_id"])["score"].sum()
    for row in topk.itertuples():
        assert sums[(row.query_id, row.doc_id)] == pytest.approx(row.score, rel=1e-3, abs=1e-5)
    assert record["stages"]["merge"]["details"]["max_relative_sum_error"] < 1e-3


def test_duckdb_reads_topk_with_hive_partitioning(local_run, tmp_path):
    import duckdb

    cfg, _, _ = local_run
    os.environ.setdefault("HOME", str(tmp_path))
    con = duckdb.connect()
    glob = str(Path(cfg.data.output) / "topk" / "*" / "*.parquet")
    rows = con.execute(f"SELECT query_id, doc_id, rank FROM read_parquet('{glob}', hive_partitioning=true) "
                       "WHERE sign = 'top' AND query_id = 'q-fish' ORDER BY rank").fetchall()
    want = pads.dataset(str(Path(cfg.data.output) / "topk" / "query_id=q-fish")).to_table().to_pylist()
    assert [r[1] for r in rows] == [r["doc_id"] for r in sorted(want, key=lambda r: r["rank"]) if r["sign"] == "top"]
    assert {r[0] for r in rows} == {"q-fish"} and [r[2] for r in rows] == [1, 2, 3]


def snapshot(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*.parquet"))
            if "runs" not in p.parts}


def test_rerun_is_noop_and_resume_is_identical(local_run):
    cfg, _, _ = local_run
    out = Path(cfg.data.output)
    before = snapshot(out)
    again = run_job(cfg)
    assert all(stage.get("skipped") for stage in again["stages"].values() if isinstance(stage.get("skipped"), bool))
    assert again["counts"]["scored"] == 0 and again["counts"]["skipped"] == 3
    assert snapshot(out) == before
    # interrupt: one shard's scores and the merged tables are lost, then the job resumes
    next(iter(sorted((out / "scores").glob("*.parquet")))).unlink()
    (out / "topk" / "_pipeline.json").unlink()
    resumed = run_job(cfg)
    assert resumed["counts"]["scored"] == 1 and resumed["counts"]["skipped"] == 2
    assert snapshot(out) == before


def test_demo_command_runs_end_to_end(ray_local, tmp_path):
    """`influence demo` (the README's first command), with a short training to keep the test fast."""
    from click.testing import CliRunner

    from pipelines.cli import main

    result = CliRunner().invoke(main, ["demo", "--output", str(tmp_path / "demo"), "--epochs", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.count("query ") == 6 and "top-1 is a planted source for" in result.output
    assert "run demo: ok" in result.output and (tmp_path / "demo" / "job.toml").exists()
    results = tmp_path / "demo" / "results"
    assert f"influence show {results} --bottom" in result.output and f"influence sql {results}" in result.output
    assert f"open {results / 'report.html'}" in result.output and (results / "report.html").stat().st_size > 10_000
    topk = pads.dataset(str(tmp_path / "demo" / "results" / "topk"), partitioning="hive").to_table()
    assert topk.num_rows == 6 * 2 * 5


def test_bad_shard_fails_only_itself_and_is_named(local_run, tmp_path):
    """Through Ray, on_error = "skip": a shard breaking the contract is reported by file, row and field; the others
    are scored."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.stages.score import score

    cfg, _, root = local_run
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(sorted((root / "shards").glob("*.parquet"))[0], corpus / "good.parquet")
    pq.write_table(pa.table({"doc_id": ["a", "b", "a"], "input_ids": pa.array([[1, 2], [3, 4], [5, 6]],
                                                                               pa.list_(pa.int32()))}),
                   corpus / "bad.parquet")
    shutil.copytree(Path(cfg.data.output) / "queries", tmp_path / "out" / "queries")
    bad_cfg = config_from_dict({**job(Path("/unused"), str(tmp_path / "out"), str(corpus)),
                                "model": {"path": cfg.model.path}, "on_error": "skip"})
    summary = score(bad_cfg, queries_digest="q")
    assert (summary["scored"], summary["failed"]) == (1, 1)
    assert summary["failures"] == [f"{corpus / 'bad.parquet'}: row 2, field 'doc_id': duplicate doc_id 'a' "
                                   "within the shard"]
    assert [(e["file"], e["stage"]) for e in summary["errors"]] == [(str(corpus / "bad.parquet"), "score")]
    assert summary["rows"]["skipped"] == 3 and summary["rows"]["scored"] + 3 == summary["rows"]["rows"]
    assert (tmp_path / "out" / "scores" / "good.parquet").exists()
    assert not (tmp_path / "out" / "scores" / "bad.parquet").exists()
