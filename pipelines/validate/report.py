"""What a validation found: counts per input, warnings and errors, and the summary lines it prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Failures of a check that are the user's to fix (a bad job key, file, row or field): reported, not raised.
USER_ERRORS = (ValueError, OSError)


@dataclass
class Report:
    """Counts of the checked inputs; ``errors`` and ``warnings`` are one-line messages."""

    job: str = ""
    model: str = ""
    shards: int = 0
    row_groups: int = 0
    rows: int = 0
    tokens: int | None = None  # None: the token scan did not run
    too_long_rows: int = 0
    too_long: str = "error"
    doc_ids_unique: bool | None = None
    queries: int | None = None
    raw_files: int | None = None
    raw_documents: int | None = None  # documents in the raw files, when every row passed the checks
    raw_ids_unique: bool | None = None  # no id in two raw files (checked when every file passed)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """The counts for the run record (errors and warnings included)."""
        return {k: v for k, v in self.__dict__.items() if k != "job"}

    def lines(self) -> list[str]:
        """The summary: one line per input, then each warning and error."""
        status = "ok" if self.ok else f"{_count(len(self.errors), 'error')}"
        out = [f"validate {self.job}: {status}, {_count(len(self.warnings), 'warning')} in {self.seconds:.1f} s"]
        if self.model:
            out.append(f"  model    {self.model}")
        if self.raw_files is not None:
            docs = ("" if self.raw_documents is None else f", {_count(self.raw_documents, 'document')}"
                    + ("; ids unique" if self.raw_ids_unique else ""))
            out.append(f"  raw      {_count(self.raw_files, 'file')}{docs}")
        if self.shards:
            corpus = f"  corpus   {_count(self.shards, 'shard')}, {_count(self.row_groups, 'row group')}, " \
                     f"{self.rows:,} rows"
            if self.tokens is not None:
                corpus += f", {self.tokens:,} tokens"
            if self.too_long_rows:
                corpus += f", {self.too_long_rows:,} longer than the context (data.too_long = {self.too_long!r})"
            if self.doc_ids_unique:
                corpus += "; doc_ids unique"
            out.append(corpus)
        if self.queries is not None:
            out.append(f"  queries  {self.queries}")
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"error: {e}" for e in self.errors]
        return out


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
