"""Starting or joining Ray, and running a stage's units of work on an actor pool.

With no address the job starts a local Ray sized for this machine (all cores,
object store capped, no dashboard). Every stage hands Ray Data a list of small
JSON "units" (a shard, or rows of a shard); actors (``__init__`` loads the model
once), or Ray tasks on reused worker processes that build the stage's callable once
each (``task_pool.py``, ``resources.pool``), turn each unit into result rows that
stream back to the driver. Actors
take fractional CPUs when the pool would otherwise hold every CPU, so that Ray
Data's own tasks can still run (the actor-pool deadlock: docs/contributing.md).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import VERBOSE_ENV, Pool, ResourceConfig
from .accounting import UnitLog, ledger_actor, ledger_counts, wrap
from .task_pool import run_unit

log = logging.getLogger(__name__)


def ensure_ray(resources: ResourceConfig, quiet: bool | None = None) -> dict[str, float]:
    """Join the configured cluster or start a local Ray (once); returns the cluster's resources.

    With no ``ray_address``, a job whose driver runs inside a Ray job (``RAY_ADDRESS``
    set, e.g. by ``influence submit``) joins that cluster. ``quiet`` (default: unless
    ``INFLUENCE_VERBOSE=1``) keeps Ray's own messages off the terminal.
    """
    import ray

    if quiet is None:
        quiet = os.environ.get(VERBOSE_ENV) != "1"

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR if quiet else logging.INFO,
                                  "log_to_driver": not quiet}
        address = resources.ray_address or os.environ.get("RAY_ADDRESS", "")  # set inside a Ray job
        if address:
            ray.init(address=address, **kwargs)
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            store = resources.object_store_mb * 2**20 or min(2**30, int(0.2 * total))
            ray.init(num_cpus=os.cpu_count(), object_store_memory=store, **kwargs)
    if quiet:  # per-dataset lines, and Ray Data's own report of a failed run (the CLI reports it, once)
        # Ray Data re-reads its logging config (e.g. when a dataset's context is set), and its
        # RAY_DATA_LOG_LEVEL variable then wins over any level set here: set both
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
        logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    ctx = data_context()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a stage's own exception reaches the driver, not a UserCodeException
    spend_restart_warning()
    return dict(ray.cluster_resources())


def data_context() -> Any:
    """Ray Data's ``DataContext.get_current()``, without the DeprecationWarnings Ray 2.60 emits making it.

    ``DataContext()`` itself assigns its deprecated fields (``use_push_based_shuffle``,
    ``use_polars``, ``use_arrow_tensor_v2``) and warns about each; no call of ours can avoid
    that, so the warnings of that one construction are dropped (only those, only there).
    """
    from ray.data import DataContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray.data.context")
        return DataContext.get_current()


class _Probe:
    def __init__(self, arg: Any) -> None:
        pass


_SPENT = False


def spend_restart_warning() -> None:
    """Spend, away from the terminal, the error-level line Ray prints once per process for restartable actors.

    Ray's core worker logs ``... has constructor arguments in the object store and
    max_restarts > 0 ...`` (ray-project/ray#53727) the first time a process creates
    an actor that may restart and whose constructor arguments are object references.
    Ray Data's actor pools are always such actors (it passes the map function by
    reference) and the caveat does not hold for them (the driver holds those
    references while the pool lives), but turning restarts off would lose node-loss
    recovery. So the driver creates one such actor itself, with its stderr pointed
    at /dev/null for that one synchronous call, and kills it: the line is spent.
    """
    global _SPENT
    import ray

    if _SPENT or ray.util.client.ray.is_connected():  # a Ray Client driver has no core worker of its own
        return
    _SPENT = True
    ref = ray.put(b"")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        probe = ray.remote(_Probe).options(num_cpus=0, max_restarts=1).remote([ref])
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(probe)


@dataclass(frozen=True)
class PoolPlan:
    """How many actors (or tasks at once), what each asks for, and whether they are tasks (``task_pool.py``)."""

    size: int
    num_cpus: float
    num_gpus: float
    tasks: bool = False


def cluster_nodes(cluster: dict[str, float]) -> int:
    """Alive nodes in ``ray.cluster_resources()``: each node adds 1 to its ``node:<ip>`` resource."""
    return int(round(sum(v for k, v in cluster.items() if k.startswith("node:") and k != "node:__internal_head__")))


def pool_plan(resources: ResourceConfig, cluster: dict[str, float], units: int) -> PoolPlan:
    gpus = resources.gpus_per_actor
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0) > 0 else 0.0
    size = max(1, min(resources.actors, units))
    cpus = float(resources.cpus_per_actor)
    free = cluster.get("CPU", 1.0)
    if size * cpus >= free:  # leave room for Ray Data's own tasks
        cpus = max(0.01, (free - 0.5) / size) if free > 0.5 else 0.01
    pool = Pool(resources.pool)
    tasks = pool == Pool.TASKS or (pool == Pool.AUTO and not gpus and cluster_nodes(cluster) <= 1)
    return PoolPlan(size, cpus, float(gpus), tasks)


def run_units(cls: type, constructor: dict[str, Any], units: list[dict[str, Any]],
              resources: ResourceConfig, cluster: dict[str, float], progress: Any = None,
              log: UnitLog | None = None) -> Iterator[dict[str, Any]]:
    """Run ``cls(**constructor)(batch)`` over ``units`` on an actor pool or as tasks; yield result rows as dicts.

    Each unit is a JSON-able dict; the callable receives ``{"unit": array of JSON strings}``
    and returns a dict of equal-length arrays. ``progress`` (a tqdm) is advanced per returned batch
    (one per unit, as each call gets one unit). ``log`` receives where and how long each unit ran
    (``accounting.py``). An actor holds one unit at a time, so units spread over every actor
    and a lost actor takes only its current unit with it. Node loss: an actor whose node dies is restarted elsewhere
    (``resources.actor_restarts``) and the tasks it held are retried (``resources.task_retries``);
    a unit writes its own output file, so a retried unit rewrites the same bytes. With a task pool
    (``pool_plan``: ``resources.pool``), at most ``size`` units run at once, each a Ray task on a reused
    worker process that builds ``cls`` once for this call (``task_pool.py``); a unit whose process dies is
    retried (``resources.task_retries``).
    """
    import ray
    import ray.data

    if not units:
        return
    plan = pool_plan(resources, cluster, len(units))
    items = [{"unit": json.dumps(u, sort_keys=True)} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ledger, ns = ledger_actor(), uuid.uuid4().hex  # ns: this call's units in the ledger, and its task key
    acct = {"_ledger": ledger, "_ledger_ns": ns}
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy", "num_cpus": plan.num_cpus,
                              "num_gpus": plan.num_gpus or None, "zero_copy_batch": True}
    with warnings.catch_warnings():  # Ray 2.60 has no other way to pass these (deprecated for Ray 2.64)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        if plan.tasks:
            spec = ray.put((wrap(cls), {**constructor, **acct}))
            ds = ds.map_batches(run_unit, fn_args=[ns, spec], concurrency=plan.size,
                                max_retries=resources.task_retries, **common)
        else:
            ds = ds.map_batches(wrap(cls), fn_constructor_kwargs={**constructor, **acct},
                                compute=ray.data.ActorPoolStrategy(size=plan.size, max_tasks_in_flight_per_actor=1),
                                max_restarts=resources.actor_restarts, max_task_retries=resources.task_retries,
                                **common)
    log = log if log is not None else UnitLog()
    log.pool = "tasks" if plan.tasks else "actors"
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        if progress is not None:
            progress.update(1)
        for i in range(len(next(iter(batch.values())))):
            yield log.add({k: _plain(v[i]) for k, v in batch.items()})
    log.starts = ledger_counts(ledger, ns)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return x


def units_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The units of a batch given to a stage callable."""
    return [json.loads(str(u)) for u in batch["unit"]]


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
