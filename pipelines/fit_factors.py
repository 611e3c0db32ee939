"""`fit-factors`: seeded corpus sample -> stage-1 sums (actors) -> eigh -> stage-3 Lambda (actors) -> factors/.

Each unit of the sample (``sampling.py``) yields partial sums and counts; the
driver adds them (``Covariances.merge`` / ``LambdaSums.merge``: exact up to the
order of float additions), so the result equals ``influence_ops.fit_ekfac`` on
the same sample whatever the number of actors. Sampled labels are drawn with a
seed per (stage, unit), so a sampled-Fisher fit is reproducible too.

Output folder ``<output>/factors``: the ``save_factors`` files (manifest.json
last), ``sample.parquet`` (shard, row, doc_id of every fitted sequence) and the
completion marker. ``_stage1.safetensors`` keeps the stage-1 sums, so an
interrupted fit resumes at stage 3.
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from influence_ops import (Covariances, Fisher, LambdaSums, LayerCovariance, LayerEigen, assemble_factors,
                           eigendecompose, fit_covariances, fit_lambda, save_factors)

from . import completion, storage
from .batching import token_batches
from .config import JobConfig, ModelConfig
from .model_loading import load_model, model_identity, pick_device
from .progress import bar
from .ray_runtime import ensure_ray, run_units, set_threads, unit_of
from .sampling import Unit, plan_units, sample_rows
from .shards import list_shards, read_rows

STAGE1 = "_stage1.safetensors"
EIGEN = "_eigen.safetensors"


def unit_seed(seed: int, stage: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stage, index]).generate_state(1)[0])


def covariances_to_bytes(cov: Covariances) -> bytes:
    tensors = {}
    for i, c in enumerate(cov.layers.values()):
        tensors[f"{i}.a_sum"], tensors[f"{i}.s_sum"] = c.a_sum.cpu(), c.s_sum.cpu()
    meta = {"layers": json.dumps(list(cov.layers)), "tokens": json.dumps([c.tokens for c in cov.layers.values()]),
            "sequences": str(cov.sequences), "fisher": cov.fisher.value}
    return st_save(tensors, metadata=meta)


def covariances_from_bytes(data: bytes, meta: dict[str, str]) -> Covariances:
    t = st_load(data)
    names, tokens = json.loads(meta["layers"]), json.loads(meta["tokens"])
    return Covariances({n: LayerCovariance(t[f"{i}.a_sum"], t[f"{i}.s_sum"], tokens[i]) for i, n in enumerate(names)},
                       int(meta["sequences"]), Fisher(meta["fisher"]))


def _st_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def lambda_to_bytes(lam: LambdaSums) -> bytes:
    return st_save({f"{i}": s.cpu() for i, s in enumerate(lam.sums.values())},
                   metadata={"layers": json.dumps(list(lam.sums)), "sequences": str(lam.sequences),
                             "fisher": lam.fisher.value})


def lambda_from_bytes(data: bytes) -> LambdaSums:
    meta, t = _st_metadata(data), st_load(data)
    return LambdaSums({n: t[str(i)] for i, n in enumerate(json.loads(meta["layers"]))}, int(meta["sequences"]),
                      Fisher(meta["fisher"]))


def eigen_to_bytes(eigen: dict[str, LayerEigen]) -> bytes:
    tensors = {f"{i}.{k}": getattr(e, k).cpu().contiguous() for i, e in enumerate(eigen.values())
               for k in ("q_a", "e_a", "q_s", "e_s")}
    return st_save(tensors, metadata={"layers": json.dumps(list(eigen))})


def eigen_from_bytes(data: bytes) -> dict[str, LayerEigen]:
    meta, t = _st_metadata(data), st_load(data)
    return {n: LayerEigen(*(t[f"{i}.{k}"] for k in ("q_a", "e_a", "q_s", "e_s")))
            for i, n in enumerate(json.loads(meta["layers"]))}


class _FitWorker:
    """Shared part of the two fitting callables: the model, and a unit's batches."""

    stage = 0

    def __init__(self, model: ModelConfig, fisher: str, seed: int, batch_size: int, threads: int = 0,
                 use_gpu: bool = False) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        self.fisher, self.seed, self.batch_size = Fisher(fisher), seed, batch_size

    def _batches(self, unit: Unit) -> tuple[list[str], list[Any], int]:
        seqs = read_rows(unit.shard, np.asarray(unit.rows), self.m.vocab_size)
        pairs = list(token_batches(seqs, self.batch_size, device=self.m.device))
        tokens = int(sum(b.attention_mask.sum() for _, b in pairs))
        return [d for p, _ in pairs for d in p.doc_ids], [b for _, b in pairs], tokens

    def fit(self, unit: Unit, batches: list[Any]) -> bytes:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"index": [], "payload": [], "doc_ids": [], "tokens": []}
        for u in unit_of(batch):
            unit = Unit.from_json(u)
            doc_ids, batches, tokens = self._batches(unit)
            out["index"].append(unit.index)
            out["payload"].append(self.fit(unit, batches))
            out["doc_ids"].append(json.dumps(doc_ids))
            out["tokens"].append(tokens)
        return {"index": np.asarray(out["index"]), "payload": np.asarray(out["payload"], dtype=object),
                "doc_ids": np.asarray(out["doc_ids"], dtype=object), "tokens": np.asarray(out["tokens"])}


class CovarianceWorker(_FitWorker):
    """Stage 1 on a unit: the stage-1 sums as safetensors bytes."""

    def fit(self, unit: Unit, batches: list[Any]) -> bytes:
        cov = fit_covariances(self.m.model, self.m.layers, batches, self.fisher, unit_seed(self.seed, 1, unit.index),
                              autocast_dtype=self.m.autocast)
        return covariances_to_bytes(cov)


class LambdaWorker(_FitWorker):
    """Stage 3 on a unit, given the eigenbases at ``eigen_url``: Lambda sums as bytes."""

    def __init__(self, eigen_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eigen = eigen_from_bytes(storage.read_bytes(eigen_url))

    def fit(self, unit: Unit, batches: list[Any]) -> bytes:
        lam = fit_lambda(self.m.model, self.m.layers, self.eigen, batches, self.fisher,
                         unit_seed(self.seed, 3, unit.index), autocast_dtype=self.m.autocast)
        return lambda_to_bytes(lam)


def factors_key(cfg: JobConfig, shards: list[str]) -> str:
    return completion.inputs_key("factors", cfg.model.__dict__, model_identity(cfg.model), cfg.factors.__dict__,
                                 cfg.resources.batch_size, completion.shard_fingerprints(shards))


def fit_factors(cfg: JobConfig, show_progress: bool = False) -> dict[str, Any]:
    """Run the stage (skipped when ``factors/`` is complete for these inputs); returns its summary."""
    out = storage.join(cfg.data.output, "factors")
    shards = list_shards(cfg.data.corpus)
    key = factors_key(cfg, shards)
    done = completion.completed(out, key)
    if done is not None:
        return {**done, "skipped": True}
    start = time.perf_counter()
    f = cfg.factors
    units = plan_units(shards, sample_rows(shards, f.sample_sequences, f.sample_tokens, f.seed), f.unit_sequences)
    cluster = ensure_ray(cfg.resources)
    worker_args = {"model": cfg.model, "fisher": f.fisher.value, "seed": f.seed,
                   "batch_size": cfg.resources.batch_size, "threads": cfg.resources.threads_per_actor,
                   "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0}
    jobs = [u.to_json() for u in units]

    stage1_url = storage.join(out, STAGE1)
    cov: Covariances | None = None
    sample: list[tuple[int, list[str], int]] = []
    if storage.exists(stage1_url):
        data = storage.read_bytes(stage1_url)
        meta = _st_metadata(data)
        if meta.get("key") == key:
            cov = covariances_from_bytes(data, meta)
            sample = [tuple(x) for x in json.loads(meta["sample"])]
    if cov is None:
        with bar(len(jobs), "fit-factors stage 1 (covariances)", show_progress) as progress:
            for row in run_units(CovarianceWorker, worker_args, jobs, cfg.resources, cluster, progress):
                part = covariances_from_bytes(row["payload"], _st_metadata(row["payload"]))
                cov = part if cov is None else cov.merge(part)
                sample.append((row["index"], json.loads(row["doc_ids"]), row["tokens"]))
        sample.sort(key=lambda x: x[0])
        meta = _st_metadata(covariances_to_bytes(cov))
        tensors = st_load(covariances_to_bytes(cov))
        storage.write_bytes(stage1_url, st_save(tensors, metadata={**meta, "key": key, "sample": json.dumps(sample)}))
    eigen = eigendecompose(cov, blocks=f.blocks)
    eigen_url = storage.join(out, EIGEN)
    storage.write_bytes(eigen_url, eigen_to_bytes(eigen))
    lam: LambdaSums | None = None
    with bar(len(jobs), "fit-factors stage 3 (Lambda)", show_progress) as progress:
        for row in run_units(LambdaWorker, {**worker_args, "eigen_url": eigen_url}, jobs, cfg.resources, cluster,
                             progress):
            part = lambda_from_bytes(row["payload"])
            lam = part if lam is None else lam.merge(part)
    layers = load_model(cfg.model).layers
    factors = assemble_factors(layers, cov, eigen, lam, blocks=f.blocks)
    rows_of = {u.index: u for u in units}
    sample_table = pa.table({
        "shard": [rows_of[i].shard for i, ids, _ in sample for _ in ids],
        "doc_id": [d for _, ids, _ in sample for d in ids],
    })
    with tempfile.TemporaryDirectory() as tmp:
        save_factors(factors, tmp, extra={"pipeline_key": key, "config": cfg.to_dict()})
        storage.upload_dir(tmp, out, last=("manifest.json",))
    storage.write_parquet(storage.join(out, "sample.parquet"), sample_table)
    for stale in (stage1_url, eigen_url):
        storage.remove(stale)
    info = {"sequences": cov.sequences, "tokens": cov.tokens, "units": len(units), "layers": len(layers),
            "seconds": round(time.perf_counter() - start, 3), "digest": factors_digest(out)}
    return {**completion.mark_complete(out, key, info), "skipped": False}


def factors_digest(url: str) -> str:
    """Hash of a factor folder's safetensors files and manifest."""
    return storage.dir_digest(url)
