"""Per-layer factor work on actors: reduce the units' partial sums, eigendecompose, write the layer's files.

The driver of `fit-factors` never holds factor tensors. Each stage-1 and
stage-3 unit writes its partial sums (every layer) to one safetensors file in
``<factors>/_partials/``; then one task per layer runs on the actor pool:

- ``LayerEigenWorker`` (stage 2): adds the layer's A and S sums over every
  stage-1 partial in unit order (reading only that layer's byte ranges), then
  ``influence_ops.eigendecompose_layer`` (float64 ``eigh``, on the actor's GPU
  when it has one), and writes ``<factors>/_stage2/<layer file>`` (sums,
  eigenvectors, eigenvalues).
- ``LayerFinalWorker`` (after stage 3): adds the layer's Lambda sums over every
  stage-3 partial in unit order and writes the layer's final file into the
  factor directory, in ``influence_ops.save_factors``' layout.

Memory: a layer task holds one layer's sums, one partial tensor and the eigh
workspace; the driver holds only the rows these tasks return (names, shapes,
counts). Sums are added in unit order, so the factors do not depend on which
actor ran which unit or in what order units finished.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from influence_ops import LayerCovariance, LayerEigen
from influence_ops.eigen import eigendecompose_layer
from influence_ops.storage import manifest_entry

from ..io import storage
from ..io.tensor_files import TensorFile, open_header, read_tensor
from ..runtime.ray_runtime import set_threads, units_of

EIGEN_TENSORS = ("q_a", "e_a", "q_s", "e_s")


def _layer_index(tf: TensorFile, name: str) -> int:
    names = json.loads(tf.metadata["layers"])
    if name not in names:
        raise ValueError(f"{tf.url}: partial sums have no layer {name!r} (layers: {names})")
    return names.index(name)


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part.to(total))


def reduce_covariance(name: str, partials: list[str]) -> tuple[LayerCovariance, int]:
    """The layer's stage-1 sums over ``partials`` (in the given order); and the sequence count."""
    a_sum = s_sum = None
    tokens = sequences = 0
    for url in partials:
        tf = open_header(url)
        i = _layer_index(tf, name)
        a_sum = _add(a_sum, read_tensor(tf, f"{i}.a_sum"))
        s_sum = _add(s_sum, read_tensor(tf, f"{i}.s_sum"))
        tokens += int(json.loads(tf.metadata["tokens"])[i])
        sequences += int(tf.metadata["sequences"])
    if a_sum is None:
        raise ValueError(f"layer {name}: no stage-1 partial sums to reduce")
    return LayerCovariance(a_sum, s_sum, tokens), sequences


def reduce_lambda(name: str, partials: list[str]) -> tuple[torch.Tensor, int]:
    """The layer's stage-3 Lambda sum over ``partials`` (in the given order); and the sequence count."""
    total = None
    sequences = 0
    for url in partials:
        tf = open_header(url)
        total = _add(total, read_tensor(tf, str(_layer_index(tf, name))))
        sequences += int(tf.metadata["sequences"])
    if total is None:
        raise ValueError(f"layer {name}: no stage-3 partial sums to reduce")
    return total, sequences


def load_layer_eigen(stage2_url: str) -> LayerEigen:
    """The eigenbases of one layer from its stage-2 file (without its sums)."""
    tf = open_header(stage2_url)
    return LayerEigen(*(read_tensor(tf, k) for k in EIGEN_TENSORS))


class _LayerWorker:
    def __init__(self, threads: int = 0, use_gpu: bool = False) -> None:
        set_threads(threads)
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def work(self, unit: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for unit in units_of(batch):
            start = time.perf_counter()
            rows.append({**self.work(unit), "seconds": time.perf_counter() - start})
        return {k: np.asarray([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
                for k in rows[0]}


class LayerEigenWorker(_LayerWorker):
    """Stage 2 of one layer: ``{name, partials, out, blocks}`` -> the layer's stage-2 file; a row of counts."""

    def work(self, unit: dict[str, Any]) -> dict[str, Any]:
        name = unit["name"]
        cov, sequences = reduce_covariance(name, unit["partials"])
        moved = LayerCovariance(cov.a_sum.to(self.device), cov.s_sum.to(self.device), cov.tokens)
        eigen = eigendecompose_layer(name, moved, unit["blocks"])
        tensors = {"a_sum": cov.a_sum, "s_sum": cov.s_sum,
                   **{k: getattr(eigen, k).cpu().contiguous() for k in EIGEN_TENSORS}}
        storage.write_bytes(unit["out"], st_save(tensors, metadata={"name": name, "tokens": str(cov.tokens),
                                                                    "key": unit["key"]}))
        return {"name": name, "tokens": cov.tokens, "sequences": sequences, "d_out": int(cov.s_sum.shape[0]),
                "d_in_h": int(cov.a_sum.shape[0]), "device": str(self.device)}


class LayerFinalWorker(_LayerWorker):
    """The final file of one layer: ``{name, index, stage2, partials, out}`` -> ``out``; its manifest entry."""

    def work(self, unit: dict[str, Any]) -> dict[str, Any]:
        name = unit["name"]
        lambda_sum, sequences = reduce_lambda(name, unit["partials"])
        tf = open_header(unit["stage2"])
        tensors = {k: read_tensor(tf, k) for k in ("a_sum", "s_sum", *EIGEN_TENSORS)}
        tensors["lambda_sum"] = lambda_sum
        storage.write_bytes(unit["out"], st_save({k: tensors[k] for k in sorted(tensors)}))
        entry = manifest_entry(name, unit["out"].rsplit("/", 1)[-1], tuple(lambda_sum.shape),
                               int(tf.metadata["tokens"]), sequences, tensors["a_sum"].dtype)
        return {"name": name, "entry": json.dumps(entry), "sequences": sequences}
