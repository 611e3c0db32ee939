"""The tables of a run's output folder, and a DuckDB connection with a view on each.

Views (each over Parquet files of ``<output>``; a table the run did not write
has no view):

    topk          topk/query_id=*/part-0.parquet (hive): the merged top-k and bottom-k, with text
    scores        scores/*.parquet: every shard's own top-k and bottom-k (the candidates of the merge)
    token_scores  token_scores/query_id=*/ (hive): per-token contributions of the topk rows
    layer_scores  layer_scores/query_id=*/ (hive): per-layer scores of the topk rows
    queries       queries/queries.parquet: prompt, completion, measurement, truncation errors
    distribution  distribution/*.parquet: histograms of every scored sequence's score
    self_influence self_influence/*.parquet: g^T (G + lambda I)^-1 g of every scored sequence (when computed)
    index_health  index_health/index_health.parquet: how closely the index ranked each query's candidates (index mode)
    documents     the corpus shards (data.corpus of the run): doc_id, text (null without a text column), shard,
                  and the shards' other columns (metadata `tokenize` passed through: url, source, ...), not the
                  token lists

Object storage (``s3://`` ...) is read through the fsspec filesystem registered
with DuckDB (no ``httpfs`` extension, no network access of DuckDB's own).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from ..io import storage

log = logging.getLogger(__name__)
HIVE = ("topk", "token_scores", "layer_scores")
FLAT = {"scores": "scores/*.parquet", "queries": "queries/queries.parquet", "distribution": "distribution/*.parquet",
        "self_influence": "self_influence/*.parquet", "index_health": "index_health/*.parquet"}


@dataclass(frozen=True)
class Output:
    """A run's output folder: its URL, the corpus it scored and which tables exist."""

    url: str
    corpus: str | None
    tables: dict[str, str]  # view name -> read_parquet(...) expression

    @property
    def names(self) -> list[str]:
        return sorted(self.tables)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def resolve_output(path: str) -> str:
    """The output folder of a job file or an output folder (ValueError naming it when it is neither)."""
    if path.endswith(".toml"):
        from ..config import load_config

        return load_config(path).data.output
    if not storage.exists(storage.join(path, "resolved_config.json")) and not storage.exists(
            storage.join(path, "topk")):
        raise ValueError(f"{path}: not a run's output folder (no resolved_config.json, no topk/); give the job's "
                         "output folder (data.output) or its job file")
    return path.rstrip("/")


def open_output(path: str) -> Output:
    url = _absolute(resolve_output(path))
    config = storage.read_json(storage.join(url, "resolved_config.json")) or {}
    corpus = (config.get("data") or {}).get("corpus")
    corpus = _absolute(corpus) if corpus else None
    tables: dict[str, str] = {}
    for name in HIVE:
        if storage.list_files(storage.join(url, name), ".parquet"):
            tables[name] = (f"read_parquet({_quote(storage.join(url, name, '*', '*.parquet'))}, "
                            "hive_partitioning = true, hive_types = {'query_id': VARCHAR})")
    for name, rel in FLAT.items():
        if storage.list_files(storage.join(url, rel.split('/')[0]), ".parquet"):
            tables[name] = f"read_parquet({_quote(storage.join(url, rel))})"
    if corpus:
        shards = storage.list_files(corpus, ".parquet")
        if shards:
            tables["documents"] = _documents(shards)
    if "topk" not in tables:
        raise ValueError(f"{url}: no topk/ tables yet (run `influence merge` or `influence run` first)")
    return Output(url, corpus, tables)


def _schema_names(url: str) -> list[str] | None:
    """The column names of a shard, None when its footer does not read (not Parquet, truncated)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return None


def _documents(shards: list[str]) -> str:
    """The documents view's query: the shards' columns but the token lists, by name across shards
    (the columns are those of the first shard whose footer reads)."""
    names = next((n for n in map(_schema_names, shards) if n is not None), [])
    files = "[" + ", ".join(_quote(s) for s in shards) + "]"
    text = "text" if "text" in names else "CAST(NULL AS VARCHAR) AS text"
    left_out = ", ".join(["doc_id", "input_ids", "filename"] + [c for c in ("text", "loss_mask") if c in names])
    return (f"(SELECT doc_id, {text}, filename AS shard, * EXCLUDE ({left_out}) "
            f"FROM read_parquet({files}, filename = true, union_by_name = true))")


def _documents_of_readable_shards(con: Any, corpus: str) -> None:
    """The documents view over the shards whose footer reads (a run with on_error = "skip" may have left
    out unreadable ones); one warning names how many are left out and the first."""
    shards = storage.list_files(corpus, ".parquet")
    reads = {url: _schema_names(url) is not None for url in shards}
    readable = [url for url in shards if reads[url]]
    unreadable = [url for url in shards if not reads[url]]
    log.warning("documents: %d unreadable shard%s left out (first: %s)", len(unreadable),
                "" if len(unreadable) == 1 else "s", unreadable[0] if unreadable else "none")
    if readable:
        con.execute(f"CREATE VIEW documents AS SELECT * FROM {_documents(readable)}")


def _register_filesystems(con: Any, urls: list[str]) -> None:
    done = set()
    for url in urls:
        if storage.is_local(url):
            continue
        fs, _ = storage.filesystem(url)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol not in done:
            con.register_filesystem(fs)
            done.add(protocol)


def connect(out: Output, read_only: bool = True) -> Any:
    """An in-memory DuckDB connection with one view per table.

    ``read_only``: DuckDB may then open only files under the output folder and
    the corpus (``allowed_directories`` + ``enable_external_access = false``,
    configuration locked): no other file can be read or written.
    """
    import duckdb

    os.environ.setdefault("HOME", tempfile.gettempdir())  # DuckDB wants a home directory
    con = duckdb.connect(":memory:")
    roots = [out.url] + ([out.corpus] if out.corpus else [])
    _register_filesystems(con, roots)
    for name, expr in out.tables.items():
        cols = "query_id, * EXCLUDE (query_id)" if name in HIVE else "*"
        try:
            con.execute(f"CREATE VIEW {name} AS SELECT {cols} FROM {expr}")
        except duckdb.Error:
            if name != "documents":
                raise
            _documents_of_readable_shards(con, out.corpus)
    if read_only:
        from ..config.corpus_paths import corpus_root

        dirs = [_dir_of(out.url)] + ([_dir_of(corpus_root(out.corpus))] if out.corpus else [])
        con.execute(f"SET allowed_directories = [{', '.join(_quote(d) for d in dirs)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def _absolute(url: str) -> str:
    return os.path.abspath(storage.filesystem(url)[1]) if storage.is_local(url) else url


def _dir_of(url: str) -> str:
    if storage.is_local(url):
        return os.path.abspath(storage.filesystem(url)[1]).rstrip("/") + "/"
    return url.rstrip("/") + "/"
