"""Saving and loading factors: one safetensors file per layer plus manifest.json.

The manifest is written last (to a temporary name, then renamed), so a directory
without ``manifest.json`` is incomplete and is never mistaken for finished
factors. Local paths only: the pipelines copy to and from object storage.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .eigen import LayerEigen
from .factors import EKFACFactors, LayerFactors
from .layers import TrackedLayer
from .fisher import Fisher
from .version import FACTORS_FORMAT, __version__

MANIFEST = "manifest.json"


def layer_file(index: int, name: str) -> str:
    """File name of layer ``index`` (tracked-layer order) in a factor directory."""
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def layer_tensors(lf: LayerFactors) -> dict[str, torch.Tensor]:
    """The tensors of one layer file (on the CPU, contiguous)."""
    tensors = {"a_sum": lf.a_sum, "s_sum": lf.s_sum, "lambda_sum": lf.lambda_sum,
               "q_a": lf.eigen.q_a, "e_a": lf.eigen.e_a, "q_s": lf.eigen.q_s, "e_s": lf.eigen.e_s}
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def manifest_entry(name: str, file: str, shape: tuple[int, int], tokens: int, sequences: int,
                   dtype: torch.dtype) -> dict[str, Any]:
    return {"name": name, "file": file, "d_out": shape[0], "d_in_h": shape[1], "tokens": tokens,
            "sequences": sequences, "dtype": str(dtype).removeprefix("torch.")}


def build_manifest(entries: list[dict[str, Any]], fingerprint: str, fisher: Fisher, covariance_sequences: int,
                   lambda_sequences: int, blocks: int, extra: dict[str, Any] | None = None,
                   samples: int = 1, lambda_samples: int = 1, passes: int | None = None,
                   lambda_passes: int | None = None) -> dict[str, Any]:
    """The manifest of a factor directory whose layer files are described by ``entries`` (in layer order)."""
    return {
        "format": FACTORS_FORMAT, "library_version": __version__, "model_fingerprint": fingerprint,
        "fisher": fisher.value, "fisher_samples": samples, "lambda_samples": lambda_samples,
        "fisher_passes": passes, "lambda_passes": lambda_passes,
        "covariance_sequences": covariance_sequences,
        "tokens": entries[0]["tokens"], "lambda_sequences": lambda_sequences, "blocks": blocks,
        "eigh_dtype": "float64", "damping_rule": "0.1 * mean(Lambda) per layer unless an absolute value is given",
        "layers": entries, "extra": extra or {},
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_meta(path: Path, fmt: str, what: str, kind: str, remedy: str) -> dict[str, Any]:
    """The JSON a save writes last beside its tensors (queries, index projection), checked.

    Raises FileNotFoundError when ``path`` is absent (``what`` is missing or incomplete) and
    ValueError when its ``format`` is not ``fmt`` (the message names ``kind`` and ends with ``remedy``).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {path.name}; {what} is missing or incomplete")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{path}: {kind} {meta.get('format')!r} is not {fmt!r}; {remedy}")
    return meta


def save_factors(factors: EKFACFactors, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``factors`` to ``directory`` (created). ``extra`` is stored in the manifest."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stale = out / MANIFEST
    if stale.exists():
        stale.unlink()  # the directory is incomplete until the new manifest lands
    entries = []
    for i, (name, lf) in enumerate(factors.layers.items()):
        fname = layer_file(i, name)
        save_file(layer_tensors(lf), str(out / fname))
        entries.append(manifest_entry(name, fname, factors.shapes[name], lf.tokens, lf.sequences, lf.a_sum.dtype))
    manifest = build_manifest(entries, factors.fingerprint, factors.fisher, factors.covariance_sequences,
                              factors.lambda_sequences, factors.blocks, extra, factors.samples,
                              factors.lambda_samples, factors.passes, factors.lambda_passes)
    write_json_atomic(out / MANIFEST, manifest)
    return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; the factor directory is missing or incomplete")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FACTORS_FORMAT:
        raise ValueError(
            f"{path}: factor format {manifest.get('format')!r} (library {manifest.get('library_version')}) "
            f"is not the format {FACTORS_FORMAT!r} this library ({__version__}) reads; refit the factors"
        )
    return manifest


def load_factors(directory: str | os.PathLike, layers: Sequence[TrackedLayer] | None = None,
                 device: torch.device | str = "cpu") -> EKFACFactors:
    """Load factors; with ``layers``, check they belong to that model (else ValueError)."""
    manifest = read_manifest(directory)
    out: dict[str, LayerFactors] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for entry in manifest["layers"]:
        path = Path(directory) / entry["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path}: factor file of layer {entry['name']} is missing")
        t = load_file(str(path), device=str(device))
        shape = (entry["d_out"], entry["d_in_h"])
        if tuple(t["lambda_sum"].shape) != shape:
            raise ValueError(f"{path}: lambda_sum has shape {tuple(t['lambda_sum'].shape)}, manifest says {shape}")
        out[entry["name"]] = LayerFactors(
            a_sum=t["a_sum"], s_sum=t["s_sum"], tokens=entry["tokens"],
            eigen=LayerEigen(q_a=t["q_a"], e_a=t["e_a"], q_s=t["q_s"], e_s=t["e_s"]),
            lambda_sum=t["lambda_sum"], sequences=entry["sequences"])
        shapes[entry["name"]] = shape
    factors = EKFACFactors(layers=out, shapes=shapes, fingerprint=manifest["model_fingerprint"],
                           fisher=Fisher(manifest["fisher"]),
                           covariance_sequences=manifest["covariance_sequences"], blocks=manifest["blocks"],
                           samples=manifest.get("fisher_samples", 1), lambda_samples=manifest.get("lambda_samples", 1),
                           passes=manifest.get("fisher_passes"), lambda_passes=manifest.get("lambda_passes"))
    if layers is not None:
        factors.check_model(layers)
    return factors
