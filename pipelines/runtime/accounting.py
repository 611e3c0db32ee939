"""Where each unit of work ran, how long it took, and how often it was retried.

``run_units`` wraps every stage callable in a ``UnitActor`` subclass: the
wrapped callable is unchanged (and can still be called directly on a dict
batch), the wrapper adds a few ``_acct_*`` columns to each returned batch and
the driver folds them into a ``UnitLog``:

- node: the Ray node id of the actor (first 12 hex characters);
- actor: the actor id (first 12 hex characters); an actor keeps its id when Ray
  restarts it after its node died, ``restarted`` tells that incarnation apart;
  in a task pool (``task_pool.py``) ``pid-<process id>``, the worker process;
- start, end: wall-clock seconds (``time.time()``) around the call.

Retries: before it works on a unit, the wrapper tells a small ``Ledger`` actor
(no CPUs, on the head node, whose loss ends the cluster anyway; one per driver
and Ray connection, each stage's units under a name of their own) that the unit
started; a unit that started more often than once was lost with its actor
(node loss) and run again. Ray Data calls the stage callable in a thread of
its own, where Ray's task attempt number is not visible, hence the ledger.
The ledger is bookkeeping only: if it is lost, units go on and the run record
shows the retries as unknown.

Constructor errors: an exception raised by the stage callable's ``__init__``
(a model that does not load, queries built on another model) is kept and
raised again on the actor's first unit. Ray then hands the exception itself
to the driver (a task error, not retried), where ``errors.root_cause`` finds
it; raised in ``__init__``, it would kill the actor, and the driver would get
only an ``ActorDiedError`` holding its text, after Ray's retries of the actor's
first call.

``UnitLog.summary()`` is what the run record shows: the pool (actors or tasks), units, per-node units and
busy seconds, per-actor units and busy seconds, retries (unit starts beyond
the first), restarted actors, and the gap an actor waited between finishing
one unit and starting the next (the scheduling overhead per unit).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections import defaultdict
from typing import Any

import numpy as np

PREFIX = "_acct_"
FIELDS = ("node", "actor", "pid", "restarted", "start", "end")


def unit_key(unit_json: str) -> str:
    return hashlib.sha1(str(unit_json).encode()).hexdigest()[:16]


class Ledger:
    """How often each unit was started, per stage (``ns``: one ``run_units`` call); a Ray actor: ``ledger_actor()``."""

    def __init__(self) -> None:
        self.starts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def started(self, key: str, ns: str = "") -> None:
        self.starts[ns][key] += 1

    def counts(self, ns: str = "") -> dict[str, int]:
        return dict(self.starts.get(ns, {}))

    def forget(self, ns: str) -> None:
        self.starts.pop(ns, None)


def head_node_id() -> str:
    """The Ray head node's id (the driver's own node when no head is marked)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeID"])
    return str(ray.get_runtime_context().get_node_id())


_LEDGER: dict[str, Any] = {}  # the Ray job and node ids -> this driver's ledger actor (one per Ray connection)


def ledger_actor() -> Any:
    """The driver's ``Ledger`` actor on the head node, asking for no CPU; made once per Ray connection
    (an actor's start costs about a second, which every stage would pay before its first unit).

    Not the driver's node: a driver started on a machine that runs several
    raylets may be attached to a worker node, which can be lost mid-stage.
    The affinity is hard: with ``soft=True`` Ray 2.60 placed the ledger on a
    worker node about one time in three (the head has no CPUs), and a lost
    node then took the retry counts with it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ctx = ray.get_runtime_context()
    job = f"{ctx.get_job_id()}@{ctx.get_node_id()}"  # a job id alone repeats in a Ray started again
    if job not in _LEDGER:
        _LEDGER.clear()
        head = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)
        _LEDGER[job] = ray.remote(Ledger).options(num_cpus=0, scheduling_strategy=head).remote()
    return _LEDGER[job]


def ledger_counts(ledger: Any, ns: str = "") -> dict[str, int] | None:
    """The ledger's counts for one stage (forgotten there), or None when the ledger was lost (the next
    stage gets a new one)."""
    import ray

    try:
        counts = dict(ray.get(ledger.counts.remote(ns)))
        ledger.forget.remote(ns)
        return counts
    except ray.exceptions.RayActorError:
        _LEDGER.clear()
        return None


class UnitActor:
    """Base of the per-stage wrapper classes ``run_units`` builds: ``_target`` is the stage callable."""

    _target: type = object

    def __init__(self, _ledger: Any = None, _ledger_ns: str = "", **kwargs: Any) -> None:
        import os

        import ray

        self.ledger, self.ledger_ns = _ledger, _ledger_ns
        self.init_error: Exception | None = None
        try:
            self.inner = self._target(**kwargs)
        except Exception as err:  # noqa: BLE001 -- not swallowed: raised again on the first unit (see below)
            self.init_error = err
        ctx = ray.get_runtime_context()
        actor = ctx.get_actor_id()
        self.node = ctx.get_node_id()[:12]
        self.actor = actor[:12] if actor else f"pid-{os.getpid()}"  # a task pool's worker process
        self.pid = os.getpid()
        self.restarted = bool(actor) and bool(ctx.was_current_actor_reconstructed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.init_error is not None:
            raise self.init_error
        if self.ledger is not None:
            import ray

            try:
                ray.get([self.ledger.started.remote(unit_key(u), self.ledger_ns) for u in batch["unit"]])
            except ray.exceptions.RayActorError:
                self.ledger = None  # bookkeeping only: the unit goes on
        start = time.time()
        out = self.inner(batch)
        end = time.time()
        n = len(next(iter(out.values())))
        values = {"node": self.node, "actor": self.actor, "pid": self.pid, "restarted": self.restarted,
                  "start": start, "end": end}
        for name in FIELDS:
            out[PREFIX + name] = np.asarray([values[name]] * n, dtype=object if name in ("node", "actor") else None)
        return out


def wrap(cls: type) -> type:
    """A ``UnitActor`` subclass named like ``cls`` (Ray shows ``MapBatches(<name>)``)."""
    return type(cls.__name__, (UnitActor,), {"_target": cls, "__module__": __name__})


class UnitLog:
    """Accounting of one stage's units, folded from returned rows on the driver."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, float], dict[str, Any]] = {}  # (actor, start) -> one call (one unit)
        self.starts: dict[str, int] | None = {}  # unit key -> times started (None: ledger lost)
        self.stage_start = time.time()
        self.pool = "actors"  # or "tasks" (``ray_runtime.run_units``)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record the accounting fields of ``row``; return the row without them."""
        acct = {name: row.pop(PREFIX + name) for name in FIELDS if PREFIX + name in row}
        if acct:
            self.calls.setdefault((acct["actor"], acct["start"]), acct)
        return row

    def summary(self) -> dict[str, Any]:
        calls = sorted(self.calls.values(), key=lambda c: c["start"])
        nodes: dict[str, dict[str, Any]] = defaultdict(lambda: {"units": 0, "busy_s": 0.0, "actors": set()})
        actors: dict[str, dict[str, Any]] = defaultdict(lambda: {"units": 0, "busy_s": 0.0, "node": "",
                                                                 "incarnations": set()})
        gaps: list[float] = []
        last_end: dict[tuple[str, int], float] = {}
        for c in calls:
            busy = c["end"] - c["start"]
            n, a = nodes[c["node"]], actors[c["actor"]]
            n["units"] += 1
            n["busy_s"] += busy
            n["actors"].add(c["actor"])
            a["units"] += 1
            a["busy_s"] += busy
            a["node"] = c["node"]
            a["incarnations"].add((c["node"], c["pid"]))
            key = (c["actor"], c["pid"])
            if key in last_end:
                gaps.append(c["start"] - last_end[key])
            last_end[key] = c["end"]
        wall = max((c["end"] for c in calls), default=self.stage_start) - self.stage_start
        return {
            "pool": self.pool,
            "units": len(calls),
            "retries": None if self.starts is None else int(sum(n - 1 for n in self.starts.values() if n > 1)),
            "restarted_actors": sorted({c["actor"] for c in calls if c["restarted"]}),
            "wall_s": round(wall, 3),
            "first_unit_start_s": round(calls[0]["start"] - self.stage_start, 3) if calls else None,
            "gap_between_units_s": {"mean": round(statistics.fmean(gaps), 4) if gaps else None,
                                    "median": round(statistics.median(gaps), 4) if gaps else None,
                                    "count": len(gaps)},
            "nodes": {k: {"units": v["units"], "busy_s": round(v["busy_s"], 3), "actors": len(v["actors"])}
                      for k, v in sorted(nodes.items())},
            "actors": {k: {"node": v["node"], "units": v["units"], "busy_s": round(v["busy_s"], 3),
                           "incarnations": len(v["incarnations"])} for k, v in sorted(actors.items())},
        }
