"""`run`: every stage from one job file, then ``runs/<run_id>.json``.

Stages (each skips complete outputs, so a re-run is a no-op and an
interrupted run resumes where it stopped): tokenize (when ``data.raw`` is set)
-> fit-factors -> build-queries -> index (``scoring.mode = "index"``, or asked for alone)
-> score -> merge. With ``scoring.mode = "scan"`` score scores every sequence; with
"index" or "tfidf" it finds candidates (``stages/candidates.py``) and merge re-scores them
exactly (``stages/rescore.py``; for the index it also reports how closely the index ranked them:
``stages.merge.index_health`` in the record, ``stages/index_health.py``). The resolved config is
written to ``<output>/resolved_config.json``; the run record holds the config,
library versions, counts (scored, skipped, failed, and the corpus rows: scored +
skipped == rows), the units each stage skipped under ``on_error = "skip"``,
timings, and the hashes of the factors and queries. The skipped units are also
written, with their reasons, to ``<output>/errors/<run_id>.parquet``
(``runtime/failures.py``). The record is written whatever happens; if that
write fails while an error is on its way up, the write's failure is logged and
the original error goes on.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from importlib import metadata
from typing import Any

from .config import JobConfig, ScoringMode
from .io import storage
from .io.completion import digest_of
from .runtime.failures import StageFailed, errors_table
from .runtime.run_lock import hold_output
from .stages.build_queries import build_queries
from .stages.candidates import find_candidates, read_candidates
from .stages.index_build import build_index
from .stages.fit_factors import fit_factors
from .stages.merge import merge
from .stages.rescore import rescore
from .stages.score import current_score_files, score
from .stages.tokenize import tokenize
from .validate import preflight, preflight_corpus

STAGES = ("tokenize", "fit-factors", "build-queries", "index", "score", "merge")
__all__ = ["STAGES", "StageFailed", "run_job"]
log = logging.getLogger(__name__)


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


def run_job(cfg: JobConfig, show_progress: bool = False, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Run the stages in order; returns (and writes) the run record.

    The inputs are checked first (``validate.preflight``: the model folder or
    Hub name and its tokenizer, raw files, queries, before Ray starts) and, before the corpus is read, its shards and doc_ids
    (``validate.preflight_corpus``); the first problem raises with one line. The stages run holding
    ``<output>/run.lock`` (``runtime/run_lock.py``): a second run in the same output refuses.
    """
    preflight(cfg, stages)
    run_id = run_id_of(cfg)
    with hold_output(cfg.data.output, run_id):  # one run at a time in an output folder
        return _run_stages(cfg, show_progress, stages, run_id)


def _run_stages(cfg: JobConfig, show_progress: bool, stages: tuple[str, ...], run_id: str) -> dict[str, Any]:
    write_resolved_config(cfg)
    record: dict[str, Any] = {"run_id": run_id, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "config": cfg.to_dict(), "versions": versions(), "stages": {}}
    errors: list[dict[str, Any]] = []

    def ran(name: str, info: dict[str, Any]) -> dict[str, Any]:
        errors.extend(info.pop("errors", None) or [])
        record["stages"][name] = info
        return info

    start = time.perf_counter()
    failed: BaseException | None = None
    try:
        if "tokenize" in stages and cfg.data.raw is not None:
            ran("tokenize", tokenize(cfg, show_progress))
        if set(stages) & {"fit-factors", "index", "score", "merge"}:
            record["preflight"] = {**preflight_corpus(cfg), "too_long": cfg.data.too_long.value}
        if "fit-factors" in stages:
            ran("fit-factors", fit_factors(cfg, show_progress))
        if set(stages) & {"build-queries", "index", "score", "merge"}:
            record["factors_hash"] = digest_of(storage.join(cfg.data.output, "factors"), "fit-factors")
        if "build-queries" in stages:
            ran("build-queries", build_queries(cfg, record["factors_hash"], show_progress))
        if set(stages) & {"score", "merge"}:
            record["queries_hash"] = digest_of(storage.join(cfg.data.output, "queries"), "build-queries")
        scan = cfg.scoring.mode == ScoringMode.SCAN
        if "index" in stages and (cfg.scoring.mode == ScoringMode.INDEX or "score" not in stages):
            built = build_index(cfg, show_progress)
            ran("index", {k: v for k, v in built.items() if k not in ("outputs", "timeline")})
            record["counts"] = {k: built[k] for k in ("scored", "skipped", "failed", "sequences", "tokens", "rows")}
        if "score" in stages and scan:
            scored = score(cfg, record["queries_hash"], show_progress)
            ran("score", {k: v for k, v in scored.items() if k not in ("outputs", "timeline")})
            record["counts"] = {k: scored[k] for k in ("scored", "skipped", "failed", "sequences", "tokens", "rows")}
        elif "score" in stages:
            ran("candidates", find_candidates(cfg))
        if "merge" in stages and scan:
            if "score" in stages:
                outputs, pending, unreadable = scored["outputs"], 0, []
            else:
                outputs, pending, unreadable = current_score_files(cfg, record["queries_hash"])
            ran("merge", merge(cfg, outputs, show_progress, pending, unreadable))
        elif "merge" in stages:
            candidates, estimates = read_candidates(cfg)
            ran("merge", rescore(cfg, candidates, record["queries_hash"], show_progress, estimates))
        record["status"] = "ok"
    except BaseException as err:
        failed = err
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        record["status"] = "interrupted" if isinstance(err, KeyboardInterrupt) else f"failed: {first}"
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        record.setdefault("status", "interrupted")
        record["errors"] = {"units": len(errors), "by_stage": {s: sum(e["stage"] == s for e in errors)
                                                                for s in dict.fromkeys(e["stage"] for e in errors)}}
        if errors:
            record["errors"]["table"] = storage.join(cfg.data.output, "errors", f"{record['run_id']}.parquet")
        _write_record(cfg, record, errors, failed)
    return record


def _write_record(cfg: JobConfig, record: dict[str, Any], errors: list[dict[str, Any]],
                  failed: BaseException | None) -> None:
    """The errors table and the run record; a failure to write them never hides ``failed``."""
    url = storage.join(cfg.data.output, "runs", f"{record['run_id']}.json")
    try:
        if errors:
            storage.write_parquet(record["errors"]["table"], errors_table(errors, record["run_id"]))
        storage.write_json(url, record)
    except Exception as err:
        if failed is None:
            raise
        log.warning("the run record %s was not written (%s); the run's own error follows",
                  url, (str(err).splitlines() or [type(err).__name__])[0])
