"""`run`: every stage from one job file, then ``runs/<run_id>.json``.

Stages (each skips complete outputs, so a re-run is a no-op and an
interrupted run resumes where it stopped): tokenize (when ``data.raw`` is set)
-> fit-factors -> build-queries -> score -> merge. The resolved config is
written to ``<output>/resolved_config.json``; the run record holds the config,
library versions, counts (scored, skipped, failed), timings, and the hashes of
the factors and queries.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from importlib import metadata
from typing import Any

from .config import JobConfig
from .errors import UserError
from .io import storage
from .io.model_source import check_model_folder, check_tokenizer
from .io.completion import digest_of
from .io.shards import list_shards
from .stages.build_queries import build_queries
from .stages.fit_factors import fit_factors
from .stages.merge import merge
from .stages.score import score, score_outputs
from .stages.tokenize import tokenize

STAGES = ("tokenize", "fit-factors", "build-queries", "score", "merge")


class StageFailed(RuntimeError):
    """A stage finished with failed units (named in the message); the run record lists them."""


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("corpus-influence", "torch", "ray", "pyarrow", "transformers", "fsspec", "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_resolved_config(cfg: JobConfig) -> None:
    storage.write_json(storage.join(cfg.data.output, "resolved_config.json"), cfg.to_dict())


def run_id_of(cfg: JobConfig) -> str:
    return cfg.run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{cfg.digest()[:8]}"


def needs_tokenizer(cfg: JobConfig, stages: tuple[str, ...]) -> bool:
    """Whether these stages tokenize text: raw documents, or queries given as text (not as token ids).

    Reads the queries file when ``build-queries`` is among the stages, so that a missing or unreadable
    file is reported before any stage starts.
    """
    text_queries = False
    if "build-queries" in stages:
        if not storage.exists(cfg.data.queries):
            raise UserError(f"data.queries '{cfg.data.queries}' does not exist")
        columns = storage.read_table(cfg.data.queries).column_names
        text_queries = not {"prompt_ids", "completion_ids"} <= set(columns)
    return text_queries or ("tokenize" in stages and cfg.data.raw is not None)


def check_model(cfg: JobConfig, stages: tuple[str, ...]) -> None:
    """Before any stage starts: the model folder (and its tokenizer when text is tokenized) can be loaded."""
    if set(stages) & {"tokenize", "fit-factors", "build-queries", "score"}:
        check_model_folder(cfg.model)
        if needs_tokenizer(cfg, stages):
            check_tokenizer(cfg.model)


def run_job(cfg: JobConfig, show_progress: bool = False, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Run the stages in order; returns (and writes) the run record."""
    check_model(cfg, stages)
    write_resolved_config(cfg)
    record: dict[str, Any] = {"run_id": run_id_of(cfg), "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "config": cfg.to_dict(), "versions": versions(), "stages": {}}
    start = time.perf_counter()
    try:
        if "tokenize" in stages and cfg.data.raw is not None:
            record["stages"]["tokenize"] = tokenize(cfg, show_progress)
        if "fit-factors" in stages:
            record["stages"]["fit-factors"] = fit_factors(cfg, show_progress)
        if set(stages) & {"build-queries", "score", "merge"}:
            record["factors_hash"] = digest_of(storage.join(cfg.data.output, "factors"), "fit-factors")
        if "build-queries" in stages:
            record["stages"]["build-queries"] = build_queries(cfg, record["factors_hash"], show_progress)
        if set(stages) & {"score", "merge"}:
            record["queries_hash"] = digest_of(storage.join(cfg.data.output, "queries"), "build-queries")
        if "score" in stages:
            scored = score(cfg, record["queries_hash"], show_progress)
            record["stages"]["score"] = {k: v for k, v in scored.items() if k not in ("outputs", "timeline")}
            record["counts"] = {k: scored[k] for k in ("scored", "skipped", "failed", "sequences", "tokens")}
            if scored["failed"]:
                raise StageFailed(f"score: {scored['failed']} shards failed; first: {scored['failures'][0]}")
        if "merge" in stages:
            outputs = score_outputs(cfg, list_shards(cfg.data.corpus))
            record["stages"]["merge"] = merge(cfg, outputs, show_progress)
        record["status"] = "ok"
    except StageFailed as err:
        record["status"] = f"failed: {err}"
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        record.setdefault("status", "interrupted")
        storage.write_json(storage.join(cfg.data.output, "runs", f"{record['run_id']}.json"), record)
    return record
