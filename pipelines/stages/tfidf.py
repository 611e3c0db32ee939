"""TF-IDF candidates: a model-free filter over the corpus (Grosse et al. 2023, section 3.2.1).

Before scoring queries against a huge corpus, the paper keeps, per query, the
sequences that share its rarest tokens (TF-IDF with Okapi BM25 weighting) and
computes influence only on those. This module finds those candidates exactly
with two Ray Data passes over the token shards, without loading any model:

1. document frequencies: each unit (one shard) counts, for every query token t,
   the sequences that contain t, and the sequences and tokens it read; the
   driver adds the per-shard counts (they add exactly, in any order).
2. scores: each unit scores every sequence of its shard against every query
   and keeps its exact top-n per query; the driver merges the per-shard lists.
   Every shard's list is cut in the same total order as the final one, so the
   union of the per-shard top-n holds the global top-n: the merge is exact.

Symbols: N sequences in the corpus, T(x) the set of distinct token ids of x,
|d| the number of tokens of sequence d (all of ``input_ids``), avgdl = sum |d| / N,
df(t) = number of sequences d with t in T(d).

Score (BM25 with binary term presence, tf = 1 for every present term)::

    idf(t)      = round_grid(ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)))      (>= 0)
    w(l)        = (k1 + 1) / (1 + k1 * (1 - b + b * l / avgdl))
    score(q, d) = (sum over t in T(q) & T(d) of idf(t)) * w(|d|)

with k1 = 1.5 and b = 0.75 (length normalisation: at equal matches, shorter
sequences score higher). ``round_grid`` rounds idf to a multiple of 2^-24: the
sums of such numbers are exact in float64 in any order, so a score does not
depend on how it was added up (shards, windows, BLAS) and ties between
sequences are exact ties, broken by (doc_id, shard) ascending. Only sequences
that share at least one token with the query (score > 0) are candidates: a
query may get fewer than n.

Which tokens: whatever ``query_token_ids`` holds. The project passes the
query's prompt + completion tokens (``query_tokens(cfg)``), the paper's "tokens of
the query"; benchmarks/tfidf_recall.py also measures completion-only tokens.

Rows are taken as stored (no model, so no context limit): with
``data.too_long = "chunk"`` a candidate doc_id stands for all its pieces
``"<doc_id>#<piece>"``. A shard that breaks the contract stops the call with
its one-line ``ShardError`` (file, row, field).

Cost: two reads of the ``doc_id`` and ``input_ids`` columns; per window of rows,
O(tokens) to find the query tokens and O(M Q) to score, M = (sequence, matched
distinct token) pairs, Q queries; memory O(window + M Q + n Q) per actor.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..config import JobConfig
from ..io.shards import Sequences, iter_shard, list_shards
from ..runtime.ray_runtime import ensure_ray, run_units, units_of

K1 = 1.5
B = 0.75
IDF_GRID = 2.0 ** -24
WINDOW_ROWS = 1024  # rows read, matched and scored together

Candidate = tuple[str, str, float]  # (doc_id, shard, score)


def idf(df: int, n_docs: int) -> float:
    """BM25 idf (the always-positive form), rounded to a multiple of ``IDF_GRID``."""
    raw = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
    return round(raw / IDF_GRID) * IDF_GRID


def length_factor(lengths: Any, avgdl: float) -> Any:
    """(k1 + 1) / (1 + k1 (1 - b + b |d| / avgdl)); ``lengths`` a float or an array."""
    return (K1 + 1) / (1 + K1 * (1 - B + B * lengths / avgdl))


def order_key(c: Candidate) -> tuple[float, str, str]:
    """Best first: higher score, then doc_id, then shard."""
    return (-c[2], c[0], c[1])


def matched_terms(seqs: Sequences, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (sequence, term) pairs of a window, sorted by sequence then term.

    Args:
        seqs: a window of rows.
        terms: [U] sorted distinct query token ids.
    Returns:
        (seq [M] int64 row index in the window, pos [M] int64 index into ``terms``).
    """
    if not len(seqs) or not terms.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    flat = np.concatenate(seqs.input_ids)  # (total tokens,)
    owner = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs.lengths)  # (total tokens,)
    pos = np.minimum(np.searchsorted(terms, flat), terms.size - 1)
    hit = terms[pos] == flat
    keys = np.unique(owner[hit] * terms.size + pos[hit])  # (M,) sorted: by sequence, then term
    return keys // terms.size, keys % terms.size


class TermCounter:
    """Ray Data callable, pass 1: ``{"unit": [JSON {shard}]}`` -> per shard: sequences, tokens, df [U]."""

    def __init__(self, terms: list[int], window_rows: int = WINDOW_ROWS) -> None:
        self.terms = np.asarray(terms, dtype=np.int64)
        self.window_rows = window_rows

    def count(self, shard: str) -> tuple[int, int, np.ndarray]:
        docs, tokens, df = 0, 0, np.zeros(self.terms.size, dtype=np.int64)
        for seqs in iter_shard(shard, None, rows_per_read=self.window_rows):
            docs += len(seqs)
            tokens += int(seqs.lengths.sum())
            _, pos = matched_terms(seqs, self.terms)
            df += np.bincount(pos, minlength=self.terms.size)
        return docs, tokens, df

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "sequences": [], "tokens": [], "df": [], "seconds": []}
        for unit in units_of(batch):
            start = time.perf_counter()
            docs, tokens, df = self.count(unit["shard"])
            rows["shard"].append(unit["shard"])
            rows["sequences"].append(docs)
            rows["tokens"].append(tokens)
            rows["df"].append(json.dumps(df.tolist()))
            rows["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v, dtype=object if k in ("shard", "df") else None) for k, v in rows.items()}


class TopNScorer:
    """Ray Data callable, pass 2: ``{"unit": [JSON {shard}]}`` -> per shard: its top-n per query (JSON).

    ``terms`` [U] sorted query token ids, ``idfs`` [U] their idf, ``query_terms`` [Q][*] the
    positions in ``terms`` of each query's distinct tokens. Holds weights [U, Q] (8 U Q bytes).
    """

    def __init__(self, terms: list[int], idfs: list[float], query_terms: list[list[int]], avgdl: float, n: int,
                 window_rows: int = WINDOW_ROWS) -> None:
        self.terms = np.asarray(terms, dtype=np.int64)
        self.weights = np.zeros((self.terms.size, len(query_terms)))  # (U, Q): idf(t) if t in q, else 0
        for q, pos in enumerate(query_terms):
            self.weights[pos, q] = np.asarray(idfs, dtype=np.float64)[pos]
        self.avgdl, self.n, self.window_rows = avgdl, n, window_rows

    def window_scores(self, seqs: Sequences) -> tuple[np.ndarray, np.ndarray]:
        """(rows [D] of the window with a match, scores [D, Q])."""
        seq, pos = matched_terms(seqs, self.terms)
        if not seq.size:
            return seq, np.zeros((0, self.weights.shape[1]))
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])  # first pair of each matched row
        rows = seq[starts]
        sums = np.add.reduceat(self.weights[pos], starts, axis=0)  # (D, Q), exact (grid multiples)
        return rows, sums * length_factor(seqs.lengths[rows].astype(np.float64), self.avgdl)[:, None]

    def top_shard(self, shard: str) -> list[list[Candidate]]:
        best: list[list[Candidate]] = [[] for _ in range(self.weights.shape[1])]
        for seqs in iter_shard(shard, None, rows_per_read=self.window_rows):
            rows, scores = self.window_scores(seqs)
            for q in range(scores.shape[1]):
                col = scores[:, q]
                keep = np.flatnonzero(col > 0)
                if keep.size > self.n:  # every row tied with the n-th best stays, so the cut below is exact
                    nth = np.partition(col[keep], keep.size - self.n)[keep.size - self.n]
                    keep = keep[col[keep] >= nth]
                found = [(seqs.doc_ids[int(rows[i])], shard, float(col[i])) for i in keep]
                best[q] = heapq.nsmallest(self.n, best[q] + found, key=order_key)
        return best

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "candidates": [], "seconds": []}
        for unit in units_of(batch):
            start = time.perf_counter()
            rows["shard"].append(unit["shard"])
            rows["candidates"].append(json.dumps(self.top_shard(unit["shard"])))
            rows["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v, dtype=object if k != "seconds" else None) for k, v in rows.items()}


def query_terms(query_token_ids: dict[str, list[int]], terms: list[int]) -> list[list[int]]:
    """[Q][*]: positions in ``terms`` (sorted) of each query's distinct tokens (binary presence)."""
    index = {t: i for i, t in enumerate(terms)}
    return [sorted({index[int(t)] for t in ids}) for ids in query_token_ids.values()]


def query_tokens(cfg: JobConfig, part: str = "all") -> dict[str, list[int]]:
    """query_id -> token ids of the job's queries: prompt + completion (``"all"``) or the completion only.

    Tokenized as ``build-queries`` does (the model's tokenizer, no special tokens; or the
    file's ``prompt_ids``/``completion_ids``), without loading the model.
    """
    from ..io.model_loading import load_tokenizer
    from ..io.model_source import has_tokenizer
    from .build_queries import tokenize_queries

    if part not in ("all", "completion"):
        raise ValueError(f"query_tokens: part must be 'all' or 'completion', got {part!r}")
    tokenizer = load_tokenizer(cfg.model) if has_tokenizer(cfg.model) else None
    rows = tokenize_queries(cfg.data.queries, tokenizer, None, None)
    return {qid: (p + c if part == "all" else list(c))
            for qid, p, c in zip(rows.ids, rows.prompt_ids, rows.completion_ids)}


def merge_candidates(per_shard: Iterator[list[list[Candidate]]], num_queries: int, n: int) -> list[list[Candidate]]:
    """The exact top-n per query of the union of per-shard top-n lists (``order_key`` order)."""
    merged: list[list[Candidate]] = [[] for _ in range(num_queries)]
    for lists in per_shard:
        for q, found in enumerate(lists):
            merged[q] = heapq.nsmallest(n, merged[q] + [tuple(c) for c in found], key=order_key)
    return merged


def tfidf_topn(cfg: JobConfig, query_token_ids: dict[str, list[int]],
               n: int) -> dict[str, list[tuple[str, str, float]]]:
    """The n best TF-IDF (BM25, binary presence) candidates of each query over ``cfg.data.corpus``.

    Args:
        cfg: the job (``data.corpus`` and ``resources`` are used; Ray is started or joined
            as for every stage).
        query_token_ids: query_id -> the query's token ids (prompt + completion in this project).
        n: candidates per query, >= 1.
    Returns:
        query_id -> [(doc_id, shard, score)], best first, ties by (doc_id, shard); only
        sequences sharing a token with the query (score > 0), so possibly fewer than n.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"tfidf_topn: n must be an integer >= 1, got {n!r}")
    for qid, ids in query_token_ids.items():
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in ids):
            raise ValueError(f"tfidf_topn: query {qid!r}: token ids must be integers >= 0")
    if not query_token_ids:
        return {}
    terms = sorted({int(t) for ids in query_token_ids.values() for t in ids})
    units = [{"shard": s} for s in list_shards(cfg.data.corpus)]
    cluster = ensure_ray(cfg.resources)
    docs, tokens, df = 0, 0, np.zeros(len(terms), dtype=np.int64)
    for row in run_units(TermCounter, {"terms": terms}, units, cfg.resources, cluster):
        docs += int(row["sequences"])
        tokens += int(row["tokens"])
        df += np.asarray(json.loads(row["df"]), dtype=np.int64)
    if docs == 0:
        return {qid: [] for qid in query_token_ids}
    args = {"terms": terms, "idfs": [idf(int(f), docs) for f in df], "avgdl": tokens / docs, "n": n,
            "query_terms": query_terms(query_token_ids, terms)}
    per_shard = (json.loads(row["candidates"]) for row in run_units(TopNScorer, args, units, cfg.resources, cluster))
    merged = merge_candidates(per_shard, len(query_token_ids), n)
    return {qid: [(str(d), str(s), float(v)) for d, s, v in found] for qid, found in zip(query_token_ids, merged)}
