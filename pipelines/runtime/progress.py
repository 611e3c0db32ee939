"""Progress bars for long stages (tqdm on stderr; silent when disabled)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def bar(total: int, desc: str, enabled: bool) -> Iterator[tqdm]:
    """A tqdm counting units of work; a no-op bar when ``enabled`` is False."""
    with tqdm(total=total, desc=desc, unit="unit", disable=not enabled, dynamic_ncols=True, leave=True) as b:
        yield b
