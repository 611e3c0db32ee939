"""Index health (``scoring.mode = "index"``): how closely the index ranked each query's candidates.

Symbols: M candidates per query and side (``scoring.candidates``), M_q the length of one query's
list on one side (M, or fewer on a small corpus), k = ``scoring.top_k``.

The index proposes each query's top-M and bottom-M sequences by its estimate I~(q, m)
(``index_query.py``); ``rescore.py`` then scores every candidate exactly. From those two numbers
per candidate, and nothing else (no extra model pass), per query and side (``top``: proponents,
``bottom``: opponents):

  - ``spearman``: the Spearman rank correlation between the index estimates and the exact scores
    over that side's list (average ranks for ties; NaN with fewer than 3 candidates or constant values);
  - ``deepest_rank_top10``: the largest index rank (1..M_q on that side's list) among the final
    top-10 rows of that side (the 10 highest exact scores among all the query's candidates; the 10
    lowest for ``bottom``); M_q + 1 for a row that was only on the other side's list;
  - ``deepest_rank_topk``: the same over the final top-k rows;
  - ``last_half_top10``: how many final top-10 rows have an index rank > M_q / 2.

Why they tell recall: a sequence of the full scan's top-10 is in the final top-10 only if the index
put it within its top M. When the final rows all come from the head of the list, the index orders
the candidates like the exact scores and the cut at M has room to spare; when they come from deep
in the list, sequences just past the cut (never re-scored) were likely as good: the final top-10
then differs from a full scan's. ``summarize`` pools the (query, side) rows into medians and the
worst, ``loose`` applies the rule measured in benchmarks/RESULTS.md section 7.2.

Tables: ``<output>/index_health/index_health.parquet`` (``HEALTH``, one row per query and side);
the summary goes into the run record (``stages.merge.index_health``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

TOP = 10  # the final top-n whose index ranks are reported (and top_k)
HEALTH = pa.schema([("query_id", pa.string()), ("sign", pa.string()), ("candidates", pa.int32()),
                    ("spearman", pa.float64()), ("top10_rows", pa.int32()), ("deepest_rank_top10", pa.int32()),
                    ("deepest_rank_topk", pa.int32()), ("last_half_top10", pa.int32())])
# The rule (benchmarks/RESULTS.md section 7.2): loose when the median over (query, side) of the deepest index rank
# among the final top-10 is beyond DEEP_SHARE of the list, or the median Spearman is below MIN_SPEARMAN.
DEEP_SHARE = 0.5
MIN_SPEARMAN = 0.5


@dataclass(frozen=True)
class IndexEstimate:
    """One candidate of one query: the index's estimate I~(q, m) and its rank on each side's list
    (1 = first; None when not on that list)."""

    score: float
    top_rank: int | None
    bottom_rank: int | None


Estimates = dict[str, dict[tuple[str, str], IndexEstimate]]  # query_id -> (doc_id, shard) -> estimate


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x [n], ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho of x, y [n] (Pearson of the average ranks); NaN when n < 3 or either is constant."""
    if len(x) < 3:
        return math.nan
    rx, ry = average_ranks(np.asarray(x, np.float64)), average_ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def side_health(estimate: np.ndarray, exact: np.ndarray, rank: np.ndarray, key_order: np.ndarray, largest: bool,
                top_k: int) -> dict[str, Any]:
    """The health of one query on one side, over all its re-scored candidates [n].

    estimate, exact: [n] float (index estimate, exact score); rank: [n] int, the index rank on this side's
    list (0 = not on it); key_order: [n] int, the tie order of the rows (ascending (doc_id, shard)); largest:
    True for ``top``. Returns the HEALTH columns but query_id and sign.
    """
    listed = rank > 0
    m = int(listed.sum())
    final = np.lexsort((key_order, -exact if largest else exact))  # the final order of this side
    depth = np.where(listed, rank, m + 1)
    top10, topk = depth[final[:TOP]], depth[final[:top_k]]
    return {"candidates": m, "spearman": spearman(estimate[listed], exact[listed]), "top10_rows": len(top10),
            "deepest_rank_top10": int(top10.max()) if len(top10) else None,
            "deepest_rank_topk": int(topk.max()) if len(topk) else None,
            "last_half_top10": int((top10 > m / 2).sum())}


def health_rows(rescored: pa.Table, estimates: Estimates, top_k: int) -> pa.Table:
    """HEALTH rows (two per query of ``estimates``) from the re-scored candidates (``rescore.RESCORED``:
    query_id, doc_id, shard, score) and their index estimates; pairs without an estimate are left out."""
    exact: dict[str, dict[tuple[str, str], float]] = {}
    for q, d, s, v in zip(*(rescored.column(n).to_pylist() for n in ("query_id", "doc_id", "shard", "score"))):
        exact.setdefault(q, {})[(d, s)] = v
    cols: dict[str, list] = {n: [] for n in HEALTH.names}
    for qid in sorted(estimates):
        found = exact.get(qid, {})
        keys = sorted(k for k in estimates[qid] if k in found)
        est = np.asarray([estimates[qid][k].score for k in keys], np.float64)
        scores = np.asarray([found[k] for k in keys], np.float64)
        order = np.arange(len(keys))  # keys are sorted: position = tie order
        for sign, attr in (("top", "top_rank"), ("bottom", "bottom_rank")):
            rank = np.asarray([getattr(estimates[qid][k], attr) or 0 for k in keys], np.int64)
            row = side_health(est, scores, rank, order, sign == "top", top_k)
            for n, v in {"query_id": qid, "sign": sign, **row}.items():
                cols[n].append(None if isinstance(v, float) and math.isnan(v) else v)
    return pa.table(cols, schema=HEALTH)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summarize(table: pa.Table, candidates: int, index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians and worst values over the HEALTH rows (both sides pooled), with the settings they were got at.

    candidates: ``scoring.candidates`` (M); index: the job's ``[index]`` settings (k_out, k_in, projection).
    """
    rows = table.to_pylist()
    rho = [r["spearman"] for r in rows if r["spearman"] is not None]
    deep = [r["deepest_rank_top10"] for r in rows if r["deepest_rank_top10"] is not None]
    deep_k = [r["deepest_rank_topk"] for r in rows if r["deepest_rank_topk"] is not None]
    listed = [r["candidates"] for r in rows if r["deepest_rank_top10"] is not None]
    shown = sum(r["top10_rows"] for r in rows)
    out = {"queries": len({r["query_id"] for r in rows}), "candidates": candidates,
           "list_median": _median(listed),
           "spearman_median": _median(rho), "spearman_worst": min(rho, default=None),
           "deepest_rank_top10_median": _median(deep), "deepest_rank_top10_worst": max(deep, default=None),
           "deepest_rank_topk_worst": max(deep_k, default=None),
           "last_half_top10_share": sum(r["last_half_top10"] for r in rows) / shown if shown else None}
    if index:
        out.update({k: index.get(k) for k in ("k_out", "k_in", "projection")})
    out["loose"] = loose(out)
    return out


def loose(summary: dict[str, Any]) -> bool:
    """The measured rule (section 7.2): the final top-10 rows sit deep in the candidate lists (median over
    (query, side) of the deepest index rank beyond DEEP_SHARE of the list), or the index orders the
    candidates unlike the exact scores (median Spearman below MIN_SPEARMAN)."""
    deep, m = summary.get("deepest_rank_top10_median"), summary.get("list_median") or summary.get("candidates")
    rho = summary.get("spearman_median")
    return bool((deep is not None and m and deep > DEEP_SHARE * m) or (rho is not None and rho < MIN_SPEARMAN))


def describe(summary: dict[str, Any]) -> str:
    """One line: the summary's numbers."""
    rho = summary.get("spearman_median")
    rho_text = "n/a" if rho is None else f"{rho:.2f} (worst {summary['spearman_worst']:.2f})"
    deep = summary.get("deepest_rank_top10_median")
    deep_text = "n/a" if deep is None else (f"median {deep:g}, worst {summary['deepest_rank_top10_worst']} of "
                                            f"{summary['candidates']}")
    share = summary.get("last_half_top10_share")
    share_text = "" if share is None else f"; {share:.0%} of them from the last half of the list"
    return (f"median Spearman {rho_text} between index and exact scores over {summary['queries']} queries; "
            f"final top-10 rows from index rank {deep_text}{share_text}")


def warning(summary: dict[str, Any]) -> str | None:
    """The one-line warning for a loose index (None for a tight one)."""
    if not summary.get("loose"):
        return None
    k = summary.get("k_out")
    k_text = f"k = {k}" if k == summary.get("k_in") else f"k = {k} x {summary.get('k_in')}"
    return (f"index ({k_text}, {summary.get('projection')}) ranks this model's candidates loosely: "
            f"{describe(summary)}: the final top-10 may differ from a full scan's; raise index.k_out / index.k_in "
            "or scoring.candidates, or compare with scoring.mode = \"scan\" on a sample")
