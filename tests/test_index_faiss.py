"""``index.search = "faiss"``: the whole index in memory with FAISS gives the scan's candidates (no Ray)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines import config_from_dict
from pipelines.config import ConfigError, IndexSearch
from pipelines.errors import UserError
from pipelines.io import storage
from pipelines.stages import index_faiss
from pipelines.stages.index_build import encode_rows
from pipelines.stages.index_faiss import faiss_candidates, faiss_top, require_faiss
from pipelines.stages.index_search import part_top
from pipelines.stages.merge import row_key


def job(tmp_path, **index) -> dict:
    return {"model": {"path": str(tmp_path / "model")},
            "data": {"corpus": str(tmp_path / "shards"), "queries": str(tmp_path / "q.jsonl"),
                     "output": str(tmp_path / "out")},
            "scoring": {"mode": "index"}, "index": index}


def assert_same_sides(got, want, keys) -> None:
    """(top scores, top rows, bottom scores, bottom rows) of faiss_top == those of part_top: the same keys in the
    same order, scores equal up to float64 rounding."""
    for side in (0, 2):
        assert [[keys[i] for i in r] for r in got[side + 1]] == [[keys[i] for i in r] for r in want[side + 1]]
        np.testing.assert_allclose(got[side], want[side], rtol=1e-12, atol=1e-12)


def test_faiss_top_equals_the_scan_with_ties(monkeypatch):
    """Small integers: many tied scores, at the M-th place too (FAISS is asked again for more rows until the
    cut is sure), broken by the row key as the scan breaks them."""
    pytest.importorskip("faiss")
    searches = []
    rescore = index_faiss.exact_scores
    monkeypatch.setattr(index_faiss, "exact_scores",
                        lambda X, P, rows: searches.append(rows.shape) or rescore(X, P, rows))
    rng = np.random.default_rng(5)
    for _ in range(40):
        n, q, m = int(rng.integers(1, 120)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
        X = rng.integers(-2, 3, (n, 4)).astype(np.float32)
        X[: n // 3] = X[0]  # a third of the rows equal: ties beyond FAISS's first K
        keys = [f"d{i}" for i in rng.permutation(n)]
        P = rng.integers(-2, 3, (q, 4)).astype(np.float64)
        got, want = faiss_top(X, keys, P, m), part_top(X, keys, P, m)
        assert got[0].shape == (q, min(m, n))
        assert_same_sides(got, want, keys)
        np.testing.assert_array_equal(got[0], want[0])  # integers: exact in float64
    assert len(searches) > 2 * 40  # some queries were searched again with a larger K


def test_faiss_top_equals_the_scan_on_float16_rows():
    """Gaussian rows stored as float16 and float64 queries at the scale of real ones: the same top-M and
    bottom-M as the scan (float32 inside FAISS, float64 re-scoring)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 64)).astype(np.float16).astype(np.float32)
    X[100:110] = X[7]  # duplicate rows: exact ties
    keys = [row_key(f"doc{i}", f"s{i % 3}") for i in rng.permutation(3000)]
    P = rng.standard_normal((25, 64)) * 1e-3
    P[3] = 10 * X[7]  # a query whose top ties (the duplicates) cross the cut at M = 5
    assert_same_sides(faiss_top(X, keys, P, 5), part_top(X, keys, P, 5), keys)
    assert_same_sides(faiss_top(X, keys, P, 40), part_top(X, keys, P, 40, chunk=512), keys)


def test_faiss_top_names_non_finite_rows():
    pytest.importorskip("faiss")
    X = np.ones((4, 3), np.float32)
    X[2, 1] = np.inf
    with pytest.raises(FloatingPointError, match=r"rows \['c'\]"):
        faiss_top(X, ["a", "b", "c", "d"], np.ones((1, 3)), 2)


def write_parts(tmp_path, rng) -> tuple[list[str], list[str], np.ndarray]:
    """Three parts of small-integer rows (float32 storage) and an empty one: urls, row keys, rows [N, 6]."""
    urls, keys, mats = [], [], []
    for p, n in enumerate((7, 0, 9, 12)):
        X = rng.integers(-3, 4, (n, 6)).astype(np.float32)
        docs = [f"d{i}" for i in rng.permutation(n)]
        vector, scale = encode_rows(torch.from_numpy(X), "float32")
        url = str(tmp_path / f"part{p}.parquet")
        storage.write_parquet(url, pa.table({"doc_id": pa.array(docs, pa.string()), "shard": [f"s{p}"] * n,
                                             "tokens": pa.array([3] * n, pa.int32()), "vector": vector,
                                             "scale": scale}))
        urls.append(url)
        keys += [row_key(d, f"s{p}") for d in docs]
        mats.append(X)
    return urls, keys, np.concatenate(mats)


def test_faiss_candidates_read_every_part_and_equal_sorting(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    urls, keys, X = write_parts(tmp_path, rng)
    P = rng.integers(-2, 3, (3, 6)).astype(np.float64)
    cfg = config_from_dict(job(tmp_path, search="faiss"))
    acc = faiss_candidates(cfg, urls, P, 4)
    assert acc.seen == 28
    scores = X.astype(np.float64) @ P.T  # (N, Q)
    for q in range(3):
        top = sorted(range(len(keys)), key=lambda i: (-scores[i, q], keys[i]))[:4]
        low = sorted(range(len(keys)), key=lambda i: (scores[i, q], keys[i]))[:4]
        assert list(acc.top.ids[q]) == [keys[i] for i in top]
        assert list(acc.bottom.ids[q]) == [keys[i] for i in low]
        np.testing.assert_array_equal(acc.top.scores[q], scores[top, q])
        np.testing.assert_array_equal(acc.bottom.scores[q], scores[low, q])


def test_faiss_candidates_leave_an_index_too_large_to_the_scan(tmp_path, monkeypatch, caplog):
    pytest.importorskip("faiss")
    urls, _, _ = write_parts(tmp_path, np.random.default_rng(2))
    need = 2 * 28 * 6 * 4  # X and FAISS's copy: 28 rows of width 6 in float32
    short = config_from_dict(job(tmp_path, search="faiss", faiss_memory_gb=(need - 1) / 2**30))  # one byte short
    with caplog.at_level(logging.WARNING, logger=index_faiss.__name__):
        assert faiss_candidates(short, urls, np.ones((2, 6)), 4) is None
    assert "index.faiss_memory_gb" in caplog.text and "searching with the scan instead" in caplog.text
    enough = config_from_dict(job(tmp_path, search="faiss", faiss_memory_gb=need / 2**30))
    assert faiss_candidates(enough, urls, np.ones((2, 6)), 4).seen == 28


def test_missing_faiss_is_one_line_naming_the_key_and_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(UserError) as err:
        require_faiss()
    message = str(err.value)
    assert "\n" not in message and "index.search = 'faiss'" in message and "pip install faiss-cpu" in message
    cfg = config_from_dict(job(tmp_path, search="faiss"))
    with pytest.raises(UserError, match="pip install faiss-cpu"):
        faiss_candidates(cfg, [], np.ones((1, 3)), 2)


def test_index_search_key_checked(tmp_path):
    assert config_from_dict(job(tmp_path)).index.search == IndexSearch.SCAN
    assert config_from_dict(job(tmp_path, search="faiss")).index.search == IndexSearch.FAISS
    with pytest.raises(ConfigError, match=r"index.search = 'hnsw': must be one of \['scan', 'faiss'\]"):
        config_from_dict(job(tmp_path, search="hnsw"))


def test_validate_reports_missing_faiss(tmp_path, monkeypatch):
    from pipelines.validate.preflight import validate

    monkeypatch.setitem(sys.modules, "faiss", None)
    faiss_errors = [e for e in validate(config_from_dict(job(tmp_path, search="faiss"))).errors if "faiss" in e]
    assert len(faiss_errors) == 1 and "index.search = 'faiss'" in faiss_errors[0]
    assert not [e for e in validate(config_from_dict(job(tmp_path))).errors if "faiss" in e]


def test_faiss_search_uses_threads_per_actor_and_restores_the_default(tmp_path, monkeypatch):
    faiss = pytest.importorskip("faiss")
    urls, _, _ = write_parts(tmp_path, np.random.default_rng(3))
    before = faiss.omp_get_max_threads()
    seen = []
    real_top = index_faiss.faiss_top

    def spy(*args, **kwargs):
        seen.append(faiss.omp_get_max_threads())
        return real_top(*args, **kwargs)

    monkeypatch.setattr(index_faiss, "faiss_top", spy)
    for threads, want in ((1, 1), (0, before)):
        cfg = config_from_dict({**job(tmp_path, search="faiss"), "resources": {"threads_per_actor": threads}})
        assert faiss_candidates(cfg, urls, np.ones((2, 6)), 4).seen == 28
        assert seen[-1] == want and faiss.omp_get_max_threads() == before
