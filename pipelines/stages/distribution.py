"""The distribution of influence over every scored sequence, kept as log-spaced histograms.

The top-k tables hold only the extremes; the report's sparsity analysis
(Grosse et al. 2023, section 5.2: influence is heavy-tailed, a few sequences
hold most of it) and the question "what share of the positive influence do
the top 1% hold?" need the rest. Each scoring unit (a shard) keeps, per query,
a histogram of |score_normalized| with ``BINS_PER_DECADE`` bins per decade,
separately for positive and negative scores, with the count and the sum of
the raw scores in each bin: partial histograms add exactly across shards.

``<output>/distribution/<shard name>.parquet`` (written before the shard's
scores file, so a complete scores file implies its histogram). Columns:

    query_id string, shard string, sign string ('positive' | 'negative' |
    'zero'), bin_lower float64, bin_upper float64 (bounds of |score_normalized|;
    0 and 0 for 'zero'), sequences int64, score_sum float64 (raw scores).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

BINS_PER_DECADE = 8
LOWEST_DECADE, HIGHEST_DECADE = -30, 30  # |normalized score| below 1e-30 counts in the lowest bin
DISTRIBUTION_SCHEMA = pa.schema([("query_id", pa.string()), ("shard", pa.string()), ("sign", pa.string()),
                                 ("bin_lower", pa.float64()), ("bin_upper", pa.float64()),
                                 ("sequences", pa.int64()), ("score_sum", pa.float64())])
_NBINS = (HIGHEST_DECADE - LOWEST_DECADE) * BINS_PER_DECADE


def bin_edges() -> np.ndarray:
    """[_NBINS + 1] edges of |score_normalized|: 10 ** (e / BINS_PER_DECADE)."""
    return 10.0 ** (np.arange(LOWEST_DECADE * BINS_PER_DECADE, HIGHEST_DECADE * BINS_PER_DECADE + 1)
                    / BINS_PER_DECADE)


class ScoreHistogram:
    """Per query and sign: counts and raw-score sums in log bins of |score / factor_tokens|."""

    def __init__(self, num_queries: int, factor_tokens: int) -> None:
        self.factor_tokens = factor_tokens
        self.counts = np.zeros((num_queries, 2, _NBINS), dtype=np.int64)  # sign 0 = positive, 1 = negative
        self.sums = np.zeros((num_queries, 2, _NBINS), dtype=np.float64)
        self.zeros = np.zeros(num_queries, dtype=np.int64)

    def update(self, scores: torch.Tensor) -> None:
        """Add raw scores [Q, B] of one batch."""
        s = scores.detach().double().cpu().numpy()
        mag = np.abs(s) / self.factor_tokens
        b = np.floor(np.log10(np.maximum(mag, 1e-300)) * BINS_PER_DECADE).astype(np.int64)
        b = np.clip(b - LOWEST_DECADE * BINS_PER_DECADE, 0, _NBINS - 1)
        for q in range(s.shape[0]):
            for side, sel in ((0, s[q] > 0), (1, s[q] < 0)):
                np.add.at(self.counts[q, side], b[q, sel], 1)
                np.add.at(self.sums[q, side], b[q, sel], s[q, sel])
            self.zeros[q] += int((s[q] == 0).sum())

    def table(self, query_ids: list[str], shard: str) -> pa.Table:
        """The non-empty bins as rows of DISTRIBUTION_SCHEMA."""
        edges = bin_edges()
        cols: dict[str, list] = {name: [] for name in DISTRIBUTION_SCHEMA.names}
        for q, qid in enumerate(query_ids):
            rows = [("positive", i, int(self.counts[q, 0, i]), float(self.sums[q, 0, i]))
                    for i in np.flatnonzero(self.counts[q, 0])]
            rows += [("negative", i, int(self.counts[q, 1, i]), float(self.sums[q, 1, i]))
                     for i in np.flatnonzero(self.counts[q, 1])]
            for sign, i, n, total in rows:
                cols["query_id"].append(qid)
                cols["shard"].append(shard)
                cols["sign"].append(sign)
                cols["bin_lower"].append(float(edges[i]))
                cols["bin_upper"].append(float(edges[i + 1]))
                cols["sequences"].append(n)
                cols["score_sum"].append(total)
            if self.zeros[q]:
                for name, value in (("query_id", qid), ("shard", shard), ("sign", "zero"), ("bin_lower", 0.0),
                                    ("bin_upper", 0.0), ("sequences", int(self.zeros[q])), ("score_sum", 0.0)):
                    cols[name].append(value)
        return pa.table(cols, schema=DISTRIBUTION_SCHEMA)


def distribution_url(scores_url: str) -> str:
    """``<output>/distribution/<name>.parquet`` for the scores file ``<output>/scores/<name>.parquet``."""
    folder, name = scores_url.rsplit("/", 1)
    return f"{folder.rsplit('/', 1)[0]}/distribution/{name}"
