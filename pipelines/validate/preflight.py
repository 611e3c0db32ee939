"""The checks put together: ``validate`` (every check, problems collected) and the stages' preflight.

``validate(cfg)`` runs every check and collects the problems in a ``Report``
(``influence validate`` prints it): the model folder, the raw files, each
shard's footer and schema, doc_id uniqueness across the corpus, every row of
every shard (token ids within the vocabulary, lengths against the context
under ``data.too_long``) and the queries file.

The stages run the same checks before Ray starts (``preflight``: the model,
the raw files for ``tokenize``, the queries for ``build-queries``, the faiss
package for ``score`` with ``index.search = "faiss"``) and before
they read the corpus (``preflight_corpus``: footers, schemas and doc_id
uniqueness; remembered in ``<output>/preflight/corpus.json`` for the same
shard files, so a re-run does not read the doc_ids again). Token ids and
lengths are checked by the stages as they read each row. The first problem
raises (a ``ConfigError``, ``ShardError`` or ``ValueError`` with one line).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import ConfigError, IndexSearch, JobConfig, ScoringMode
from ..config.corpus_paths import corpus_root
from ..io import completion, storage
from ..io.raw_files import check_raw_files
from ..io.shards import ShardError, raw_inputs
from ..runtime.run_lock import in_use
from .doc_ids import RawIds, check_unique_doc_ids
from .model import ModelInfo, check_model, check_tokenizer, is_byte_level
from .queries import check_queries, has_text
from .report import USER_ERRORS, Report
from .shards import check_footer, check_footers, find_shards, scan_shard

log = logging.getLogger(__name__)
T = TypeVar("T")
CORPUS_STAGES = ("fit-factors", "score", "merge")


def raw_files(cfg: JobConfig) -> list[str]:
    """The raw text files of ``data.raw`` (``io.shards.raw_inputs``: none, two for one shard, a raw file in
    the corpus are errors)."""
    return raw_inputs(cfg.data.raw, cfg.data.corpus)[0]


def _step(report: Report, check: Callable[[], T]) -> T | None:
    """Run one check; a user error goes into the report (and the check's result is None)."""
    try:
        return check()
    except USER_ERRORS as err:
        report.errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def validate(cfg: JobConfig, job: str = "") -> Report:
    """Every check of the job's inputs; the problems are in the report, nothing is raised for them."""
    start = time.perf_counter()
    report = Report(job=job, too_long=cfg.data.too_long.value)
    text = cfg.data.raw is not None or has_text(cfg.data.queries)
    info = _step(report, lambda: check_model(cfg.model, needs_tokenizer=text))
    if info is not None:
        report.model = info.description
    if cfg.data.raw is not None:
        found = _step(report, lambda: raw_files(cfg))
        report.raw_files = len(found) if found is not None else None
        if found:
            ids = RawIds(found, cfg.data.id_column)
            try:
                report.raw_documents = _step(report, lambda: check_raw_files(found, cfg.data.text_column,
                                                                             cfg.data.id_column, ids.add))
                if report.raw_documents is not None:  # every file's own ids are unique: now across the files
                    errors = len(report.errors)
                    _step(report, ids.check)
                    report.raw_ids_unique = len(report.errors) == errors
            finally:
                ids.close()
    shards = _corpus_shards(cfg, report)
    footers = _step(report, lambda: check_footers(shards)) if shards else None
    if footers is not None:
        report.shards, report.rows = len(footers), sum(f.rows for f in footers)
        report.row_groups = sum(f.row_groups for f in footers)
        errors = len(report.errors)
        _step(report, lambda: check_unique_doc_ids(shards, report.rows))
        report.doc_ids_unique = len(report.errors) == errors
        if info is not None:
            report.tokens = 0
            for url in shards:
                scan = _step(report, lambda: scan_shard(url, info.vocab_size, info.context, cfg.data.too_long))
                if scan is None:
                    report.tokens = None
                    break
                report.tokens += scan.tokens
                report.too_long_rows += scan.too_long
    if report.too_long_rows:
        report.warnings.append(f"{report.too_long_rows} rows are longer than the model's context of {info.context} "
                               f"tokens: data.too_long = {cfg.data.too_long.value!r} applies to them")
    if info is not None or not text:
        checked = _step(report, lambda: check_queries(cfg.data.queries, info.tokenizer if info else None,
                                                      info.vocab_size if info else None,
                                                      info.context if info else None,
                                                      info.byte_level if info else False))
        if checked is not None:
            report.queries = checked.queries
            report.warnings += checked.warnings
    if _needs_faiss(cfg):
        _step(report, _require_faiss)
    holder = _step(report, lambda: in_use(cfg.data.output))
    if holder:
        report.warnings.append(f"data.output = {cfg.data.output!r} is in use by {holder}: `influence run` refuses "
                               "to start in it until that run ends")
    report.seconds = time.perf_counter() - start
    return report


def _needs_faiss(cfg: JobConfig) -> bool:
    return cfg.scoring.mode == ScoringMode.INDEX and cfg.index.search == IndexSearch.FAISS


def _require_faiss() -> None:
    from ..stages.index_faiss import require_faiss

    require_faiss()


def _corpus_shards(cfg: JobConfig, report: Report) -> list[str] | None:
    """The shards; with ``data.raw`` set, a corpus that `tokenize` has not written yet is only a warning."""
    try:
        return find_shards(cfg.data.corpus)
    except ConfigError as err:
        if cfg.data.raw is None:
            report.errors.append(str(err))
        else:
            report.warnings.append(f"{err}; `tokenize` writes them from data.raw")
        return None


def preflight(cfg: JobConfig, stages: tuple[str, ...]) -> ModelInfo:
    """The checks of the inputs of ``stages`` that need no corpus: model, raw files, queries. Raises the first."""
    tokenize = "tokenize" in stages and cfg.data.raw is not None
    queries = "build-queries" in stages
    info = check_model(cfg.model, needs_tokenizer=tokenize)
    if "score" in stages and _needs_faiss(cfg):
        _require_faiss()  # before the index pass, not after it
    if tokenize:
        raw_files(cfg)
    if queries:
        tokenizer = check_tokenizer(cfg.model) if has_text(cfg.data.queries) else None
        checked = check_queries(cfg.data.queries, tokenizer, info.vocab_size, info.context,
                                tokenizer is not None and is_byte_level(tokenizer))
        for warning in checked.warnings:
            log.warning(warning)
    return info


def _from_raw(cfg: JobConfig, err: ShardError) -> ShardError:
    """A doc_id repeated in two shards that `tokenize` wrote: the error also names the raw files and id."""
    other = getattr(err, "other", None)
    if cfg.data.raw is None or other is None:
        return err
    try:
        inputs, stems = raw_inputs(cfg.data.raw, cfg.data.corpus)
    except (ValueError, OSError):
        return err
    root = corpus_root(cfg.data.corpus)
    made = {storage.join(root, f"{stem}.parquet"): url for url, stem in zip(inputs, stems)}
    if err.shard not in made or other not in made:
        return err
    raw_id = str(err.doc_id).rsplit(":", 1)[0]
    files = made[err.shard] if made[err.shard] == made[other] else f"{made[err.shard]} and {made[other]}"
    err.args = (f"{err.args[0]}; tokenized from data.raw: the id {raw_id!r} is in {files} "
                "(`influence validate` names every raw file and row)",)
    return err


def preflight_corpus(cfg: JobConfig) -> dict[str, Any]:
    """Footers, schemas and corpus-wide doc_id uniqueness (skipped when checked before for the same files)."""
    shards = find_shards(cfg.data.corpus)
    key = completion.inputs_key("corpus-check-v1", completion.shard_fingerprints(shards))
    folder = storage.join(cfg.data.output, "preflight")
    done = completion.completed(folder, key)
    if done is not None:
        return {**done, "skipped": True}
    start = time.perf_counter()
    footers, unreadable = [], []
    for url in shards:
        try:
            footers.append(check_footer(url))
        except ShardError as err:
            if cfg.on_error != "skip":
                raise
            unreadable.append(str(err))  # on_error = "skip": the stages skip this shard and record why
    rows = sum(f.rows for f in footers)
    try:
        check_unique_doc_ids([f.url for f in footers], rows)
    except ShardError as err:
        raise _from_raw(cfg, err) from None
    info = {"shards": len(shards), "rows": rows, "doc_ids_unique": True, "unreadable": unreadable,
            "seconds": round(time.perf_counter() - start, 3)}
    return {**completion.mark_complete(folder, key, info), "skipped": False}
