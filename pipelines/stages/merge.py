"""`merge`: scores/ -> topk/ (exact global top-k and bottom-k per query), then token_scores/.

The per-unit files (``score.py``) are read one at a time and folded into one
``TopKAccumulator`` per query (memory: queries x k, whatever the corpus size).
Each file holds its unit's top-k and bottom-k for its queries, so their union holds the
global ones: the result equals scoring every sequence in one process and
sorting (ties broken by doc_id).

Rows are keyed by (doc_id, shard), never by doc_id alone: even if the corpus
check for unique doc_ids were bypassed, a row's score, shard and details all
belong to one sequence, and one sequence appears at most once per side.

``<output>/topk/query_id=<id>/part-0.parquet`` (hive partitioning; the
``query_id`` column comes from the folder name, so read it with hive
partitioning on: DuckDB ``read_parquet('.../topk/*/*.parquet',
hive_partitioning=true)``). Columns:

    doc_id string, score float64 (raw influence, paper sign), score_normalized
    float64 (score / tokens the factors were fitted on), rank int32 (1 = most
    extreme), sign string ('top' = the k most positive, 'bottom' = the k most
    negative), shard string (the shard file holding the sequence), tokens int32
    (its length in tokens), text string (the shard's text, or the decoded
    tokens; see ``token_scores``). ``layer_scores/`` and ``token_scores/`` hold
    the per-layer and per-token scores of these rows.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from influence_ops import TopKAccumulator

from ..config import JobConfig
from ..io import completion, storage
from .score_plan import KEY, QUERIES

MERGED_SCHEMA = pa.schema([("doc_id", pa.string()), ("score", pa.float64()), ("score_normalized", pa.float64()),
                           ("rank", pa.int32()), ("sign", pa.string()), ("shard", pa.string())])
TOPK_SCHEMA = MERGED_SCHEMA.append(pa.field("tokens", pa.int32())).append(pa.field("text", pa.string())) \
    .append(pa.field("found_by", pa.string()))
FOUND_BY = ("scan", "index", "tfidf")  # how a row was found: the full scan, or a candidate of the index / TF-IDF


SEP = "\x00"  # (doc_id, shard) as one string that sorts like the pair: ties stay broken by doc_id first


def row_key(doc_id: str, shard: str) -> str:
    """The key of one sequence of the corpus: its doc_id and its shard."""
    return f"{doc_id}{SEP}{shard}"


def split_key(key: str) -> tuple[str, str]:
    doc_id, _, shard = key.partition(SEP)
    return doc_id, shard


class QueryMerge:
    """Global top/bottom-k of one query, folded from per-shard candidates (rows keyed by (doc_id, shard))."""

    def __init__(self, k: int) -> None:
        self.acc = TopKAccumulator(1, k)
        self.normalized: dict[str, float] = {}  # row_key -> score_normalized of kept rows

    def add(self, doc_ids: np.ndarray, scores: np.ndarray, normalized: np.ndarray, shards: np.ndarray) -> None:
        keys = np.asarray([row_key(d, s) for d, s in zip(doc_ids, shards)], dtype=object)
        _, first = np.unique(keys, return_index=True)  # a row can be in a shard's top and bottom lists
        self.acc.update(scores[first][None, :], list(keys[first]))
        for i in first:
            self.normalized[keys[i]] = float(normalized[i])
        kept = set(self.acc.top.ids[0]) | set(self.acc.bottom.ids[0])
        self.normalized = {d: v for d, v in self.normalized.items() if d in kept}

    def table(self) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in MERGED_SCHEMA.names}
        for sign, side in (("top", self.acc.top), ("bottom", self.acc.bottom)):
            for rank, (key, s) in enumerate(zip(side.ids[0], side.scores[0]), start=1):
                doc, shard = split_key(str(key))
                cols["doc_id"].append(doc)
                cols["score"].append(float(s))
                cols["score_normalized"].append(self.normalized[key])
                cols["rank"].append(rank)
                cols["sign"].append(sign)
                cols["shard"].append(shard)
        return pa.table(cols, schema=MERGED_SCHEMA)


def merge_scores(score_files: list[str], k: int) -> dict[str, QueryMerge]:
    """Fold per-shard score files into per-query merges (query order of the first file)."""
    merges: dict[str, QueryMerge] = {}
    for url in score_files:
        t = storage.read_parquet(url)
        qids = np.asarray(t.column("query_id").to_pylist(), dtype=object)
        cols = {n: np.asarray(t.column(n).to_pylist(), dtype=object if n in ("doc_id", "shard") else np.float64)
                for n in ("doc_id", "score", "score_normalized", "shard")}
        for qid in dict.fromkeys(qids):
            sel = qids == qid
            merges.setdefault(qid, QueryMerge(k)).add(*(cols[n][sel] for n in cols))
    return merges


def partition(output: str, table: str, query_id: str) -> str:
    return storage.join(output, table, f"query_id={query_id}", "part-0.parquet")


def merge(cfg: JobConfig, score_files: list[str], show_progress: bool = False,
          units_without_scores: int = 0, unreadable: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Write topk/, layer_scores/ and (when asked) token_scores/; skipped when all are complete for these inputs.

    ``score_files``: the current score files (``score.current_score_files``); ``units_without_scores``: units
    that miss some queries' scores (an error unless ``on_error = "skip"`` left them out); ``unreadable``:
    score files whose footer does not read (named in that error).
    """
    start = time.perf_counter()
    missing = [u for u in score_files if not storage.exists(u)]
    if (missing or units_without_scores) and (cfg.on_error != "skip" or len(missing) == len(score_files)):
        if unreadable:
            raise ValueError(f"{unreadable[0]}: not a readable Parquet file (run `score` to write it again)")
        what = f"e.g. {missing[0]}" if missing else f"{units_without_scores} units miss some queries"
        raise FileNotFoundError(f"score files are missing (run `score` first): {what}")
    gone = set(missing)
    score_files = [u for u in score_files if u not in gone]  # on_error = "skip": units that failed
    keys = [[storage.parquet_metadata(u).get(k) for k in (KEY, QUERIES)] for u in score_files]
    key = completion.inputs_key("merge-v4", cfg.scoring.top_k, cfg.scoring.per_token, list(zip(score_files, keys)))
    topk_dir = storage.join(cfg.data.output, "topk")
    done = completion.completed(topk_dir, key)
    if done is not None:
        return {**done, "skipped": True}
    merges = merge_scores(score_files, cfg.scoring.top_k)
    info = {"units_without_scores": len(missing) + units_without_scores,
            "fold_seconds": round(time.perf_counter() - start, 3)}
    return write_topk(cfg, merges, key, info, None, start, show_progress)


def write_topk(cfg: JobConfig, merges: dict[str, QueryMerge], key: str, info: dict[str, Any],
               found_by: dict[str, dict[tuple[str, str], str]] | None = None, start: float | None = None,
               show_progress: bool = False) -> dict[str, Any]:
    """Write topk/ (with ``found_by``: query -> (doc_id, shard) -> how it was found; None = "scan"),
    layer_scores/ and token_scores/ from folded merges, then the completion marker with ``key``."""
    from .token_scores import write_token_scores

    start = time.perf_counter() if start is None else start
    topk_dir = storage.join(cfg.data.output, "topk")
    storage.remove(topk_dir)
    storage.remove(storage.join(cfg.data.output, "token_scores"))
    storage.remove(storage.join(cfg.data.output, "layer_scores"))
    if found_by is None:  # a scan: no index health report (``rescore.index_health`` writes it for the index)
        storage.remove(storage.join(cfg.data.output, "index_health"))
    tables = {qid: m.table() for qid, m in merges.items()}
    info = {"queries": len(tables), "rows": sum(t.num_rows for t in tables.values()), **info}
    tables, info["details"] = write_token_scores(cfg, tables, show_progress)  # text, tokens, layer/token scores
    for qid, table in tables.items():
        found = (found_by or {}).get(qid, {})
        labels = [found.get(k, "scan") for k in zip(table.column("doc_id").to_pylist(),
                                                      table.column("shard").to_pylist())]
        table = table.append_column("found_by", pa.array(labels, pa.string()))
        storage.write_parquet(partition(cfg.data.output, "topk", qid), table)
    info["seconds"] = round(time.perf_counter() - start, 3)
    return {**completion.mark_complete(topk_dir, key, info), "skipped": False}
