"""Checks of a job's inputs before anything runs: ``influence validate`` and every stage's preflight.

One concept a file: ``job`` (the job file), ``model`` (the model folder),
``shards`` (footers, schemas, rows), ``doc_ids`` (corpus-wide uniqueness),
``queries`` (the queries file), ``report`` (what was found), ``preflight``
(the checks put together), ``command`` (the CLI command).
"""

from .preflight import preflight, preflight_corpus, validate
from .report import Report

__all__ = ["Report", "preflight", "preflight_corpus", "validate"]
