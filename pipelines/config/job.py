"""The whole job: ``JobConfig`` (the sections plus run_id and on_error) and reading it from TOML,
with relative paths resolved against the job file's folder (``load_config``, ``config_from_dict``)."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import ConfigError, check_str, fail
from .sections import DataConfig, FactorConfig, IndexConfig, ModelConfig, ResourceConfig, ScoringConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")  # "org/model"
ON_ERROR = ("fail", "skip")
TOP_LEVEL = ("run_id", "on_error")


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig
    data: DataConfig
    factors: FactorConfig = field(default_factory=FactorConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    run_id: str | None = None
    on_error: str = "fail"

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            fail("on_error", self.on_error, f"must be one of {list(ON_ERROR)}")
        if self.run_id is not None:
            check_str("run_id", self.run_id)
            if not all(c.isalnum() or c in "-_." for c in self.run_id):
                fail("run_id", self.run_id, "may hold only letters, digits, '-', '_' and '.'")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (enums as their values)."""
        def plain(v: Any) -> Any:
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v
        return plain(dataclasses.asdict(self))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = {"model": ModelConfig, "data": DataConfig, "factors": FactorConfig,
             "scoring": ScoringConfig, "index": IndexConfig, "resources": ResourceConfig}


def _section(name: str, raw: Any) -> Any:
    cls = SECTIONS[name]
    if not isinstance(raw, dict):
        fail(name, raw, "must be a table ([" + name + "])")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        fail(f"{name}.{unknown[0]}", raw[unknown[0]], f"unknown key; known keys: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in raw]
    if missing:
        raise ConfigError(f"{name}.{missing[0]} is missing: [{name}] needs {', '.join(required)}")
    return cls(**raw)


def config_from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> JobConfig:
    """Build and validate a JobConfig; relative local paths are resolved against ``base_dir``."""
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        fail(unknown[0], raw[unknown[0]], f"unknown key; known: {sorted(SECTIONS) + list(TOP_LEVEL)}")
    for required in ("model", "data"):
        if required not in raw:
            raise ConfigError(f"[{required}] section is missing")
    parts = {name: _section(name, raw[name]) for name in SECTIONS if name in raw}
    if base_dir is not None:
        parts["data"] = dataclasses.replace(parts["data"], **{
            k: _resolve(getattr(parts["data"], k), base_dir) for k in ("corpus", "queries", "output", "raw")})
        parts["model"] = dataclasses.replace(parts["model"], path=_resolve_model(parts["model"].path, base_dir),
                                             tokenizer=_resolve_model(parts["model"].tokenizer, base_dir))
    return JobConfig(**{k: raw[k] for k in TOP_LEVEL if k in raw}, **parts)


def _resolve(url: str | None, base_dir: Path) -> str | None:
    if url is None or "://" in url or Path(url).is_absolute():
        return url
    return str((base_dir / url).resolve())


def _resolve_model(url: str | None, base_dir: Path) -> str | None:
    """Like ``_resolve``, but ``org/model`` with no such folder next to the job file stays a Hub name."""
    resolved = _resolve(url, base_dir)
    if url is not None and resolved != url and not Path(resolved).exists() and HUB_NAME.match(url):
        return url
    return resolved


def load_config(path: str | Path) -> JobConfig:
    """Read a TOML job file (relative paths are relative to the file's folder)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from err
    return config_from_dict(raw, base_dir=p.resolve().parent)
