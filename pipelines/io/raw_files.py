"""Raw text files (``data.raw``) as `tokenize` reads them: JSON Lines, a JSON array, or Parquet.

A ``.jsonl`` or ``.json`` file holds one JSON object a line (JSON Lines), or,
when its first character is ``[``, one JSON array of objects (what
``json.dump(list_of_dicts)`` writes). Both are UTF-8; a leading byte order mark
and CRLF line ends are allowed. A ``.parquet`` file is read as it is. Every
error names the file and the line (or array item).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

HEAD_BYTES = 64 * 1024  # read to tell a JSON array from JSON Lines and to find the first line's keys


def array_rows(url: str, data: bytes) -> list[dict[str, Any]]:
    """The objects of a file that is one JSON array (``data`` without a byte order mark)."""
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{url}: not UTF-8 text (byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: a JSON array that does not parse: {err.msg} at line {err.lineno}, column "
                         f"{err.colno}") from err
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{url}: item {i} of the JSON array is not a JSON object ({type(row).__name__})")
    return rows


def _line_object(url: str, n: int, raw: bytes) -> dict[str, Any] | None:
    """Line ``n`` (0-based) of a JSON Lines file as an object; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{url}: line {n + 1} is not UTF-8 text (byte {err.start} of the line)") from err
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{url}: line {n + 1} is not JSON: {err}") from err
    if not isinstance(row, dict):
        raise ValueError(f"{url}: line {n + 1} is not a JSON object ({type(row).__name__}): one object a line, "
                         "or the whole file one JSON array of objects")
    return row


def _line_rows(url: str, data: bytes) -> list[dict[str, Any]]:
    return [row for n, raw in enumerate(data.splitlines()) if (row := _line_object(url, n, raw)) is not None]


def is_json_array(head: bytes) -> bool:
    """Whether a JSON file's first bytes open an array (else it is read as JSON Lines)."""
    return storage.without_bom(head).lstrip().startswith(b"[")


def read_raw(url: str) -> pa.Table:
    """The raw file as a table (JSON objects: one row each, columns by key)."""
    if url.endswith(".parquet"):
        return storage.read_parquet(url)
    data = storage.without_bom(storage.read_bytes(url))
    return pa.Table.from_pylist(array_rows(url, data) if is_json_array(data) else _line_rows(url, data))


def raw_columns(url: str) -> list[str]:
    """The columns of a raw file: a Parquet file's schema, the keys of a JSON Lines file's first row, or the
    keys of a JSON array's objects (the whole file is read)."""
    fs, path = storage.filesystem(url)
    if url.endswith(".parquet"):
        try:
            with fs.open(path, "rb") as f:
                return list(pq.read_schema(f).names)
        except pa.ArrowInvalid as err:
            raise ValueError(f"{url}: not a readable Parquet file ({err})") from err
    with fs.open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    if is_json_array(head):
        return read_raw(url).column_names
    lines = storage.without_bom(head).splitlines()
    for n, raw in enumerate(lines[:-1] if len(head) == HEAD_BYTES else lines):  # a cut last line is not judged
        row = _line_object(url, n, raw)
        if row is not None:
            return list(row)
    return read_raw(url).column_names if len(head) == HEAD_BYTES else []  # a first line longer than the head


def check_raw_columns(urls: list[str], text_column: str, id_column: str) -> None:
    """Every raw file has the text and id columns (ValueError naming the file and the key)."""
    for url in urls:
        columns = raw_columns(url)
        for key, col in (("data.text_column", text_column), ("data.id_column", id_column)):
            if col not in columns:
                raise ValueError(f"{url}: no column {col!r} ({key}); its columns: {columns}")


def document_ids(url: str, values: list[Any], field: str) -> list[str]:
    """The id column as strings; ValueError naming the file, row and field for a missing, empty or repeated id
    (a repeated id would give two sequences one doc_id, which every later stage refuses)."""
    first: dict[str, int] = {}
    ids = []
    for row, value in enumerate(values):
        if value is None or str(value) == "":
            what = "missing" if value is None else "empty"
            raise ValueError(f"{url}: row {row}, field {field!r}: the document id is {what}")
        doc = str(value)
        if doc in first:
            raise ValueError(f"{url}: row {row}, field {field!r}: id {doc!r} is also in row {first[doc]} "
                             "(document ids must be unique)")
        first[doc] = row
        ids.append(doc)
    return ids


def texts_and_ids(url: str, table: pa.Table, text_column: str, id_column: str) -> tuple[list[str], list[str]]:
    """A raw file's texts and document ids, checked: both columns there, every text a string, every id present,
    non-empty and unique in the file (ValueError naming the file, row and field)."""
    for col in (text_column, id_column):
        if col not in table.column_names:
            raise ValueError(f"{url}: column {col!r} is missing (columns: {table.column_names})")
    texts = table.column(text_column).to_pylist()
    ids = document_ids(url, table.column(id_column).to_pylist(), id_column)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"{url}: row {row}, field {text_column!r}: not a string ({text!r})")
    return texts, ids


def check_raw_files(urls: list[str], text_column: str, id_column: str,
                    ids_of: Callable[[str, list[str]], None] | None = None) -> int:
    """`validate`'s check of the raw files, file by file: the columns, then every row as `tokenize` reads it
    (``texts_and_ids``); returns the number of documents. ``ids_of(url, ids)`` receives each file's ids."""
    check_raw_columns(urls, text_column, id_column)
    documents = 0
    for url in urls:
        table = storage.read_parquet(url, [text_column, id_column]) if url.endswith(".parquet") else read_raw(url)
        ids = texts_and_ids(url, table, text_column, id_column)[1]
        documents += len(ids)
        if ids_of is not None:
            ids_of(url, ids)
    return documents
