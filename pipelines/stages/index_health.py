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
then differs from a full scan's. ``summarize`` reduces the rows to medians and the worst, per side
and pooled; ``loose`` applies the rule measured in benchmarks/RESULTS.md section 7.2 to each side.

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
# The rule (benchmarks/RESULTS.md section 7.2): a side is loose when the median over queries of the deepest index
# rank among its final top-10 rows is beyond DEEP_SHARE of the list (and beyond 10).
DEEP_SHARE = 0.5
TIE_RTOL = 1e-5  # exact scores this close (relative to the largest) are ties: duplicate sequences


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


def tied_depth(depth: np.ndarray, exact: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Each row's depth [n] lowered to the shallowest depth among the rows whose exact scores tie with it
    (neighbours in score order within rtol x the largest |score|): duplicate sequences get the same exact
    score up to the rounding of the batch they were scored in, and the index, which cannot tell them apart,
    lists only some of them; a final row whose twin the index listed high up was found. O(n log n)."""
    if len(depth) == 0:
        return depth
    tol = rtol * float(np.abs(exact).max())
    order = np.argsort(exact, kind="stable")
    x, d = exact[order], depth[order]
    group = np.concatenate([[0], np.cumsum(np.diff(x) > tol)])  # runs of scores within tol of their neighbour
    shallowest = np.full(int(group[-1]) + 1, np.iinfo(np.int64).max)
    np.minimum.at(shallowest, group, d)
    out = np.empty_like(depth)
    out[order] = shallowest[group]
    return out


def side_health(estimate: np.ndarray, exact: np.ndarray, rank: np.ndarray, key_order: np.ndarray, largest: bool,
                top_k: int) -> dict[str, Any]:
    """The health of one query on one side, over all its re-scored candidates [n].

    estimate, exact: [n] float (index estimate, exact score); rank: [n] int, the index rank on this side's
    list (0 = not on it); key_order: [n] int, the tie order of the rows (ascending (doc_id, shard)); largest:
    True for ``top``. The final rows are those of the right sign only (exact > 0 for ``top``, < 0 for
    ``bottom``): on a small corpus a top-10 can run out of proponents, and where the rows past them were
    found says nothing about the index. Rows whose exact scores tie (duplicate documents) count at the
    shallowest rank among them (``tied_depth``). Returns the HEALTH columns but query_id and sign.
    """
    listed = rank > 0
    m = int(listed.sum())
    final = np.lexsort((key_order, -exact if largest else exact))  # the final order of this side
    final = final[(exact[final] > 0) if largest else (exact[final] < 0)]  # proponents raise, opponents lower
    depth = tied_depth(np.where(listed, rank, m + 1), exact)
    top10, topk = depth[final[:TOP]], depth[final[:top_k]]
    return {"candidates": m, "spearman": spearman(estimate[listed], exact[listed]), "top10_rows": len(top10),
            "deepest_rank_top10": int(top10.max()) if len(top10) else None,
            "deepest_rank_topk": int(topk.max()) if len(topk) else None,
            "last_half_top10": int((top10 > m / 2).sum())}


def health_rows(rescored: pa.Table, estimates: Estimates, top_k: int) -> pa.Table:
    """HEALTH rows (two per query of ``estimates``) from the re-scored candidates (``rescore.RESCORED``:
    query_id, doc_id, shard, score) and their index estimates. A re-scored candidate without an estimate
    (found by TF-IDF only: ``scoring.tfidf_candidates``) is on neither list: a final row among them is one the
    index missed, counted at rank M_q + 1."""
    exact: dict[str, dict[tuple[str, str], float]] = {}
    for q, d, s, v in zip(*(rescored.column(n).to_pylist() for n in ("query_id", "doc_id", "shard", "score"))):
        exact.setdefault(q, {})[(d, s)] = v
    cols: dict[str, list] = {n: [] for n in HEALTH.names}
    off = IndexEstimate(math.nan, None, None)
    for qid in sorted(estimates):
        found = exact.get(qid, {})
        keys = sorted(found)
        mine = [estimates[qid].get(k, off) for k in keys]
        est = np.asarray([e.score for e in mine], np.float64)
        scores = np.asarray([found[k] for k in keys], np.float64)
        order = np.arange(len(keys))  # keys are sorted: position = tie order
        for sign, attr in (("top", "top_rank"), ("bottom", "bottom_rank")):
            rank = np.asarray([getattr(e, attr) or 0 for e in mine], np.int64)
            row = side_health(est, scores, rank, order, sign == "top", top_k)
            for n, v in {"query_id": qid, "sign": sign, **row}.items():
                cols[n].append(None if isinstance(v, float) and math.isnan(v) else v)
    return pa.table(cols, schema=HEALTH)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and worst values over HEALTH rows (as dicts)."""
    rho = [r["spearman"] for r in rows if r["spearman"] is not None]
    deep = [r["deepest_rank_top10"] for r in rows if r["deepest_rank_top10"] is not None]
    deep_k = [r["deepest_rank_topk"] for r in rows if r["deepest_rank_topk"] is not None]
    shown = sum(r["top10_rows"] for r in rows)
    return {"list_median": _median([r["candidates"] for r in rows if r["deepest_rank_top10"] is not None]),
            "spearman_median": _median(rho), "spearman_worst": min(rho, default=None),
            "deepest_rank_top10_median": _median(deep), "deepest_rank_top10_worst": max(deep, default=None),
            "deepest_rank_topk_worst": max(deep_k, default=None),
            "last_half_top10_share": sum(r["last_half_top10"] for r in rows) / shown if shown else None}


def summarize(table: pa.Table, candidates: int, index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Medians and worst values over the HEALTH rows: both sides pooled, and each side (``sides``: top, bottom,
    each with ``loose``), with the settings they were got at. ``loose``: either side is.

    candidates: ``scoring.candidates`` (M); index: the job's ``[index]`` settings (k_out, k_in, projection).
    """
    rows = table.to_pylist()
    out: dict[str, Any] = {"queries": len({r["query_id"] for r in rows}), "candidates": candidates, **_stats(rows)}
    out["sides"] = {}
    for sign in ("top", "bottom"):
        side = _stats([r for r in rows if r["sign"] == sign])
        out["sides"][sign] = {**side, "loose": loose(side)}
    if index:
        out.update({k: index.get(k) for k in ("k_out", "k_in", "projection")})
    out["loose"] = any(side["loose"] for side in out["sides"].values())
    return out


def loose(side: dict[str, Any]) -> bool:
    """The measured rule (benchmarks/RESULTS.md section 7.2): a side is loose when, for the median query, its final
    top-10 rows reach beyond DEEP_SHARE of the candidate list (the median over queries of the deepest index rank
    among them > DEEP_SHARE x M_q), and beyond rank 10 (where a perfect index puts them: short lists)."""
    deep, m = side.get("deepest_rank_top10_median"), side.get("list_median")
    return bool(deep is not None and m and deep > max(TOP, DEEP_SHARE * m))


SIDE_NAMES = {"top": "proponents", "bottom": "opponents"}
LOOSE = "the final top-10 may differ from a full scan's"


def advice(summary: dict[str, Any]) -> str:
    """What to do about a loose index: a wider one first (doubling k: 4x the storage; recall 0.95 of the exact
    top-10 took k = 32 to 192 on the models of benchmarks/RESULTS.md section 7.5), then the other remedies."""
    k_out, k_in = summary.get("k_out"), summary.get("k_in")
    wider = (f", e.g. to {2 * k_out} x {2 * k_in} (4x the index's storage; recall 0.95 took k = 32 to 192 on the "
             "models measured),"
             if isinstance(k_out, int) and isinstance(k_in, int) else "")
    return (f"raise index.k_out / index.k_in{wider} or scoring.candidates, add TF-IDF candidates "
            '(scoring.tfidf_candidates), or compare with scoring.mode = "scan" on a sample')


def describe(summary: dict[str, Any], sides: tuple[str, ...] = ("top", "bottom")) -> str:
    """One line: per side, the median Spearman and how deep in the lists the final top-10 rows were found."""
    parts = []
    for sign in sides:
        s = summary["sides"][sign]
        if s["deepest_rank_top10_median"] is None:
            continue
        rho = "n/a" if s["spearman_median"] is None else f"{s['spearman_median']:.2f}"
        share = s["last_half_top10_share"]
        m = summary["candidates"]
        where = (lambda r: f"{r:g}/{m}" if r <= m else "beyond the list")  # noqa: E731 -- M + 1: other list only
        parts.append(f"{SIDE_NAMES[sign]}: median Spearman {rho} between index and exact scores, final top-10 rows "
                     f"reach index rank {where(s['deepest_rank_top10_median'])} for the median query "
                     f"({where(s['deepest_rank_top10_worst'])} at worst)"
                     + ("" if share is None else f", {share:.0%} of them from the list's last half"))
    return "; ".join(parts) + f" ({summary['queries']} queries)"


def warning(summary: dict[str, Any]) -> str | None:
    """The one-line warning for a loose index (None for a tight one)."""
    if not summary.get("loose"):
        return None
    k = summary.get("k_out")
    k_text = f"k = {k}" if k == summary.get("k_in") else f"k = {k} x {summary.get('k_in')}"
    bad = tuple(sign for sign in ("top", "bottom") if summary["sides"][sign]["loose"])
    return (f"index ({k_text}, {summary.get('projection')}) ranks this model's candidates loosely: "
            f"{describe(summary, bad)}: {LOOSE}; {advice(summary)}")
