"""The queries file, read and checked row by row: one reader for `validate` and `build-queries`.

Each query is ``query_id`` (letters, digits, ``-_.``; it becomes a hive
partition value) with either ``prompt`` and ``completion`` text or
``prompt_ids`` and ``completion_ids``. The file is JSONL (one object a line,
UTF-8), one JSON array of objects, or Parquet. Errors are ``ValueError``s naming
the file, the place (``line N`` of a JSONL file, ``item N`` of a JSON array,
``row N`` of a Parquet file) and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from . import storage
from .raw_files import array_rows, is_json_array

QUERY_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class QueryRow:
    """One checked query: where it is in the file, the raw row, its id and token ids."""

    where: str
    row: dict[str, Any]
    query_id: str
    prompt_ids: list[int]
    completion_ids: list[int]

    def prompt_cut(self, context: int | None) -> int:
        """How many of the prompt's first tokens do not fit the model's ``context`` with the completion."""
        return 0 if context is None else max(0, len(self.prompt_ids) + len(self.completion_ids) - context)


def query_rows(url: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs: ``line N`` of a JSONL file, ``item N`` of a JSON array, ``row N`` of a Parquet file."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise ConfigError(f"data.queries '{url}' does not exist") from err
    if url.endswith(".parquet"):
        return [(f"row {i}", r) for i, r in enumerate(storage.read_parquet(url).to_pylist())]
    try:
        data = storage.without_bom(data)
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{url}: line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "save the queries file as UTF-8") from err
    if is_json_array(data):
        return [(f"item {i}", row) for i, row in enumerate(array_rows(url, data))]
    rows = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{url}: line {n}: not JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{url}: line {n}: a JSON object is expected, got {type(row).__name__}")
        rows.append((f"line {n}", row))
    return rows


def text_tokens(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized on its own, without special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _ids(url: str, where: str, row: dict[str, Any], name: str) -> list[int]:
    value = row[name]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{url}: {where}, field {name!r}: must be a list of token ids (integers)")
    return value


def _tokens(url: str, where: str, row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    if row.get("prompt_ids") is not None or row.get("completion_ids") is not None:
        for name in ("prompt_ids", "completion_ids"):
            if row.get(name) is None:
                raise ValueError(f"{url}: {where}, field {name!r}: missing (give both prompt_ids and "
                                 "completion_ids, or prompt and completion text)")
        return _ids(url, where, row, "prompt_ids"), _ids(url, where, row, "completion_ids")
    for name in ("prompt", "completion"):
        if not isinstance(row.get(name), str):
            raise ValueError(f"{url}: {where}, field {name!r}: missing or not a string (give prompt and "
                             "completion text, or prompt_ids and completion_ids)")
    if tokenizer is None:
        raise ConfigError(f"{url}: {where}: text queries need the model's tokenizer (model.tokenizer)")
    return text_tokens(tokenizer, row["prompt"]), text_tokens(tokenizer, row["completion"])


def read_queries(url: str, tokenizer: Any, vocab_size: int | None, context: int | None) -> Iterator[QueryRow]:
    """Every query of the file, checked: id, no duplicate, fields, tokens in the vocabulary, a completion
    that fits the context. The first problem raises; the file must hold at least one query."""
    rows = query_rows(url)
    if not rows:
        raise ValueError(f"{url}: no queries")
    first_seen: dict[str, str] = {}
    for where, row in rows:
        qid = row.get("query_id")
        if not isinstance(qid, str) or not QUERY_ID.match(qid):
            raise ValueError(f"{url}: {where}, field 'query_id': {qid!r} must be a string of letters, digits, '-_.'")
        if qid in first_seen:
            raise ValueError(f"{url}: {where}, field 'query_id': duplicate {qid!r} (first at {first_seen[qid]})")
        first_seen[qid] = where
        prompt, completion = _tokens(url, where, row, tokenizer)
        if not completion:
            raise ValueError(f"{url}: {where}, field 'completion': no tokens")
        suffix = "_ids" if row.get("prompt_ids") is not None else ""
        if not prompt and len(completion) < 2:
            raise ValueError(f"{url}: {where}, field 'prompt{suffix}': no tokens, and a completion of one token "
                             "needs a prompt before it (its first token is predicted from the prompt)")
        for name, ids in (("prompt", prompt), ("completion", completion)):
            bad = [(i, t) for i, t in enumerate(ids) if t < 0 or (vocab_size is not None and t >= vocab_size)]
            if bad:
                raise ValueError(f"{url}: {where}, field '{name}{suffix}': token id {bad[0][1]} (position "
                                 f"{bad[0][0]}) is outside the vocabulary [0, {vocab_size})")
        if context is not None and len(completion) > context:
            raise ValueError(f"{url}: {where}, field 'completion': {len(completion)} tokens, the model takes {context}")
        yield QueryRow(where, row, qid, [int(t) for t in prompt], [int(t) for t in completion])


def has_text(url: str) -> bool:
    """Whether any query gives text (so the tokenizer is needed); False when the file cannot be read."""
    try:
        return any(row.get("prompt_ids") is None for _, row in query_rows(url))
    except (ValueError, OSError):  # reported by the checks
        return False
