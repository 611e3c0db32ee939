"""Reading single tensors out of safetensors files in any storage, without reading the whole file.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``)
and the tensor bytes; offsets count from the end of the header. Per-layer
factor work reads one layer's tensors from files that hold every layer, so it
reads the header and then only the byte range of each tensor it needs (one
ranged GET each on object storage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from . import storage

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorFile:
    """The parsed header of a safetensors file at ``url``."""

    url: str
    header: dict[str, Any]
    data_start: int

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.get("__metadata__", {})

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]


def open_header(url: str) -> TensorFile:
    """Read only the header of the safetensors file at ``url``.

    Raises:
        ValueError: the file is too short or its header is not safetensors JSON (names the file).
    """
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{url}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{url}: not a safetensors file (bad header: {err})") from err
    return TensorFile(url, header, 8 + n)


def read_tensor(tf: TensorFile, name: str) -> torch.Tensor:
    """Tensor ``name`` of the file, read by its byte range (a CPU tensor that owns its memory)."""
    if name not in tf.header or name == "__metadata__":
        raise KeyError(f"{tf.url}: no tensor {name!r} (has {tf.names()[:8]}...)")
    info = tf.header[name]
    begin, end = info["data_offsets"]
    fs, path = storage.filesystem(tf.url)
    with fs.open(path, "rb") as f:
        f.seek(tf.data_start + begin)
        data = bytearray(f.read(end - begin))
    if len(data) != end - begin:
        raise ValueError(f"{tf.url}: tensor {name!r} is truncated ({len(data)} of {end - begin} bytes)")
    dtype = DTYPES[info["dtype"]]
    if not data:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])
