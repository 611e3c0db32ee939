"""`tokenize`: raw text (JSONL or Parquet with a text and an id column) -> training shards.

One output shard per input file (``<corpus folder>/<input stem>.parquet``; when
``data.corpus`` is a glob, it must match those names), written by
Ray Data tasks in parallel over the files, with the model's Hugging Face
tokenizer (special tokens as the tokenizer adds them). A document longer than
the model's context is cut into chunks of at most ``max_length`` tokens
(``model.max_length``, else the model's context); chunk c of document ``id``
gets ``doc_id = "<id>:<c>"``, and ``text`` holds the chunk's own characters
(from the tokenizer's offsets). Chunks of fewer than 2 tokens are dropped
(nothing in them can be predicted). Other input columns are passed through.
Shards are written in row groups of ``data.row_group_rows`` rows: the score
stage's units of work are ranges of row groups (``stages/score_plan.py``), so a
large shard spreads over many actors. The row-group size is not part of a
shard's key (changing it rewrites no finished shard).
A file that fails (unreadable, a missing column, a row that is not text, a
missing or repeated id, storage errors after retries) follows the job's ``on_error``
(``runtime/failures.py``): "fail" stops with one line naming the file, "skip"
writes no shard for it and reports it. A shard counts as done only when its
footer reads and carries the current key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import JobConfig, ModelConfig
from ..io import completion, storage
from ..io.model_loading import load_tokenizer
from ..io.model_source import model_source
from ..io.raw_files import check_raw_columns, read_raw, texts_and_ids
from ..config.corpus_paths import corpus_root
from ..io.shards import raw_inputs
from ..io.unknown_tokens import WARN_SHARE, count_unknown, unknown_token_id
from ..runtime.failures import FailureLog, guard
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, units_of

log = logging.getLogger(__name__)

MIN_TOKENS = 2


def chunk_document(text: str, encoding: Any, max_length: int) -> list[tuple[list[int], str]]:
    """(token ids, chunk text) for each chunk of at most ``max_length`` tokens."""
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    chunks = []
    for lo in range(0, len(ids), max_length):
        part = ids[lo:lo + max_length]
        if len(part) < MIN_TOKENS:
            continue
        spans = [o for o in offsets[lo:lo + max_length] if o[1] > o[0]]
        chunk_text = text[spans[0][0]:spans[-1][1]] if spans else ""
        chunks.append((part, chunk_text))
    return chunks


class Tokenizer:
    """Ray Data callable: ``{"unit": [JSON {input, output}]}`` -> one summary row per file."""

    def __init__(self, model: ModelConfig, max_length: int, text_column: str, id_column: str,
                 row_group_rows: int | None = None) -> None:
        self.tokenizer = load_tokenizer(model)
        self.unk = unknown_token_id(self.tokenizer)
        self.max_length, self.text_column, self.id_column = max_length, text_column, id_column
        self.row_group_rows = row_group_rows

    def tokenize_file(self, url: str) -> pa.Table:
        table = read_raw(url)
        texts, ids = texts_and_ids(url, table, self.text_column, self.id_column)
        enc = self.tokenizer(texts, return_offsets_mapping=True, truncation=False, verbose=False)
        extra = [c for c in table.column_names if c not in (self.text_column, self.id_column)]
        out: dict[str, list] = {"doc_id": [], "input_ids": [], "text": [], **{c: [] for c in extra}}
        extra_values = {c: table.column(c).to_pylist() for c in extra}
        for row, text in enumerate(texts):
            encoding = {"input_ids": enc["input_ids"][row], "offset_mapping": enc["offset_mapping"][row]}
            for c, (part, chunk_text) in enumerate(chunk_document(text, encoding, self.max_length)):
                out["doc_id"].append(f"{ids[row]}:{c}")
                out["input_ids"].append(part)
                out["text"].append(chunk_text)
                for col in extra:
                    out[col].append(extra_values[col][row])
        schema = pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("text", pa.string())]
                           + [table.schema.field(c) for c in extra])
        return pa.table(out, schema=schema)

    def tokenize_unit(self, unit: dict[str, str]) -> tuple[int, int, int]:
        """Tokenize one file and write its shard; returns (sequences, tokens, unknown tokens)."""
        table = self.tokenize_file(unit["input"])
        storage.write_parquet(unit["output"], table.replace_schema_metadata({"influence.key": unit["key"]}),
                              self.row_group_rows)
        ids = table.column("input_ids").to_pylist()
        return table.num_rows, int(sum(len(x) for x in ids)), sum(count_unknown(x, self.unk) for x in ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, sequences, tokens, unknown, errors = [], [], [], [], []
        for unit in units_of(batch):
            done, failure = guard(unit["input"], self.tokenize_unit, unit)
            names.append(unit["output"])
            sequences.append(done[0] if done else 0)
            tokens.append(done[1] if done else 0)
            unknown.append(done[2] if done else 0)
            errors.append(failure["error"] if failure else "")
        return {"output": np.asarray(names, dtype=object), "sequences": np.asarray(sequences),
                "tokens": np.asarray(tokens), "unknown_tokens": np.asarray(unknown),
                "error": np.asarray(errors, dtype=object)}


def context_length(model: ModelConfig) -> int:
    """model.max_length, else the context of the model's config (read without loading weights)."""
    if model.max_length is not None:
        return model.max_length
    if model.path is not None:
        cfg = json.loads(storage.read_bytes(storage.join(model_source(model.path), "config.json")))
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            if cfg.get(key):
                return int(cfg[key])
    raise ValueError("model.max_length is not set and the model's context is unknown")


def warn_unknown(unknown: int, tokens: int, cfg: JobConfig) -> None:
    """One warning line when more than ``WARN_SHARE`` of the tokens just made are the unknown token."""
    if tokens and unknown > WARN_SHARE * tokens:
        where = cfg.model.tokenizer_path or cfg.model.path
        log.warning("tokenize: %d of %d corpus tokens (%.0f%%) are the tokenizer's unknown token: the text may not "
                    "match the model's tokenizer (%s); documents that differ only in unknown words score alike",
                    unknown, tokens, 100 * unknown / tokens, where)


def tokenize(cfg: JobConfig, show_progress: bool = False) -> dict[str, Any]:
    """Tokenize every raw file whose shard is missing or stale; returns counts."""
    if cfg.data.raw is None:
        raise ValueError("data.raw is not set: nothing to tokenize")
    start = time.perf_counter()
    inputs, stems = raw_inputs(cfg.data.raw, cfg.data.corpus)
    max_length = context_length(cfg.model)
    tokenizer_id = storage.folder_identity(model_source(cfg.model.tokenizer_path)) if cfg.model.tokenizer_path else ""
    root = corpus_root(cfg.data.corpus)
    units = []
    for url, stem, (_, size) in zip(inputs, stems, completion.shard_fingerprints(inputs)):
        key = completion.inputs_key("tokenize", url, size, max_length, tokenizer_id, cfg.data.text_column,
                                    cfg.data.id_column)
        out = storage.join(root, f"{stem}.parquet")
        meta = storage.footer_metadata(out)
        if meta is not None and "influence.key" not in meta:
            raise ValueError(f"data.corpus: {out} was not written by `tokenize`, which would replace it with the "
                             f"shard of {url}: move or rename one of them")
        if (meta or {}).get("influence.key") != key:
            units.append({"input": url, "output": out, "key": key})
    summary: dict[str, Any] = {"files": len(inputs), "skipped": len(inputs) - len(units), "failed": 0,
                               "sequences": 0, "tokens": 0, "unknown_tokens": 0}
    failures = FailureLog("tokenize", cfg.on_error)
    by_output = {u["output"]: u["input"] for u in units}
    if units:
        if cfg.on_error != "skip":  # with "skip" a file without the columns is skipped and recorded by its unit
            check_raw_columns([u["input"] for u in units], cfg.data.text_column, cfg.data.id_column)
        cluster = ensure_ray(cfg.resources)
        args = {"model": cfg.model, "max_length": max_length, "text_column": cfg.data.text_column,
                "id_column": cfg.data.id_column, "row_group_rows": cfg.data.row_group_rows}
        with bar(len(units), "tokenize (files)", show_progress) as progress:
            for row in run_units(Tokenizer, args, units, cfg.resources, cluster, progress):
                if row["error"]:
                    failures.add(by_output[row["output"]], row["error"])
                    summary["failed"] += 1
                summary["sequences"] += int(row["sequences"])
                summary["tokens"] += int(row["tokens"])
                summary["unknown_tokens"] += int(row["unknown_tokens"])
    warn_unknown(summary["unknown_tokens"], summary["tokens"], cfg)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["errors"] = failures.rows
    return summary
