"""What a stage does with a unit of work that fails: the job's ``on_error`` policy and the ``errors/`` table.

Actors never let a unit's exception escape: ``guard`` turns it into one line
naming the file (``"<file>: <problem>"``) and the unit's result row carries it
(transient object-storage errors are retried first, ``storage.retry``). The
driver hands every failed row to a ``FailureLog``:

- ``on_error = "fail"`` (default): the first failure raises ``StageFailed`` with
  that line (the run stops; the record and the CLI show the line);
- ``on_error = "skip"``: the failure is kept (stage, file, rows, doc_id, error),
  the stage goes on without that unit, and the run writes the failures to
  ``<output>/errors/<run_id>.parquet`` (``ERRORS_SCHEMA``) and counts them in
  its record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")

ERRORS_SCHEMA = pa.schema([("stage", pa.string()), ("file", pa.string()), ("rows", pa.string()),
                           ("doc_id", pa.string()), ("error", pa.string()), ("run_id", pa.string())])


class StageFailed(RuntimeError):
    """A stage stopped at a failed unit, or finished with failures it cannot skip; one line names the file."""


def one_line(file: str, err: BaseException) -> str:
    """``"<file>: <problem>"`` from an exception (first line of its message; the file once)."""
    text = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
    if not isinstance(err, (ValueError, OSError)) and type(err).__name__ not in text:
        text = f"{type(err).__name__}: {text}"
    return text if file in text else f"{file}: {text}"


def guard(file: str, work: Callable[..., T], *args: Any) -> tuple[T | None, dict[str, Any] | None]:
    """``(work(*args), None)``, or ``(None, failure)`` when it raises an Exception.

    ``failure``: ``error`` (one line naming ``file``), ``rows`` (the row the error names, else
    "all") and ``doc_id`` (when known). A remote ``file`` whose unit hit a transient storage
    error is tried again first (``storage.retry``).
    """
    from ..io import storage

    try:
        return storage.retry(file, "unit of work", work, *args), None
    except Exception as err:  # any failure of one unit is that unit's; the policy is the driver's
        log.debug("unit failed: %s", file, exc_info=True)
        row = getattr(err, "row", None)
        return None, {"error": one_line(file, err), "rows": "all" if row is None else str(row),
                      "doc_id": getattr(err, "doc_id", None)}


def row_range(rows: list[int] | tuple[int, ...] | None) -> str:
    """``"all"``, ``"12"`` or ``"12-40"`` (first-last of a unit's rows)."""
    if not rows:
        return "all"
    lo, hi = min(rows), max(rows)
    return str(lo) if lo == hi else f"{lo}-{hi}"


class FailureLog:
    """Failed units of one stage under the job's policy (``"fail"`` raises at the first one)."""

    def __init__(self, stage: str, policy: str) -> None:
        self.stage, self.policy = stage, policy
        self.rows: list[dict[str, Any]] = []

    def add(self, file: str, error: str, rows: str = "all", doc_id: str | None = None) -> None:
        if self.policy != "skip":
            raise StageFailed(error)
        log.warning("%s: skipped (on_error = 'skip'): %s", self.stage, error)
        self.rows.append({"stage": self.stage, "file": file, "rows": rows, "doc_id": doc_id, "error": error})

    def __len__(self) -> int:
        return len(self.rows)

    def first(self) -> str | None:
        return self.rows[0]["error"] if self.rows else None


def errors_table(failures: list[dict[str, Any]], run_id: str) -> pa.Table:
    """The ``errors/`` rows of a run (ERRORS_SCHEMA)."""
    return pa.Table.from_pylist([{**f, "run_id": run_id} for f in failures], schema=ERRORS_SCHEMA)
