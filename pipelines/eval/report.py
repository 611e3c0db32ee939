"""Results tables of the eval suites: Parquet + Markdown, each with the machine, versions and command."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def environment() -> dict[str, str]:
    """Machine and versions, as strings."""
    import torch

    from influence_ops import __version__

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - transformers is a dependency of the suites
        tf_version = "absent"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs",
        "load_average_1_5_15": " ".join(f"{x:.2f}" for x in load),
        "torch_threads": str(torch.get_num_threads()),
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": tf_version,
        "influence": __version__,
    }


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table(out: str | Path, suite: str, rows: Sequence[dict[str, Any]], command: str, notes: str,
                started: float, env: dict[str, str] | None = None,
                sections: Sequence[tuple[str, str, Sequence[dict[str, Any]]]] = ()) -> tuple[Path, Path]:
    """Write ``<out>/<suite>.parquet`` (rows, with the environment in the schema metadata) and ``<suite>.md``.

    ``sections``: further tables as (name, notes, rows), each written to ``<suite>_<name>.parquet``
    and appended to ``<suite>.md`` after the main table, under its notes.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**(env or environment()), "command": command, "seconds": f"{time.perf_counter() - started:.1f}"}
    meta = {k.encode(): v.encode() for k, v in env.items()}

    def parquet_of(name: str, table_rows: Sequence[dict[str, Any]]) -> Path:
        path = out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(list(table_rows)).replace_schema_metadata(meta), path)
        return path

    parquet = parquet_of(suite, rows)
    head = [f"# influence eval {suite}", "", notes.strip(), "", markdown_table(rows, list(rows[0]) if rows else []),
            ""]
    for name, section_notes, section_rows in sections:
        parquet_of(f"{suite}_{name}", section_rows)
        head += [section_notes.strip(), "", markdown_table(section_rows, list(section_rows[0]) if section_rows else []),
                 ""]
    head += ["| run | |", "|---|---|"] + [f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |"
                                         for k, v in env.items()]
    md = out / f"{suite}.md"
    md.write_text("\n".join(head) + "\n")
    return parquet, md


class Progress:
    """Numbered progress lines: ``[i/n] what ... seconds``."""

    def __init__(self, total: int, echo: Callable[[str], Any]) -> None:
        self.total, self.done, self.echo = total, 0, echo

    def step(self, what: str, started: float) -> None:
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {what} ({time.perf_counter() - started:.1f} s)")
