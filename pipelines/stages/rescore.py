"""Exact re-scoring of candidates: the full EK-FAC path of ``score`` on candidate sequences only -> topk/.

Candidates are ``{query_id: {(doc_id, shard): found_by}}`` (from the index: ``index_query.py``,
or from TF-IDF). The sequences named by any query are read again (one unit per shard, on
the actor pool) and scored with the job's preconditioned queries exactly as ``score``
scores them (``ShardScorer``: same model, queries, strategy, normalization), so a
re-scored row's score is the one the full scan gives that sequence.

Each sequence is scored only against the queries that named it (a query's score does not
depend on the other queries of the batch): a unit carries, per doc_id, the queries that
nominated it; its sequences are ordered by length class, then first nominating query, then
length (``rescore_order``), so a batch holds sequences of similar length that share
queries; each batch is scored with the union of its sequences' queries
(``PreconditionedQueries.select``) and emits only the nominated (query, sequence) pairs. The
cost is then about that of a scan at Q = the batch's union (a few queries per sequence)
on the candidate sequences, not Q x every candidate.

Each query keeps its own candidates, folded into the exact top-k and bottom-k of that set
(``merge.QueryMerge``); ``merge.write_topk`` then writes topk/ (with ``found_by``),
layer_scores/ and token_scores/ as for a scan. With the index's estimates of the candidates
(``index_health.py``), the exact scores of every candidate also give the index health report:
``<output>/index_health/index_health.parquet`` and its summary in the stage's record
(``index_health``), with a logged warning when the index ranks loosely. Skipped when topk/ is
complete for these candidates and inputs (the summary and the warning come back from the marker).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from influence_ops import score_batch

from ..config import JobConfig
from ..io import completion, storage
from ..io.shards import read_rows
from ..runtime.batching import prefetch, token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, units_of
from .index_health import Estimates, health_rows, summarize, warning
from .merge import QueryMerge, write_topk
from .score import ShardScorer
from .token_scores import _from_ipc, _ipc

RESCORED = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("shard", pa.string()),
                      ("score", pa.float64()), ("score_normalized", pa.float64())])
LENGTH_CLASS = 1.25  # sequences within a factor 1.25 in length share a class: padding <= 25% inside one
log = logging.getLogger(__name__)


def rescore_order(lengths: np.ndarray, first_query: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices ordering sequences by (length class, first nominating query, length, file row): deterministic.

    Within a class (lengths within a factor ``LENGTH_CLASS``) sequences named by the same queries
    are consecutive, so a batch's union of queries stays small where queries share sequences;
    where they do not (a large corpus: about one query per sequence) the order is by length, as
    ``score``'s, and padding stays bounded.
    """
    cls = np.floor(np.log(np.maximum(lengths, 1)) / math.log(LENGTH_CLASS)).astype(np.int64)
    return np.lexsort((rows, lengths, first_query, cls))


class Rescorer(ShardScorer):
    """Ray Data callable: ``{"unit": [JSON {shard, doc_ids, query_ids, named_by}]}`` -> one row per unit:
    ``rows``, an Arrow IPC payload of RESCORED (one row per nominated (query, sequence) pair).

    ``query_ids`` are the queries naming any sequence of the unit; ``named_by[i]`` the positions in
    ``query_ids`` of those naming ``doc_ids[i]``.
    """

    def rescore(self, unit: dict[str, Any]) -> pa.Table:
        cols: dict[str, list] = {n: [] for n in RESCORED.names}
        where = {q: i for i, q in enumerate(self.all_queries.query_ids or [])}
        absent = [q for q in unit["query_ids"] if q not in where]
        if absent:
            raise ValueError(f"query {absent[0]!r} is not in the queries the actor loaded (were they rebuilt while "
                             "the job ran?)")
        position = [where[q] for q in unit["query_ids"]]  # unit query -> position in all_queries
        named = {d: [position[j] for j in js] for d, js in zip(unit["doc_ids"], unit["named_by"])}
        seqs = read_rows(unit["shard"], None, self.m.vocab_size, doc_ids=set(unit["doc_ids"]), context=self.m.context,
                         too_long=self.too_long)
        if not len(seqs):
            return RESCORED.empty_table()
        first = np.fromiter((min(named[d]) for d in seqs.doc_ids), dtype=np.int64, count=len(seqs))
        seqs = seqs.take(rescore_order(seqs.lengths, first, seqs.rows))
        batches = token_batches(seqs, self.batch_size, sort=False, device=self.m.device)
        for part, batch in prefetch(batches):
            union = sorted({q for d in part.doc_ids for q in named[d]})
            col = {q: i for i, q in enumerate(union)}
            queries = self.all_queries if len(union) == self.all_queries.num_queries else \
                self.all_queries.select(union)
            result = score_batch(self.m.model, queries, batch, strategy=self.strategy,
                                 autocast_dtype=self.m.autocast, factors=self.factors, normalize=self.normalize)
            scores = result.scores.detach().cpu().double().numpy()  # (len(union), B)
            for b, doc in enumerate(part.doc_ids):
                qs = named[doc]
                s = scores[[col[q] for q in qs], b]
                cols["query_id"] += [self.all_queries.query_ids[q] for q in qs]
                cols["doc_id"] += [str(doc)] * len(qs)
                cols["shard"] += [unit["shard"]] * len(qs)
                cols["score"] += s.tolist()
                cols["score_normalized"] += (s / self.scale).tolist()
        return pa.table(cols, schema=RESCORED)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"rows": np.asarray([_ipc(self.rescore(u)) for u in units_of(batch)], dtype=object)}


def rescore_units(candidates: dict[str, dict[tuple[str, str], str]]) -> list[dict[str, Any]]:
    """One unit per shard: the doc_ids any query named in it, and which queries named each.

    ``{"shard", "doc_ids" (sorted), "query_ids" (those naming any of them, in candidate order),
    "named_by" (per doc_id, positions in query_ids)}``.
    """
    by_shard: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for qid, found in candidates.items():
        for doc, shard in found:
            by_shard[shard][doc].append(qid)
    units = []
    for shard, docs in sorted(by_shard.items()):
        doc_ids = sorted(docs)
        qids = list(dict.fromkeys(q for d in doc_ids for q in docs[d]))
        pos = {q: i for i, q in enumerate(qids)}
        units.append({"shard": shard, "doc_ids": doc_ids, "query_ids": qids,
                      "named_by": [[pos[q] for q in docs[d]] for d in doc_ids]})
    return units


def fold(rows: pa.Table, query_ids: list[str], k: int) -> dict[str, QueryMerge]:
    """Per query of ``query_ids``, the exact top/bottom-k of its re-scored rows (one grouped pass over them;
    a query without rows gets an empty merge)."""
    merges = {q: QueryMerge(k) for q in query_ids}
    if not rows.num_rows:
        return merges
    qid = np.asarray(rows.column("query_id").to_pylist(), dtype=object)
    cols = {n: np.asarray(rows.column(n).to_pylist(), dtype=object if n in ("doc_id", "shard") else np.float64)
            for n in ("doc_id", "score", "score_normalized", "shard")}
    order = np.argsort(qid, kind="stable")
    sorted_q = qid[order]
    starts = np.flatnonzero(np.r_[True, sorted_q[1:] != sorted_q[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
        sel = order[lo:hi]
        merges.setdefault(sorted_q[lo], QueryMerge(k)).add(*(cols[n][sel] for n in cols))
    return merges


def health_url(cfg: JobConfig) -> str:
    return storage.join(cfg.data.output, "index_health", "index_health.parquet")


def index_health(cfg: JobConfig, rows: pa.Table, estimates: Estimates | None) -> dict[str, Any] | None:
    """Write index_health/ from the re-scored rows and the index estimates; returns its summary (None and
    index_health/ removed without estimates: TF-IDF candidates, or a candidates file older than them)."""
    storage.remove(storage.join(cfg.data.output, "index_health"))
    if estimates is None:
        return None
    table = health_rows(rows, estimates, cfg.scoring.top_k)
    storage.write_parquet(health_url(cfg), table)
    return summarize(table, cfg.scoring.candidates, {"k_out": cfg.index.k_out, "k_in": cfg.index.k_in,
                                                    "projection": cfg.index.projection.value})


def warn_if_loose(summary: dict[str, Any] | None) -> None:
    line = warning(summary) if summary else None
    if line:
        log.warning(line)


def rescore(cfg: JobConfig, candidates: dict[str, dict[tuple[str, str], str]], queries_digest: str,
            show_progress: bool = False, estimates: Estimates | None = None) -> dict[str, Any]:
    """Score the candidates exactly and write topk/ (found_by from ``candidates``) and, with the index's
    ``estimates`` of them, index_health/; skipped when complete."""
    start = time.perf_counter()
    flat = sorted((q, d, s, f) for q, found in candidates.items() for (d, s), f in found.items())
    key = completion.inputs_key("rescore-v2", queries_digest, cfg.scoring.top_k, cfg.scoring.per_token,
                                cfg.scoring.normalize.value, cfg.data.too_long.value, flat, estimates is not None)
    topk_dir = storage.join(cfg.data.output, "topk")
    done = completion.completed(topk_dir, key)
    if done is not None:
        warn_if_loose(done.get("index_health"))
        return {**done, "skipped": True}
    units = rescore_units(candidates)
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "queries_url": storage.join(cfg.data.output, "queries"),
            "top_k": cfg.scoring.top_k, "batch_size": cfg.resources.batch_size,
            "sort_window": cfg.scoring.sort_window, "strategy": cfg.scoring.strategy.value,
            "threads": cfg.resources.threads_per_actor, "too_long": cfg.data.too_long.value,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0,
            "normalize": cfg.scoring.normalize.value,
            "factors_url": storage.join(cfg.data.output, "factors") if cfg.scoring.normalize == "cosine" else None}
    parts = []
    with bar(len(units), "rescore (shards)", show_progress) as progress:
        for row in run_units(Rescorer, args, units, cfg.resources, cluster, progress):
            parts.append(_from_ipc(row["rows"]))
    rows = pa.concat_tables(parts) if parts else RESCORED.empty_table()
    merges = fold(rows, list(candidates), cfg.scoring.top_k)
    info = {"candidates": len(flat), "sequences": len({(d, s) for _, d, s, _ in flat}), "units": len(units),
            "pairs_scored": rows.num_rows, "rescore_seconds": round(time.perf_counter() - start, 3)}
    health = index_health(cfg, rows, estimates)
    if health is not None:
        info["index_health"] = health
        warn_if_loose(health)
    return write_topk(cfg, merges, key, info, candidates, start, show_progress)
