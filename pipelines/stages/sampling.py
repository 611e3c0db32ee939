"""The seeded random fitting sample of a corpus, cut into units of work.

Rows of the corpus are numbered globally (shards in sorted order, rows in file
order; row counts come from Parquet footers). ``numpy.random.default_rng(seed)``
draws the sample:
- by sequences: ``n`` distinct rows, uniformly;
- by tokens: rows in a random permutation until their tokens reach the budget
  (the last row may overshoot it). Needs the lengths of the visited rows.
The plan depends only on the corpus, the size and the seed, never on the number
of actors; units hold at most ``unit_sequences`` rows of one shard, in a fixed
order, so even the sampled labels (seeded per unit) do not depend on the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from ..io import storage
from ..io.shards import row_counts


@dataclass(frozen=True)
class Unit:
    """Rows of one shard to process together. ``index`` numbers the units of a plan."""

    index: int
    shard: str
    rows: tuple[int, ...]

    def to_json(self) -> dict:
        return {"index": self.index, "shard": self.shard, "rows": list(self.rows)}

    @staticmethod
    def from_json(d: dict) -> Unit:
        return Unit(int(d["index"]), d["shard"], tuple(int(r) for r in d["rows"]))


def _shard_lengths(shard: str) -> np.ndarray:
    col = storage.read_parquet(shard, columns=["input_ids"]).column("input_ids")
    return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)


def sample_rows(shards: list[str], sequences: int | None, tokens: int | None, seed: int) -> np.ndarray:
    """Sorted global row numbers of the sample (all rows when both sizes are None)."""
    counts = row_counts(shards)
    total = int(sum(counts))
    if total == 0:
        raise ValueError("the corpus has no rows")
    rng = np.random.default_rng(seed)
    if sequences is None and tokens is None:
        return np.arange(total)
    if sequences is not None:
        if sequences >= total:
            return np.arange(total)
        return np.sort(rng.choice(total, size=sequences, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    lengths: dict[int, np.ndarray] = {}
    order = rng.permutation(total)
    taken, budget = [], 0
    for g in order:
        s = int(np.searchsorted(starts, g, side="right") - 1)
        if s not in lengths:
            lengths[s] = _shard_lengths(shards[s])
        taken.append(int(g))
        budget += int(lengths[s][g - starts[s]])
        if budget >= tokens:
            break
    return np.sort(np.asarray(taken, dtype=np.int64))


def plan_units(shards: list[str], rows: np.ndarray, unit_sequences: int) -> list[Unit]:
    """Cut sorted global rows into units (one shard each, at most ``unit_sequences`` rows)."""
    counts = row_counts(shards)
    starts = np.concatenate([[0], np.cumsum(counts)])
    units: list[Unit] = []
    for s, shard in enumerate(shards):
        local = rows[(rows >= starts[s]) & (rows < starts[s + 1])] - starts[s]
        for lo in range(0, len(local), unit_sequences):
            units.append(Unit(len(units), shard, tuple(int(r) for r in local[lo:lo + unit_sequences])))
    return units
