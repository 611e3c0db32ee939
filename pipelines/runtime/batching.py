"""Sequences -> padded ``TokenBatch``es, sorted by length, prepared ahead of the compute.

Sorting a window of sequences by length before cutting batches limits padding
(padding costs compute but never changes a sequence's gradient: losses are
per-sequence sums). ``prefetch`` prepares the next batches in a background
thread (reading, checking, collating, pinning and copying to the device) while
the current one computes; torch releases the GIL in its kernels, so the two
overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from influence_ops import TokenBatch, collate

from ..io.shards import Sequences

T = TypeVar("T")


def length_order(seqs: Sequences) -> np.ndarray:
    """Indices sorting by (length, file row): deterministic."""
    return np.lexsort((seqs.rows, seqs.lengths))


def token_batches(seqs: Sequences, batch_size: int, sort: bool = True,
                  device: torch.device | None = None) -> Iterator[tuple[Sequences, TokenBatch]]:
    """(the sequences of the batch, their TokenBatch) for consecutive groups of ``batch_size``."""
    if sort:
        seqs = seqs.take(length_order(seqs))
    for lo in range(0, len(seqs), batch_size):
        part = seqs.take(np.arange(lo, min(lo + batch_size, len(seqs))))
        batch = collate(part.input_ids, part.loss_masks)
        if device is not None and device.type == "cuda":
            batch = TokenBatch(*(t.pin_memory().to(device, non_blocking=True)
                                 for t in (batch.input_ids, batch.attention_mask, batch.labels)))
        yield part, batch


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` produced by a background thread, at most ``depth`` ahead.

    An exception raised while producing is re-raised here, in the consumer.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(err)
            return
        q.put(_DONE)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
