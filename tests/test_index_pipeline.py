"""The influence index through the pipeline: storage, exact top-M over parts, re-scoring, resumability, run_job.

The Ray-starting tests share one module fixture (a tiny corpus, ``scoring.mode = "index"``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch

from influence_ops import TopKAccumulator, collate, load_queries, score_batch
from pipelines import config_from_dict
from pipelines.config import ConfigError
from pipelines.errors import UserError
from pipelines.io import storage
from pipelines.io.model_loading import load_model
from pipelines.io.shards import list_shards, read_rows, row_group_rows
from pipelines.run import run_job
from pipelines.stages.index_build import (DTYPE_META, build_index, current_parts, decode_rows, encode_rows,
                                          from_arrow, to_arrow)
from pipelines.stages.index_query import candidates_of, search_index
from pipelines.stages.index_search import IndexSearcher, fold, part_top, read_part, search_units, top_candidates
from pipelines.stages.merge import row_key


def job(world: Path, output: str, corpus: str, candidates: int) -> dict:
    return {
        "run_id": "index",
        "model": {"path": str(world / "model")},
        "data": {"raw": str(world / "raw"), "corpus": corpus, "queries": str(world / "queries.jsonl"),
                 "output": output, "row_group_rows": 4},
        "factors": {"fisher": "empirical", "sample_sequences": 30, "seed": 7, "unit_sequences": 8},
        "scoring": {"top_k": 3, "rank": 4, "per_token": True, "query_precision": "float64", "mode": "index",
                    "candidates": candidates},
        "index": {"k_out": 8, "k_in": 8, "dtype": "float32"},
        "resources": {"actors": 2, "batch_size": 4, "cpus_per_actor": 0.5},
    }


def test_int8_rows_keep_every_entry_within_half_a_level():
    """index.dtype = "int8": each row stored as integers in [-127, 127] times its scale (largest |entry| / 127);
    decoded, every entry is within half a level of the original, the largest one exact, an all-zero row zero."""
    magnitudes = torch.logspace(-3, 4, 6, dtype=torch.float64)[:, None]
    x = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * magnitudes
    x[2] = 0.0
    vector, scale = encode_rows(x, "int8")
    assert vector.type.value_type == pa.int8() and vector.type.list_size == 40
    codes = np.asarray(vector.flatten().to_numpy()).reshape(6, 40)
    assert np.abs(codes).max() == 127 and np.abs(codes[2]).max() == 0
    got = decode_rows(pa.table({"vector": vector, "scale": scale}), "int8")
    level = scale.to_numpy()[:, None].astype(np.float64)
    assert (np.abs(got - x.numpy()) <= 0.5 * level * (1 + 1e-6) + 1e-30).all()
    rows = np.abs(x.numpy()).argmax(axis=1)
    np.testing.assert_allclose(got[range(6), rows], x.numpy()[range(6), rows], rtol=1e-6)
    assert (got[2] == 0).all()


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
def test_vectors_round_trip_in_each_storage_dtype(dtype, tol):
    x = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    col = to_arrow(x, dtype)
    assert col.type.list_size == 12 and len(col) == 5
    back = from_arrow(pa.chunked_array([col]), dtype)
    np.testing.assert_allclose(back, x.float().numpy(), rtol=tol, atol=tol)
    big = x * 1e6  # beyond float16's range: rows are stored scaled
    vector, scale = encode_rows(big, dtype)
    got = decode_rows(pa.table({"vector": vector, "scale": scale}), dtype)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, big.float().numpy(), rtol=max(tol, 1e-6), atol=tol * 4e6)


def sorted_sides(scores: np.ndarray, keys: list[str], m: int) -> tuple[list[list[str]], list[list[str]]]:
    """Top-m and bottom-m keys per query of scores [N, Q] by sorting everything (ties: key ascending)."""
    top = [[keys[i] for i in sorted(range(len(keys)), key=lambda i: (-scores[i, q], keys[i]))[:m]]
           for q in range(scores.shape[1])]
    low = [[keys[i] for i in sorted(range(len(keys)), key=lambda i: (scores[i, q], keys[i]))[:m]]
           for q in range(scores.shape[1])]
    return top, low


def test_a_part_is_written_a_row_group_at_a_time(tmp_path):
    """The builder's part file (``PartWriter``): rows added batch by batch go out in row groups of about group_rows,
    the footer carries the metadata given at close, and the rows read back as encoding them all at once gives."""
    import pyarrow.parquet as pq

    from pipelines.stages.index_build import PartWriter
    from pipelines.stages.index_search import read_part

    rng = np.random.default_rng(5)
    X = torch.from_numpy(rng.standard_normal((50, 6)) * rng.uniform(0.1, 10, (50, 1)))
    path = str(tmp_path / "part.parquet")
    writer = PartWriter(path, "s", 6, "int8", group_rows=16)
    for lo in range(0, 50, 7):
        writer.add([f"d{i}" for i in range(lo, min(lo + 7, 50))], [3] * len(range(lo, min(lo + 7, 50))),
                   X[lo:lo + 7])
    writer.close({DTYPE_META: "int8", "influence.key": "k1"})
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(3)] == [21, 21, 8]
    assert {DTYPE_META: "int8", "influence.key": "k1"}.items() <= storage.parquet_metadata(path).items()
    rows, keys = read_part(path)
    vector, scale = encode_rows(X, "int8")
    np.testing.assert_array_equal(rows, decode_rows(pa.table({"vector": vector, "scale": scale}), "int8"))
    assert keys == [row_key(f"d{i}", "s") for i in range(50)]
    empty = str(tmp_path / "empty.parquet")
    PartWriter(empty, "s", 6, "float16", group_rows=16).close({DTYPE_META: "float16"})
    assert read_part(empty)[1] == [] and pq.ParquetFile(empty).schema_arrow.field("vector").type.list_size == 6


def test_a_part_is_searched_a_chunk_at_a_time(tmp_path, monkeypatch):
    """The searcher reads a part ``chunk_rows`` rows at a time from the file (never the whole part) and finds what
    the whole part in memory gives; int8 rows decode per chunk with their own scales."""
    from pipelines.stages import index_search

    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 8)) * rng.uniform(0.1, 10, (50, 1))
    docs = [f"d{i}" for i in rng.permutation(50)]
    url = str(tmp_path / "part.parquet")
    vector, scale = encode_rows(torch.from_numpy(X), "int8")
    storage.write_parquet(url, pa.table({"doc_id": docs, "shard": ["s"] * 50, "tokens": [3] * 50, "vector": vector,
                                         "scale": scale}).replace_schema_metadata({DTYPE_META: "int8"}),
                          row_group_rows=16)
    decoded: list[int] = []
    real = index_search.decode_rows
    monkeypatch.setattr(index_search, "decode_rows", lambda table, dtype: (decoded.append(table.num_rows),
                                                                            real(table, dtype))[1])
    P = rng.standard_normal((3, 8))
    keys, got = index_search.part_chunks_top(url, P, 5, chunk=7)
    assert max(decoded) <= 7 and sum(decoded) == 50
    whole, whole_keys = index_search.read_part(url)
    assert keys == whole_keys
    ts, tr, bs, br = index_search.part_top(whole, whole_keys, P, 5)
    np.testing.assert_array_equal(got[1], tr)  # the same rows; scores to rounding (other matmul block sizes)
    np.testing.assert_array_equal(got[3], br)
    np.testing.assert_allclose(got[0], ts, rtol=1e-12)
    np.testing.assert_allclose(got[2], bs, rtol=1e-12)
    with pytest.raises(ValueError, match="index rows have width 8, the queries 9"):
        index_search.part_chunks_top(url, rng.standard_normal((3, 9)), 5, chunk=7)


@pytest.mark.parametrize("chunk_rows", [3, 8192])
def test_top_m_over_parts_equals_sorting_everything(tmp_path, chunk_rows):
    """Each part's top-M (IndexSearcher, as an actor runs it, in row chunks), folded on the driver == sorting."""
    rng = np.random.default_rng(0)
    parts, keys, mats = [], [], []
    for p in range(3):
        n = 7 + p
        X = rng.integers(-2, 3, (n, 6)).astype(np.float32)  # small integers: many tied scores
        X[0] = X[1]  # ties: broken by (doc_id, shard)
        docs = [f"d{i}" for i in rng.permutation(n)]
        url = str(tmp_path / f"part{p}.parquet")
        vector, scale = encode_rows(torch.from_numpy(X), "float32")
        storage.write_parquet(url, pa.table({"doc_id": docs, "shard": [f"s{p}"] * n, "tokens": [3] * n,
                                             "vector": vector, "scale": scale}))
        parts.append(url)
        keys += [row_key(d, f"s{p}") for d in docs]
        mats.append(X)
    empty = str(tmp_path / "empty.parquet")
    vector, scale = encode_rows(torch.zeros(0, 6), "float32")
    storage.write_parquet(empty, pa.table({"doc_id": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                                           "tokens": pa.array([], pa.int32()), "vector": vector, "scale": scale}))
    P = rng.integers(-2, 3, (2, 6)).astype(np.float64)
    searcher = IndexSearcher(P, 4, chunk_rows=chunk_rows)
    out = searcher({"unit": np.asarray([json.dumps({"parts": parts[:2]}), json.dumps({"parts": [parts[2], empty]})],
                                       dtype=object)})
    assert list(out["part"]) == parts + [empty] and list(out["seen"]) == [7, 8, 9, 0]
    acc = TopKAccumulator(2, 4)
    for i in range(len(out["part"])):
        fold(acc, {k: v[i] for k, v in out.items()})
    assert acc.seen == 24
    scores = np.concatenate(mats).astype(np.float64) @ P.T  # (N, Q)
    top, low = sorted_sides(scores, keys, 4)
    for q in range(2):
        assert list(acc.top.ids[q]) == top[q]
        np.testing.assert_allclose(acc.top.scores[q], [scores[keys.index(k), q] for k in top[q]], rtol=1e-12)
        assert list(acc.bottom.ids[q]) == low[q]
    found = candidates_of(acc, ["a", "b"])
    assert set(found) == {"a", "b"} and all(v == "index" for f in found.values() for v in f.values())
    assert all(len(f) <= 8 for f in found.values())


def test_part_top_with_ties_equals_sorting_for_any_chunk():
    """The selection inside a part (partial sort, ties kept at the cut) == sorting, whatever the chunk size."""
    rng = np.random.default_rng(3)
    for _ in range(60):
        n, q, m = int(rng.integers(1, 30)), int(rng.integers(1, 4)), int(rng.integers(1, 8))
        X = rng.integers(-2, 3, (n, 3)).astype(np.float32)
        keys = [f"d{i}" for i in rng.permutation(n)]
        P = rng.integers(-2, 3, (q, 3)).astype(np.float64)
        ts, tr, bs, br = part_top(X, keys, P, m, chunk=int(rng.integers(1, 12)))
        scores = X.astype(np.float64) @ P.T
        top, low = sorted_sides(scores, keys, m)
        assert [[keys[i] for i in r] for r in tr] == top and [[keys[i] for i in r] for r in br] == low
        np.testing.assert_array_equal(ts, np.take_along_axis(scores.T, tr, 1))
        np.testing.assert_array_equal(bs, np.take_along_axis(scores.T, br, 1))


def test_search_units_cover_every_part_once():
    urls = [f"p{i}" for i in range(11)]
    units = search_units(urls, actors=2)
    assert len(units) == 8 and [u for unit in units for u in unit["parts"]] == urls
    assert search_units(urls[:3], actors=2) == [{"parts": ["p0"]}, {"parts": ["p1"]}, {"parts": ["p2"]}]


def test_config_keys_checked(tmp_path):
    base = job(tmp_path, str(tmp_path / "o"), str(tmp_path / "s"), 5)
    for section, key, bad in (("scoring", "mode", "fast"), ("scoring", "candidates", 0),
                              ("index", "projection", "pca"), ("index", "dtype", "int4"), ("index", "k_in", 0)):
        raw = {**base, section: {**base[section], key: bad}}
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            config_from_dict(raw)


def test_tfidf_candidates_only_with_the_index(tmp_path):
    """scoring.tfidf_candidates adds TF-IDF's best to the index's candidates: an integer >= 0, index mode only."""
    base = job(tmp_path, str(tmp_path / "o"), str(tmp_path / "s"), 5)
    good = config_from_dict({**base, "scoring": {**base["scoring"], "tfidf_candidates": 7}})
    assert good.scoring.tfidf_candidates == 7
    for mode, bad, why in (("index", -1, "integer >= 0"), ("index", 2.5, "integer >= 0"),
                           ("scan", 7, 'index" only.*"scan"'), ("tfidf", 7, "set scoring.candidates")):
        with pytest.raises(ConfigError, match=f"scoring.tfidf_candidates = {bad}: .*{why}"):
            config_from_dict({**base, "scoring": {**base["scoring"], "mode": mode, "tfidf_candidates": bad}})


def test_with_tfidf_labels_each_candidate_by_who_found_it():
    from pipelines.stages.candidates import with_tfidf

    index = {"q1": {("a", "s"): "index", ("b", "s"): "index"}, "q2": {("a", "s"): "index"}}
    tfidf = {"q1": {("b", "s"): "tfidf", ("c", "s"): "tfidf"}, "q3": {("d", "t"): "tfidf"}}
    assert with_tfidf(index, tfidf) == {"q1": {("a", "s"): "index", ("b", "s"): "index+tfidf", ("c", "s"): "tfidf"},
                                        "q2": {("a", "s"): "index"}, "q3": {("d", "t"): "tfidf"}}
    assert index["q1"] == {("a", "s"): "index", ("b", "s"): "index"}  # the inputs are left as they were


def test_index_queries_without_an_index_say_so(tiny_world, tmp_path):
    corpus = tmp_path / "shards"
    corpus.mkdir()
    storage.write_parquet(str(corpus / "a.parquet"), pa.table({"doc_id": ["x"], "input_ids": [[1, 2, 3]]}))
    cfg = config_from_dict(job(tiny_world, str(tmp_path / "out"), str(corpus), 5))
    with pytest.raises(UserError, match="run `influence index` first"):
        current_parts(cfg)


def exact_scores(cfg) -> dict[tuple[str, str, str], float]:
    """(query_id, doc_id, shard) -> the score of that sequence alone, in this process."""
    m = load_model(cfg.model)
    queries = load_queries(storage.local_copy(storage.join(cfg.data.output, "queries")))
    out = {}
    for shard in list_shards(cfg.data.corpus):
        seqs = read_rows(shard, None, None)
        for doc, ids in zip(seqs.doc_ids, seqs.input_ids):
            s = score_batch(m.model, queries, collate([ids])).scores[:, 0]
            out.update({(q, doc, shard): float(v) for q, v in zip(queries.query_ids, s)})
    return out


@pytest.fixture(scope="module")
def index_run(ray_local, tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    cfg = config_from_dict(job(tiny_world, str(root / "out"), str(root / "shards"), candidates=4))
    record = run_job(cfg)
    return cfg, record, root


def topk_rows(cfg) -> list[dict]:
    return pads.dataset(str(Path(cfg.data.output) / "topk"), partitioning="hive").to_table().to_pylist()


def test_rescored_rows_equal_exact_scores(index_run):
    cfg, record, _ = index_run
    assert record["status"] == "ok" and record["stages"]["index"]["scored"] == 3
    ix = record["stages"]["index"]["index"]
    assert ix["width"] == 2 * 2 * 8 * 8 and ix["vector_bytes_per_sequence"] == 4 * 256
    exact = exact_scores(cfg)
    rows = topk_rows(cfg)
    cands = pads.dataset(str(Path(cfg.data.output) / "candidates")).to_table().to_pylist()
    named = {(c["query_id"], c["doc_id"], c["shard"]) for c in cands}
    assert len(rows) == 3 * 2 * 3 and all(r["found_by"] == "index" for r in rows)
    for r in rows:
        key = (r["query_id"], r["doc_id"], r["shard"])
        assert key in named
        assert r["score"] == pytest.approx(exact[key], rel=1e-4, abs=1e-6)
    tokens = pads.dataset(str(Path(cfg.data.output) / "token_scores"), partitioning="hive").to_table().to_pandas()
    sums = tokens.groupby(["query_id", "doc_id"])["score"].sum()
    for r in rows:
        assert sums[(r["query_id"], r["doc_id"])] == pytest.approx(r["score"], rel=1e-3, abs=1e-5)
    # each candidate keeps its index estimate and rank; the health report has a row per query and side
    assert all(c["index_score"] is not None and (c["index_top_rank"] or c["index_bottom_rank"]) for c in cands)
    assert sorted(c["index_top_rank"] for c in cands if c["query_id"] == cands[0]["query_id"]
                  and c["index_top_rank"]) == [1, 2, 3, 4]
    health = storage.read_parquet(str(Path(cfg.data.output) / "index_health" / "index_health.parquet")).to_pylist()
    assert sorted((h["query_id"], h["sign"]) for h in health) == sorted((q, s) for q in {r["query_id"] for r in rows}
                                                                       for s in ("top", "bottom"))
    assert all(h["candidates"] == 4 and 1 <= h["deepest_rank_topk"] <= 5 for h in health)
    summary = record["stages"]["merge"]["index_health"]
    assert summary["queries"] == 3 and summary["candidates"] == 4 and summary["k_out"] == 8


def test_full_width_index_estimates_are_the_exact_scores(index_run):
    """index.k_out = k_in = full widths (an orthogonal projection) and dense queries: the index estimates are the
    exact scores, so per query and side the Spearman is 1 and the final rows are the index's first ones."""
    cfg, _, root = index_run
    out = root / "full"
    shutil.copytree(Path(cfg.data.output) / "factors", out / "factors")
    full = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output=str(out)),
                               scoring=dataclasses.replace(cfg.scoring, rank=None, candidates=12),
                               index=dataclasses.replace(cfg.index, k_out=4096, k_in=4096))
    record = run_job(full, stages=("build-queries", "index", "score", "merge"))
    assert record["status"] == "ok"
    cands = storage.read_parquet(str(out / "candidates" / "candidates.parquet")).to_pylist()
    exact = {(r["query_id"], r["doc_id"], r["shard"]): r["score"] for r in topk_rows(full)}
    shared = [c for c in cands if (c["query_id"], c["doc_id"], c["shard"]) in exact]
    assert len(shared) >= 3 * 2 * 3
    for c in shared:
        assert c["index_score"] == pytest.approx(exact[(c["query_id"], c["doc_id"], c["shard"])], rel=1e-4, abs=1e-7)
    health = storage.read_parquet(str(out / "index_health" / "index_health.parquet")).to_pylist()
    assert len(health) == 3 * 2
    for h in health:
        assert h["spearman"] == pytest.approx(1.0, abs=1e-3) and h["candidates"] == 12
        assert h["deepest_rank_topk"] == 3 and h["deepest_rank_top10"] == 10 and h["last_half_top10"] == 4
    assert record["stages"]["merge"]["index_health"]["loose"] is False
    from pipelines.results.load import open_run
    from pipelines.results.report.page import render_report
    from pipelines.results.show import show_lines

    run = open_run(str(out))  # `influence show` has one health line, the report a paragraph; tight: no warning
    (line,) = [x for x in show_lines(run) if x.startswith("index health")]
    assert line.startswith("index health (k = 4096 x 4096, eigen, 12 candidates a side): proponents: median "
                           "Spearman 1.00") and "LOOSE" not in line
    page = render_report(run)
    assert '<p class="health">' in page and "loosely" not in page
    assert "No distribution and no power-law fit: in index mode only each query's candidates" in page
    assert "raise scoring.top_k" not in page  # the scan's advice does not apply


def test_rerun_builds_nothing_and_all_candidates_give_the_scan_topk(index_run, brute_force_topk, assert_topk_equal):
    cfg, _, _ = index_run
    wide = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, candidates=40))  # > corpus size
    record = run_job(wide)
    assert record["stages"]["index"]["skipped"] == 3 and record["stages"]["index"]["scored"] == 0
    assert record["stages"]["index"]["index"]["projection_skipped"] is True
    qids, acc = brute_force_topk(wide)
    assert_topk_equal(topk_rows(wide), qids, acc)


def test_faiss_search_gives_the_scan_candidates(index_run):
    """index.search = "faiss" (the whole index in memory) over the job's parts == the Ray scan of them."""
    pytest.importorskip("faiss")
    cfg, _, _ = index_run
    parts = current_parts(cfg)
    width = max(read_part(url)[0].shape[1] for url in parts)
    P = np.random.default_rng(0).standard_normal((5, width))
    scan = top_candidates(cfg, parts, P, 4)
    in_memory = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, search="faiss"))
    acc, search = search_index(in_memory, parts, P, 4)
    assert search == "faiss" and acc.seen == scan.seen > 8
    for side in ("top", "bottom"):
        got, want = getattr(acc, side), getattr(scan, side)
        assert got.ids.tolist() == want.ids.tolist()
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12)


def test_new_shard_builds_only_its_unit(index_run):
    cfg, _, root = index_run
    shards = list_shards(cfg.data.corpus)
    table = storage.read_parquet(shards[0])
    extra = table.set_column(table.schema.get_field_index("doc_id"), "doc_id",
                             pa.array([f"new-{d}" for d in table.column("doc_id").to_pylist()]))
    storage.write_parquet(str(Path(cfg.data.corpus) / "zz-new.parquet"), extra)
    try:
        built = build_index(cfg)
        assert built["shards"] == 4 and built["skipped"] == 3 and built["scored"] == 1
        assert built["index"]["projection_skipped"] is True
    finally:
        (Path(cfg.data.corpus) / "zz-new.parquet").unlink()
        shutil.rmtree(Path(cfg.data.output) / "index" / "parts" / "zz-new.parquet", ignore_errors=True)
        (Path(cfg.data.output) / "index" / "parts" / "zz-new.parquet").unlink(missing_ok=True)


def index_rows(urls: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """row key -> (vector, tokens) over index parts."""
    out = {}
    for url in urls:
        X, keys = read_part(url)
        tokens = storage.read_parquet(url, columns=["tokens"]).column(0).to_pylist()
        assert not set(keys) & set(out), f"{url}: a row in two parts"
        out.update({k: (x, t) for k, x, t in zip(keys, X, tokens)})
    return out


def test_units_of_a_shard_give_the_rows_of_the_whole_shard(index_run):
    """scoring.unit_rows cuts shards into row-group units: one part per unit, the rows of the whole-shard build;
    a re-run builds nothing; a stale part is refused by queries and removed by the build; the Ray search over
    the unit parts == sorting every score."""
    cfg, _, root = index_run
    out = root / "split"
    shutil.copytree(Path(cfg.data.output) / "factors", out / "factors")
    shutil.copytree(Path(cfg.data.output) / "index" / "projection", out / "index" / "projection")
    split = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output=str(out)),
                                scoring=dataclasses.replace(cfg.scoring, unit_rows=4))
    groups = sum(len(row_group_rows(s)) for s in list_shards(cfg.data.corpus))
    built = build_index(split)
    assert groups > 3 and built["units_total"] == built["scored"] == groups and built["skipped"] == 0
    assert built["index"]["projection_skipped"] is True
    parts = current_parts(split)
    assert len(parts) == groups and all(".rg" in Path(p).name for p in parts)
    whole, units = index_rows(current_parts(cfg)), index_rows(parts)
    assert sorted(units) == sorted(whole) and len(units) == built["rows"]["scored"] == built["rows"]["rows"]
    for key, (x, tokens) in whole.items():
        assert units[key][1] == tokens
        np.testing.assert_allclose(units[key][0], x, rtol=1e-5, atol=1e-6 * np.abs(x).max(), err_msg=key)

    again = build_index(split)
    assert again["scored"] == 0 and again["skipped"] == groups and again["stale_files_removed"] == 0

    stale = out / "index" / "parts" / "old-shard.parquet"
    shutil.copy(parts[0], stale)  # a part no current unit names
    with pytest.raises(UserError, match="missing or stale"):
        current_parts(split)
    again = build_index(split)
    assert again["scored"] == 0 and again["stale_files_removed"] == 1 and not stale.exists()

    keys = sorted(units)
    X = np.stack([units[k][0] for k in keys]).astype(np.float64)
    P = np.random.default_rng(5).standard_normal((3, X.shape[1]))
    acc = top_candidates(split, parts, P, 5)
    assert acc.seen == len(keys)
    scores = X @ P.T  # (N, Q)
    top, low = sorted_sides(scores, keys, 5)
    for q in range(3):
        assert list(acc.top.ids[q]) == top[q] and list(acc.bottom.ids[q]) == low[q]
        np.testing.assert_allclose(acc.top.scores[q], [scores[keys.index(k), q] for k in top[q]], rtol=1e-10)


def test_tfidf_mode_rescores_its_candidates_exactly(index_run):
    """scoring.mode = tfidf: no index pass; TF-IDF's top candidates, re-scored with the full EK-FAC path."""
    from pipelines.stages.tfidf import query_tokens, tfidf_topn

    cfg, _, _ = index_run
    tf = dataclasses.replace(cfg, scoring=dataclasses.replace(cfg.scoring, mode="tfidf", candidates=5))
    record = run_job(tf)
    assert record["status"] == "ok" and "index" not in record["stages"]
    assert record["stages"]["candidates"]["mode"] == "tfidf"
    direct = tfidf_topn(tf, query_tokens(tf), 5)
    named = {(q, d, s) for q, found in direct.items() for d, s, _ in found}
    cands = pads.dataset(str(Path(tf.data.output) / "candidates")).to_table().to_pylist()
    assert {(c["query_id"], c["doc_id"], c["shard"]) for c in cands} == named
    rows = topk_rows(tf)
    assert rows and all(r["found_by"] == "tfidf" for r in rows)
    exact = exact_scores(tf)
    for r in rows:
        key = (r["query_id"], r["doc_id"], r["shard"])
        assert key in named and r["score"] == pytest.approx(exact[key], rel=1e-4, abs=1e-6)


def test_tfidf_candidates_join_the_index_candidates(index_run):
    """scoring.tfidf_candidates = n in index mode: the index's top and bottom M plus TF-IDF's top n per query, all
    re-scored exactly; found_by says which found each row; the health report counts a TF-IDF-only row as missed."""
    from pipelines.stages.tfidf import query_tokens, tfidf_topn

    cfg, _, root = index_run
    both = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, output=str(root / "out-union")),
                               scoring=dataclasses.replace(cfg.scoring, candidates=2, tfidf_candidates=4))
    for kept in ("factors", "queries", "index"):  # what the candidate settings do not change: reused, not rebuilt
        shutil.copytree(Path(cfg.data.output) / kept, root / "out-union" / kept)
    record = run_job(both)
    assert all(record["stages"][s]["skipped"] is True for s in ("fit-factors", "build-queries")), record["stages"]
    assert record["stages"]["index"]["scored"] == 0 and record["stages"]["index"]["skipped"] == 3  # copied: kept
    assert record["status"] == "ok" and record["stages"]["candidates"]["tfidf_candidates"] == 4
    direct = {(q, d, s) for q, found in tfidf_topn(both, query_tokens(both), 4).items() for d, s, _ in found}
    cands = pads.dataset(str(Path(both.data.output) / "candidates")).to_table().to_pylist()
    by_index = {(c["query_id"], c["doc_id"], c["shard"]) for c in cands if c["index_score"] is not None}
    assert len(by_index) == 3 * 2 * 2  # 3 queries, M = 2 a side (the sides do not overlap on 3 x 4 sequences)
    for c in cands:
        key = (c["query_id"], c["doc_id"], c["shard"])
        assert c["found_by"] == {(True, True): "index+tfidf", (True, False): "index",
                                 (False, True): "tfidf"}[(key in by_index, key in direct)]
    assert {(c["query_id"], c["doc_id"], c["shard"]) for c in cands} == by_index | direct
    assert record["stages"]["candidates"]["tfidf_only"] == len(direct - by_index) > 0
    from pipelines.cli import _stage_line
    assert _stage_line("candidates", record["stages"]["candidates"]) == (
        f"{len(cands)} candidates (index + TF-IDF's best 4 a query, {len(direct - by_index)} of them not found by "
        "the index)")
    exact = exact_scores(both)
    rows = topk_rows(both)
    found = {(r["query_id"], r["doc_id"], r["shard"]): r["found_by"] for r in rows}
    assert "tfidf" in found.values() or "index+tfidf" in found.values()
    for r in rows:
        key = (r["query_id"], r["doc_id"], r["shard"])
        assert r["score"] == pytest.approx(exact[key], rel=1e-4, abs=1e-6)
    # the final top rows per query are the best exact scores among all the candidates, whoever found them
    for q in {c["query_id"] for c in cands}:
        best = sorted((k for k in by_index | direct if k[0] == q), key=lambda k: -exact[k])[:3]
        listed = {(r["query_id"], r["doc_id"], r["shard"]) for r in rows if r["query_id"] == q and r["sign"] == "top"}
        assert listed == set(best)
    health = storage.read_parquet(str(Path(both.data.output) / "index_health" / "index_health.parquet")).to_pylist()
    assert all(h["candidates"] == 2 and h["deepest_rank_topk"] <= 3 for h in health)


def test_rescore_unit_scores_only_the_nominated_pairs(index_run, monkeypatch):
    """A unit emits exactly the nominated (query, sequence) pairs, each equal to ``score_batch`` with all the
    queries on those sequences; its batches are scored with their own queries only (no Ray: called directly)."""
    from pipelines.stages import rescore as rs

    cfg, _, _ = index_run
    shard = list_shards(cfg.data.corpus)[0]
    seqs = read_rows(shard, None, None)
    queries = load_queries(storage.local_copy(storage.join(cfg.data.output, "queries")))
    q0, q1, q2 = queries.query_ids
    d = seqs.doc_ids
    candidates = {q0: {(x, shard): "index" for x in d[0:5]}, q1: {(x, shard): "index" for x in d[3:6]},
                  q2: {(x, shard): "tfidf" for x in d[9:11]}}
    (unit,) = rs.rescore_units(candidates)
    assert unit["doc_ids"] == sorted(d[0:6] + d[9:11]) and unit["query_ids"] == [q0, q1, q2]
    calls = []

    def spy(model, qs, batch, **kw):
        calls.append((list(qs.query_ids), int(batch.input_ids.shape[0])))
        return score_batch(model, qs, batch, **kw)

    monkeypatch.setattr(rs, "score_batch", spy)
    scorer = rs.Rescorer(cfg.model, storage.join(cfg.data.output, "queries"), top_k=3, batch_size=2, sort_window=64)
    rows = scorer.rescore(json_round_trip(unit)).to_pylist()
    named = {(q, x, s) for q, found in candidates.items() for x, s in found}
    got = {(r["query_id"], r["doc_id"], r["shard"]): r["score"] for r in rows}
    assert len(rows) == len(named) == 10 and set(got) == named
    assert sum(n for _, n in calls) == 8  # every sequence once
    assert sum(len(qs) < 3 for qs, _ in calls) >= 2  # q2 names 2 of 8 sequences: at most 2 of 4 batches hold it
    assert sum(len(qs) * n for qs, n in calls) < 3 * 8  # fewer (query, sequence) products than all queries
    m = load_model(cfg.model)
    pos = {x: i for i, x in enumerate(d)}
    full = score_batch(m.model, queries, collate([seqs.input_ids[pos[x]] for x in unit["doc_ids"]])).scores
    for (q, x, _), score in got.items():
        want = float(full[queries.query_ids.index(q), unit["doc_ids"].index(x)])
        assert score == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert all(r["score_normalized"] == pytest.approx(r["score"] / queries.factor_tokens) for r in rows)


def json_round_trip(unit: dict) -> dict:
    return json.loads(json.dumps(unit, sort_keys=True))  # as run_units hands it to the actor


def test_fold_groups_rows_by_query_into_exact_topk():
    from pipelines.stages.rescore import RESCORED, fold

    rng = np.random.default_rng(1)
    rows = [(f"q{rng.integers(3)}", f"d{i % 7}", f"s{i % 2}", float(rng.standard_normal()), 0.0) for i in range(30)]
    rows = list({(q, d, s): (q, d, s, v, v / 10) for q, d, s, v, _ in rows}.values())
    table = pa.table(list(map(list, zip(*rows))), schema=RESCORED)
    merges = fold(table, ["q0", "q1", "q2", "q-none"], 2)
    assert merges["q-none"].table().num_rows == 0
    for q in ("q0", "q1", "q2"):
        mine = sorted((r for r in rows if r[0] == q), key=lambda r: (-r[3], row_key(r[1], r[2])))
        t = merges[q].table().to_pylist()
        top = [(r["doc_id"], r["shard"], r["score"], r["score_normalized"]) for r in t if r["sign"] == "top"]
        assert top == [(r[1], r[2], r[3], r[4]) for r in mine[:2]]
        low = sorted(mine, key=lambda r: (r[3], row_key(r[1], r[2])))[:2]
        assert [(r["doc_id"], r["score"]) for r in t if r["sign"] == "bottom"] == [(r[1], r[3]) for r in low]


def test_rescore_order_groups_by_length_class_then_first_query():
    from pipelines.stages.rescore import rescore_order

    lengths = np.array([10, 10, 11, 30, 31, 10])  # classes (factor 1.25): 10, 10, 10, 15, 15, 10
    first = np.array([2, 0, 1, 0, 0, 1])
    assert rescore_order(lengths, first, np.arange(6)).tolist() == [1, 5, 2, 0, 3, 4]


def hand_made_health_case() -> tuple[pa.Table, dict]:
    """One query, M = 12 a side. Top list t01..t12 (index rank r = estimate order), exact 100 - r except t11
    (1000: the best, from deep in the list) and t02 (-1000: the worst); bottom list b01..b12, exact -100 + r
    (same order as the index) except b12 (500: a final top-10 row found only on the bottom list)."""
    from pipelines.stages.index_health import IndexEstimate

    est, exact = {}, {}
    for r in range(1, 13):
        est[(f"t{r:02d}", "s")] = IndexEstimate(13.0 - r, r, None)
        exact[(f"t{r:02d}", "s")] = {11: 1000.0, 2: -1000.0}.get(r, 100.0 - r)
        est[(f"b{r:02d}", "s")] = IndexEstimate(-13.0 + r, None, r)
        exact[(f"b{r:02d}", "s")] = 500.0 if r == 12 else -100.0 + r
    rows = pa.table({"query_id": ["q"] * 24, "doc_id": [d for d, _ in exact], "shard": ["s"] * 24,
                     "score": list(exact.values())})
    return rows, {"q": est}


def test_index_health_of_a_hand_made_query():
    """Spearman over each side's list, the deepest index rank of the final top-10 / top-k, the last-half count."""
    from scipy.stats import spearmanr

    from pipelines.stages.index_health import health_rows, summarize

    rows, estimates = hand_made_health_case()
    got = {r["sign"]: r for r in health_rows(rows, estimates, top_k=3).to_pylist()}
    top, bottom = got["top"], got["bottom"]
    t_est = [13.0 - r for r in range(1, 13)]
    t_exact = [{11: 1000.0, 2: -1000.0}.get(r, 100.0 - r) for r in range(1, 13)]
    assert top["spearman"] == pytest.approx(spearmanr(t_est, t_exact).statistic, abs=1e-12)
    assert top["spearman"] < 0.9
    assert bottom["spearman"] == pytest.approx(1.0)  # b12's 500 is still the highest of the bottom list
    # final top-10 by exact score: t11, b12 (only on the bottom list: rank M + 1 = 13), t01, t03..t09
    assert top["top10_rows"] == 10 and top["deepest_rank_top10"] == 13 and top["deepest_rank_topk"] == 13
    assert top["last_half_top10"] == 5  # ranks > 6: t07, t08, t09, t11, b12
    # final bottom-10 by lowest exact score: t02 (only on the top list: 13), b01..b09
    assert bottom["deepest_rank_top10"] == 13 and bottom["deepest_rank_topk"] == 13  # t02 is the lowest
    assert bottom["last_half_top10"] == 4  # b07, b08, b09, t02
    assert top["candidates"] == bottom["candidates"] == 12
    summary = summarize(health_rows(rows, estimates, top_k=3), 12, {"k_out": 16, "k_in": 16, "projection": "eigen"})
    assert summary["deepest_rank_top10_worst"] == 13 and summary["deepest_rank_top10_median"] == 13
    assert summary["spearman_worst"] == pytest.approx(top["spearman"]) and summary["last_half_top10_share"] == 0.45
    assert summary["loose"] is True


def test_index_health_counts_a_tfidf_only_row_as_missed():
    """A re-scored candidate the index did not list (scoring.tfidf_candidates) is on neither list: in the final
    top-10 it counts at rank M + 1, and it stays out of the Spearman between estimates and exact scores."""
    from pipelines.stages.index_health import health_rows

    rows, estimates = hand_made_health_case()
    extra = pa.table({"query_id": ["q"], "doc_id": ["x"], "shard": ["s"], "score": [2000.0]})
    got = {r["sign"]: r for r in health_rows(pa.concat_tables([rows, extra]), estimates, top_k=1).to_pylist()}
    before = {r["sign"]: r for r in health_rows(rows, estimates, top_k=1).to_pylist()}
    assert got["top"]["deepest_rank_topk"] == 13 and before["top"]["deepest_rank_topk"] == 11  # x replaces t11
    assert got["top"]["spearman"] == pytest.approx(before["top"]["spearman"], abs=1e-12)
    assert got["top"]["candidates"] == before["top"]["candidates"] == 12
    assert got["bottom"] == before["bottom"]


def test_index_health_counts_only_rows_of_the_sides_sign():
    """A small corpus whose top-10 runs out of proponents: the rows past them (exact <= 0, wherever the index put
    them) are not final proponents, so they do not make the index look loose."""
    from pipelines.stages.index_health import IndexEstimate, health_rows

    est, exact = {}, {}
    for r in range(1, 7):  # top list: 3 proponents at ranks 1-3, then zeros and negatives
        est[(f"t{r}", "s")] = IndexEstimate(7.0 - r, r, None)
        exact[(f"t{r}", "s")] = {1: 3.0, 2: 2.0, 3: 1.0, 4: 0.0}.get(r, -r - 0.5)
        est[(f"b{r}", "s")] = IndexEstimate(-7.0 + r, None, r)
        exact[(f"b{r}", "s")] = -10.0 + r
    rows = pa.table({"query_id": ["q"] * 12, "doc_id": [d for d, _ in exact], "shard": ["s"] * 12,
                     "score": list(exact.values())})
    got = {r["sign"]: r for r in health_rows(rows, {"q": est}, top_k=5).to_pylist()}
    assert got["top"]["top10_rows"] == 3 and got["top"]["deepest_rank_top10"] == 3
    assert got["top"]["deepest_rank_topk"] == 3 and got["top"]["last_half_top10"] == 0
    # opponents: every negative row, the bottom list's 6 in order and t5, t6 (only on the top list: rank 7)
    assert got["bottom"]["top10_rows"] == 8 and got["bottom"]["deepest_rank_top10"] == 7


def test_index_health_counts_a_duplicate_at_its_twins_rank():
    """Duplicate sequences: equal exact scores up to rounding, one listed high by the index, the other not listed.
    The unlisted twin in the final top-10 counts at the listed twin's rank, not beyond the list."""
    from pipelines.stages.index_health import IndexEstimate, health_rows, tied_depth

    depth, exact = np.array([1, 2, 7, 7, 3]), np.array([5.0, 4.0, 4.0 * (1 + 1e-7), 1.0, 1.0 + 1e-3])
    assert tied_depth(depth, exact).tolist() == [1, 2, 2, 7, 3]
    est = {("a", "s"): IndexEstimate(2.0, 1, None), ("dup1", "s"): IndexEstimate(1.0, 2, None),
           ("dup2", "s"): IndexEstimate(-1.0, None, 1)}
    rows = pa.table({"query_id": ["q"] * 3, "doc_id": ["a", "dup1", "dup2"], "shard": ["s"] * 3,
                     "score": [3.0, 2.0, 2.0 * (1 + 1e-9)]})
    top = {r["sign"]: r for r in health_rows(rows, {"q": est}, top_k=3).to_pylist()}["top"]
    assert top["top10_rows"] == 3 and top["deepest_rank_top10"] == 2


def health_summary(top_deepest: int, bottom_deepest: int, rho: float = 0.9, m: int = 100) -> dict:
    from pipelines.stages.index_health import HEALTH, summarize

    rows = [{"query_id": f"q{i}", "sign": s, "candidates": m, "spearman": rho, "top10_rows": 10,
             "deepest_rank_top10": d, "deepest_rank_topk": d, "last_half_top10": int(d > m / 2)}
            for i in range(3) for s, d in (("top", top_deepest), ("bottom", bottom_deepest))]
    return summarize(pa.Table.from_pylist(rows, schema=HEALTH), m, {"k_out": 16, "k_in": 16, "projection": "eigen"})


def test_health_warning_for_a_loose_index_only(caplog):
    """One warning line through logging (the CLI prints it as `warning: ...`) when a side's final top-10 rows come from
    beyond half the candidate list for the median query; none for a tight index (whatever its Spearman)."""
    from pipelines.stages.rescore import warn_if_loose

    for tight in (health_summary(14, 40), health_summary(50, 20, rho=0.1)):
        with caplog.at_level("WARNING"):
            warn_if_loose(tight)
        assert caplog.records == [] and tight["loose"] is False
    for loose, named in ((health_summary(97, 20), "proponents"), (health_summary(20, 51), "opponents")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            warn_if_loose(loose)
        (record,) = caplog.records
        line = record.getMessage()
        assert record.levelname == "WARNING" and "\n" not in line
        assert line.startswith(f"index (k = 16, eigen) ranks this model's candidates loosely: {named}: median "
                               "Spearman 0.90")
        assert ({"proponents", "opponents"} - {named}).pop() not in line  # only the loose side is named
        assert "/100" in line and "scoring.candidates" in line
        assert "raise index.k_out / index.k_in, e.g. to 32 x 32 (4x the index's storage;" in line  # a concrete width


def test_candidates_file_without_index_columns_still_reads(tmp_path):
    """A candidates.parquet written before the index columns: the candidates read back, without estimates."""
    from pipelines.stages.candidates import candidates_url, read_candidates

    cfg = config_from_dict(job(tmp_path, str(tmp_path / "out"), str(tmp_path / "s"), 5))
    storage.write_parquet(candidates_url(cfg), pa.table({"query_id": ["q", "q"], "doc_id": ["a", "b"],
                                                          "shard": ["s", "s"], "found_by": ["index", "index"]}))
    candidates, estimates = read_candidates(cfg)
    assert candidates == {"q": {("a", "s"): "index", ("b", "s"): "index"}} and estimates is None
