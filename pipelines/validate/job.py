"""The job file: readable, UTF-8, valid TOML, every key known and in range (``config.load_config``)."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, JobConfig, load_config


def read_job(path: str | Path) -> JobConfig:
    """The checked job; a ``ConfigError`` naming the file or the key otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such job file")
    try:
        return load_config(p)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start}); save the job file as UTF-8") from err
