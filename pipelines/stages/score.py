"""`score`: every unit (row groups of a shard) -> actors holding the model and the queries -> scores/ per unit.

A unit of work is a range of Parquet row groups of one shard
(``score_plan.py``: ``scoring.unit_rows``, whole shards when small), so one
large shard spreads over many actors. The actor streams the unit in windows of
``sort_window`` rows (memory bounded by the window and the unit's doc ids, not
by the corpus), sorts each window by length, cuts batches, prepares the next
batch in a background thread while the current one computes, and keeps the
top-k and bottom-k per query (``influence_ops.TopKAccumulator``: ties broken by
doc_id, so the union of unit results holds the exact global top-k).

Output ``<output>/scores/<unit name>[.q<hash>].parquet``: the unit's top-k and
bottom-k for the queries it was run for, written atomically, with the unit's
key, its row groups and the (query_id, query key) pairs it holds in the
Parquet metadata (``score_plan.py``: a file whose footer reads and carries the
current keys is complete and is reused on re-runs; new queries are scored
alone, into a file of their own), and the unit's rows and the sequences scored
(``influence.rows``, ``influence.sequences``). A unit that fails (unreadable
Parquet, a contract violation, a sequence longer than the model's context,
storage errors after retries) follows the job's ``on_error``
(``runtime/failures.py``). The stage accounts for every row of the corpus:
rows scored (now or in an earlier run) + rows of skipped units == rows, or the
stage fails. Columns:

    query_id string, doc_id string, score float64 (influence, paper sign:
    positive = training on the sequence makes the completion more likely; raw,
    or divided as ``scoring.normalize`` says: ``influence_ops.normalize``),
    score_normalized float64 (score / tokens the factors were fitted on; for
    ``normalize = cosine``, already scale-free, the score itself),
    sign string ('top': k highest scores, 'bottom': k lowest),
    shard_rank int32 (1 = most extreme within the unit and side), shard string.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from influence_ops import Normalize, Strategy, TokenBatch, TopKAccumulator, load_factors, load_queries, score_batch

from ..config import JobConfig, ModelConfig
from ..errors import UserError
from ..io import completion, storage
from ..io.model_loading import load_model, pick_device
from ..io.shards import Sequences, iter_shard, row_counts
from ..runtime.accounting import UnitLog
from ..runtime.failures import FailureLog, StageFailed, guard
from ..runtime.batching import prefetch, token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of
from .build_queries import QUERY_KEYS
from .distribution import ScoreHistogram, distribution_url
from .score_plan import GROUPS, KEY, QUERIES, ROWS, SEQUENCES, SHARD, Unit, plan
from .self_influence import SelfInfluenceRows, self_influence_url

SCORE_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64()),
                          ("score_normalized", pa.float64()), ("sign", pa.string()), ("shard_rank", pa.int32()),
                          ("shard", pa.string())])


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
    """Ray Data callable: ``{"unit": [JSON unit (score_plan.Unit.task)]}`` -> one summary row per unit."""

    def __init__(self, model: ModelConfig, queries_url: str, top_k: int, batch_size: int, sort_window: int,
                 strategy: str = "auto", threads: int = 0, use_gpu: bool = False, too_long: str = "error",
                 normalize: str = "none", factors_url: str | None = None) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        local = storage.local_copy(queries_url)
        dtype = torch.float64 if next(self.m.model.parameters()).dtype == torch.float64 else torch.float32
        self.all_queries = self.queries = load_queries(local).to(self.m.device, dtype)
        try:  # once per actor: queries built on another model are refused
            self.queries.check_model(self.m.layers)
        except ValueError as err:
            raise UserError(f"{queries_url}: {err}; rebuild them (influence build-queries) for model.path") from err
        self.top_k, self.batch_size, self.sort_window = top_k, batch_size, sort_window
        self.strategy = Strategy(strategy)
        self.too_long = too_long  # data.too_long: sequences longer than the model's context
        self.normalize = Normalize(normalize)  # factors_url: compute (and write) self-influence
        self.factors = None if factors_url is None else load_factors(storage.local_copy(factors_url), self.m.layers,
                                                                     device=self.m.device)
        self.scale = 1 if self.normalize == Normalize.COSINE else self.queries.factor_tokens  # score_normalized

    def use_queries(self, query_ids: list[str] | None) -> None:
        """Score only these queries (None: all of them) from now on."""
        ids = self.all_queries.query_ids or []
        if query_ids is None or query_ids == ids:
            self.queries = self.all_queries
            return
        where = {q: i for i, q in enumerate(ids)}
        absent = [q for q in query_ids if q not in where]
        if absent:
            raise ValueError(f"query {absent[0]!r} is not in the queries the actor loaded (were they rebuilt while "
                             "the job ran?)")
        self.queries = self.all_queries.select([where[q] for q in query_ids])

    def batches(self, shard: str, groups: tuple[int, int] | None = None) -> Iterator[tuple[Sequences, TokenBatch]]:
        for window in iter_shard(shard, self.m.vocab_size, rows_per_read=self.sort_window, context=self.m.context,
                                 too_long=self.too_long, row_groups=groups):
            self.rows_read += len(np.unique(window.rows))  # file rows (chunked pieces of a row count once)
            yield from token_batches(window, self.batch_size, device=self.m.device)

    def score_shard(self, shard: str, groups: tuple[int, int] | None = None) -> tuple[TopKAccumulator, int]:
        """Top/bottom-k of every query over the shard's row groups [lo, hi) (None: all), and the tokens scored."""
        acc = TopKAccumulator(self.queries.num_queries, self.top_k)
        self.histogram = ScoreHistogram(self.queries.num_queries, self.scale)
        self.self_influence = SelfInfluenceRows()
        tokens, self.rows_read = 0, 0
        for part, batch in prefetch(self.batches(shard, groups)):
            result = score_batch(self.m.model, self.queries, batch, strategy=self.strategy,
                                 autocast_dtype=self.m.autocast, factors=self.factors, normalize=self.normalize)
            acc.update(result.scores, part.doc_ids)
            if result.self_influence is not None:
                self.self_influence.update(part.doc_ids, result.self_influence, part.lengths)
            self.histogram.update(result.scores)
            tokens += int(part.lengths.sum())  # from the CPU copy: no device sync
        return acc, tokens

    def score_unit(self, unit: dict[str, Any]) -> tuple[int, int, int]:
        """Score a unit and write its files; returns (sequences scored, tokens, rows of the unit)."""
        groups = None if unit.get("groups") is None else tuple(unit["groups"])
        self.use_queries(None if unit.get("all_queries", True) else [q for q, _ in unit["queries"]])
        acc, tokens = self.score_shard(unit["shard"], groups)
        rows = row_counts([unit["shard"]])[0] if groups is None else int(unit["rows"])
        table = topk_rows(acc, self.queries.query_ids, self.scale, unit["shard"])
        unit_file = (f"{unit['output'].rsplit('/', 1)[0]}/{unit['name']}.parquet" if "name" in unit
                     else unit["output"])  # self_influence/ is per unit, for any queries
        if self.factors is not None:  # the same for any queries: one file per unit
            storage.write_parquet(self_influence_url(unit_file), self.self_influence.table(unit["shard"]))
        elif storage.exists(self_influence_url(unit_file)):  # from a run that wrote it
            storage.remove(self_influence_url(unit_file))
        storage.write_parquet(distribution_url(unit["output"]),  # before the scores file that marks it done
                              self.histogram.table(self.queries.query_ids, unit["shard"]))
        meta = {KEY: unit["key"], SHARD: unit["shard"], GROUPS: json.dumps(unit.get("groups")),
                QUERIES: json.dumps(unit.get("queries", [])), ROWS: str(rows), SEQUENCES: str(self.rows_read)}
        storage.write_parquet(unit["output"], table.replace_schema_metadata(meta))
        return self.rows_read, tokens, rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "output": [], "status": [], "sequences": [], "tokens": [], "rows": [],
                                 "seconds": [], "error": [], "error_rows": [], "doc_id": [], "peak_rss_mb": []}
        for unit in units_of(batch):
            start = time.perf_counter()
            done, failure = guard(unit["shard"], self.score_unit, unit)
            if failure is not None:
                counted = [int(unit["rows"])] if unit.get("groups") is not None else \
                    guard(unit["shard"], row_counts, [unit["shard"]])[0]
                done = (0, 0, counted[0] if counted else -1)  # -1: the shard's footer does not read
            rows["shard"].append(unit["shard"])
            rows["output"].append(unit["output"])
            rows["status"].append("failed" if failure else "scored")
            rows["error"].append(failure["error"] if failure else "")
            rows["error_rows"].append(unit_rows_label(unit, failure))
            rows["doc_id"].append((failure or {}).get("doc_id") or "")
            for name, value in zip(("sequences", "tokens", "rows"), done):
                rows[name].append(value)
            rows["seconds"].append(time.perf_counter() - start)
            rows["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        text = ("shard", "output", "status", "error", "error_rows", "doc_id")
        return {k: np.asarray(v, dtype=object if k in text else None) for k, v in rows.items()}


def unit_rows_label(unit: dict[str, Any], failure: dict[str, Any] | None) -> str:
    """The rows a failed unit leaves out, for the errors/ table: "all" (a whole shard) or "first-last" file rows."""
    if failure is None:
        return ""
    if unit.get("whole", True) or unit.get("groups") is None or int(unit.get("rows", -1)) < 0:
        return "all"
    lo = int(unit["first_row"])
    return f"{lo}-{lo + int(unit['rows']) - 1}"


def is_current(url: str, key: str) -> bool:
    """The file exists, its footer reads, and it carries ``key``."""
    meta = storage.footer_metadata(url)
    return meta is not None and meta.get(KEY) == key


def current_query_keys(cfg: JobConfig, queries_digest: str) -> dict[str, str]:
    """query_id -> query key, in query order (``queries/query_keys.json``; for queries built before it
    existed, keys derived from the queries folder's digest)."""
    folder = storage.join(cfg.data.output, "queries")
    keys = storage.read_json(storage.join(folder, QUERY_KEYS))
    if keys:
        return dict(keys["queries"])
    table = storage.join(folder, "queries.parquet")
    if not storage.exists(table):
        raise ValueError(f"{table} is missing: run `build-queries` first")
    ids = storage.read_parquet(table, columns=["query_id"]).column(0).to_pylist()
    return {q: completion.inputs_key("query", queries_digest, q) for q in ids}


def score(cfg: JobConfig, queries_digest: str, show_progress: bool = False) -> dict[str, Any]:
    """Score every unit not already scored for these inputs (and, in scored units, only the new queries).

    Returns counts and timings: ``scored``/``skipped``/``failed`` count units (run now, finished
    before, failed), ``units_total`` all units, ``unit_rows`` the rows per unit used for new units;
    ``timeline`` lists (seconds since the stage started, tokens) as each unit completed;
    ``peak_rss_mb`` is the largest peak RSS an actor reported; ``units`` says where the units ran
    (nodes, actors, busy seconds, retries: ``UnitLog.summary``). ``rows`` counts the corpus:
    ``rows`` (of the shards whose footer reads), ``scored`` (rows of units whose every query is in
    a current score file), ``skipped`` (rows of failed units), ``unreadable_shards``; ``errors``
    holds the failed units (``on_error = "skip"``; with "fail" the first one raises ``StageFailed``).
    ``outputs`` lists the current score files (the merge's inputs).
    """
    start = time.perf_counter()
    p = plan(cfg, current_query_keys(cfg, queries_digest))
    todo = p.todo
    summary, rows = planned_summary(p.units, todo, p.unit_rows)
    summary.update({"stale_files_removed": len(p.removed), "new_query_units": sum(bool(u.files) for u in todo)})

    def args_of(use_gpu: bool) -> dict[str, Any]:
        return {"model": cfg.model, "queries_url": storage.join(cfg.data.output, "queries"),
                "top_k": cfg.scoring.top_k, "batch_size": cfg.resources.batch_size,
                "sort_window": cfg.scoring.sort_window, "strategy": cfg.scoring.strategy.value,
                "threads": cfg.resources.threads_per_actor, "too_long": cfg.data.too_long.value,
                "use_gpu": use_gpu, "normalize": cfg.scoring.normalize.value,
                "factors_url": storage.join(cfg.data.output, "factors") if cfg.scoring.writes_self_influence else None}

    tasks = [u.task(p.scores_dir, p.queries, p.query_keys) for u in todo]
    return run_tasks(cfg, "score", ShardScorer, args_of, tasks, summary, rows, p.files(), start, show_progress)


def planned_summary(units: list[Unit], todo: list[Unit], unit_rows: int) -> tuple[dict[str, Any], dict[str, int]]:
    """A stage's summary and row counts before the units ``todo`` run: every other unit of ``units`` is done
    (its rows and sequences from its files' footers). The fields of ``score``'s summary (``run_tasks`` adds
    the rest); also used by the index build (``index_build``)."""
    rows = {"rows": 0, "scored": 0, "skipped": 0, "unreadable_shards": 0}
    running = {id(u) for u in todo}
    for unit in units:
        if id(unit) not in running:
            rows["rows"] += unit.done_rows if unit.done_rows >= 0 else unit.rows
            rows["scored"] += unit.done_sequences if unit.done_sequences >= 0 else unit.rows
    summary: dict[str, Any] = {"shards": len({u.shard for u in units}), "units_total": len(units),
                               "unit_rows": unit_rows, "skipped": len(units) - len(todo), "scored": 0,
                               "failed": 0, "sequences": 0, "tokens": 0, "failures": [], "actor_seconds": 0.0,
                               "peak_rss_mb": 0.0, "timeline": []}
    return summary, rows


def run_tasks(cfg: JobConfig, stage: str, worker: type, args_of: Any, tasks: list[dict[str, Any]],
               summary: dict[str, Any], rows: dict[str, int], outputs: list[str], start: float,
               show_progress: bool) -> dict[str, Any]:
    """Run the units ``tasks`` on actors, fold their rows into ``summary`` / ``rows``; check the row accounting."""
    failures = FailureLog(stage, cfg.on_error)
    if tasks:
        cluster = ensure_ray(cfg.resources)
        args = args_of(cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0)
        log = UnitLog()
        with bar(len(tasks), f"{stage} (units)", show_progress) as progress:
            for row in run_units(worker, args, tasks, cfg.resources, cluster, progress, log):
                summary[row["status"]] += 1
                summary["sequences"] += int(row["sequences"])
                summary["tokens"] += int(row["tokens"])
                summary["actor_seconds"] += float(row["seconds"])
                summary["peak_rss_mb"] = max(summary["peak_rss_mb"], float(row["peak_rss_mb"]))
                summary["timeline"].append((round(time.perf_counter() - start, 3), int(row["tokens"])))
                if int(row["rows"]) >= 0:
                    rows["rows"] += int(row["rows"])
                else:
                    rows["unreadable_shards"] += 1
                if row["status"] == "failed":
                    summary["failures"].append(row["error"])
                    failures.add(row["shard"], row["error"], row["error_rows"] or "all", row["doc_id"] or None)
                    rows["skipped"] += max(0, int(row["rows"]))
                else:
                    rows["scored"] += int(row["sequences"])
                    outputs.append(row["output"])
        summary["units"] = log.summary()
    if rows["scored"] + rows["skipped"] != rows["rows"]:
        raise StageFailed(f"{stage}: {rows['scored']} rows scored + {rows['skipped']} skipped != {rows['rows']} rows "
                          f"in the corpus {cfg.data.corpus}")
    summary["rows"] = rows
    summary["errors"] = failures.rows
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["outputs"] = sorted(outputs)
    return summary


def current_score_files(cfg: JobConfig, queries_digest: str) -> tuple[list[str], int, list[str]]:
    """The current score files (the merge's inputs), the number of units that still miss queries, and the
    score files whose footer does not read."""
    p = plan(cfg, current_query_keys(cfg, queries_digest), clean=False)
    return sorted(p.files()), len(p.todo), p.unreadable
