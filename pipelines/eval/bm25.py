"""Okapi BM25 over token ids: the lexical baseline of ``influence eval facts``.

Symbols: N documents, |d| a document's length in tokens, avgdl the mean length,
n(t) the number of documents containing token t, tf(t, d) its count in d.

    idf(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))          (never negative)
    score(q, d) = sum over distinct tokens t of q:
                  qtf(t, q) idf(t) tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))

(qtf: the token's count in the query.) Exact, in plain Python: the suite's
corpora have a few hundred documents.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


class BM25:
    """BM25 index of tokenized documents (lists of token ids)."""

    def __init__(self, documents: Sequence[Sequence[int]], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tf = [Counter(d) for d in documents]
        self.lengths = [len(d) for d in documents]
        self.avgdl = sum(self.lengths) / max(len(documents), 1)
        df: Counter[int] = Counter()
        for counts in self.tf:
            df.update(counts.keys())
        n = len(documents)
        self.idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: Sequence[int]) -> list[float]:
        """[N] the query's score against every document."""
        out = []
        for counts, length in zip(self.tf, self.lengths):
            norm = self.k1 * (1.0 - self.b + self.b * length / self.avgdl)
            s = 0.0
            for t, qtf in Counter(query).items():
                tf = counts.get(t, 0)
                if tf:
                    s += qtf * self.idf[t] * tf * (self.k1 + 1.0) / (tf + norm)
            out.append(s)
        return out
