"""The queries file: encoding, one JSON object a line (or Parquet), fields, duplicate ids, tokens.

Each query is ``query_id`` (letters, digits, ``-_.``) with either ``prompt`` and
``completion`` text or ``prompt_ids`` and ``completion_ids``. Errors are
``ValueError``s naming the file, the line (JSONL; the row for Parquet) and
the field. The leading-space trap of byte-level BPE tokenizers (GPT-2 style):
a completion that does not start with whitespace after a prompt that does not
end with it is tokenized as if glued to the prompt's last word (``"Chardet."``
and ``" Chardet."`` are different tokens), so it gets a warning showing both
tokenizations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..io import storage
from ..stages.build_queries import QUERY_ID


@dataclass
class QueriesCheck:
    queries: int = 0
    warnings: list[str] = field(default_factory=list)


def _rows(url: str) -> list[tuple[str, Any]]:
    """(where, row) pairs: ``line N`` of a JSONL file, ``row N`` of a Parquet file."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise ConfigError(f"data.queries = {url!r}: no such file") from err
    if url.endswith(".parquet"):
        return [(f"row {i}", r) for i, r in enumerate(storage.read_parquet(url).to_pylist())]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{url}: line {line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
                         "save the queries file as UTF-8") from err
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


def _ids(url: str, where: str, row: dict[str, Any], name: str) -> list[int]:
    value = row[name]
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{url}: {where}, field {name!r}: must be a list of token ids (integers)")
    return value


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def leading_space_warning(url: str, where: str, qid: str, prompt: str, completion: str, tokenizer: Any) -> str | None:
    """The warning for a completion glued to its prompt (byte-level BPE), showing both tokenizations."""
    if not prompt or not completion or prompt[-1].isspace() or completion[0].isspace():
        return None
    as_written = _tokens(tokenizer, completion)
    spaced = _tokens(tokenizer, " " + completion)
    if as_written == spaced:
        return None

    def shown(ids: list[int]) -> str:
        return f"{tokenizer.convert_ids_to_tokens(ids)} {ids}"

    return (f"{url}: {where} (query {qid!r}), field 'completion': {completion!r} does not start with a space and "
            f"the prompt does not end with one; this byte-level BPE tokenizer reads it as {shown(as_written)}, "
            f"while {' ' + completion!r} is {shown(spaced)}; add the leading space unless the completion "
            "continues the prompt's last word")


def check_queries(url: str, tokenizer: Any, vocab_size: int | None, context: int | None,
                  byte_level: bool = False) -> QueriesCheck:
    """Check every query; the first problem raises, the leading-space trap is a warning."""
    rows = _rows(url)
    if not rows:
        raise ValueError(f"{url}: no queries")
    out = QueriesCheck()
    first_seen: dict[str, str] = {}
    for where, row in rows:
        qid = row.get("query_id")
        if not isinstance(qid, str) or not QUERY_ID.match(qid):
            raise ValueError(f"{url}: {where}, field 'query_id': {qid!r} must be a string of letters, digits, '-_.'")
        if qid in first_seen:
            raise ValueError(f"{url}: {where}, field 'query_id': duplicate {qid!r} (first at {first_seen[qid]})")
        first_seen[qid] = where
        if row.get("prompt_ids") is not None or row.get("completion_ids") is not None:
            for name in ("prompt_ids", "completion_ids"):
                if row.get(name) is None:
                    raise ValueError(f"{url}: {where}, field {name!r}: missing (give both prompt_ids and "
                                     "completion_ids, or prompt and completion text)")
            prompt, completion = _ids(url, where, row, "prompt_ids"), _ids(url, where, row, "completion_ids")
        else:
            for name in ("prompt", "completion"):
                if not isinstance(row.get(name), str):
                    raise ValueError(f"{url}: {where}, field {name!r}: missing or not a string (give prompt and "
                                     "completion text, or prompt_ids and completion_ids)")
            if tokenizer is None:
                raise ConfigError(f"{url}: {where}: text queries need the model's tokenizer (model.tokenizer)")
            prompt, completion = _tokens(tokenizer, row["prompt"]), _tokens(tokenizer, row["completion"])
            if byte_level:
                warning = leading_space_warning(url, where, qid, row["prompt"], row["completion"], tokenizer)
                if warning:
                    out.warnings.append(warning)
        if not completion:
            raise ValueError(f"{url}: {where}, field 'completion': no tokens")
        bad = [t for t in prompt + completion if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"{url}: {where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if context is not None and len(completion) > context:
            raise ValueError(f"{url}: {where}, field 'completion': {len(completion)} tokens, the model takes {context}")
        out.queries += 1
    return out


def has_text(url: str) -> bool:
    """Whether any query gives text (so the tokenizer is needed); False when the file cannot be read."""
    try:
        return any(row.get("prompt_ids") is None for _, row in _rows(url))
    except (ValueError, OSError):  # reported by check_queries
        return False
