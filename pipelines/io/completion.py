"""Completion markers: how a stage knows its output folder is complete and current.

A stage writes ``_pipeline.json`` into its output folder after everything else,
holding the key of its inputs (a hash over the settings and the input files
that determine the result). A later run with the same key skips the stage; a
different key (new settings, new data) redoes it. The marker also lists the
folder's files with their sizes: a folder whose listing no longer matches (a
truncated, missing or foreign file) is not complete, and a warning names the
file; the stage then writes the folder again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from . import storage

MARKER = "_pipeline.json"
log = logging.getLogger(__name__)


def inputs_key(*parts: Any) -> str:
    """sha256 (first 24 hex chars) over JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def completed(folder: str, key: str) -> dict[str, Any] | None:
    """The marker's payload when ``folder`` is complete for ``key``, else None."""
    marker = _read_marker(folder)
    if marker is None or marker.get("key") != key:
        return None
    if "files" in marker:
        now = storage.file_sizes(folder)
        for name in sorted(set(now) | set(marker["files"])):
            if now.get(name) != marker["files"].get(name):
                what = ("missing" if name not in now else "not written by this stage" if name not in marker["files"]
                        else f"{now[name]} bytes, {marker['files'][name]} when written")
                log.warning("%s: %s; the folder will be written again", storage.join(folder, name), what)
                return None
    return {k: v for k, v in marker.items() if k != "files"}


def _read_marker(folder: str) -> dict[str, Any] | None:
    url = storage.join(folder, MARKER)
    try:
        return storage.read_json(url)
    except (ValueError, UnicodeDecodeError) as err:  # not JSON: not ours, or cut short
        log.warning("%s: unreadable (%s); the folder will be written again", url, err)
        return None


def mark_complete(folder: str, key: str, info: dict[str, Any]) -> dict[str, Any]:
    """Write the marker (key, ``info``, and the names and sizes of the folder's files); returns its payload."""
    payload = {"key": key, **info, "files": storage.file_sizes(folder)}
    storage.write_json(storage.join(folder, MARKER), payload)
    return {k: v for k, v in payload.items() if k != "files"}


def invalidate(folder: str) -> None:
    storage.remove(storage.join(folder, MARKER))


def shard_fingerprints(shards: list[str]) -> list[tuple[str, int]]:
    """(URL, size in bytes) per shard: enough to notice a replaced shard."""
    out = []
    for shard in shards:
        fs, path = storage.filesystem(shard)
        out.append((shard, int(storage.retry(shard, "size", fs.size, path))))
    return out


def digest_of(folder: str, stage: str) -> str:
    """The content hash recorded by a complete stage folder (ValueError if it is not complete)."""
    marker = _read_marker(folder)
    if marker is None or "digest" not in marker:
        raise ValueError(f"{folder} is not complete: run `{stage}` first")
    return marker["digest"]
