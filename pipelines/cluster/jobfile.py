"""A validated job config written back as a TOML job file (what `influence submit` ships).

The shipped file is the resolved config: relative local paths of the user's
file are made absolute (they are relative to the job file's folder), so the
job means the same thing wherever the file lands; ``None`` values are left
out (the defaults). Only the types a job file holds are written: strings,
numbers, booleans, and one level of tables.
"""

from __future__ import annotations

import json
from typing import Any

from ..config import JobConfig
from ..io import storage


def _value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return json.dumps(v)  # a JSON string or number is a valid TOML basic string or number
    raise TypeError(f"job key {key!r}: cannot write {type(v).__name__} {v!r} to TOML")


def to_toml(cfg: JobConfig) -> str:
    """The job file of ``cfg`` (round-trips through ``config_from_dict``)."""
    raw = cfg.to_dict()
    if raw["scoring"]["rank"] is None:  # dense queries: the job file says rank = 0 (leaving it out means 32)
        raw["scoring"]["rank"] = 0
    lines = [f"{k} = {_value(k, v)}" for k, v in raw.items() if not isinstance(v, dict) and v is not None]
    for section, table in raw.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"]
            lines += [f"{k} = {_value(f'{section}.{k}', v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def local_paths(cfg: JobConfig) -> list[str]:
    """The job's paths that are local files (every node of a cluster must see them, e.g. a shared filesystem)."""
    urls = [cfg.model.path, cfg.model.tokenizer, cfg.data.raw, cfg.data.corpus, cfg.data.queries, cfg.data.output]
    return [u for u in urls if u is not None and storage.is_local(u)]
