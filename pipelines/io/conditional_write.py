"""Writes that succeed only when the object is as the writer last saw it (for ``runtime/run_lock.py``).

``create_new`` writes an object only if none is there; ``replace_if_unchanged`` replaces one only if it is
still the version the caller read (``version_of``). Of two writers racing, exactly one succeeds where the
store can tell:

- local files: ``O_CREAT | O_EXCL`` for a new file (atomic on local filesystems);
- S3 (s3fs): ``PutObject`` with ``If-None-Match: *``, or ``If-Match: <ETag>`` (S3's conditional writes;
  moto, the tests' server, implements both).

Elsewhere (a local takeover, GCS, Azure, memory) they return None: the store cannot say, and the caller
falls back to writing and reading back.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import storage


def _s3(url: str) -> tuple[object, str, str] | None:
    """(s3fs filesystem, bucket, key) for an S3 URL, else None."""
    if not url.startswith(("s3://", "s3a://")):
        return None
    fs, path = storage.filesystem(url)
    if not hasattr(fs, "call_s3") or "/" not in path:
        return None
    bucket, key = path.split("/", 1)
    return fs, bucket, key


def _lost(err: Exception) -> bool:
    """S3 said the condition did not hold (412; s3fs: FileExistsError or OSError), or another conditional
    write of the same key was in flight (409 ConditionalRequestConflict)."""
    text = str(err)
    return isinstance(err, FileExistsError) or "pre-condition" in text or "ConditionalRequestConflict" in text


def create_new(url: str, data: bytes) -> bool | None:
    """Write ``data`` at ``url`` only if nothing is there: True when written, False when something is there,
    None when this store cannot create atomically."""
    if storage.is_local(url):
        path = Path(storage.filesystem(url)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    s3 = _s3(url)
    if s3 is None:
        return None
    fs, bucket, key = s3
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except Exception as err:  # noqa: BLE001 -- a lost race is an answer; anything else goes up
        if _lost(err):
            return False
        raise
    return True


def version_of(url: str) -> str | None:
    """The version a later ``replace_if_unchanged`` compares with (S3: the ETag), or None."""
    s3 = _s3(url)
    if s3 is None:
        return None
    fs, bucket, key = s3
    try:
        return str(fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"])
    except FileNotFoundError:
        return None


def replace_if_unchanged(url: str, data: bytes, version: str | None) -> bool | None:
    """Replace the object at ``url`` only if it is still ``version``: True when replaced, False when it
    changed (or went), None when this store (or a missing version) cannot say."""
    s3 = _s3(url)
    if s3 is None or version is None:
        return None
    fs, bucket, key = s3
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
    except FileNotFoundError:
        return False
    except Exception as err:  # noqa: BLE001
        if _lost(err):
            return False
        raise
    return True
