"""Exact re-scoring of candidates: the full EK-FAC path of ``score`` on candidate sequences only -> topk/.

Candidates are ``{query_id: {(doc_id, shard): found_by}}`` (from the index: ``index_query.py``,
or from TF-IDF). The sequences named by any query are read again (one unit per shard, on
the actor pool) and scored with the job's preconditioned queries exactly as ``score``
scores them (``ShardScorer``: same model, queries, strategy, normalization), so a
re-scored row's score is the one the full scan gives that sequence. Each query keeps its
own candidates, folded into the exact top-k and bottom-k of that set (``merge.QueryMerge``);
``merge.write_topk`` then writes topk/ (with ``found_by``), layer_scores/ and token_scores/
as for a scan. Skipped when topk/ is complete for these candidates and inputs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from influence_ops import score_batch

from ..config import JobConfig
from ..io import completion, storage
from ..io.shards import read_rows
from ..runtime.batching import token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, units_of
from .merge import QueryMerge, write_topk
from .score import ShardScorer
from .token_scores import _from_ipc, _ipc

RESCORED = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("shard", pa.string()),
                      ("score", pa.float64()), ("score_normalized", pa.float64())])


class Rescorer(ShardScorer):
    """Ray Data callable: ``{"unit": [JSON {shard, doc_ids}]}`` -> one row per unit: ``rows``, an Arrow IPC
    payload of RESCORED (every query x every named sequence)."""

    def rescore(self, unit: dict[str, Any]) -> pa.Table:
        cols: dict[str, list] = {n: [] for n in RESCORED.names}
        seqs = read_rows(unit["shard"], None, self.m.vocab_size, doc_ids=set(unit["doc_ids"]), context=self.m.context,
                         too_long=self.too_long)
        qids = self.queries.query_ids
        for part, batch in token_batches(seqs, self.batch_size, device=self.m.device):
            result = score_batch(self.m.model, self.queries, batch, strategy=self.strategy,
                                 autocast_dtype=self.m.autocast, factors=self.factors, normalize=self.normalize)
            scores = result.scores.detach().cpu().double().numpy()  # (Q, B)
            for b, doc in enumerate(part.doc_ids):
                cols["query_id"] += qids
                cols["doc_id"] += [str(doc)] * len(qids)
                cols["shard"] += [unit["shard"]] * len(qids)
                cols["score"] += scores[:, b].tolist()
                cols["score_normalized"] += (scores[:, b] / self.scale).tolist()
        return pa.table(cols, schema=RESCORED)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"rows": np.asarray([_ipc(self.rescore(u)) for u in units_of(batch)], dtype=object)}


def rescore_units(candidates: dict[str, dict[tuple[str, str], str]]) -> list[dict[str, Any]]:
    """One unit per shard: the doc_ids any query named in it."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for found in candidates.values():
        for doc, shard in found:
            by_shard[shard].add(doc)
    return [{"shard": s, "doc_ids": sorted(d)} for s, d in sorted(by_shard.items())]


def fold(rows: pa.Table, candidates: dict[str, dict[tuple[str, str], str]], k: int) -> dict[str, QueryMerge]:
    """Per query, the exact top/bottom-k of its own candidates among the re-scored rows."""
    merges: dict[str, QueryMerge] = {}
    cols = {n: np.asarray(rows.column(n).to_pylist(), dtype=object) for n in RESCORED.names}
    for qid, found in candidates.items():
        sel = np.asarray([q == qid and (d, s) in found for q, d, s in
                          zip(cols["query_id"], cols["doc_id"], cols["shard"])], dtype=bool)
        merge = QueryMerge(k)
        if sel.any():
            merge.add(cols["doc_id"][sel], cols["score"][sel].astype(np.float64),
                      cols["score_normalized"][sel].astype(np.float64), cols["shard"][sel])
        merges[qid] = merge
    return merges


def rescore(cfg: JobConfig, candidates: dict[str, dict[tuple[str, str], str]], queries_digest: str,
            show_progress: bool = False) -> dict[str, Any]:
    """Score the candidates exactly and write topk/ (found_by from ``candidates``); skipped when complete."""
    start = time.perf_counter()
    flat = sorted((q, d, s, f) for q, found in candidates.items() for (d, s), f in found.items())
    key = completion.inputs_key("rescore-v1", queries_digest, cfg.scoring.top_k, cfg.scoring.per_token,
                                cfg.scoring.normalize.value, cfg.data.too_long.value, flat)
    topk_dir = storage.join(cfg.data.output, "topk")
    done = completion.completed(topk_dir, key)
    if done is not None:
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
    merges = fold(rows, candidates, cfg.scoring.top_k)
    info = {"candidates": len(flat), "sequences": len({(d, s) for _, d, s, _ in flat}), "units": len(units),
            "rescore_seconds": round(time.perf_counter() - start, 3)}
    return write_topk(cfg, merges, key, info, candidates, start, show_progress)
