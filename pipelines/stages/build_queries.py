"""`build-queries`: queries file -> tokens -> preconditioned (dense or rank-r) -> queries/.

Input (JSONL or Parquet), one row per query: ``query_id`` (letters, digits,
``-_.``; it becomes a hive partition value), and either ``prompt`` +
``completion`` text (tokenized with the model's tokenizer, each on its own,
without special tokens: give the completion the leading space a BPE tokenizer
expects, e.g. " Paris") or pre-tokenized ``prompt_ids`` + ``completion_ids``.
A prompt too long for the model's context keeps its last tokens.

Preparation runs on an actor pool (``runtime.ray_runtime.run_units``): one unit
is ``scoring.query_batches_per_unit`` batches of ``resources.batch_size`` queries;
an actor loads the model and factors once, prepares its units
(``influence_ops.precondition_queries`` with ``scoring.query_precision`` and
``scoring.query_lowrank``) and writes each to ``queries/parts/unit-NNNNN/``. The
driver tokenizes (it loads the model on the CPU for its vocabulary size and
context), concatenates the parts in query order and removes them.

Output folder ``<output>/queries``: ``queries.safetensors`` + ``queries.json``
(``influence_ops.save_queries``) and ``queries.parquet``: query_id, prompt,
completion, prompt_ids, completion_ids, measurement (log p(completion | prompt)),
truncation_error (per tracked layer, relative Frobenius error of the rank-r
truncation; 0 for dense), truncation_error_max, prompt_tokens_dropped; and ``query_keys.json``: each
query's own key (``query_keys``), so that adding queries leaves the scores of
the others current. A query whose key is unchanged since the last complete
build keeps its preconditioned gradient as it was (only new or changed queries
are prepared: ``reusable``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from influence_ops import (
    PreconditionedQueries,
    QueryPrep,
    load_factors,
    load_queries,
    precondition_queries,
    query_batch,
    save_queries,
)

from ..config import JobConfig, ModelConfig
from ..errors import UserError
from ..io import completion, storage
from ..io.model_loading import LoadedModel, load_model, load_tokenizer, pick_device
from ..io.model_source import has_tokenizer
from ..io.queries_file import read_queries
from ..io.unknown_tokens import count_unknown, unknown_token_id
from ..runtime.accounting import UnitLog
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of

log = logging.getLogger(__name__)

QUERY_KEYS = "query_keys.json"  # query_id -> query key (``query_keys``)


@dataclass
class QueryRows:
    ids: list[str]
    prompts: list[str | None]
    completions: list[str | None]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    dropped: list[int]


def tokenize_queries(url: str, tokenizer: Any, vocab_size: int | None, context: int | None) -> QueryRows:
    """Check and tokenize the queries file (``io.queries_file.read_queries``: errors name the file, the
    line or row and the field); a prompt too long for the context keeps its last tokens."""
    out = QueryRows([], [], [], [], [], [])
    for q in read_queries(url, tokenizer, vocab_size, context):
        p, c = q.prompt_ids, q.completion_ids
        dropped = q.prompt_cut(context)
        out.ids.append(q.query_id)
        out.prompts.append(q.row.get("prompt"))
        out.completions.append(q.row.get("completion"))
        out.prompt_ids.append(p[dropped:])
        out.completion_ids.append(c)
        out.dropped.append(dropped)
    return out


def warn_cut_prompts(rows: QueryRows, context: int | None, url: str) -> None:
    """One warning line naming the queries whose prompt lost its first tokens to the model's context."""
    cut = [f"{q} ({d} of {d + len(p)})" for q, p, d in zip(rows.ids, rows.prompt_ids, rows.dropped) if d]
    if cut:
        log.warning("%s: %d quer%s longer than the model's context of %s tokens: the prompt's first tokens are left "
                    "out (left out of the prompt's tokens): %s%s", url, len(cut), "y is" if len(cut) == 1 else "ies are",
                    context, ", ".join(cut[:5]), ", ..." if len(cut) > 5 else "")


def warn_unknown_queries(rows: QueryRows, unk: int | None, url: str) -> None:
    """One warning line naming the queries with the tokenizer's unknown token in their prompt or completion."""
    bad = [f"{q} ({n} of {len(p) + len(c)})" for q, p, c in zip(rows.ids, rows.prompt_ids, rows.completion_ids)
           if (n := count_unknown(p, unk) + count_unknown(c, unk))]
    if bad:
        log.warning("%s: %d quer%s contain the tokenizer's unknown token (unknown of all tokens): %s%s; queries "
                    "that differ only in unknown words get the same gradient", url, len(bad),
                    "y" if len(bad) == 1 else "ies", ", ".join(bad[:5]), ", ..." if len(bad) > 5 else "")


def queries_key(cfg: JobConfig, factors_digest: str) -> str:
    return completion.inputs_key("queries", cfg.model.__dict__, factors_digest, storage.file_digest(cfg.data.queries),
                                 cfg.scoring.rank, cfg.factors.damping, cfg.scoring.query_precision.value,
                                 cfg.scoring.query_lowrank.value)


def query_keys(cfg: JobConfig, factors_digest: str, rows: QueryRows) -> dict[str, str]:
    """query_id -> the key of that query's preconditioned gradient (its tokens, model, factors, rank, damping,
    precision and low-rank method; not the other queries, not batch sizes): the score stage reuses a query's
    scores while its key stays the same (``score_plan.py``)."""
    common = (cfg.model.__dict__, factors_digest, cfg.scoring.rank, cfg.factors.damping,
              cfg.scoring.query_precision.value, cfg.scoring.query_lowrank.value)
    return {q: completion.inputs_key("query", *common, q, p, c)
            for q, p, c in zip(rows.ids, rows.prompt_ids, rows.completion_ids)}


def reusable(folder: str, keys: dict[str, str]) -> tuple[PreconditionedQueries | None, dict[str, int]]:
    """The queries of a complete earlier ``queries/`` folder, and the position there of each query whose key
    is still current (its preconditioned gradient is reused as it is)."""
    marker = storage.read_json(storage.join(folder, completion.MARKER)) if storage.exists(folder) else None
    old_keys = storage.read_json(storage.join(folder, QUERY_KEYS)) if marker else None
    if not marker or not old_keys or completion.completed(folder, marker.get("key", "")) is None:
        return None, {}
    current = {q: k for q, k in old_keys["queries"] if keys.get(q) == k}
    if not current:
        return None, {}
    old = load_queries(storage.local_copy(folder))
    return old, {q: i for i, q in enumerate(old.query_ids or []) if q in current}


def subset(rows: QueryRows, index: list[int]) -> QueryRows:
    pick = (lambda xs: [xs[i] for i in index])
    return QueryRows(pick(rows.ids), pick(rows.prompts), pick(rows.completions), pick(rows.prompt_ids),
                     pick(rows.completion_ids), pick(rows.dropped))


def query_prep(cfg: JobConfig) -> QueryPrep:
    return QueryPrep(precision=cfg.scoring.query_precision, lowrank=cfg.scoring.query_lowrank)


class QueryWorker:
    """Ray Data callable: ``{"unit": [JSON {index, ids, prompt_ids, completion_ids, output}]}`` -> a row per unit.

    Prepares the unit's queries and writes them (``save_queries``) to the unit's ``output`` folder.
    """

    def __init__(self, model: ModelConfig, factors_url: str, rank: int | None, damping: float | None,
                 batch_size: int, precision: str, lowrank: str, threads: int = 0, use_gpu: bool = False) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        try:
            self.factors = load_factors(storage.local_copy(factors_url), self.m.layers, device=self.m.device)
        except ValueError as err:
            raise UserError(f"{factors_url}: {err}; refit them (influence fit-factors) for model.path") from err
        self.rank, self.damping, self.batch_size = rank, damping, batch_size
        self.prep = QueryPrep(precision=precision, lowrank=lowrank)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"index": [], "queries": [], "seconds": []}
        for unit in units_of(batch):
            start = time.perf_counter()
            part = QueryRows(unit["ids"], [None] * len(unit["ids"]), [None] * len(unit["ids"]), unit["prompt_ids"],
                             unit["completion_ids"], [0] * len(unit["ids"]))
            pq = precondition(self.m, self.factors, part, self.rank, self.damping, self.batch_size, self.prep)
            with tempfile.TemporaryDirectory() as tmp:
                save_queries(pq, tmp)
                storage.upload_dir(tmp, unit["output"], last=("queries.json",))
            rows["index"].append(unit["index"])
            rows["queries"].append(len(unit["ids"]))
            rows["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v) for k, v in rows.items()}


def query_units(rows: QueryRows, per_unit: int, parts_url: str) -> list[dict[str, Any]]:
    """Consecutive slices of ``per_unit`` queries, each with the folder its queries go to."""
    return [{"index": i, "ids": rows.ids[lo:lo + per_unit], "prompt_ids": rows.prompt_ids[lo:lo + per_unit],
             "completion_ids": rows.completion_ids[lo:lo + per_unit],
             "output": storage.join(parts_url, f"unit-{i:05d}")}
            for i, lo in enumerate(range(0, len(rows.ids), per_unit))]


def prepare_on_actors(cfg: JobConfig, rows: QueryRows, show_progress: bool = False) -> tuple[PreconditionedQueries,
                                                                                                dict[str, Any]]:
    """Preconditioned queries of ``rows`` prepared by an actor pool, concatenated in query order (on the CPU)."""
    parts_url = storage.join(cfg.data.output, "queries", "parts")
    storage.remove(parts_url)
    units = query_units(rows, cfg.scoring.query_batches_per_unit * cfg.resources.batch_size, parts_url)
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "factors_url": storage.join(cfg.data.output, "factors"), "rank": cfg.scoring.rank,
            "damping": cfg.factors.damping, "batch_size": cfg.resources.batch_size,
            "precision": cfg.scoring.query_precision.value, "lowrank": cfg.scoring.query_lowrank.value,
            "threads": cfg.resources.threads_per_actor,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0}
    log = UnitLog()
    seconds = 0.0
    with bar(len(units), "build-queries (units)", show_progress) as progress:
        for row in run_units(QueryWorker, args, units, cfg.resources, cluster, progress, log):
            seconds += float(row["seconds"])
    pq = None
    for unit in units:
        part = load_queries(storage.local_copy(unit["output"]))
        pq = part if pq is None else pq.concat(part)
    storage.remove(parts_url)
    return pq, {"units": len(units), "actor_seconds": round(seconds, 3), "unit_log": log.summary()}


def build_queries(cfg: JobConfig, factors_digest: str, show_progress: bool = False) -> dict[str, Any]:
    """Run the stage (skipped when ``queries/`` is complete for these inputs); returns its summary."""
    out = storage.join(cfg.data.output, "queries")
    key = queries_key(cfg, factors_digest)
    done = completion.completed(out, key)
    if done is not None:
        return {**done, "skipped": True}
    start = time.perf_counter()
    loaded = load_model(cfg.model)  # on the CPU, for the vocabulary size and context the queries are checked against
    tokenizer = load_tokenizer(cfg.model) if has_tokenizer(cfg.model) else None
    rows = tokenize_queries(cfg.data.queries, tokenizer, loaded.vocab_size, loaded.context)
    warn_cut_prompts(rows, loaded.context, cfg.data.queries)
    del loaded
    warn_unknown_queries(rows, unknown_token_id(tokenizer) if tokenizer is not None else None, cfg.data.queries)
    keys = query_keys(cfg, factors_digest, rows)
    kept, index = reusable(out, keys)
    new = [i for i, q in enumerate(rows.ids) if q not in index]
    actors: dict[str, Any] = {"units": 0, "actor_seconds": 0.0, "unit_log": None}
    pq = None if kept is None else kept.select([index[q] for q in rows.ids if q in index])
    if new:
        fresh, actors = prepare_on_actors(cfg, subset(rows, new), show_progress)
        pq = fresh if pq is None else pq.concat(fresh)
    order = {q: i for i, q in enumerate(pq.query_ids)}
    pq = pq.select([order[q] for q in rows.ids])  # the queries file's order
    table = pa.table({
        "query_id": pa.array(rows.ids, pa.string()),
        "prompt": pa.array(rows.prompts, pa.string()),
        "completion": pa.array(rows.completions, pa.string()),
        "prompt_ids": pa.array(rows.prompt_ids, pa.list_(pa.int32())),
        "completion_ids": pa.array(rows.completion_ids, pa.list_(pa.int32())),
        "measurement": pa.array(pq.measurement.numpy(), pa.float64()),
        "truncation_error": pa.array(list(pq.truncation_error.numpy()), pa.list_(pa.float64())),
        "truncation_error_max": pa.array(pq.truncation_error.max(dim=1).values.numpy(), pa.float64()),
        "prompt_tokens_dropped": pa.array(rows.dropped, pa.int32()),
    })
    completion.invalidate(out)  # from here on the folder is not a complete earlier build (``reusable``)
    with tempfile.TemporaryDirectory() as tmp:
        save_queries(pq, tmp)
        storage.upload_dir(tmp, out, last=("queries.json",))
    storage.write_parquet(storage.join(out, "queries.parquet"), table)
    storage.write_json(storage.join(out, QUERY_KEYS), {"queries": list(keys.items())})
    info = {"queries": len(rows.ids), "prepared": len(new), "reused": len(rows.ids) - len(new), "rank": pq.rank, "factor_tokens": pq.factor_tokens,
            "precision": cfg.scoring.query_precision.value, "lowrank": cfg.scoring.query_lowrank.value,
            "units": actors["units"], "actor_seconds": actors["actor_seconds"], "placement": actors["unit_log"],
            "seconds": round(time.perf_counter() - start, 3)}
    info["digest"] = storage.dir_digest(out)
    return {**completion.mark_complete(out, key, info), "skipped": False}


def precondition(loaded: LoadedModel, factors: Any, rows: QueryRows, rank: int | None, damping: float | None,
                 batch_size: int, prep: QueryPrep | None = None) -> PreconditionedQueries:
    """Preconditioned queries (moved to the CPU) for the tokenized rows."""
    batches = [query_batch(rows.prompt_ids[lo:lo + batch_size], rows.completion_ids[lo:lo + batch_size])
               for lo in range(0, len(rows.ids), batch_size)]
    batches = [b.to(loaded.device) for b in batches]
    pq = precondition_queries(loaded.model, factors, batches, rank=rank, damping=damping,
                              autocast_dtype=loaded.autocast, query_ids=rows.ids, prep=prep)
    return pq.to("cpu")
