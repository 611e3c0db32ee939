"""Searching the influence index: every part scored on actors, the exact global top-M and bottom-M per query.

Symbols: Q queries, D index width, N rows of a part, M candidates per query and side.

The preconditioned queries P [Q, D] go to the object store once (``ray.put``) and
every actor of the pass reads them from there. A unit of the pass is a few index
parts (``search_units``: about ``AUTO_UNITS_PER_ACTOR`` units per actor); for each
part the actor computes the scores S = P X^T [Q, N] (float64, ``SEARCH_ROWS`` rows
at a time, read from the file that many at a time, so memory is SEARCH_ROWS x D rows and
Q x SEARCH_ROWS scores whatever the part's size) and keeps the
part's M highest and M lowest per query (``part_top``). Order: score, then the
row key (doc_id, shard) ascending, the order of ``TopKAccumulator``; within a part
the keys are ranked once, so the selection compares integers (a partial sort of
each chunk, exact with ties: every column tied with the M-th score is kept before
the final sort). The driver folds the parts into one ``TopKAccumulator``: the
union of the parts' top-M holds the global top-M, so the result is exactly the
index's best M per query and side, as sorting every score would give.

Payload per part: the scores [Q, n] float64 and row numbers [Q, n] int32 of both
sides (n = min(M, N)), and the keys of the rows they name (at most N).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from influence_ops import TopKAccumulator
from influence_ops.topk import TopKSide

from ..config import JobConfig
from ..io import storage
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of
from .index_build import DTYPE_META, decode_rows
from .merge import row_key
from .score_plan import AUTO_UNITS_PER_ACTOR

SEARCH_ROWS = 8192  # rows of a part scored at once: [Q, SEARCH_ROWS] float64 scores in memory
SEARCH_BYTES = 64 * 2**20  # and at most this many bytes of them in float64 (fewer rows for a wide index)


def best_columns(scores: np.ndarray, rows: np.ndarray, rank: np.ndarray, m: int, largest: bool) -> np.ndarray:
    """Columns of the m highest (``largest``) or lowest entries of each row of ``scores`` [Q, n], ties broken by
    ``rank[rows]`` (smaller first): [Q, min(m, n)] int, in that order. rows: [n] or [Q, n], the part row of each
    entry; rank: [N], the key order of the part's rows.

    Every entry at least as good as the row's m-th best is a candidate (all ties included, so the cut is
    exact); only the candidates are sorted.
    """
    q, n = scores.shape
    rows = np.broadcast_to(rows, scores.shape)
    if n > m:
        kth = n - m if largest else m - 1
        cut = np.partition(scores, kth, axis=1)[:, kth:kth + 1]  # (Q, 1): the m-th best
        mask = scores >= cut if largest else scores <= cut
        counts = mask.sum(1)
        where_q, where_col = np.nonzero(mask)  # row-major: each row's candidates together
        at = np.arange(len(where_q)) - np.repeat(np.cumsum(counts) - counts, counts)
        picked = np.full((q, int(counts.max())), -1)
        picked[where_q, at] = where_col  # (Q, W), -1: padding (W >= m: every row has at least m candidates)
    else:
        picked = np.broadcast_to(np.arange(n), (q, n))
    pad = picked < 0
    safe = np.where(pad, 0, picked)
    sub = np.take_along_axis(scores, safe, 1)
    sub_key = np.where(pad, np.inf, -sub if largest else sub)
    sub_rank = np.where(pad, np.iinfo(np.int64).max, rank[np.take_along_axis(rows, safe, 1)])
    order = np.lexsort((sub_rank, sub_key), axis=-1)[:, :m]
    return np.take_along_axis(safe, order, 1)


def key_rank(keys: list[str]) -> np.ndarray:
    """[N] int: the position of each row key in ascending key order (the tie order of ``TopKAccumulator``)."""
    return np.argsort(np.argsort(np.asarray(keys, dtype=str), kind="stable"), kind="stable")


def part_top(X: np.ndarray, keys: list[str], P: np.ndarray, m: int,
             chunk: int = SEARCH_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The part's top-m and bottom-m per query of S = P X^T. X: [N, D] rows, keys: N row keys, P: [Q, D].

    Returns (top scores, top rows, bottom scores, bottom rows), each [Q, min(m, N)] (float64, int64 rows of X),
    sorted: top by (score descending, key ascending), bottom by (score ascending, key ascending).
    """
    return chunks_top((X[lo:lo + chunk] for lo in range(0, X.shape[0], chunk)), keys, P, m)


def chunks_top(chunks: Iterable[np.ndarray], keys: list[str], P: np.ndarray, m: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``part_top`` over the part's rows in consecutive chunks [c, D] (together the N rows of ``keys``, in order),
    so that only one chunk of the part is in memory at a time."""
    q = P.shape[0]
    rank = key_rank(keys)
    Pt = torch.from_numpy(np.ascontiguousarray(P, dtype=np.float64))
    kept = {largest: (np.zeros((q, 0)), np.zeros((q, 0), dtype=np.int64)) for largest in (True, False)}
    lo = 0
    for X in chunks:
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
        s = (Pt @ x.T).numpy()  # (Q, c)
        if not np.isfinite(s).all():
            bad = sorted({keys[lo + j] for j in np.nonzero(~np.isfinite(s))[1]})
            raise FloatingPointError(f"non-finite index scores for rows {bad[:10]}")
        rows = np.arange(lo, lo + s.shape[1])
        lo += s.shape[1]
        for largest in (True, False):
            cols = best_columns(s, rows, rank, m, largest)  # the chunk's best, then with those kept so far
            scores = np.concatenate([kept[largest][0], np.take_along_axis(s, cols, 1)], 1)
            idx = np.concatenate([kept[largest][1], rows[cols]], 1)
            cols = best_columns(scores, idx, rank, m, largest)
            kept[largest] = (np.take_along_axis(scores, cols, 1), np.take_along_axis(idx, cols, 1))
    if lo != len(keys):
        raise ValueError(f"the part's chunks held {lo} rows, its keys {len(keys)}")
    return kept[True][0], kept[True][1], kept[False][0], kept[False][1]


def stored_dtype(pf: pq.ParquetFile) -> str:
    """How a part's vectors are stored (``index.dtype`` when it was built), from its footer."""
    return (pf.metadata.metadata or {}).get(DTYPE_META.encode(), b"float32").decode()


def row_keys(table: pa.Table) -> list[str]:
    """The row keys (doc_id, shard) of a part's rows, in row order."""
    return [row_key(d, s) for d, s in zip(table.column("doc_id").to_pylist(), table.column("shard").to_pylist())]


def part_chunks_top(url: str, P: np.ndarray, m: int, chunk: int = SEARCH_ROWS
                    ) -> tuple[list[str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(keys, ``part_top`` of the part at ``url``), reading it a row group at a time and scoring ``chunk`` rows at a
    time: memory is one row group (``index_build.GROUP_BYTES`` of float32) and one chunk, not the part. The file
    is opened once (footer, keys, row groups); a transient storage error starts the part again."""
    def search(pf: pq.ParquetFile) -> tuple[list[str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        dtype = stored_dtype(pf)
        keys = row_keys(pf.read(columns=["doc_id", "shard"], use_threads=False))

        def chunks() -> Iterable[np.ndarray]:  # one row group read at a time (iter_batches reads ahead)
            for g in range(pf.metadata.num_row_groups):
                group = pf.read_row_group(g, columns=["vector", "scale"], use_threads=False)
                for lo in range(0, group.num_rows, chunk):
                    yield check_width(url, decode_rows(group.slice(lo, chunk), dtype), P.shape[1])
        return keys, chunks_top(chunks(), keys, P, m)
    return storage.read_parquet_file(url, search)


def check_width(url: str, X: np.ndarray, width: int) -> np.ndarray:
    """X, after checking that its rows have the queries' width."""
    if X.shape[1] != width:
        raise ValueError(f"{url}: index rows have width {X.shape[1]}, the queries {width}")
    return X


def read_part(url: str) -> tuple[np.ndarray, list[str]]:
    """An index part's rows [N, D] float32 and row keys (doc_id, shard): the whole part in memory (FAISS)."""
    table, dtype = storage.read_parquet_file(url, lambda pf: (pf.read(), stored_dtype(pf)))  # one open
    if table.num_rows == 0:
        return np.zeros((0, 0), np.float32), []
    return decode_rows(table, dtype), row_keys(table)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class IndexSearcher:
    """Ray Data callable: ``{"unit": [JSON {"parts": [url, ...]}]}`` -> one row per part: its top-M and bottom-M.

    ``queries``: P [Q, D] float64, or an object reference to it (``ray.put``); ``chunk_rows``: rows scored
    at once (``part_top``). Returns per part ``part``
    (its URL), ``seen`` (its rows), ``keys`` (JSON list of the row keys the sides name) and ``sides`` (an
    .npz of top_scores, top_rows, bottom_scores, bottom_rows [Q, n]; rows index ``keys``).
    """

    def __init__(self, queries: Any, m: int, threads: int = 0, chunk_rows: int = SEARCH_ROWS) -> None:
        set_threads(threads)
        self.chunk_rows = chunk_rows
        if not isinstance(queries, np.ndarray):
            import ray

            queries = ray.get(queries)
        self.P, self.m = np.asarray(queries, dtype=np.float64), m

    def search(self, url: str) -> tuple[int, str, bytes]:
        chunk = max(1, min(self.chunk_rows, SEARCH_BYTES // (8 * max(1, self.P.shape[1]))))
        keys, (ts, tr, bs, br) = part_chunks_top(url, self.P, self.m, chunk)
        if not keys:
            empty = np.zeros((self.P.shape[0], 0))
            return 0, "[]", _npz(top_scores=empty, top_rows=empty.astype(np.int32), bottom_scores=empty,
                                 bottom_rows=empty.astype(np.int32))
        named, inverse = np.unique(np.concatenate([tr, br], 1), return_inverse=True)
        inverse = inverse.reshape(tr.shape[0], -1).astype(np.int32)
        return len(keys), json.dumps([keys[i] for i in named]), _npz(
            top_scores=ts, top_rows=inverse[:, :tr.shape[1]], bottom_scores=bs, bottom_rows=inverse[:, tr.shape[1]:])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"part": [], "seen": [], "keys": [], "sides": []}
        for unit in units_of(batch):
            for url in unit["parts"]:
                seen, keys, sides = self.search(url)
                rows["part"].append(url)
                rows["seen"].append(seen)
                rows["keys"].append(keys)
                rows["sides"].append(sides)
        return {k: np.asarray(v, dtype=None if k == "seen" else object) for k, v in rows.items()}


def fold(acc: TopKAccumulator, row: dict[str, Any]) -> None:
    """Fold one part's result row (``IndexSearcher``) into ``acc``."""
    keys = np.asarray(json.loads(row["keys"]), dtype=object)
    sides = np.load(io.BytesIO(row["sides"]), allow_pickle=False)
    acc.add_sides(TopKSide(sides["top_scores"], keys[sides["top_rows"]]),
                  TopKSide(sides["bottom_scores"], keys[sides["bottom_rows"]]), int(row["seen"]))


def search_units(part_urls: list[str], actors: int) -> list[dict[str, Any]]:
    """The parts in about ``AUTO_UNITS_PER_ACTOR`` units per actor (consecutive parts together)."""
    n = max(1, min(len(part_urls), actors * AUTO_UNITS_PER_ACTOR))
    return [{"parts": list(chunk)} for chunk in np.array_split(np.asarray(part_urls, dtype=object), n) if len(chunk)]


def top_candidates(cfg: JobConfig, part_urls: list[str], P: np.ndarray, m: int) -> TopKAccumulator:
    """Top-M and bottom-M of each query over the index parts (a Ray Data pass over the parts). P: [Q, D]."""
    import ray

    acc = TopKAccumulator(P.shape[0], m)
    if not part_urls:
        return acc
    cluster = ensure_ray(cfg.resources)
    ref = ray.put(np.ascontiguousarray(P, dtype=np.float64))
    args = {"queries": ref, "m": m, "threads": cfg.resources.threads_per_actor}
    for row in run_units(IndexSearcher, args, search_units(part_urls, cfg.resources.actors), cfg.resources, cluster):
        fold(acc, row)
    return acc
