"""Paths as fsspec URLs: ``s3://``, ``gs://``, ``file://``, ``memory://`` or plain local paths.

Credentials come from the standard provider chain (environment, profile,
instance role); nothing here reads, stores or logs them. Writes are atomic at
the file level: the bytes go to a temporary name first, then the final name, so
a file that exists under its final name is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

CACHE_ENV = "INFLUENCE_CACHE_DIR"


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
    return fs.exists(path)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Files under a prefix (recursively) or matching a glob, sorted, as URLs."""
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
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Write atomically: temporary name in the same folder, then the final name."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
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


def write_parquet(url: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(url, buf.getvalue())


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except pa.ArrowInvalid as err:  # truncated, or not Parquet
        raise ValueError(f"{url}: not a readable Parquet file ({err})") from err


def read_table(url: str) -> pa.Table:
    """A Parquet file, or a JSONL file (one JSON object a line), as a table."""
    if url.endswith(".parquet"):
        return read_parquet(url)
    rows = []
    for n, raw in enumerate(read_bytes(url).splitlines()):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{url}: line {n + 1} is not UTF-8 text (byte {err.start} of the line)") from err
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{url}: line {n + 1} is not JSON: {err}") from err
    return pa.Table.from_pylist(rows)


def parquet_metadata(url: str) -> dict[str, str]:
    """The key-value metadata of a Parquet file's schema (decoded)."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except pa.ArrowInvalid as err:  # truncated, or not Parquet
        raise ValueError(f"{url}: not a readable Parquet file ({err})") from err
    return {k.decode(): v.decode() for k, v in meta.items()}


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
        fs.invalidate_cache()


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
    key = url + folder_identity(url)
    target = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    if target.exists():
        return target
    fs, path = filesystem(url)
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".download-"))
    for remote in fs.find(path):
        rel = remote[len(path.rstrip("/")) + 1:]
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(dest))
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


def folder_identity(url: str) -> str:
    """Names, sizes and modification times (or ETags) of a folder's files, from the listing only."""
    fs, path = filesystem(url)
    entries = []
    for f in sorted(fs.find(path, detail=True).values(), key=lambda e: e["name"]):
        stamp = f.get("ETag") or f.get("mtime") or f.get("LastModified") or f.get("created")
        entries.append((f["name"].rsplit("/", 1)[-1], f.get("size"), str(stamp)))
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:24]
