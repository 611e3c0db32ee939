"""One torch intra-op thread for the length of a block, for the tiny models of the demo and the eval suites.

Models this small run fastest on one thread, and on a loaded machine extra threads cost far more than they give
(measured: the exact suite's GPT-2 expected-Fisher fit took 0.75 s on 1 thread, 175 s on 2 at load average 8).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; the previous count comes back afterwards, also on error."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
