"""token_scores/: per-token contributions of the merged top-k rows (a second, small pass).

Only the sequences named in topk/ are read again (grouped by shard, one unit
per shard) and scored with ``per_token=True``. For training token position t,
the contribution is c_t = sum_l g_{t,l}^T P_l a_{t,l} (its activations, and the
gradient of the loss of predicting the token after it); sum_t c_t equals the
sequence's score.

``<output>/token_scores/query_id=<id>/part-0.parquet`` (hive partitioning).
Columns: doc_id string, token_index int32, token_id int32, score float64.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from influence_ops import score_batch

from ..config import JobConfig
from ..io import storage
from ..io.shards import read_rows
from ..runtime.batching import token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, units_of
from .score import ShardScorer

TOKEN_SCHEMA = pa.schema([("doc_id", pa.string()), ("token_index", pa.int32()), ("token_id", pa.int32()),
                          ("score", pa.float64())])


class TokenScorer(ShardScorer):
    """Ray Data callable: ``{"unit": [JSON {shard, pairs: [[query_id, doc_id], ...]}]}`` -> token rows."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cols: dict[str, list] = {"query_id": [], "doc_id": [], "token_index": [], "token_id": [], "score": []}
        q_index = {q: i for i, q in enumerate(self.queries.query_ids)}
        for unit in units_of(batch):
            wanted: dict[str, list[str]] = defaultdict(list)
            for qid, doc in unit["pairs"]:
                wanted[doc].append(qid)
            seqs = read_rows(unit["shard"], None, self.m.vocab_size, doc_ids=set(wanted))
            for part, tb in token_batches(seqs, self.batch_size, device=self.m.device):
                per_token = score_batch(self.m.model, self.queries, tb, per_token=True,
                                        autocast_dtype=self.m.autocast).per_token.cpu().double().numpy()
                for b, doc in enumerate(part.doc_ids):
                    ids = part.input_ids[b]
                    for qid in wanted[doc]:
                        cols["query_id"] += [qid] * len(ids)
                        cols["doc_id"] += [doc] * len(ids)
                        cols["token_index"] += range(len(ids))
                        cols["token_id"] += ids.tolist()
                        cols["score"] += per_token[q_index[qid], b, :len(ids)].tolist()
        return {"query_id": np.asarray(cols["query_id"], dtype=object),
                "doc_id": np.asarray(cols["doc_id"], dtype=object),
                "token_index": np.asarray(cols["token_index"], dtype=np.int32),
                "token_id": np.asarray(cols["token_id"], dtype=np.int32),
                "score": np.asarray(cols["score"], dtype=np.float64)}


def token_units(tables: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """One unit per shard: the (query_id, doc_id) pairs of the merged rows held in that shard."""
    by_shard: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for qid, t in tables.items():
        for doc, shard in zip(t.column("doc_id").to_pylist(), t.column("shard").to_pylist()):
            by_shard[shard].add((qid, doc))
    return [{"shard": s, "pairs": sorted(p)} for s, p in sorted(by_shard.items())]


def write_token_scores(cfg: JobConfig, tables: dict[str, pa.Table], show_progress: bool = False) -> dict[str, Any]:
    """Score the merged rows per token and write token_scores/; returns row counts and the sum check."""
    from .merge import partition

    units = token_units(tables)
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "queries_url": storage.join(cfg.data.output, "queries"),
            "top_k": cfg.scoring.top_k, "batch_size": cfg.resources.batch_size,
            "sort_window": cfg.scoring.sort_window, "threads": cfg.resources.threads_per_actor,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0}
    rows: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    with bar(len(units), "merge (token scores)", show_progress) as progress:
        for row in run_units(TokenScorer, args, units, cfg.resources, cluster, progress):
            rows[row["query_id"]].append(row)
    worst = 0.0
    total = 0
    for qid, parts in sorted(rows.items()):
        t = pa.table({n: [r[n] for r in parts] for n in TOKEN_SCHEMA.names}, schema=TOKEN_SCHEMA)
        t = t.sort_by([("doc_id", "ascending"), ("token_index", "ascending")])
        storage.write_parquet(partition(cfg.data.output, "token_scores", qid), t)
        total += t.num_rows
        sums = defaultdict(float)
        for doc, s in zip(t.column("doc_id").to_pylist(), t.column("score").to_pylist()):
            sums[doc] += s
        ref = dict(zip(tables[qid].column("doc_id").to_pylist(), tables[qid].column("score").to_pylist()))
        scale = max(abs(v) for v in ref.values()) or 1.0
        worst = max(worst, max(abs(sums[d] - ref[d]) / scale for d in ref))
    return {"rows": total, "max_relative_sum_error": worst}
