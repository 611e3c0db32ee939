"""Stage results as bytes (safetensors with JSON metadata), to pass between actors, driver and storage.

Stage-1 sums (``Covariances``), stage-3 sums (``LambdaSums``) and eigenbases
(``LayerEigen`` per layer) keep their layer order, counts and label mode in the
safetensors metadata; ``metadata_of`` reads it without loading the tensors.
"""

from __future__ import annotations

import json

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from influence_ops import Covariances, Fisher, LambdaSums, LayerCovariance, LayerEigen


def _passes(passes: int | None) -> dict[str, str]:
    """Metadata of the backward passes a stage's draws were summed into (absent: one per draw)."""
    return {} if passes is None else {"passes": str(passes)}


def _passes_of(meta: dict[str, str]) -> int | None:
    return int(meta["passes"]) if "passes" in meta else None


def covariances_to_bytes(cov: Covariances, extra: dict[str, str] | None = None) -> bytes:
    tensors = {}
    for i, c in enumerate(cov.layers.values()):
        tensors[f"{i}.a_sum"], tensors[f"{i}.s_sum"] = c.a_sum.cpu(), c.s_sum.cpu()
    meta = {"layers": json.dumps(list(cov.layers)), "tokens": json.dumps([c.tokens for c in cov.layers.values()]),
            "sequences": str(cov.sequences), "fisher": cov.fisher.value, "samples": str(cov.samples),
            **_passes(cov.passes), **(extra or {})}
    return st_save(tensors, metadata=meta)


def covariances_from_bytes(data: bytes) -> Covariances:
    meta, t = metadata_of(data), st_load(data)
    names, tokens = json.loads(meta["layers"]), json.loads(meta["tokens"])
    return Covariances({n: LayerCovariance(t[f"{i}.a_sum"], t[f"{i}.s_sum"], tokens[i]) for i, n in enumerate(names)},
                       int(meta["sequences"]), Fisher(meta["fisher"]), int(meta.get("samples", 1)),
                       _passes_of(meta))


def metadata_of(data: bytes) -> dict[str, str]:
    """The metadata of safetensors bytes (an 8-byte little-endian header length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def lambda_to_bytes(lam: LambdaSums, extra: dict[str, str] | None = None) -> bytes:
    return st_save({f"{i}": s.cpu() for i, s in enumerate(lam.sums.values())},
                   metadata={"layers": json.dumps(list(lam.sums)), "sequences": str(lam.sequences),
                             "fisher": lam.fisher.value, "samples": str(lam.samples), **_passes(lam.passes),
                             **(extra or {})})


def lambda_from_bytes(data: bytes) -> LambdaSums:
    meta, t = metadata_of(data), st_load(data)
    return LambdaSums({n: t[str(i)] for i, n in enumerate(json.loads(meta["layers"]))}, int(meta["sequences"]),
                      Fisher(meta["fisher"]), int(meta.get("samples", 1)), _passes_of(meta))


def eigen_to_bytes(eigen: dict[str, LayerEigen]) -> bytes:
    tensors = {f"{i}.{k}": getattr(e, k).cpu().contiguous() for i, e in enumerate(eigen.values())
               for k in ("q_a", "e_a", "q_s", "e_s")}
    return st_save(tensors, metadata={"layers": json.dumps(list(eigen))})


def eigen_from_bytes(data: bytes) -> dict[str, LayerEigen]:
    meta, t = metadata_of(data), st_load(data)
    return {n: LayerEigen(*(t[f"{i}.{k}"] for k in ("q_a", "e_a", "q_s", "e_s")))
            for i, n in enumerate(json.loads(meta["layers"]))}
