"""Saving and loading preconditioned queries: ``queries.safetensors`` + ``queries.json``.

``queries.json`` is written last (temporary name, then rename): a directory
without it is incomplete. The pipelines add ``queries.parquet`` beside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .queries import LayerQuery, PreconditionedQueries
from .storage import read_meta, write_json_atomic
from .version import QUERIES_FORMAT, __version__

TENSORS = "queries.safetensors"
META = "queries.json"


def save_queries(queries: PreconditionedQueries, directory: str | os.PathLike) -> Path:
    """Write ``queries`` to ``directory`` (created), in the weight basis (``PreconditionedQueries.to_weight_basis``)."""
    queries = queries.to_weight_basis()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).exists():
        (out / META).unlink()
    tensors = {"measurement": queries.measurement, "truncation_error": queries.truncation_error}
    for i, (name, q) in enumerate(queries.layers.items()):
        for part in ("dense", "left", "right"):
            t = getattr(q, part)
            if t is not None:
                tensors[f"{i}.{part}"] = t
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    write_json_atomic(out / META, {
        "format": QUERIES_FORMAT, "library_version": __version__, "layers": queries.layer_names,
        "rank": queries.rank, "model_fingerprint": queries.fingerprint, "factor_tokens": queries.factor_tokens,
        "damping": queries.damping, "query_ids": queries.query_ids, "num_queries": queries.num_queries,
        # float64 written by repr: exact in JSON (kept out of the tensor file, whose layout it would shift)
        "self_influence": None if queries.self_influence is None else queries.self_influence.tolist(),
    })
    return out


def load_queries(directory: str | os.PathLike, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> PreconditionedQueries:
    """Load queries saved by ``save_queries`` (optionally cast the layer tensors to ``dtype``)."""
    meta = read_meta(Path(directory) / META, QUERIES_FORMAT, "the query directory", "query format",
                     "rebuild the queries")
    t = load_file(str(Path(directory) / TENSORS), device=str(device))
    layers = {}
    for i, name in enumerate(meta["layers"]):
        parts = {p: t.get(f"{i}.{p}") for p in ("dense", "left", "right")}
        if dtype is not None:
            parts = {p: None if v is None else v.to(dtype) for p, v in parts.items()}
        layers[name] = LayerQuery(**parts)
    return PreconditionedQueries(layers, t["measurement"], t["truncation_error"], meta["rank"],
                                 meta["model_fingerprint"], meta["factor_tokens"], meta["damping"],
                                 meta["query_ids"], None if meta.get("self_influence") is None else
                                 torch.tensor(meta["self_influence"], dtype=torch.float64))
