"""``influence ddl OUTPUT --engine trino|spark|athena``: CREATE TABLE statements over a run's tables.

Columns and types come from each table's Parquet schema (one file is read),
so the DDL always matches what was written. The hive-partitioned tables
(topk, token_scores, layer_scores) get ``query_id`` as their partition
column; a statement that loads the partitions follows each of them.

Type mapping: string -> VARCHAR (Trino) / STRING (Spark) / string (Athena);
int8/int32/int64 -> TINYINT/INTEGER/BIGINT; float64 -> DOUBLE; list<T> ->
ARRAY(T) (Trino) / ARRAY<T> (Spark, Athena).

``documents`` is the corpus (``data.corpus`` of the run) as a table, so that
results join to the shards' columns (doc_id, text, token lists and the metadata
`tokenize` passed through) by doc_id: its columns are those of the first shard
whose footer reads, less any whose type has no mapping (named in a comment). A
table's location is a folder, so a corpus given as a glob or a single file gets
a comment instead.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

import click
import pyarrow as pa
import pyarrow.parquet as pq

from ..config.corpus_paths import corpus_is_folder
from ..io import storage
from .tables import HIVE, resolve_output


class Engine(str, enum.Enum):
    TRINO = "trino"
    SPARK = "spark"
    ATHENA = "athena"


# (folder, file glob suffix); queries/ also holds the safetensors of the preconditioned queries
TABLES = {"topk": "topk", "scores": "scores", "token_scores": "token_scores", "layer_scores": "layer_scores",
          "distribution": "distribution", "queries": "queries", "self_influence": "self_influence",
          "index_health": "index_health"}


@dataclass(frozen=True)
class TableSchema:
    name: str
    location: str  # folder (or, for queries on Spark, the file)
    columns: list[tuple[str, pa.DataType]]  # without the partition column
    partitioned: bool
    optional_columns: bool = False  # documents: a column whose type has no mapping is left out, not an error


def column_type(t: pa.DataType, engine: Engine, where: str) -> str:
    """The engine's SQL type for an Arrow type (ValueError naming the column for a type with no mapping)."""
    upper = engine is not Engine.ATHENA
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = column_type(t.value_type, engine, where)
        return f"ARRAY({inner})" if engine is Engine.TRINO else (f"ARRAY<{inner}>" if upper else f"array<{inner}>")
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        name = {Engine.TRINO: "VARCHAR", Engine.SPARK: "STRING", Engine.ATHENA: "string"}[engine]
        return name
    simple = {pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER" if engine is Engine.TRINO else "INT",
              pa.int64(): "BIGINT", pa.float32(): "REAL" if engine is Engine.TRINO else "FLOAT",
              pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}
    if t in simple:
        return simple[t] if upper else simple[t].lower()
    raise ValueError(f"{where}: type {t} has no {engine.value} mapping")


def table_schemas(output: str) -> list[TableSchema]:
    """The tables present in ``output`` with their Parquet schemas."""
    out = []
    for name, folder in TABLES.items():
        url = storage.join(output, folder)
        files = [f for f in storage.list_files(url, ".parquet")]
        if name == "queries":
            files = [f for f in files if f.endswith("/queries.parquet")]
        if not files:
            continue
        fs, path = storage.filesystem(files[0])
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
        partitioned = name in HIVE
        cols = [(field.name, field.type) for field in schema if not (partitioned and field.name == "query_id")]
        out.append(TableSchema(name, url, cols, partitioned))
    return out


def documents_schema(output: str) -> TableSchema | str | None:
    """The corpus shards as the ``documents`` table; a comment when the corpus is a glob or a single file
    (a table's location is a folder); None when the run records no corpus or it holds no readable shard."""
    config = storage.read_json(storage.join(output, "resolved_config.json")) or {}
    corpus = (config.get("data") or {}).get("corpus")
    if not corpus:
        return None
    if not corpus_is_folder(corpus):
        return (f"-- documents: data.corpus = {_q(corpus)} is a glob or a single file, and a table's location is a "
                "folder: with the shards in a folder of their own (data.corpus = that folder) this is a table")
    for shard in storage.list_files(corpus, ".parquet"):
        fs, path = storage.filesystem(shard)
        try:
            with fs.open(path, "rb") as f:
                schema = pq.read_schema(f)
        except (OSError, ValueError):  # unreadable (a run with on_error = "skip" went past it): try the next
            continue
        return TableSchema("documents", corpus.rstrip("/"), [(fd.name, fd.type) for fd in schema], False,
                           optional_columns=True)
    return None


def _location(url: str, engine: Engine) -> str:
    if storage.is_local(url):
        path = os.path.abspath(storage.filesystem(url)[1])
        return "file://" + path if engine is Engine.SPARK else "file://" + path
    return url


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def create_statements(output: str, engine: Engine, schema_name: str = "influence") -> list[str]:
    """The statements, one string each (no trailing ';')."""
    statements = []
    documents = documents_schema(output)
    if isinstance(documents, str):
        statements.append(documents)
    for t in table_schemas(output) + ([documents] if isinstance(documents, TableSchema) else []):
        where = f"{t.location} ({t.name})"
        cols, left_out = [], []
        for n, ty in t.columns:
            try:
                cols.append((n, column_type(ty, engine, f"{where}, column {n!r}")))
            except ValueError:
                if not t.optional_columns:
                    raise
                left_out.append(f"{n} ({ty})")
        if left_out:
            statements.append(f"-- {t.name}: left out, no {engine.value} type for: {', '.join(left_out)}")
        loc = _location(t.location, engine)
        if engine is Engine.TRINO:
            if t.name == "queries":
                statements.append(f"-- queries: {loc}/ also holds queries.safetensors and queries.json; copy "
                                  "queries.parquet into a folder of its own to read it with Trino")
                continue
            all_cols = cols + ([("query_id", "VARCHAR")] if t.partitioned else [])
            body = ",\n  ".join(f"{n} {ty}" for n, ty in all_cols)
            props = [f"external_location = {_q(loc)}", "format = 'PARQUET'"]
            if t.partitioned:
                props.append("partitioned_by = ARRAY['query_id']")
            statements.append(f"CREATE TABLE {schema_name}.{t.name} (\n  {body}\n)\nWITH (" + ", ".join(props) + ")")
            if t.partitioned:
                statements.append(f"CALL system.sync_partition_metadata({_q(schema_name)}, {_q(t.name)}, 'ADD')")
        elif engine is Engine.SPARK:
            all_cols = cols + ([("query_id", "STRING")] if t.partitioned else [])
            body = ",\n  ".join(f"{n} {ty}" for n, ty in all_cols)
            part = "\nPARTITIONED BY (query_id)" if t.partitioned else ""
            if t.name == "queries":
                loc = f"{loc}/queries.parquet"
            statements.append(f"CREATE TABLE {t.name} (\n  {body}\n)\nUSING PARQUET{part}\nLOCATION {_q(loc)}")
            if t.partitioned:
                statements.append(f"MSCK REPAIR TABLE {t.name}")
        else:
            if t.name == "queries":
                statements.append(f"-- queries: {loc}/ also holds queries.safetensors and queries.json; copy "
                                  "queries.parquet into a folder of its own to read it with Athena")
                continue
            body = ",\n  ".join(f"`{n}` {ty}" for n, ty in cols)
            part = "\nPARTITIONED BY (`query_id` string)" if t.partitioned else ""
            statements.append(f"CREATE EXTERNAL TABLE {t.name} (\n  {body}\n){part}\nSTORED AS PARQUET\n"
                              f"LOCATION {_q(loc.rstrip('/') + '/')}")
            if t.partitioned:
                statements.append(f"MSCK REPAIR TABLE {t.name}")
    return statements


@click.command(name="ddl")
@click.argument("output")
@click.option("--engine", type=click.Choice([e.value for e in Engine]), required=True, help="SQL dialect.")
@click.option("--schema", "schema_name", default="influence", show_default=True, help="Trino schema of the tables.")
def ddl_command(output: str, engine: str, schema_name: str) -> None:
    """CREATE TABLE statements for a run's Parquet tables and its corpus (documents), over their location
    (Trino, Spark SQL or Athena). OUTPUT is the job's output folder (local or s3://) or its job file."""
    try:
        statements = create_statements(resolve_output(output), Engine(engine), schema_name)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    for s in statements:
        click.echo(s if s.startswith("--") else s + ";")
        click.echo("")
