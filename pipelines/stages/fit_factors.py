"""`fit-factors`: seeded corpus sample -> stage-1 sums (actors) -> eigh per layer (actors) -> stage-3 Lambda
(actors) -> factors/, with no factor tensor on the driver.

Each unit of the sample (``sampling.py``) writes its partial sums and counts to
``<factors>/_partials/stage{1,3}/unit-NNNNN.safetensors`` (the workers: ``factor_units.py``); one task per layer
(``factor_layers.py``) adds that layer's partials in unit order, eigendecomposes
it, and writes the layer's file straight into the factor directory. The result
equals ``influence_ops.fit_ekfac`` on the same sample (exact up to the order of
float additions) whatever the number of actors, and is identical from run to
run. Sampled labels are drawn with a seed per (stage, unit), so a
sampled-Fisher fit is reproducible too; ``factors.fisher_samples = k`` (stage 1)
and ``factors.lambda_samples`` (stage 3) draw k label sets per position from
that unit's generator and average them. A unit whose partial file carries the
current key is not redone, so an interrupted fit resumes unit by unit.

A unit that fails (a contract violation, a sequence longer than the model's
context, storage errors after retries) and a shard whose Parquet footer does
not read follow the job's ``on_error`` (``runtime/failures.py``): "fail" stops
the stage with one line naming the file; "skip" leaves them out of the sums
(the factors are those of the remaining sample; ``sample.parquet`` lists it)
and reports them. Every sampled row is accounted for: fitted + skipped ==
sampled.

Output folder ``<output>/factors``: the ``save_factors`` files (manifest.json
last), ``sample.parquet`` (shard, doc_id of every fitted sequence) and the
completion marker. The partials and ``_stage2/`` are removed at the end. Whether
factors already fitted stay current (the key, ``factors.refit``): ``factor_refit.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from influence_ops.fisher import effective_passes, is_random
from influence_ops.storage import MANIFEST, build_manifest, layer_file

from ..config import JobConfig
from ..io import completion, storage
from ..io.shards import list_shards, row_counts
from ..io.tensor_files import open_header
from ..runtime.accounting import UnitLog
from ..runtime.failures import FailureLog, StageFailed, one_line, row_range
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units
from .factor_layers import LayerEigenWorker, LayerFinalWorker
from .factor_refit import factors_key, keeps_factors, named_fingerprints
from .factor_units import CovarianceWorker, LambdaWorker
from .sampling import Unit, plan_units, sample_rows

log = logging.getLogger(__name__)
PARTIALS = "_partials"
STAGE2 = "_stage2"


def _partial_url(out: str, stage: int, index: int) -> str:
    return storage.join(out, PARTIALS, f"stage{stage}", f"unit-{index:05d}.safetensors")


def _current(url: str, key: str) -> dict[str, str] | None:
    """The metadata of the partial at ``url`` when it exists, its header reads and it carries ``key``."""
    if not storage.exists(url):
        return None
    try:
        meta = open_header(url).metadata
    except (ValueError, OSError) as err:
        if isinstance(err, storage.StorageError):
            raise
        log.warning("%s: unreadable (%s); it will be written again", url, str(err).splitlines()[0])
        return None
    return meta if meta.get("key") == key else None


def _unit_stage(worker: type, stage: int, units: list[Unit], args: dict, out: str, key: str, cfg: JobConfig,
                cluster: dict, show_progress: bool, failures: FailureLog) -> dict[str, Any]:
    """Run ``worker`` on every unit whose partial is not current; the unit sums stay in storage.

    ``failed`` holds the indices of the units that failed (``failures`` has them; with
    ``on_error = "fail"`` the first one raised).
    """
    todo, fingerprints, layers, failed = [], set(), set(), set()
    for u in units:
        url = _partial_url(out, stage, u.index)
        if _current(url, key) is None:
            todo.append({**u.to_json(), "partial": url, "key": key})
    by_index = {u.index: u for u in units}
    log = UnitLog()
    with bar(len(todo), f"fit-factors stage {stage}", show_progress) as progress:
        for row in run_units(worker, args, todo, cfg.resources, cluster, progress, log):
            if row["error"]:
                unit = by_index[int(row["index"])]
                failures.add(unit.shard, row["error"], row_range(unit.rows), row["doc_id"] or None)
                failed.add(unit.index)
                continue
            fingerprints.add(row["fingerprint"])
            layers.add(row["layers"])
    if len(fingerprints) > 1 or len(layers) > 1:
        raise ValueError(f"fit-factors stage {stage}: actors loaded different models ({sorted(fingerprints)}); "
                         "was model.path changed during the run?")
    return {"done": len(todo) - len(failed), "resumed": len(units) - len(todo),
            "fingerprint": next(iter(fingerprints), None), "layers": next(iter(layers), None),
            "units": log.summary(), "failed": failed}


def readable_shards(shards: list[str], failures: FailureLog, known: dict[str, int] | None = None) -> dict[str, int]:
    """Rows of each shard whose Parquet footer reads; the others go to ``failures`` (which raises under
    "fail"). known: url -> rows of footers already read (by the refit check), not read again."""
    from ..io.storage import StorageError

    ok = {}
    for shard in shards:
        if known and shard in known:
            ok[shard] = known[shard]
            continue
        try:
            (ok[shard],) = row_counts([shard])
        except StorageError:
            raise
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            failures.add(shard, one_line(shard, err))
    return ok


def _footer_rows(urls: dict[str, str], read: dict[str, int]) -> Callable[[str], int]:
    """name -> rows of the shard of that name (0 when its footer does not read), for ``keeps_factors``; the
    footers that read are kept in ``read`` (url -> rows) so that a refit does not read them again."""
    def rows(name: str) -> int:
        try:
            read[urls[name]] = row_counts([urls[name]])[0]
        except (OSError, ValueError):  # unreadable: nothing to fit on (the stages skip or refuse it)
            return 0
        return read[urls[name]]
    return rows


def _layer_stage(worker: type, jobs: list[dict], cfg: JobConfig, cluster: dict, use_gpu: bool, name: str,
                 show_progress: bool) -> tuple[dict[str, dict], dict[str, Any]]:
    """One task per layer on the actor pool; returns name -> row, and the unit accounting."""
    args = {"threads": cfg.resources.threads_per_actor, "use_gpu": use_gpu}
    rows: dict[str, dict] = {}
    log = UnitLog()
    with bar(len(jobs), f"fit-factors {name}", show_progress) as progress:
        for row in run_units(worker, args, jobs, cfg.resources, cluster, progress, log):
            rows[row["name"]] = row
    return rows, log.summary()


def _layer_names(out: str, units: list[Unit], stage_info: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """(name, shape) of the tracked layers, from the stage-1 actors or the first current partial."""
    if stage_info["layers"] is not None:
        return [tuple(x) for x in json.loads(stage_info["layers"])]
    meta = open_header(_partial_url(out, 1, units[0].index)).metadata
    return [(n, []) for n in json.loads(meta["layers"])]


def fit_factors(cfg: JobConfig, show_progress: bool = False) -> dict[str, Any]:
    """Run the stage (skipped when ``factors/`` is complete for these inputs); returns its summary.

    The summary's ``driver_peak_rss_mb`` is this process's peak resident memory
    (``getrusage``), ``driver_peak_rss_at_start_mb`` the same once Ray was joined: the
    difference is what the stage itself cost the driver (no factor tensor passes through
    it, so it does not grow with the layers). ``tasks`` says where each step ran (``UnitLog``).
    """
    out = storage.join(cfg.data.output, "factors")
    shards = list_shards(cfg.data.corpus)
    shard_prints = completion.shard_fingerprints(shards)
    key = factors_key(cfg, shard_prints)
    done = completion.completed(out, key)
    refit = None  # why factors fitted for these settings are refitted (on_growth), for the summary
    footers: dict[str, int] = {}  # url -> rows, footers the refit check read
    if done is not None:
        fitted_on = done.pop("fitted_shards", None)
        if cfg.factors.refit != "on_growth":
            return {**done, "skipped": True}
        named = named_fingerprints(shard_prints, cfg.data.corpus)
        urls = {name: url for (name, _), (url, _) in zip(named, shard_prints)}
        kept, refit = keeps_factors([tuple(f) for f in fitted_on] if fitted_on else None, named,
                                    cfg.factors.refit_growth, _footer_rows(urls, footers))
        if kept:
            return {**done, "skipped": True, "refit": refit}
        log.info("fit-factors: %s", refit)
    completion.invalidate(out)  # an older fit's files may stay, but never look complete
    storage.remove(storage.join(out, MANIFEST))
    start = time.perf_counter()
    f = cfg.factors
    failures = FailureLog("fit-factors", cfg.on_error)
    rows_of = readable_shards(shards, failures, footers)
    readable = list(rows_of)
    if not readable:
        raise StageFailed(f"fit-factors: no shard of the corpus {cfg.data.corpus} could be read")
    sampled = sample_rows(readable, f.sample_sequences, f.sample_tokens, f.seed)
    units = plan_units(readable, sampled, f.unit_sequences)
    cluster = ensure_ray(cfg.resources)
    rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    use_gpu = cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0
    args = {"model": cfg.model, "fisher": f.fisher.value, "seed": f.seed, "batch_size": cfg.resources.batch_size,
            "threads": cfg.resources.threads_per_actor, "use_gpu": use_gpu, "too_long": cfg.data.too_long.value,
            "samples": f.fisher_samples, "passes": f.fisher_passes}
    accounting: dict[str, Any] = {}
    unit_key = completion.inputs_key(key, shard_prints)  # partials: this corpus only
    stage1 = _unit_stage(CovarianceWorker, 1, units, args, out, unit_key, cfg, cluster, show_progress, failures)
    accounting["stage1"] = stage1.pop("units")
    fitted = [u for u in units if u.index not in stage1["failed"]]
    if not fitted:
        raise StageFailed(f"fit-factors: every unit failed; first: {failures.first()}")
    layers = _layer_names(out, fitted, stage1)
    partials1 = [_partial_url(out, 1, u.index) for u in fitted]
    stage2_urls = [storage.join(out, STAGE2, layer_file(i, n)) for i, (n, _) in enumerate(layers)]
    key2 = completion.inputs_key(unit_key, [u.index for u in fitted])  # stage 2 and 3 depend on the units fitted
    eig_jobs = [{"name": n, "partials": partials1, "out": url, "blocks": f.blocks, "key": key2}
                for (n, _), url in zip(layers, stage2_urls) if _current(url, key2) is None]
    eig_rows, accounting["eigh"] = _layer_stage(LayerEigenWorker, eig_jobs, cfg, cluster, use_gpu, "eigh (per layer)",
                                                show_progress)
    stage3 = _unit_stage(LambdaWorker, 3, fitted, {**args, "stage2": stage2_urls, "lambda_samples": f.lambda_samples,
                                                   "passes": f.lambda_passes},
                         out, key2, cfg, cluster, show_progress, failures)
    accounting["stage3"] = stage3.pop("units")
    partials3 = [_partial_url(out, 3, u.index) for u in fitted if u.index not in stage3["failed"]]
    if not partials3:
        raise StageFailed(f"fit-factors: every unit failed in stage 3; first: {failures.first()}")
    final_jobs = [{"name": n, "stage2": s2, "partials": partials3, "out": storage.join(out, layer_file(i, n))}
                  for i, ((n, _), s2) in enumerate(zip(layers, stage2_urls))]
    final_rows, accounting["layers"] = _layer_stage(LayerFinalWorker, final_jobs, cfg, cluster, use_gpu,
                                                    "layer files", show_progress)
    entries = [json.loads(final_rows[n]["entry"]) for n, _ in layers]
    metas = [open_header(u).metadata for u in partials1]
    sample = [(u.index, json.loads(m["doc_ids"]), int(m["unit_tokens"])) for u, m in zip(fitted, metas)]
    sequences = sum(len(ids) for _, ids, _ in sample)
    skipped = sum(len(u.rows) for u in units if u.index in stage1["failed"])
    if sequences + skipped != len(sampled):
        raise StageFailed(f"fit-factors: {sequences} sequences fitted + {skipped} skipped != {len(sampled)} sampled")
    fingerprints = ({m.get("fingerprint") for m in metas} | {stage3["fingerprint"]}) - {None}
    if len(fingerprints) != 1:
        raise ValueError(f"fit-factors: partial sums of different models {sorted(fingerprints)} in {out}")
    (fingerprint,) = fingerprints
    manifest = build_manifest(entries, fingerprint, f.fisher, sequences, final_rows[layers[0][0]]["sequences"],
                              f.blocks, {"pipeline_key": key, "config": cfg.to_dict()},
                              samples=f.fisher_samples if is_random(f.fisher) else 1,
                              lambda_samples=f.lambda_samples if is_random(f.fisher) else 1,
                              passes=effective_passes(f.fisher, f.fisher_samples, f.fisher_passes),
                              lambda_passes=effective_passes(f.fisher, f.lambda_samples, f.lambda_passes))
    storage.write_json(storage.join(out, MANIFEST), manifest)
    shard_of = {u.index: u.shard for u in units}
    storage.write_parquet(storage.join(out, "sample.parquet"), pa.table({
        "shard": [shard_of[i] for i, ids, _ in sample for _ in ids],
        "doc_id": [d for _, ids, _ in sample for d in ids]}))
    for stale in (PARTIALS, STAGE2):
        storage.remove(storage.join(out, stale))
    info = {"sequences": sequences, "tokens": entries[0]["tokens"], "units": len(units), "layers": len(layers),
            "resumed_units": stage1["resumed"], "eigh_device": sorted({r["device"] for r in eig_rows.values()}),
            "rows": {"sampled": len(sampled), "fitted": sequences, "skipped": skipped,
                     "lambda_skipped": sum(len(u.rows) for u in fitted if u.index in stage3["failed"]),
                     "unreadable_shards": len(shards) - len(readable)},
            "failed_units": len(failures),
            "seconds": round(time.perf_counter() - start, 3), "digest": factors_digest(out),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_peak_rss_at_start_mb": round(rss_at_start, 1),
            "tasks": accounting}
    fitted_shards = [(name, size, rows_of.get(url, 0))  # rows: what on_growth measures growth against
                     for (name, size), (url, _) in zip(named_fingerprints(shard_prints, cfg.data.corpus), shard_prints)]
    done = completion.mark_complete(out, key, {**info, "fitted_shards": fitted_shards})
    done.pop("fitted_shards")
    return {**done, "skipped": False, "errors": failures.rows, **({"refit": refit} if refit else {})}


def factors_digest(url: str) -> str:
    """Hash of a factor folder: its manifest (model fingerprint, counts, the inputs key) and its files' sizes.

    The tensors themselves are not read: that would pull every byte of the factors through the driver.
    """
    h = hashlib.sha256(storage.read_bytes(storage.join(url, MANIFEST)))
    for f in storage.list_files(url, suffix=".safetensors"):
        fs, path = storage.filesystem(f)
        h.update(f"{f.rsplit('/', 1)[-1]}:{fs.size(path)}".encode())
    return h.hexdigest()[:16]
