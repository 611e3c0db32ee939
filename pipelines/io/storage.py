"""Paths as fsspec URLs: ``s3://``, ``gs://``, ``file://``, ``memory://`` or plain local paths.

Credentials come from the standard provider chain (environment, profile,
instance role); nothing here reads, stores or logs them. Writes are atomic at
the file level: the bytes go to a temporary name first, then the final name, so
a file that exists under its final name is complete.

Every call here on an object store goes through ``retry``: transient errors
(5xx, SlowDown and other throttling, connection resets and refusals, truncated
responses) are retried with bounded exponential backoff (``RETRIES`` tries,
``BACKOFF_S`` doubling up to ``MAX_BACKOFF_S``, with jitter; both can be set
with ``INFLUENCE_STORAGE_RETRIES`` and ``INFLUENCE_STORAGE_BACKOFF_S``), on top of
the retries s3fs and botocore make themselves; then ``StorageError`` says in one
line which URL failed and why. Other errors (missing file, denied) are raised
at once.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

CACHE_ENV = "INFLUENCE_CACHE_DIR"
RETRIES = int(os.environ.get("INFLUENCE_STORAGE_RETRIES", "5"))  # tries per call (environment: for tests)
BACKOFF_S = float(os.environ.get("INFLUENCE_STORAGE_BACKOFF_S", "0.2"))  # first wait; doubles each try
MAX_BACKOFF_S = 4.0
log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_TYPES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ResponseStreamingError", "IncompleteReadError", "ClientPayloadError", "ServerDisconnectedError",
                    "ClientOSError", "ClientConnectorError", "ServerTimeoutError", "ProtocolError",
                    "ContentLengthError", "ReadTimeout", "ConnectionError"}
_TRANSIENT_WORDS = ("SlowDown", "Throttl", "TooManyRequests", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "Service Unavailable", "Reduce your request rate", "(500)", "(502)",
                    "(503)", "(504)", "Connection reset", "Server disconnected", "payload is not completed",
                    "Not enough data", "IncompleteRead", "Connect timeout", "Could not connect")


class StorageError(OSError):
    """An object-storage call that still failed after its retries; the message names the URL."""


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: server-side 5xx and throttling, lost or refused connections, short reads."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError,
                            NotADirectoryError)) or type(err).__name__ in ("ShardError", "ConfigError"):
            return False  # (a shard's own contents, e.g. a doc_id, may hold any words)
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in _TRANSIENT_TYPES:
            return True
        if any(w in str(err) for w in _TRANSIENT_WORDS):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def retry(url: str, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, retried on transient errors when ``url`` is remote.

    Raises:
        StorageError: still failing after ``RETRIES`` tries ("<url>: <what> failed after N tries: <error>").
    """
    if is_local(url):
        return call(*args, **kwargs)
    for attempt in range(1, RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if attempt == RETRIES:
                raise StorageError(f"{url}: {what} failed after {RETRIES} tries: {type(err).__name__}: "
                                   f"{first}") from err
            delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.info("%s: %s failed (%s), retry %d in %.1f s", url, what, first, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL or local path.

    Object stores get no listings cache: other processes (actors) write the
    files this process checks.
    """
    if url.startswith(("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://")):
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for ``path`` on ``fs`` (plain path for local files)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    if protocol == "memory":  # fsspec roots memory paths at "/": keep the URL as written
        return "memory://" + path.lstrip("/")
    return fs.unstrip_protocol(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return retry(url, "exists", fs.exists, path)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Files under a prefix (recursively) or matching a glob, sorted, as URLs."""
    return retry(url, "listing", _list_files, url, suffix)


def _list_files(url: str, suffix: str) -> list[str]:
    fs, path = filesystem(url)
    if any(c in path for c in "*?["):
        found = [p for p in fs.glob(path) if fs.isfile(p)]
    elif fs.isfile(path):
        found = [path]
    elif fs.exists(path):
        found = [p for p in fs.find(path) if not Path(p).name.startswith(("_", "."))]
    else:
        found = []
    return sorted(with_protocol(fs, p) for p in found if p.endswith(suffix))


def read_bytes(url: str) -> bytes:
    return retry(url, "read", _read_bytes, url)


def _read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        data = f.read()
    size = None if is_local(url) else getattr(f, "size", None)
    if isinstance(size, int) and len(data) != size:  # a response cut short
        raise ConnectionError(f"IncompleteRead: {len(data)} of {size} bytes")
    return data


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: temporary name in the same folder, then the final name."""
    retry(url, "write", _write_bytes, url, data)


def _write_bytes(url: str, data: bytes) -> None:
    def put(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
        with fs.open(tmp, "wb") as f:
            f.write(data)
    _atomic(url, put)


def write_file(url: str, local: str | Path) -> None:
    """Copy the local file ``local`` to ``url`` atomically, as ``write_bytes``, streaming it (never whole in memory)."""
    retry(url, "write", _atomic, url, lambda fs, tmp: fs.put_file(str(local), tmp))


def _atomic(url: str, put: Callable[[fsspec.AbstractFileSystem, str], None]) -> None:
    """``put(fs, tmp)`` writes a temporary name in the same folder, then it becomes ``url``."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    put(fs, tmp)
    if is_local(url):
        os.replace(tmp, path)
    else:  # object stores have no rename: copy then delete (the final key appears whole)
        fs.mv(tmp, path)
    fs.invalidate_cache()


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON document at ``url``, or None when there is none."""
    if not exists(url):
        return None
    return json.loads(read_bytes(url))


def write_json(url: str, payload: dict[str, Any]) -> None:
    write_bytes(url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_parquet(url: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    """Write ``table`` atomically (zstd); ``row_group_rows``: rows per row group (default: pyarrow's)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows)
    write_bytes(url, buf.getvalue())


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    def read() -> pa.Table:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    return _read_parquet(url, read)


def read_parquet_file(url: str, use: Callable[[pq.ParquetFile], T]) -> T:
    """``use(ParquetFile)`` of the file at ``url``, opened once (its footer read once) for reading it in parts;
    retried whole on a transient error, an unreadable file raised as ``read_parquet`` raises it."""
    def read() -> T:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            return use(pq.ParquetFile(f))
    return _read_parquet(url, read)


def _read_parquet(url: str, read: Callable[[], T]) -> T:
    try:
        return retry(url, "read", read)
    except pa.ArrowInvalid as err:  # truncated, or not Parquet
        raise ValueError(f"{url}: not a readable Parquet file ({err})") from err


def without_bom(data: bytes) -> bytes:
    """Text bytes without a leading UTF-8 byte order mark (Windows editors write one; JSON does not allow it)."""
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def parquet_metadata(url: str) -> dict[str, str]:
    """The key-value metadata of a Parquet file (decoded): its schema's, and what a streaming writer added at the
    end (``ParquetWriter.add_key_value_metadata``), without pyarrow's serialized schema."""
    def read() -> dict[bytes, bytes]:
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata.metadata or {}
        return {k: v for k, v in meta.items() if k != b"ARROW:schema"}
    try:
        meta = retry(url, "footer read", read)
    except pa.ArrowInvalid as err:  # truncated, or not Parquet
        raise ValueError(f"{url}: not a readable Parquet file ({err})") from err
    return {k.decode(): v.decode() for k, v in meta.items()}


def footer_metadata(url: str) -> dict[str, str] | None:
    """The schema metadata of the Parquet file at ``url``; None when there is no file or its footer does not read.

    A file whose footer does not read (truncated, or not Parquet) is named in a warning: the stage
    that owns it writes it again.
    """
    if not exists(url):
        return None
    try:
        return parquet_metadata(url)
    except StorageError:
        raise
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        log.warning("%s: unreadable (%s); it will be written again", url,
                    (str(err).splitlines() or [type(err).__name__])[0])
        return None


def remove(url: str) -> None:
    def rm() -> None:
        fs, path = filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            fs.invalidate_cache()
    retry(url, "remove", rm)


def upload_dir(local_dir: str | Path, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files of a local folder to ``url``; names in ``last`` are copied after all others."""
    files = sorted(p for p in Path(local_dir).iterdir() if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        write_bytes(join(url, p.name), p.read_bytes())


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "corpus-influence")
    root.mkdir(parents=True, exist_ok=True)
    return root


def local_copy(url: str) -> Path:
    """A local folder holding the files of ``url`` (the folder itself when it is local).

    Remote folders are copied once per node into the cache, keyed by the URL and
    the folder's listing (names, sizes, ETags or modification times: a changed
    file gives a new copy), to a temporary folder first and then renamed.
    """
    if is_local(url):
        return Path(filesystem(url)[1])
    return retry(url, "download", _local_copy, url)


def _local_copy(url: str) -> Path:
    key = url + folder_identity(url)
    target = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    if target.exists():
        return target
    fs, path = filesystem(url)
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".download-"))
    try:
        for remote in fs.find(path):
            rel = remote[len(path.rstrip("/")) + 1:]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(remote, str(dest))
            if dest.stat().st_size != fs.size(remote):  # a response cut short
                raise ConnectionError(f"IncompleteRead: {remote}: {dest.stat().st_size} of {fs.size(remote)} bytes")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process on this node finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_digest(url: str) -> str:
    return hashlib.sha256(read_bytes(url)).hexdigest()[:16]


def dir_digest(url: str) -> str:
    """sha256 over the names and bytes of the files of a folder (first 16 hex chars)."""
    h = hashlib.sha256()
    for f in list_files(url):
        h.update(f.rsplit("/", 1)[-1].encode())
        h.update(read_bytes(f))
    return h.hexdigest()[:16]


def file_sizes(url: str) -> dict[str, int]:
    """Size of every file below a folder, by path relative to it (parts starting with '_' or '.' left out)."""
    fs, path = filesystem(url)
    if not exists(url):
        return {}
    found = retry(url, "listing", fs.find, path, detail=True)
    root = path.rstrip("/") + "/"
    out = {}
    for name, entry in found.items():
        rel = name[len(root):] if name.startswith(root) else name.rsplit("/", 1)[-1]
        if not any(part.startswith(("_", ".")) for part in rel.split("/")):
            out[rel] = int(entry.get("size") or 0)
    return dict(sorted(out.items()))


def folder_identity(url: str) -> str:
    """Names, sizes and modification times (or ETags) of a folder's files, from the listing only."""
    fs, path = filesystem(url)
    entries = []
    for f in sorted(retry(url, "listing", fs.find, path, detail=True).values(), key=lambda e: e["name"]):
        stamp = f.get("ETag") or f.get("mtime") or f.get("LastModified") or f.get("created")
        entries.append((f["name"].rsplit("/", 1)[-1], f.get("size"), str(stamp)))
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:24]
