"""The job against object storage for real: an S3-protocol server (moto) on 127.0.0.1.

Model, raw text, queries, shards and every output live in a bucket and are
reached through s3:// URLs (s3fs / pyarrow), as against a real bucket; each
stage runs on its own, as the CLI subcommands do.
"""

from __future__ import annotations

import io
import os

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipelines import config_from_dict
from pipelines.io import storage
from pipelines.run import run_job


@pytest.fixture(scope="module")
def bucket(s3_server, tiny_world):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("influence-test")
    for path in sorted(tiny_world.rglob("*")):
        if path.is_file():
            fs.put(str(path), f"influence-test/world/{path.relative_to(tiny_world)}")
    return "s3://influence-test"


def test_stages_against_s3(ray_local, bucket, brute_force_topk, assert_topk_equal, assert_factors_match_fit,
                           tmp_path):
    cfg = config_from_dict({
        "run_id": "s3-test",
        "model": {"path": f"{bucket}/world/model"},
        "data": {"raw": f"{bucket}/world/raw/", "corpus": f"{bucket}/shards/", "queries": f"{bucket}/world/queries.jsonl",
                 "output": f"{bucket}/out"},
        "factors": {"fisher": "empirical", "sample_sequences": 20, "seed": 3, "unit_sequences": 16},
        "scoring": {"top_k": 2, "rank": 0, "per_token": True},
        "resources": {"actors": 1, "batch_size": 8},
    })
    for stage in ("tokenize", "fit-factors", "build-queries", "score", "merge"):
        record = run_job(cfg, stages=(stage,))
        assert record["status"] == "ok", stage
    shards = storage.list_files(f"{bucket}/shards/", ".parquet")
    assert [s.rsplit("/", 1)[-1] for s in shards] == ["part0.parquet", "part1.parquet", "part2.parquet"]
    assert storage.exists(f"{bucket}/out/runs/s3-test.json")
    assert storage.read_json(f"{bucket}/out/resolved_config.json")["data"]["output"] == f"{bucket}/out"

    assert assert_factors_match_fit(cfg) == 20  # one actor, units of 16 (the local test: two actors, units of 8)

    fs, root = storage.filesystem(f"{bucket}/out/topk")
    table = pads.dataset(root, filesystem=fs, partitioning="hive").to_table().to_pylist()
    qids, acc = brute_force_topk(cfg)
    assert_topk_equal(table, qids, acc)
    tokens = pq.read_table(io.BytesIO(storage.read_bytes(f"{bucket}/out/token_scores/query_id=q-cat/part-0.parquet")))
    assert tokens.num_rows > 0 and tokens.column_names == ["doc_id", "shard", "token_index", "token_id", "token", "score"]

    # DuckDB over the bucket through s3fs (no httpfs extension needed)
    import duckdb
    import s3fs

    os.environ.setdefault("HOME", str(tmp_path))
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem())
    n = con.execute(f"SELECT count(*) FROM read_parquet('{bucket}/out/topk/*/*.parquet', hive_partitioning=true) "
                    "WHERE query_id = 'q-dog'").fetchone()[0]
    assert n == 2 * cfg.scoring.top_k


def mode_job(bucket: str, mode: str, index: dict | None = None, **scoring):
    """A job of scoring.mode ``mode`` with every input and output in the bucket (its own shards and output)."""
    return config_from_dict({
        "run_id": f"s3-{mode}",
        "model": {"path": f"{bucket}/world/model"},
        "data": {"raw": f"{bucket}/world/raw/", "corpus": f"{bucket}/shards-{mode}/",
                 "queries": f"{bucket}/world/queries.jsonl", "output": f"{bucket}/out-{mode}"},
        "factors": {"fisher": "empirical", "sample_sequences": 20, "seed": 3, "unit_sequences": 16},
        "scoring": {"top_k": 2, "rank": 0, "mode": mode, **scoring},
        "index": index or {},
        "resources": {"actors": 1, "batch_size": 8},
    })


def test_index_mode_against_s3(ray_local, bucket, brute_force_topk, assert_topk_equal):
    """scoring.mode = "index" with every file in the bucket: the index parts and its projection are written there,
    and, with more candidates than sequences, the re-scored top-k equals every sequence scored alone. A second run
    finds the index complete and builds nothing."""
    cfg = mode_job(bucket, "index", index={"k_out": 4, "k_in": 4})
    record = run_job(cfg)
    assert record["status"] == "ok"
    parts = storage.list_files(f"{bucket}/out-index/index/parts/", ".parquet")
    assert [p.rsplit("/", 1)[-1] for p in parts] == ["part0.parquet", "part1.parquet", "part2.parquet"]
    assert storage.list_files(f"{bucket}/out-index/index/projection/", ".safetensors")
    assert record["stages"]["index"]["scored"] == 3
    fs, root = storage.filesystem(f"{bucket}/out-index/topk")
    table = pads.dataset(root, filesystem=fs, partitioning="hive").to_table().to_pylist()
    assert {r["found_by"] for r in table} == {"index"}
    qids, acc = brute_force_topk(cfg)
    assert_topk_equal(table, qids, acc)
    again = run_job(cfg)
    assert again["status"] == "ok" and again["stages"]["index"]["scored"] == 0
    assert again["stages"]["index"]["skipped"] == 3


def test_tfidf_mode_against_s3(ray_local, bucket):
    """scoring.mode = "tfidf" with every file in the bucket: candidates from the two TF-IDF passes over the shards,
    re-scored exactly; every top-k row was found by TF-IDF and its query's candidates are in the bucket."""
    cfg = mode_job(bucket, "tfidf", candidates=5)
    record = run_job(cfg)
    assert record["status"] == "ok"
    candidates = storage.read_parquet(f"{bucket}/out-tfidf/candidates/candidates.parquet").to_pylist()
    assert candidates and {c["found_by"] for c in candidates} == {"tfidf"}
    per_query: dict[str, set] = {}
    for c in candidates:
        per_query.setdefault(c["query_id"], set()).add(c["doc_id"])
    assert max(len(v) for v in per_query.values()) <= 5
    fs, root = storage.filesystem(f"{bucket}/out-tfidf/topk")
    table = pads.dataset(root, filesystem=fs, partitioning="hive").to_table().to_pylist()
    assert table and all(r["doc_id"] in per_query[r["query_id"]] for r in table)
    assert {r["found_by"] for r in table} == {"tfidf"}
