"""`fit-factors`: seeded corpus sample -> stage-1 sums (actors) -> eigh -> stage-3 Lambda (actors) -> factors/.

Each unit of the sample (``sampling.py``) yields partial sums and counts; the
driver adds them (``Covariances.merge`` / ``LambdaSums.merge``: exact up to the
order of float additions), so the result equals ``influence_ops.fit_ekfac`` on
the same sample whatever the number of actors. Sampled labels are drawn with a
seed per (stage, unit), so a sampled-Fisher fit is reproducible too.

Output folder ``<output>/factors``: the ``save_factors`` files (manifest.json
last), ``sample.parquet`` (shard, doc_id of every fitted sequence) and the
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

from influence_ops import (
    Covariances,
    Fisher,
    LambdaSums,
    assemble_factors,
    eigendecompose,
    fit_covariances,
    fit_lambda,
    save_factors,
)

from ..config import JobConfig, ModelConfig
from ..io import completion, storage
from ..io.model_loading import load_model, model_identity, pick_device
from ..io.payloads import (
    covariances_from_bytes,
    covariances_to_bytes,
    eigen_from_bytes,
    eigen_to_bytes,
    lambda_from_bytes,
    lambda_to_bytes,
    metadata_of,
)
from ..io.shards import list_shards, read_rows
from ..runtime.batching import token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of
from .sampling import Unit, plan_units, sample_rows

STAGE1 = "_stage1.safetensors"
EIGEN = "_eigen.safetensors"


def unit_seed(seed: int, stage: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stage, index]).generate_state(1)[0])


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
        for u in units_of(batch):
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


Sample = list[tuple[int, list[str], int]]  # per unit: (index, doc ids, tokens)


def _stage1(jobs: list[dict], args: dict, cfg: JobConfig, cluster: dict, url: str, key: str,
            show_progress: bool) -> tuple[Covariances, Sample]:
    """Stage-1 sums over all units, resumed from ``url`` when it holds this key's sums."""
    if storage.exists(url):
        data = storage.read_bytes(url)
        meta = metadata_of(data)
        if meta.get("key") == key:
            return covariances_from_bytes(data), [tuple(x) for x in json.loads(meta["sample"])]
    cov: Covariances | None = None
    sample: Sample = []
    with bar(len(jobs), "fit-factors stage 1 (covariances)", show_progress) as progress:
        for row in run_units(CovarianceWorker, args, jobs, cfg.resources, cluster, progress):
            part = covariances_from_bytes(row["payload"])
            cov = part if cov is None else cov.merge(part)
            sample.append((row["index"], json.loads(row["doc_ids"]), row["tokens"]))
    sample.sort(key=lambda x: x[0])
    storage.write_bytes(url, covariances_to_bytes(cov, {"key": key, "sample": json.dumps(sample)}))
    return cov, sample


def _stage3(jobs: list[dict], args: dict, cfg: JobConfig, cluster: dict, show_progress: bool) -> LambdaSums:
    lam: LambdaSums | None = None
    with bar(len(jobs), "fit-factors stage 3 (Lambda)", show_progress) as progress:
        for row in run_units(LambdaWorker, args, jobs, cfg.resources, cluster, progress):
            part = lambda_from_bytes(row["payload"])
            lam = part if lam is None else lam.merge(part)
    return lam


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
    jobs = [u.to_json() for u in units]
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "fisher": f.fisher.value, "seed": f.seed, "batch_size": cfg.resources.batch_size,
            "threads": cfg.resources.threads_per_actor,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0}
    stage1_url, eigen_url = storage.join(out, STAGE1), storage.join(out, EIGEN)
    cov, sample = _stage1(jobs, args, cfg, cluster, stage1_url, key, show_progress)
    eigen = eigendecompose(cov, blocks=f.blocks)
    storage.write_bytes(eigen_url, eigen_to_bytes(eigen))
    lam = _stage3(jobs, {**args, "eigen_url": eigen_url}, cfg, cluster, show_progress)
    layers = load_model(cfg.model).layers
    with tempfile.TemporaryDirectory() as tmp:
        save_factors(assemble_factors(layers, cov, eigen, lam, blocks=f.blocks), tmp,
                     extra={"pipeline_key": key, "config": cfg.to_dict()})
        storage.upload_dir(tmp, out, last=("manifest.json",))
    shard_of = {u.index: u.shard for u in units}
    storage.write_parquet(storage.join(out, "sample.parquet"), pa.table({
        "shard": [shard_of[i] for i, ids, _ in sample for _ in ids],
        "doc_id": [d for _, ids, _ in sample for d in ids]}))
    for stale in (stage1_url, eigen_url):
        storage.remove(stale)
    info = {"sequences": cov.sequences, "tokens": cov.tokens, "units": len(units), "layers": len(layers),
            "seconds": round(time.perf_counter() - start, 3), "digest": factors_digest(out)}
    return {**completion.mark_complete(out, key, info), "skipped": False}


def factors_digest(url: str) -> str:
    """Hash of a factor folder's safetensors files and manifest."""
    return storage.dir_digest(url)
