"""The corpus shards: the set (non-empty), each file's footer and schema, and (optionally) every row.

``check_footers`` reads only the Parquet footers (file readable, columns and
types of the shard contract in ``io/shards.py``, row groups whose row counts add
up). ``scan_shard`` reads the token columns: rows checked as the stages check
them (``check_batch``: nulls, empty sequences, token ids within the
vocabulary, loss masks) and lengths against the model's context under the
``data.too_long`` policy. Errors are ``ShardError``s naming the file (and the
row and field); a corpus that matches nothing is a ``ConfigError`` on ``data.corpus``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import ConfigError, TooLong
from ..config.corpus_paths import GLOB_CHARS
from ..io import storage
from ..io.shards import SHARD_COLUMNS, ShardError, check_batch, check_schema


@dataclass(frozen=True)
class ShardFooter:
    """One shard as its footer describes it."""

    url: str
    rows: int
    row_groups: int


def find_shards(corpus: str) -> list[str]:
    """The shard files of ``data.corpus`` (sorted); ConfigError when there is none."""
    found = storage.list_files(corpus, suffix=".parquet")
    if not found:
        where = "matches no file" if any(c in corpus for c in GLOB_CHARS) else (
            "holds no .parquet file" if storage.exists(corpus) else "does not exist")
        raise ConfigError(f"data.corpus = {corpus!r}: {where} (no Parquet shards to read)")
    return found


@contextmanager
def _open(url: str) -> Iterator[pq.ParquetFile]:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise ShardError(url, None, None, f"not a readable Parquet file ({str(err).splitlines()[0]}); "
                             "it may be truncated or not Parquet: rewrite it") from err
        yield pf


def check_footer(url: str) -> ShardFooter:
    """Read one shard's footer: readable, contract schema, row groups consistent."""
    with _open(url) as pf:
        check_schema(url, pf.schema_arrow)
        meta = pf.metadata
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    if sum(groups) != meta.num_rows:
        raise ShardError(url, None, None, f"the footer says {meta.num_rows} rows but its row groups hold {sum(groups)}")
    return ShardFooter(url, meta.num_rows, meta.num_row_groups)


def check_footers(shards: list[str]) -> list[ShardFooter]:
    return [check_footer(url) for url in shards]


@dataclass
class ShardScan:
    """Counts of one shard's rows: tokens, and rows longer than the context."""

    rows: int = 0
    tokens: int = 0
    too_long: int = 0


def scan_shard(url: str, vocab_size: int | None, context: int | None, too_long: TooLong,
               rows_per_read: int = 8192) -> ShardScan:
    """Check every row of a shard as the stages will read it; with ``too_long = error`` a long row is an error.
    Repeated doc_ids are left to ``check_unique_doc_ids`` (the whole corpus, one error per repeat)."""
    scan = ShardScan()
    strict = context if too_long is TooLong.ERROR else None  # check_batch raises for the first long row
    with _open(url) as pf:
        cols = [c for c in SHARD_COLUMNS if c in pf.schema_arrow.names]
        try:
            for batch in pf.iter_batches(batch_size=rows_per_read, columns=cols):
                check_batch(url, batch, scan.rows, vocab_size, context=strict, unique_ids=False)
                lengths = pc.list_value_length(batch.column("input_ids")).to_numpy(zero_copy_only=False)
                scan.too_long += int((lengths > context).sum()) if context is not None else 0
                scan.rows += batch.num_rows
                scan.tokens += int(lengths.sum())
        except (pa.ArrowException, OSError) as err:  # a damaged page below a good footer
            raise ShardError(url, None, None, f"unreadable after row {scan.rows} ({str(err).splitlines()[0]})") from err
    return scan
