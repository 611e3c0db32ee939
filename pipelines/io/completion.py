"""Completion markers: how a stage knows its output folder is complete and current.

A stage writes ``_pipeline.json`` into its output folder after everything else,
holding the key of its inputs (a hash over the settings and the input files
that determine the result). A later run with the same key skips the stage; a
different key (new settings, new data) redoes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from . import storage

MARKER = "_pipeline.json"


def inputs_key(*parts: Any) -> str:
    """sha256 (first 24 hex chars) over JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def completed(folder: str, key: str) -> dict[str, Any] | None:
    """The marker's payload when ``folder`` is complete for ``key``, else None."""
    marker = storage.read_json(storage.join(folder, MARKER))
    if marker is None or marker.get("key") != key:
        return None
    return marker


def mark_complete(folder: str, key: str, info: dict[str, Any]) -> dict[str, Any]:
    payload = {"key": key, **info}
    storage.write_json(storage.join(folder, MARKER), payload)
    return payload


def invalidate(folder: str) -> None:
    storage.remove(storage.join(folder, MARKER))


def shard_fingerprints(shards: list[str]) -> list[tuple[str, int]]:
    """(URL, size in bytes) per shard: enough to notice a replaced shard."""
    out = []
    for shard in shards:
        fs, path = storage.filesystem(shard)
        out.append((shard, int(fs.size(path))))
    return out


def digest_of(folder: str, stage: str) -> str:
    """The content hash recorded by a complete stage folder (ValueError if it is not complete)."""
    marker = storage.read_json(storage.join(folder, MARKER))
    if marker is None or "digest" not in marker:
        raise ValueError(f"{folder} is not complete: run `{stage}` first")
    return marker["digest"]
