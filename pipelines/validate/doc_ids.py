"""Corpus-wide doc_id uniqueness in bounded memory: a hash-partitioned count over the doc_id column.

Two sequences with one doc_id would be one row to every table keyed by it, so
every stage that reads the corpus checks this first (the merge also keys rows
by (doc_id, shard), so nothing is mixed even without the check).

Pass 1 reads only the ``doc_id`` column of each shard, batch by batch, and
appends (doc_id, shard index, row) to one of P buckets chosen by a stable
64-bit hash of the doc_id (Arrow IPC files in a temporary folder; with P = 1,
for corpora of up to ``bucket_rows`` rows, the one bucket stays in memory).
P = ceil(rows / bucket_rows). Pass 2 counts each bucket with Arrow's hash
aggregation. Memory: one bucket (about ``bucket_rows`` ids) whatever the
corpus size; I/O: the doc_id column once, plus the spilled ids once each way.
A duplicate is a ``ShardError`` naming both files and rows. ``RawIds`` runs the
same count over the ids of the raw files (``data.raw``), before they are tokenized.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io import storage
from ..io.shards import ShardError

BUCKET_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.int32()), ("row", pa.int64())])
MAX_BUCKETS = 4096


def _bucket_of(doc_ids: pa.Array, buckets: int) -> np.ndarray:
    """Stable bucket numbers [n] in [0, buckets): a 64-bit hash of each id (the same in every process)."""
    from pandas.util import hash_array  # a dependency of ray[data]

    values = np.asarray(doc_ids.to_pylist(), dtype=object)
    return (hash_array(values) % np.uint64(buckets)).astype(np.int64)


def _read_ids(shards: list[str], batch_rows: int = 65536):
    """(shard index, first row, doc_id array) for each batch of each shard's doc_id column."""
    for s, url in enumerate(shards):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["doc_id"]):
                yield s, row, batch.column(0).cast(pa.string())
                row += batch.num_rows


def _piece(s: int, first_row: int, ids: pa.Array) -> pa.Table:
    rows = np.arange(first_row, first_row + len(ids), dtype=np.int64)
    return pa.table([ids, pa.array(np.full(len(ids), s, dtype=np.int32)), pa.array(rows)], schema=BUCKET_SCHEMA)


def _duplicates(bucket: pa.Table) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """(doc_id, first (shard, row), second (shard, row)) of each doc_id seen more than once in the bucket."""
    counts = bucket.group_by("doc_id").aggregate([("doc_id", "count")])
    dups = counts.filter(pc.greater(counts.column("doc_id_count"), 1)).column("doc_id")
    if len(dups) == 0:
        return []
    occ = bucket.filter(pc.is_in(bucket.column("doc_id"), value_set=dups))
    occ = occ.sort_by([("shard", "ascending"), ("row", "ascending")])
    seen: dict[str, list[tuple[int, int]]] = {}
    for doc, s, r in zip(*(occ.column(n).to_pylist() for n in ("doc_id", "shard", "row"))):
        seen.setdefault(doc, []).append((s, r))
    return [(doc, where[0], where[1]) for doc, where in seen.items()]


def _find_duplicates(pieces, rows: int, bucket_rows: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
    """Every doc_id seen more than once among ``pieces`` (an iterable of ``BUCKET_SCHEMA`` tables; ``rows`` in all)."""
    buckets = min(MAX_BUCKETS, max(1, math.ceil(rows / bucket_rows)))
    if buckets == 1:
        pieces = list(pieces)
        return _duplicates(pa.concat_tables(pieces) if pieces else BUCKET_SCHEMA.empty_table())
    found: list[tuple[str, tuple[int, int], tuple[int, int]]] = []
    with tempfile.TemporaryDirectory(prefix="doc-ids-") as tmp:
        paths = [Path(tmp) / f"bucket-{b:04d}.arrow" for b in range(buckets)]
        writers = [pa.ipc.new_file(str(p), BUCKET_SCHEMA) for p in paths]
        try:
            for piece in pieces:
                which = _bucket_of(piece.column("doc_id"), buckets)
                for b in np.unique(which):
                    writers[b].write_table(piece.filter(pa.array(which == b)))
        finally:
            for w in writers:
                w.close()
        for p in paths:
            with pa.memory_map(str(p)) as source:
                found += _duplicates(pa.ipc.open_file(source).read_all())
    return found


def _first(found: list[tuple[str, tuple[int, int], tuple[int, int]]]) -> tuple[str, tuple[int, int], tuple[int, int]]:
    return min(found, key=lambda d: (d[1], d[2]))


def check_unique_doc_ids(shards: list[str], rows: int, bucket_rows: int = 1_000_000) -> None:
    """Raise a ShardError naming both places of the first duplicated doc_id (corpus order); ``rows``: the total."""
    found = _find_duplicates((_piece(s, row, ids) for s, row, ids in _read_ids(shards)), rows, bucket_rows)
    if not found:
        return
    doc, (s1, r1), (s2, r2) = _first(found)
    other = f"row {r2} of the same shard" if s1 == s2 else f"{shards[s2]} row {r2}"
    more = f"; {len(found)} doc_ids occur more than once" if len(found) > 1 else ""
    err = ShardError(shards[s1], r1, "doc_id", f"doc_id {doc!r} is also in {other} "
                     f"(doc_ids must be unique across the corpus{more})")
    err.doc_id, err.other = doc, shards[s2]
    raise err


class RawIds:
    """The document ids of the raw files (``data.raw``), file by file as ``validate`` reads them
    (``add``), spilled to a temporary Arrow file so that memory stays one file's ids; ``check`` then
    finds an id that two files share with the bucketed count above."""

    def __init__(self, urls: list[str], field: str) -> None:
        self.urls, self.field, self.rows = urls, field, 0
        self._index = {url: i for i, url in enumerate(urls)}
        self._tmp = tempfile.TemporaryDirectory(prefix="raw-ids-")
        self._path = Path(self._tmp.name) / "ids.arrow"
        self._writer = pa.ipc.new_file(str(self._path), BUCKET_SCHEMA)
        self._closed = False

    def add(self, url: str, ids: list[str]) -> None:
        self._writer.write_table(_piece(self._index[url], 0, pa.array(ids, pa.string())))
        self.rows += len(ids)

    def _close_writer(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()

    def close(self) -> None:
        """Remove the spilled ids (also when ``check`` never ran)."""
        self._close_writer()
        self._tmp.cleanup()

    def _pieces(self):
        with pa.memory_map(str(self._path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield pa.Table.from_batches([reader.get_batch(i)])

    def check(self, bucket_rows: int = 1_000_000) -> None:
        """Raise a ShardError naming the first id found in two raw files (each file's own repeats are
        refused as it is read)."""
        self._close_writer()
        try:
            found = _find_duplicates(self._pieces(), self.rows, bucket_rows)
        finally:
            self.close()
        if not found:
            return
        doc, (s1, r1), (s2, r2) = _first(found)
        more = f"; {len(found)} ids occur in more than one file" if len(found) > 1 else ""
        raise ShardError(self.urls[s1], r1, self.field, f"id {doc!r} is also in {self.urls[s2]} row {r2} "
                         f"(document ids must be unique across data.raw: tokenize would give both documents' "
                         f"sequences the same doc_ids{more})")
