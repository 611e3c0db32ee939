"""Training shards: reading and checking the contract (docs/design.md section 3).

A shard is one Parquet file with ``doc_id: string`` (unique), ``input_ids:
list<int32>`` (non-empty), optional ``loss_mask: list<int8>`` (same length,
1 = the token counts in the loss), optional ``text: string`` and any extra
columns (ignored here, passed through by ``tokenize``). A violation is a
``ShardError`` naming the shard file, the row and the field.

A sequence longer than the model's context follows ``data.too_long``
(``fit_context``): ``error`` (a ``ShardError``), ``truncate`` (its first
``context`` tokens) or ``chunk`` (pieces of at most ``context`` tokens, doc_id
``"<doc_id>#<piece>"``, all with the row number of the file row). Every reader
of shards (fitting, scoring, the merge's details) applies the same policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ConfigError, TooLong
from ..config.corpus_paths import corpus_root
from . import storage

SHARD_COLUMNS = ("doc_id", "input_ids", "loss_mask")


class ShardError(ValueError):
    """A shard that breaks the contract."""

    def __init__(self, shard: str, row: int | None, field: str | None, problem: str) -> None:
        where = f"row {row}" if row is not None else "schema"
        super().__init__(f"{shard}: {problem}" if field is None else f"{shard}: {where}, field {field!r}: {problem}")
        self.shard, self.row, self.field = shard, row, field
        self.doc_id: str | None = None


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


def check_schema(shard: str, schema: pa.Schema) -> None:
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


def fit_context(shard: str, seqs: Sequences, context: int | None, too_long: TooLong | str) -> Sequences:
    """Apply the ``data.too_long`` policy to the sequences longer than ``context`` tokens (None: no limit)."""
    if context is None:
        return seqs
    lengths = seqs.lengths
    long = np.flatnonzero(lengths > context)
    if not long.size:
        return seqs
    policy = TooLong(too_long)
    if policy is TooLong.ERROR:
        i = int(long[0])
        err = ShardError(shard, int(seqs.rows[i]), "input_ids",
                         f"{int(lengths[i])} tokens, more than the model's context of {context} "
                         "(set data.too_long = \"truncate\" or \"chunk\")")
        err.doc_id = seqs.doc_ids[i]
        raise err
    doc_ids, ids, masks, rows = [], [], [] if seqs.loss_masks is not None else None, []
    for i in range(len(seqs)):
        cut = [(0, int(lengths[i]))] if lengths[i] <= context else (
            [(0, context)] if policy is TooLong.TRUNCATE
            else [(lo, min(lo + context, int(lengths[i]))) for lo in range(0, int(lengths[i]), context)])
        for piece, (lo, hi) in enumerate(cut):
            mask = None if masks is None else seqs.loss_masks[i][lo:hi]
            if nothing_in_loss(seqs.input_ids[i][lo:hi], mask) is not None:
                if len(cut) > 1:
                    continue  # a piece with nothing in the loss (a last piece of one token): no gradient, left out
                err = ShardError(shard, int(seqs.rows[i]), "loss_mask", f"its 1s are all beyond the first {context} "
                                 "tokens, so truncated (data.too_long = \"truncate\") nothing is left in the loss; "
                                 "use \"chunk\"")
                err.doc_id = seqs.doc_ids[i]
                raise err
            doc_ids.append(seqs.doc_ids[i] if len(cut) == 1 else f"{seqs.doc_ids[i]}#{piece}")
            ids.append(seqs.input_ids[i][lo:hi])
            if masks is not None:
                masks.append(mask)
            rows.append(int(seqs.rows[i]))
    return Sequences(doc_ids, ids, masks, np.asarray(rows, dtype=np.int64))


def nothing_in_loss(ids: np.ndarray, mask: np.ndarray | None) -> tuple[str, str] | None:
    """(field, problem) when a sequence has no token in the loss, else None.

    The first token of a sequence is never predicted (it is only context), so a sequence needs 2 or more
    tokens, and with a ``loss_mask`` a 1 after its first position. Such a sequence has no gradient:
    training on it would change nothing, and the engine refuses it (``influence_ops.collate``).
    """
    if len(ids) < 2:
        return "input_ids", (f"has {len(ids)} token: a sequence needs 2 or more (its first token is never "
                             "predicted, so one token puts nothing in the loss)")
    if mask is not None and not bool(np.asarray(mask[1:]).any()):
        return "loss_mask", ("has no 1 after the first position: nothing of the sequence is in the loss "
                             "(its first token is never predicted)")
    return None


def check_batch(shard: str, batch: pa.RecordBatch | pa.Table, first_row: int, vocab_size: int | None,
                seen: set[str] | None = None, context: int | None = None,
                too_long: TooLong | str = TooLong.ERROR, unique_ids: bool = True) -> Sequences:
    """Check rows of a shard and convert them; ``first_row`` is the file row of the batch's row 0.

    ``context`` (the model's longest sequence; None: no limit) and ``too_long``: see ``fit_context``.
    ``seen``: the doc_ids of the shard's earlier batches (a repeat is refused); ``unique_ids = False`` skips
    that check (``validate`` checks doc_ids over the whole corpus once and reports a repeat there).
    """
    check_schema(shard, batch.schema)
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
        off = np.flatnonzero((mflat != 0) & (mflat != 1))
        if off.size:
            r = int(np.searchsorted(offsets, off[0], side="right") - 1)
            raise ShardError(shard, first_row + r, "loss_mask", f"value {int(mflat[off[0]])} at position "
                             f"{int(off[0] - offsets[r])}: must be 0 or 1 (1 = the token is in the loss)")
        masks = [mflat[offsets[i]:offsets[i + 1]] for i in range(n)]
    for i in range(n):
        problem = nothing_in_loss(input_ids[i], None if masks is None else masks[i])
        if problem is not None:
            err = ShardError(shard, first_row + i, problem[0], problem[1])
            err.doc_id = doc_ids[i]
            raise err
    seen = set() if seen is None else seen
    for i, d in enumerate(doc_ids if unique_ids else ()):
        if d in seen:
            raise ShardError(shard, first_row + i, "doc_id", f"duplicate doc_id {d!r} within the shard")
        seen.add(d)
    return fit_context(shard, Sequences(doc_ids, input_ids, masks, np.arange(first_row, first_row + n)), context,
                       too_long)


def iter_shard(shard: str, vocab_size: int | None, rows_per_read: int = 4096, context: int | None = None,
               too_long: TooLong | str = TooLong.ERROR,
               row_groups: tuple[int, int] | None = None) -> Iterator[Sequences]:
    """Stream a shard in checked pieces of at most ``rows_per_read`` file rows (memory stays bounded).

    ``row_groups``: only the row groups [lo, hi) (row numbers stay those of the file; doc_ids are
    checked unique within the range); None: the whole shard.
    """
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        check_schema(shard, pf.schema_arrow)
        cols = [c for c in SHARD_COLUMNS if c in pf.schema_arrow.names]
        seen: set[str] = set()
        lo, hi = (0, pf.num_row_groups) if row_groups is None else row_groups
        if not 0 <= lo <= hi <= pf.num_row_groups:
            raise ShardError(shard, None, None, f"row groups {lo}-{hi} asked, the file has {pf.num_row_groups} "
                             "(was it replaced while the job ran?)")
        row = sum(pf.metadata.row_group(i).num_rows for i in range(lo))
        for batch in pf.iter_batches(batch_size=rows_per_read, columns=cols, row_groups=list(range(lo, hi))):
            yield check_batch(shard, batch, row, vocab_size, seen, context, too_long)
            row += batch.num_rows


def read_rows(shard: str, rows: np.ndarray | None, vocab_size: int | None,
              doc_ids: set[str] | None = None, context: int | None = None,
              too_long: TooLong | str = TooLong.ERROR) -> Sequences:
    """Checked rows of a shard selected by row number or by doc_id (all rows if both are None).

    With ``too_long = "chunk"``, ``doc_ids`` selects pieces by their piece ids. Selected by doc_id, only the
    row groups holding them are read (``groups_holding``): doc_ids are then checked unique within each group.
    """
    parts = []
    ranges = [None] if doc_ids is None else [(g, g + 1) for g in groups_holding(shard, doc_ids)]
    pieces = (p for r in ranges for p in iter_shard(shard, vocab_size, context=context, too_long=too_long,
                                                    row_groups=r))
    for piece in pieces:
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


def groups_holding(shard: str, doc_ids: set[str]) -> list[int]:
    """The row groups of a shard holding any of ``doc_ids`` (or a piece ``"<doc_id>#<n>"`` of one), from the
    doc_id column alone: the other row groups are never read or checked (a unit that failed stays out)."""
    wanted = set(doc_ids) | {d.rsplit("#", 1)[0] for d in doc_ids}
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        check_schema(shard, pf.schema_arrow)
        return [g for g in range(pf.num_row_groups)
                if any(d in wanted for d in pf.read_row_group(g, columns=["doc_id"]).column(0).to_pylist())]


def row_group_rows(shard: str) -> list[int]:
    """Rows of each row group of a shard, from its Parquet footer."""
    def read() -> list[int]:
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return storage.retry(shard, "footer read", read)


def row_counts(shards: list[str]) -> list[int]:
    """Rows of each shard, from the Parquet footers only."""
    return [storage.retry(shard, "footer read", _row_count, shard) for shard in shards]


def _row_count(shard: str) -> int:
    fs, path = storage.filesystem(shard)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def list_shards(corpus: str) -> list[str]:
    """The shard files of a corpus prefix or glob (sorted); ValueError when there is none."""
    found = storage.list_files(corpus, suffix=".parquet")
    if not found:
        raise ValueError(f"data.corpus = {corpus!r}: no Parquet shards found")
    return found


RAW_SUFFIXES = (".jsonl", ".json", ".parquet")


def raw_inputs(raw: str, corpus: str) -> tuple[list[str], list[str]]:
    """The raw text files of ``data.raw`` and the shard name `tokenize` writes for each (its name without
    the suffix, into the folder of ``corpus``). ConfigError when there is no raw file; ValueError naming
    the files when two would write the same shard, when a shard would overwrite its raw file, or when a
    raw file is itself one of the corpus's shards (read as one)."""
    inputs = [u for u in storage.list_files(raw) if u.endswith(RAW_SUFFIXES)]
    if not inputs:
        raise ConfigError(f"data.raw = {raw!r}: no .jsonl or .parquet files")
    stems = [u.rsplit("/", 1)[-1].rsplit(".", 1)[0] for u in inputs]
    first: dict[str, str] = {}
    for url, stem in zip(inputs, stems):
        if stem in first:
            raise ValueError(f"data.raw = {raw!r}: {first[stem]} and {url} share the name {stem!r}, and each would "
                             f"be tokenized to the shard {stem}.parquet: rename or move one of them")
        first[stem] = url
    root = corpus_root(corpus)
    listed = set(storage.list_files(corpus, suffix=".parquet")) if storage.exists(root) else set()
    for url, stem in zip(inputs, stems):
        if url == storage.join(root, f"{stem}.parquet") or url in listed:
            raise ValueError(f"data.raw = {raw!r}: the raw file {url} lies in data.corpus = {corpus!r}, where "
                             f"`tokenize` writes its shards (it would be overwritten by, or read as, a shard): "
                             "keep raw files and shards in separate folders")
    return inputs, stems


def shard_name(shard: str, corpus: str) -> str:
    """A stable file name for outputs derived from a shard: its path below the corpus root, flattened."""
    root = corpus_root(corpus)
    rel = shard[len(root):].lstrip("/") if shard.startswith(root) else shard.rsplit("/", 1)[-1]
    return rel.removesuffix(".parquet").replace("/", "__")
