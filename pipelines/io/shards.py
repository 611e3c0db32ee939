"""Training shards: reading and checking the contract (DESIGN.md section 3).

A shard is one Parquet file with ``doc_id: string`` (unique), ``input_ids:
list<int32>`` (non-empty), optional ``loss_mask: list<int8>`` (same length,
1 = the token counts in the loss), optional ``text: string`` and any extra
columns (ignored here, passed through by ``tokenize``). A violation is a
``ShardError`` naming the shard file, the row and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage

SHARD_COLUMNS = ("doc_id", "input_ids", "loss_mask")


class ShardError(ValueError):
    """A shard that breaks the contract."""

    def __init__(self, shard: str, row: int | None, field: str, problem: str) -> None:
        where = f"row {row}" if row is not None else "schema"
        super().__init__(f"{shard}: {where}, field {field!r}: {problem}")
        self.shard, self.row, self.field = shard, row, field


def shard_schema() -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                      ("loss_mask", pa.list_(pa.int8())), ("text", pa.string())])


@dataclass
class Sequences:
    """Checked rows of a shard: ids, token lists, loss masks (or None), and row numbers in the file."""

    doc_ids: list[str]
    input_ids: list[np.ndarray]
    loss_masks: list[np.ndarray] | None
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_ids)

    def take(self, order: np.ndarray) -> Sequences:
        masks = None if self.loss_masks is None else [self.loss_masks[i] for i in order]
        return Sequences([self.doc_ids[i] for i in order], [self.input_ids[i] for i in order], masks,
                         self.rows[order])

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def _check_schema(shard: str, schema: pa.Schema) -> None:
    for name, kinds in (("doc_id", (pa.types.is_string, pa.types.is_large_string)),
                        ("input_ids", (pa.types.is_list, pa.types.is_large_list))):
        if name not in schema.names:
            raise ShardError(shard, None, name, f"column is missing (columns: {schema.names})")
        if not any(k(schema.field(name).type) for k in kinds):
            raise ShardError(shard, None, name, f"has type {schema.field(name).type}, expected "
                             + ("string" if name == "doc_id" else "list<int32>"))
    if not pa.types.is_integer(schema.field("input_ids").type.value_type):
        raise ShardError(shard, None, "input_ids", f"has type {schema.field('input_ids').type}, expected list<int32>")
    if "loss_mask" in schema.names:
        t = schema.field("loss_mask").type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(t.value_type):
            raise ShardError(shard, None, "loss_mask", f"has type {t}, expected list<int8>")


def check_batch(shard: str, batch: pa.RecordBatch | pa.Table, first_row: int, vocab_size: int | None,
                seen: set[str] | None = None) -> Sequences:
    """Check rows of a shard and convert them; ``first_row`` is the file row of the batch's row 0."""
    _check_schema(shard, batch.schema)
    n = batch.num_rows
    doc_col = batch.column("doc_id")
    if doc_col.null_count:
        raise ShardError(shard, first_row + int(np.flatnonzero(doc_col.is_null())[0]), "doc_id", "is null")
    doc_ids = doc_col.to_pylist()
    ids_col = batch.column("input_ids")
    if ids_col.null_count:
        raise ShardError(shard, first_row + int(np.flatnonzero(ids_col.is_null())[0]), "input_ids", "is null")
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False)
    if (lengths == 0).any():
        raise ShardError(shard, first_row + int(np.flatnonzero(lengths == 0)[0]), "input_ids", "is empty")
    flat = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if flat.size and (flat.min() < 0 or (vocab_size is not None and flat.max() >= vocab_size)):
        bad = int(np.flatnonzero((flat < 0) | (flat >= (vocab_size or np.iinfo(np.int64).max)))[0])
        row = int(np.searchsorted(offsets, bad, side="right") - 1)
        raise ShardError(shard, first_row + row, "input_ids",
                         f"token id {int(flat[bad])} is outside the vocabulary [0, {vocab_size})")
    input_ids = [flat[offsets[i]:offsets[i + 1]] for i in range(n)]
    masks = None
    if "loss_mask" in batch.schema.names:
        mcol = batch.column("loss_mask")
        mlen = pc.list_value_length(mcol).to_numpy(zero_copy_only=False)
        bad_rows = np.flatnonzero(np.asarray(mcol.is_null()) | (np.nan_to_num(mlen, nan=-1) != lengths))
        if bad_rows.size:
            r = int(bad_rows[0])
            raise ShardError(shard, first_row + r, "loss_mask",
                             f"has {mlen[r]} entries, input_ids has {lengths[r]}")
        mflat = pc.list_flatten(mcol).to_numpy(zero_copy_only=False)
        masks = [mflat[offsets[i]:offsets[i + 1]] for i in range(n)]
    seen = set() if seen is None else seen
    for i, d in enumerate(doc_ids):
        if d in seen:
            raise ShardError(shard, first_row + i, "doc_id", f"duplicate doc_id {d!r} within the shard")
        seen.add(d)
    return Sequences(doc_ids, input_ids, masks, np.arange(first_row, first_row + n))


def iter_shard(shard: str, vocab_size: int | None, rows_per_read: int = 4096) -> Iterator[Sequences]:
    """Stream a shard in checked pieces of at most ``rows_per_read`` rows (memory stays bounded)."""
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        _check_schema(shard, pf.schema_arrow)
        cols = [c for c in SHARD_COLUMNS if c in pf.schema_arrow.names]
        seen: set[str] = set()
        row = 0
        for batch in pf.iter_batches(batch_size=rows_per_read, columns=cols):
            yield check_batch(shard, batch, row, vocab_size, seen)
            row += batch.num_rows


def read_rows(shard: str, rows: np.ndarray | None, vocab_size: int | None,
              doc_ids: set[str] | None = None) -> Sequences:
    """Checked rows of a shard selected by row number or by doc_id (all rows if both are None)."""
    parts = []
    for piece in iter_shard(shard, vocab_size):
        if rows is not None:
            keep = np.flatnonzero(np.isin(piece.rows, rows))
        elif doc_ids is not None:
            keep = np.array([i for i, d in enumerate(piece.doc_ids) if d in doc_ids], dtype=np.int64)
        else:
            keep = np.arange(len(piece))
        if keep.size:
            parts.append(piece.take(keep))
    if not parts:
        return Sequences([], [], None, np.zeros(0, dtype=np.int64))
    masks = None if any(p.loss_masks is None for p in parts) else [m for p in parts for m in p.loss_masks]
    return Sequences([d for p in parts for d in p.doc_ids], [x for p in parts for x in p.input_ids], masks,
                     np.concatenate([p.rows for p in parts]))


def row_counts(shards: list[str]) -> list[int]:
    """Rows of each shard, from the Parquet footers only."""
    out = []
    for shard in shards:
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            out.append(pq.ParquetFile(f).metadata.num_rows)
    return out


def list_shards(corpus: str) -> list[str]:
    """The shard files of a corpus prefix or glob (sorted); ValueError when there is none."""
    found = storage.list_files(corpus, suffix=".parquet")
    if not found:
        raise ValueError(f"data.corpus = {corpus!r}: no Parquet shards found")
    return found


def corpus_root(corpus: str) -> str:
    """The folder of a corpus prefix or glob (the part before the first glob character, up to its last '/')."""
    if any(c in corpus for c in "*?["):
        return re.split(r"[*?\[]", corpus, maxsplit=1)[0].rsplit("/", 1)[0]
    if corpus.endswith(".parquet"):
        return corpus.rsplit("/", 1)[0]
    return corpus.rstrip("/")


def shard_name(shard: str, corpus: str) -> str:
    """A stable file name for outputs derived from a shard: its path below the corpus root, flattened."""
    root = corpus_root(corpus)
    rel = shard[len(root):].lstrip("/") if shard.startswith(root) else shard.rsplit("/", 1)[-1]
    return rel.removesuffix(".parquet").replace("/", "__")
