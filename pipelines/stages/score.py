"""`score`: every shard -> actors holding the model and the preconditioned queries -> scores/ per shard.

One unit of work is one shard. The actor streams the shard in windows of
``sort_window`` rows (memory bounded by the window and the shard's doc ids, not
by the corpus), sorts each window by length, cuts batches, prepares the next
batch in a background thread while the current one computes, and keeps the
top-k and bottom-k per query (``influence_ops.TopKAccumulator``: ties broken by
doc_id, so the union of shard results holds the exact global top-k).

Output ``<output>/scores/<shard name>.parquet``, one file per input shard,
written atomically, with the key of its inputs in the Parquet metadata (a file
with the current key is complete and is skipped on re-runs). Columns:

    query_id string, doc_id string, score float64 (influence, paper sign:
    positive = training on the sequence makes the completion more likely; raw,
    or divided as ``scoring.normalize`` says: ``influence_ops.normalize``),
    score_normalized float64 (score / tokens the factors were fitted on; for
    ``normalize = cosine``, already scale-free, the score itself),
    sign string ('top': k highest scores, 'bottom': k lowest),
    shard_rank int32 (1 = most extreme within the shard and side), shard string.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from influence_ops import Normalize, Strategy, TokenBatch, TopKAccumulator, load_factors, load_queries, score_batch

from ..config import JobConfig, ModelConfig
from ..io import completion, storage
from ..io.model_loading import load_model, pick_device
from ..io.shards import Sequences, ShardError, iter_shard, list_shards, shard_name
from ..runtime.accounting import UnitLog
from ..runtime.batching import prefetch, token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of
from .distribution import ScoreHistogram, distribution_url
from .self_influence import SelfInfluenceRows, self_influence_url

SCORE_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64()),
                          ("score_normalized", pa.float64()), ("sign", pa.string()), ("shard_rank", pa.int32()),
                          ("shard", pa.string())])
KEY = "influence.key"


def topk_rows(acc: TopKAccumulator, query_ids: list[str], factor_tokens: int, shard: str) -> pa.Table:
    """The accumulator as rows of SCORE_SCHEMA (query order, top side first)."""
    cols: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for q, qid in enumerate(query_ids):
        for sign, side in (("top", acc.top), ("bottom", acc.bottom)):
            n = side.scores.shape[1]
            cols["query_id"] += [qid] * n
            cols["doc_id"] += [str(d) for d in side.ids[q]]
            cols["score"] += side.scores[q].tolist()
            cols["score_normalized"] += (side.scores[q] / factor_tokens).tolist()
            cols["sign"] += [sign] * n
            cols["shard_rank"] += list(range(1, n + 1))
            cols["shard"] += [shard] * n
    return pa.table(cols, schema=SCORE_SCHEMA)


class ShardScorer:
    """Ray Data callable: ``{"unit": [JSON {shard, output, key}]}`` -> one summary row per shard."""

    def __init__(self, model: ModelConfig, queries_url: str, top_k: int, batch_size: int, sort_window: int,
                 strategy: str = "auto", threads: int = 0, use_gpu: bool = False, normalize: str = "none",
                 factors_url: str | None = None) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        local = storage.local_copy(queries_url)
        dtype = torch.float64 if next(self.m.model.parameters()).dtype == torch.float64 else torch.float32
        self.queries = load_queries(local).to(self.m.device, dtype)
        self.queries.check_model(self.m.layers)  # once per actor: queries built on another model are refused
        self.top_k, self.batch_size, self.sort_window = top_k, batch_size, sort_window
        self.strategy = Strategy(strategy)
        self.normalize = Normalize(normalize)  # factors_url: compute (and write) self-influence
        self.factors = None if factors_url is None else load_factors(storage.local_copy(factors_url), self.m.layers,
                                                                     device=self.m.device)
        self.scale = 1 if self.normalize == Normalize.COSINE else self.queries.factor_tokens  # score_normalized

    def batches(self, shard: str) -> Iterator[tuple[Sequences, TokenBatch]]:
        for window in iter_shard(shard, self.m.vocab_size, rows_per_read=self.sort_window):
            yield from token_batches(window, self.batch_size, device=self.m.device)

    def score_shard(self, shard: str) -> tuple[TopKAccumulator, int]:
        """Top/bottom-k of every query over the shard, and the number of tokens scored."""
        acc = TopKAccumulator(self.queries.num_queries, self.top_k)
        self.histogram = ScoreHistogram(self.queries.num_queries, self.scale)
        self.self_influence = SelfInfluenceRows()
        tokens = 0
        for part, batch in prefetch(self.batches(shard)):
            result = score_batch(self.m.model, self.queries, batch, strategy=self.strategy,
                                 autocast_dtype=self.m.autocast, factors=self.factors, normalize=self.normalize)
            acc.update(result.scores, part.doc_ids)
            if result.self_influence is not None:
                self.self_influence.update(part.doc_ids, result.self_influence, part.lengths)
            self.histogram.update(result.scores)
            tokens += int(part.lengths.sum())  # from the CPU copy: no device sync
        return acc, tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "status": [], "sequences": [], "tokens": [], "seconds": [], "error": [],
                                 "peak_rss_mb": []}
        for unit in units_of(batch):
            start = time.perf_counter()
            acc, tokens, error = None, 0, ""
            try:
                acc, tokens = self.score_shard(unit["shard"])
            except ShardError as err:  # a contract violation fails this shard only; others go on
                error = str(err)
            if acc is not None:
                table = topk_rows(acc, self.queries.query_ids, self.scale, unit["shard"])
                if self.factors is not None:
                    storage.write_parquet(self_influence_url(unit["output"]), self.self_influence.table(unit["shard"]))
                elif storage.exists(self_influence_url(unit["output"])):  # from a run that wrote it
                    storage.remove(self_influence_url(unit["output"]))
                storage.write_parquet(distribution_url(unit["output"]),  # before the scores file that marks it done
                                      self.histogram.table(self.queries.query_ids, unit["shard"]))
                storage.write_parquet(unit["output"], table.replace_schema_metadata({KEY: unit["key"]}))
            rows["shard"].append(unit["shard"])
            rows["status"].append("failed" if error else "scored")
            rows["error"].append(error)
            rows["sequences"].append(0 if acc is None else acc.seen)
            rows["tokens"].append(tokens)
            rows["seconds"].append(time.perf_counter() - start)
            rows["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {k: np.asarray(v, dtype=object if k in ("shard", "status", "error") else None)
                for k, v in rows.items()}


def score_file_key(queries_digest: str, top_k: int, shard: tuple[str, int], normalize: str = "none",
                   self_influence: bool = False) -> str:
    if normalize == "none" and not self_influence:  # the key of runs made before these options
        return completion.inputs_key("scores", queries_digest, top_k, shard)
    return completion.inputs_key("scores", queries_digest, top_k, shard, normalize, self_influence)


def score_outputs(cfg: JobConfig, shards: list[str]) -> list[str]:
    """The scores/ file of each shard, in shard order."""
    names = [shard_name(s, cfg.data.corpus) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"corpus {cfg.data.corpus!r}: two shards map to the same output name")
    return [storage.join(cfg.data.output, "scores", f"{n}.parquet") for n in names]


def is_current(url: str, key: str) -> bool:
    return storage.exists(url) and storage.parquet_metadata(url).get(KEY) == key


def score(cfg: JobConfig, queries_digest: str, show_progress: bool = False) -> dict[str, Any]:
    """Score every shard not already scored for these inputs; returns counts and timings.

    ``timeline`` lists (seconds since the stage started, tokens) as each shard
    completed; ``peak_rss_mb`` is the largest peak RSS an actor reported; ``units``
    says where the units ran (nodes, actors, busy seconds, retries: ``UnitLog.summary``).
    """
    start = time.perf_counter()
    shards = list_shards(cfg.data.corpus)
    outputs = score_outputs(cfg, shards)
    todo = []
    for (shard, size), out in zip(completion.shard_fingerprints(shards), outputs):
        key = score_file_key(queries_digest, cfg.scoring.top_k, (shard, size), cfg.scoring.normalize.value,
                             cfg.scoring.writes_self_influence)
        if not is_current(out, key):
            todo.append({"shard": shard, "output": out, "key": key})
    summary: dict[str, Any] = {"shards": len(shards), "skipped": len(shards) - len(todo), "scored": 0, "failed": 0,
                               "sequences": 0, "tokens": 0, "failures": [], "actor_seconds": 0.0,
                               "peak_rss_mb": 0.0, "timeline": []}
    if todo:
        cluster = ensure_ray(cfg.resources)
        args = {"model": cfg.model, "queries_url": storage.join(cfg.data.output, "queries"),
                "top_k": cfg.scoring.top_k, "batch_size": cfg.resources.batch_size,
                "sort_window": cfg.scoring.sort_window, "strategy": cfg.scoring.strategy.value,
                "threads": cfg.resources.threads_per_actor,
                "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0,
                "normalize": cfg.scoring.normalize.value,
                "factors_url": storage.join(cfg.data.output, "factors") if cfg.scoring.writes_self_influence else None}
        log = UnitLog()
        with bar(len(todo), "score (shards)", show_progress) as progress:
            for row in run_units(ShardScorer, args, todo, cfg.resources, cluster, progress, log):
                summary[row["status"]] += 1
                summary["sequences"] += int(row["sequences"])
                summary["tokens"] += int(row["tokens"])
                summary["actor_seconds"] += float(row["seconds"])
                summary["peak_rss_mb"] = max(summary["peak_rss_mb"], float(row["peak_rss_mb"]))
                summary["timeline"].append((round(time.perf_counter() - start, 3), int(row["tokens"])))
                if row["status"] == "failed":
                    summary["failures"].append(row["error"])
        summary["units"] = log.summary()
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["outputs"] = outputs
    return summary
