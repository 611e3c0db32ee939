"""Searching the influence index in memory with FAISS (``index.search = "faiss"``): the scan's candidates.

Symbols: Q queries, N rows of the whole index, D its width, M candidates per query and side,
K rows FAISS returns per query (M <= K <= N).

The driver reads every index part into one matrix X [N, D] float32 and adds it to an exact
inner-product index (``faiss.IndexFlatIP``: a float32 matrix product, no approximation), which
returns each query's K highest rows; the bottom side is the K highest of the negated queries.
FAISS's float32 score of a row differs from its float64 score by at most
b_q = 2 (D + 2) u ||P_q|| max_r ||X_r|| (u = 2^-24: the query rounded to float32, then a float32
dot product of length D; the classic bound, doubled for margin). When a query's M-th FAISS score
exceeds its K-th by more than 2 b_q, no row outside the K can reach its M best (ties included);
the other queries are searched again with K doubled, up to N. The rows within 2 b_q of the M-th
FAISS score (the others cannot be among the M best) are then scored in float64 from X and cut
to M with ``best_columns`` (score, then row key (doc_id, shard)), as
``part_top`` cuts a part, so the candidates are the scan's (``index_search.py``) and their
scores equal the scan's up to float64 rounding.

Memory: X and FAISS's copy of it, 2 x N x D x 4 bytes. FAISS is used when that is at most
min(``index.faiss_memory_gb``, half the memory available on the driver); a larger index is
searched with the scan instead, with a logged warning (the same candidates, only on actors).
Threads: FAISS's OpenMP threads are set to ``resources.threads_per_actor`` for the search when
that is above 0 (0: FAISS's default, every core of the driver).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from influence_ops import TopKAccumulator
from influence_ops.topk import TopKSide

from ..config import JobConfig
from ..errors import UserError
from ..io.shards import row_counts
from .index_search import best_columns, key_rank, read_part

log = logging.getLogger(__name__)

FIRST_K = 2  # FAISS is first asked for max(FIRST_K x M, M + 16) rows per query
UNIT_ROUNDOFF = 2.0 ** -24  # float32
INSTALL = "pip install faiss-cpu (or pip install 'corpus-influence[faiss]')"


def require_faiss() -> Any:
    """The faiss module; a one-line UserError naming the job key and the install command when it is missing."""
    try:
        import faiss
    except ImportError as err:
        raise UserError(f"index.search = 'faiss' needs the faiss package: {INSTALL}; "
                        "or set index.search = 'scan'") from err
    return faiss


def faiss_bytes(rows: int, width: int) -> int:
    """Bytes the in-memory search holds: X [rows, width] float32 and FAISS's copy of it."""
    return 2 * rows * width * 4


def available_memory() -> int:
    """Bytes of memory available on this machine (Linux: MemAvailable; else the free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def faiss_limit(memory_gb: float) -> int:
    """The most bytes the in-memory search may hold (``faiss_bytes``): ``index.faiss_memory_gb``, at most
    half the available memory."""
    return min(int(memory_gb * 2**30), available_memory() // 2)


def float32_error(P: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """[Q] float64: a bound on |FAISS's float32 score - the float64 score| of any index row for each query of
    P [Q, D] (module docstring). squared_norms: [N] the rows' squared norms."""
    largest_row = float(np.sqrt(squared_norms.max())) if len(squared_norms) else 0.0
    return 2.0 * (P.shape[1] + 2) * UNIT_ROUNDOFF * np.linalg.norm(P, axis=1) * largest_row


def exact_scores(X: np.ndarray, P: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[q, K] float64 scores P_i . X_rows[i, j]. X: [N, D], P: [q, D], rows: [q, K] row numbers of X.

    One query at a time: its K rows [K, D] as float64 stay in cache (a gather of all queries' rows at once
    measured several times slower).
    """
    out = np.empty(rows.shape)
    for i in range(len(rows)):
        out[i] = X[rows[i]].astype(np.float64) @ P[i]
    return out


def faiss_top(X: np.ndarray, keys: list[str], P: np.ndarray, m: int,
              faiss: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``part_top`` over the whole index with FAISS: X [N, D] rows, keys: N row keys, P [Q, D] queries.

    Returns (top scores, top rows, bottom scores, bottom rows), each [Q, min(m, N)] (float64, int64 rows
    of X), sorted: top by (score descending, key ascending), bottom by (score ascending, key ascending).
    """
    faiss = faiss or require_faiss()
    n, q = X.shape[0], P.shape[0]
    P = np.asarray(P, dtype=np.float64)
    X = np.ascontiguousarray(X, dtype=np.float32)
    squared_norms = np.einsum("nd,nd->n", X, X, dtype=np.float64)  # (N,): non-finite iff a row is
    if not np.isfinite(squared_norms).all():
        bad = sorted({keys[i] for i in np.nonzero(~np.isfinite(squared_norms))[0]})
        raise FloatingPointError(f"non-finite index scores for rows {bad[:10]}")
    if not np.isfinite(P.astype(np.float32)).all():
        bad_queries = np.nonzero(~np.isfinite(P.astype(np.float32)).all(1))[0][:10].tolist()
        raise FloatingPointError(f"non-finite query rows {bad_queries} (or beyond float32's range)")
    rank, bound = key_rank(keys), float32_error(P, squared_norms)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sides = []
    for largest in (True, False):
        kept, scores, rows = min(m, n), np.empty((q, min(m, n))), np.empty((q, min(m, n)), dtype=np.int64)
        todo, k = np.arange(q), min(n, max(FIRST_K * m, m + 16))
        while len(todo):
            found, idx = index.search(np.ascontiguousarray(P[todo] if largest else -P[todo], dtype=np.float32), k)
            sure = np.ones(len(todo), bool) if k == n else found[:, m - 1] - found[:, k - 1] > 2 * bound[todo]
            done, found, idx = todo[sure], found[sure], idx[sure].astype(np.int64)
            if len(done) and k > m:  # only rows within 2 b of the M-th can be among the M best: a prefix
                near = found >= found[:, m - 1:m] - 2 * bound[done, None]
                idx = idx[:, :max(m, int(near.sum(1).max()))]
            if len(done):
                s = exact_scores(X, P[done], idx)
                cols = best_columns(s, idx, rank, kept, largest)
                scores[done], rows[done] = np.take_along_axis(s, cols, 1), np.take_along_axis(idx, cols, 1)
            todo, k = todo[~sure], min(n, 2 * k)
        sides += [scores, rows]
    return sides[0], sides[1], sides[2], sides[3]


def faiss_candidates(cfg: JobConfig, part_urls: list[str], P: np.ndarray, m: int) -> TopKAccumulator | None:
    """Top-M and bottom-M of each query over the index parts, in memory with FAISS. P: [Q, D].

    None when the index does not fit (``faiss_limit``): the caller searches with the scan.
    """
    faiss = require_faiss()
    acc = TopKAccumulator(P.shape[0], m)
    if not part_urls:
        return acc
    width, total = P.shape[1], sum(row_counts(part_urls))
    need, limit = faiss_bytes(total, width), faiss_limit(cfg.index.faiss_memory_gb)
    if need > limit:
        log.warning("index.search = 'faiss': the index needs %.2f GiB in memory (2 x %d rows x %d float32), "
                    "more than %.2f GiB (the smaller of index.faiss_memory_gb = %g and half the available "
                    "memory); searching with the scan instead", need / 2**30, total, width, limit / 2**30,
                    cfg.index.faiss_memory_gb)
        return None
    X, keys = np.empty((total, width), np.float32), []
    for url in part_urls:
        part, part_keys = read_part(url)
        if not part_keys:
            continue
        if part.shape[1] != width:
            raise ValueError(f"{url}: index rows have width {part.shape[1]}, the queries {width}")
        X[len(keys):len(keys) + len(part_keys)] = part
        keys += part_keys
    if not keys:
        return acc
    threads = cfg.resources.threads_per_actor
    before = faiss.omp_get_max_threads()
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    try:
        ts, tr, bs, br = faiss_top(X[:len(keys)], keys, P, m, faiss)
    finally:
        faiss.omp_set_num_threads(before)
    named = np.asarray(keys, dtype=object)
    acc.add_sides(TopKSide(ts, named[tr]), TopKSide(bs, named[br]), len(keys))
    return acc
