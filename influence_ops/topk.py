"""Streaming top-k and bottom-k per query, exact and mergeable.

Symbols: Q queries, B sequences per update, k kept per query and side.

Order: top-k by (score descending, doc_id ascending); bottom-k by (score
ascending, doc_id ascending). Ties are broken by doc_id, so the result is the
same whatever the batching, worker split or merge order: merging the top-k of
disjoint parts equals sorting everything (the union of the parts' top-k holds
the global top-k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TopKSide:
    """One side for all queries: scores [Q, n] float64 and doc ids [Q, n] (n <= k), sorted."""

    scores: np.ndarray
    ids: np.ndarray


def _select(scores: np.ndarray, ids: np.ndarray, k: int, largest: bool) -> TopKSide:
    key = -scores if largest else scores
    order = np.lexsort((ids, key), axis=-1)[:, :k]  # last key is primary
    return TopKSide(np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1))


class TopKAccumulator:
    """Keeps the k highest and k lowest scoring sequences for each of Q queries."""

    def __init__(self, num_queries: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        self.k = k
        self.num_queries = num_queries
        empty = TopKSide(np.zeros((num_queries, 0)), np.zeros((num_queries, 0), dtype=object))
        self.top = empty
        self.bottom = empty
        self.seen = 0

    def update(self, scores: np.ndarray, doc_ids: Sequence[str]) -> None:
        """Add a batch. scores: [Q, B] (array or tensor); doc_ids: B ids."""
        s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != self.num_queries or s.shape[1] != len(doc_ids):
            raise ValueError(f"scores have shape {s.shape}, expected ({self.num_queries}, {len(doc_ids)})")
        if not np.isfinite(s).all():
            bad = sorted({doc_ids[j] for j in np.nonzero(~np.isfinite(s))[1]})
            raise FloatingPointError(f"non-finite influence scores for doc_ids {bad[:10]}")
        ids = np.empty((self.num_queries, len(doc_ids)), dtype=object)
        ids[:] = np.asarray(list(doc_ids), dtype=object)[None, :]
        self._absorb(TopKSide(s, ids), TopKSide(s, ids))
        self.seen += len(doc_ids)

    def _absorb(self, top: TopKSide, bottom: TopKSide) -> None:
        self.top = _select(np.concatenate([self.top.scores, top.scores], 1),
                           np.concatenate([self.top.ids, top.ids], 1), self.k, largest=True)
        self.bottom = _select(np.concatenate([self.bottom.scores, bottom.scores], 1),
                              np.concatenate([self.bottom.ids, bottom.ids], 1), self.k, largest=False)

    def merge(self, other: TopKAccumulator) -> TopKAccumulator:
        """A new accumulator holding the top/bottom-k of both (disjoint doc ids assumed)."""
        if (other.k, other.num_queries) != (self.k, self.num_queries):
            raise ValueError(f"cannot merge top-k of (k={self.k}, Q={self.num_queries}) and "
                             f"(k={other.k}, Q={other.num_queries})")
        out = TopKAccumulator(self.num_queries, self.k)
        out.top, out.bottom, out.seen = self.top, self.bottom, self.seen
        out._absorb(other.top, other.bottom)
        out.seen += other.seen
        return out

    def add_sides(self, top: TopKSide, bottom: TopKSide, seen: int) -> None:
        """Fold in the kept rows of another part: its top and bottom sides (scores and ids [Q, n], n <= k, over
        ``seen`` sequences whose doc ids are disjoint from those seen so far)."""
        for name, side in (("top", top), ("bottom", bottom)):
            if side.scores.ndim != 2 or side.scores.shape[0] != self.num_queries or side.ids.shape != side.scores.shape:
                raise ValueError(f"{name} side has scores {side.scores.shape} and ids {side.ids.shape}, expected "
                                 f"({self.num_queries}, n) for both")
        self._absorb(top, bottom)
        self.seen += seen
