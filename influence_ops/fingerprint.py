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


def check_same_model(layers: Sequence[TrackedLayer], names: list[str], fingerprint: str,
                     kind: str, made: str) -> None:
    """Raise ValueError unless ``layers`` have these ``names`` and this ``fingerprint``.

    ``kind`` and ``made`` word the message: "{kind} were {made} a different model".
    """
    seen = [l.name for l in layers]
    if seen != names:
        raise ValueError(f"{kind} are for layers {names}, the model tracks {seen}")
    fp = model_fingerprint(layers)
    if fp != fingerprint:
        raise ValueError(f"{kind} were {made} a different model (fingerprint {fingerprint}, this model {fp}): "
                         "same layer names, different weights")
