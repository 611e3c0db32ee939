"""``influence sql OUTPUT [QUERY]``: read-only SQL (DuckDB) over a run's tables, printed as a table.

Without a query it reads statements from the terminal (each ends with ``;``;
``.tables`` lists the views, ``.schema NAME`` describes one, ``.quit`` or
end of input leaves). The views are those of ``results.tables``.

Read-only twice over: a statement is run only when it is a single SELECT
(``WITH``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` and ``EXPLAIN``
included); COPY, ATTACH, INSTALL/LOAD, CREATE, INSERT, SET, PRAGMA and a
second statement after ``;`` are refused before DuckDB runs anything; and the
connection itself may open only files under the output folder and the corpus,
with its configuration locked.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from .tables import Output, connect, open_output

ALLOWED = ("SELECT", "EXPLAIN")


class RefusedStatement(click.ClickException):
    """A statement that is not a single read-only query."""


def check_read_only(con: Any, sql: str) -> str:
    """The one statement of ``sql`` when it only reads; RefusedStatement naming what it is otherwise."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as err:
        raise click.ClickException(f"SQL does not parse: {err}") from err
    if not statements:
        raise RefusedStatement("no SQL statement given")
    if len(statements) > 1:
        raise RefusedStatement(f"{len(statements)} statements given (the second: {statements[1].query.strip()!r}); "
                               "influence sql runs one read-only SELECT at a time")
    kind = statements[0].type.name
    if kind not in ALLOWED:
        raise RefusedStatement(f"refused: a {kind} statement ({sql.strip()[:60]!r}); influence sql is read-only: "
                               "only SELECT (WITH, DESCRIBE, SHOW, SUMMARIZE) and EXPLAIN are run")
    return statements[0].query


def run_query(con: Any, sql: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of a read-only query; click errors name the problem."""
    import duckdb

    query = check_read_only(con, sql)
    try:
        cur = con.execute(query)
    except duckdb.Error as err:
        raise click.ClickException(f"query failed: {_failure(con, err)}") from err
    return [d[0] for d in cur.description], cur.fetchall()


def _failure(con: Any, err: Exception) -> str:
    """DuckDB's message and its hint line ("Candidate bindings: ..."), without the echoed SQL; for a name that
    is not a view, the views there are (DuckDB's own guess may be one of its system tables)."""
    import duckdb

    message, *hints = str(err).split("\n\n")[0].splitlines()
    if isinstance(err, duckdb.CatalogException):
        views = [row[0] for row in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name").fetchall()]
        hints = [f"the views: {', '.join(views)}"]
    return "; ".join([message, *(h.strip() for h in hints if h.strip())])


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = str(value)
    text = " ".join(text.split())  # one line per row
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(columns: Sequence[str], rows: Sequence[tuple], max_width: int = 60) -> str:
    """An aligned text table; cells are cut to ``max_width`` characters (numbers are right-aligned)."""
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def format_rows(columns: Sequence[str], rows: Sequence[tuple], fmt: str, max_width: int) -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "jsonl":
        return "\n".join(json.dumps(dict(zip(columns, r)), default=str) for r in rows)
    return format_table(columns, rows, max_width)


def describe(con: Any, out: Output) -> str:
    lines = []
    for name in out.names:
        cols = con.execute(f"DESCRIBE {name}").fetchall()
        lines.append(f"{name}: " + ", ".join(f"{c[0]} {c[1]}" for c in cols))
    return "\n".join(lines)


def interactive(con: Any, out: Output, fmt: str, max_width: int, echo: Any = click.echo) -> None:
    """Read statements ending with ';' until .quit or end of input; errors are printed, the session goes on."""
    echo(f"influence sql on {out.url}: views {', '.join(out.names)}")
    echo("end each statement with ';'. .tables lists the views and their columns, .quit leaves.")
    buffer = ""
    while True:
        try:
            line = input("sql> " if not buffer else "...> ")
        except EOFError:
            break
        stripped = line.strip()
        if not buffer and stripped in (".quit", ".exit", "\\q"):
            break
        if not buffer and stripped in (".tables", ".schema"):
            echo(describe(con, out))
            continue
        buffer += line + "\n"
        if not stripped.endswith(";"):
            continue
        sql, buffer = buffer, ""
        try:
            columns, rows = run_query(con, sql)
            echo(format_rows(columns, rows, fmt, max_width))
        except click.ClickException as err:
            echo(f"error: {err.message}", err=True)


@click.command(name="sql")
@click.argument("output")
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table", show_default=True,
              help="How rows are printed.")
@click.option("--max-width", default=60, show_default=True, help="Longest cell shown in table format.")
def sql_command(output: str, query: str | None, fmt: str, max_width: int) -> None:
    """Read-only SQL over a run's tables (views: topk, scores, token_scores, layer_scores, queries,
    distribution, self_influence, documents). OUTPUT is the job's output folder (local or s3://) or its job file.
    Without QUERY, an interactive session reads statements from the terminal."""
    try:
        out = open_output(output)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    con = connect(out)
    if query is None:
        interactive(con, out, fmt, max_width)
        return
    columns, rows = run_query(con, query)
    click.echo(format_rows(columns, rows, fmt, max_width))
    sys.stdout.flush()
