"""Value checks of the job file's keys: every problem is a ``ConfigError`` naming the key and the value."""

from __future__ import annotations

import enum
from typing import Any


class ConfigError(ValueError):
    """A bad job file: the message names the key and the value."""


def fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key} = {value!r}: {why}")


def check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, value, f"must be an integer >= {minimum}")


def check_number(key: str, value: Any, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        fail(key, value, f"must be a number >= {minimum}")


def check_str(key: str, value: Any, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not value.strip():
        fail(key, value, "must be a non-empty string")


def enum_value(key: str, cls: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        fail(key, value, f"must be one of {[m.value for m in cls]}")
