"""Model identity: a hash of the tracked layers' names, shapes and weights."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .layers import TrackedLayer


def model_fingerprint(layers: Sequence[TrackedLayer]) -> str:
    """sha256 (hex, first 32 chars) over each tracked layer's name, shape and W' in float32.

    Two models give the same fingerprint exactly when their tracked layers have
    the same names and the same weights (as float32), which is what factors and
    preconditioned queries depend on.
    """
    h = hashlib.sha256()
    for layer in layers:
        w = layer.weight_matrix().to("cpu", torch.float32).contiguous()
        h.update(layer.name.encode())
        h.update(repr(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()[:32]
