"""Stages on a task pool (``resources.pool``): the plan's choice, the per-process instance, and one real stage call."""

from __future__ import annotations

import os
import sys
import time
import types
import uuid

import numpy as np
import pytest

from pipelines.config import ConfigError, Pool, ResourceConfig
from pipelines.runtime import task_pool
from pipelines.runtime.accounting import Ledger
from pipelines.runtime.ray_runtime import cluster_nodes, pool_plan


class Counted:
    """A stage callable that counts how often it is built (in this process) and tags its rows."""

    built = 0

    def __init__(self, tag: str) -> None:
        type(self).built += 1
        self.tag, self.token = tag, uuid.uuid4().hex

    def __call__(self, batch: dict) -> dict:
        n = len(batch["unit"])
        return {"tag": np.asarray([self.tag] * n), "pid": np.asarray([os.getpid()] * n),
                "instance": np.asarray([self.token] * n)}


class Broken:
    def __init__(self) -> None:
        raise ValueError("the model does not load")


@pytest.fixture(autouse=True)
def _empty_pool():
    task_pool._HELD.clear()
    Counted.built = 0
    yield
    task_pool._HELD.clear()


def batch(n: int = 1) -> dict:
    return {"unit": np.asarray(['{"shard": "a"}'] * n)}


def test_one_instance_per_stage_key_and_process():
    first = task_pool.run_unit(batch(), "stage-1", (Counted, {"tag": "x"}))
    again = task_pool.run_unit(batch(2), "stage-1", (Counted, {"tag": "ignored: built already"}))
    assert Counted.built == 1 and list(again["tag"]) == ["x", "x"]
    assert again["instance"][0] == first["instance"][0]
    other = task_pool.run_unit(batch(), "stage-2", (Counted, {"tag": "y"}))
    assert Counted.built == 2 and list(other["tag"]) == ["y"]
    assert task_pool.held_keys() == ["stage-2"]  # the first stage's instance was dropped


def test_constructor_error_is_raised_on_every_unit_and_nothing_is_held():
    for _ in range(2):
        with pytest.raises(ValueError, match="does not load"):
            task_pool.run_unit(batch(), "broken", (Broken, {}))
    assert task_pool.held_keys() == []


def test_idle_instance_is_released_but_not_while_a_unit_runs():
    task_pool.run_unit(batch(), "stage-1", (Counted, {"tag": "x"}))
    now = time.monotonic()
    assert not task_pool.release_if_idle(now)  # a unit just ended
    task_pool._STATE["busy"] += 1
    try:
        assert not task_pool.release_if_idle(now + 2 * task_pool.IDLE_RELEASE_S)
    finally:
        task_pool._STATE["busy"] -= 1
    assert task_pool.release_if_idle(now + 2 * task_pool.IDLE_RELEASE_S)
    assert task_pool.held_keys() == []


RELEASE_PROBE = """
import json, os, sys, time
import numpy as np
from pipelines.runtime import task_pool

def rss_mb():
    return int(open(f"/proc/{os.getpid()}/status").read().split("VmRSS:")[1].split()[0]) / 1024

KEEP = []  # small blocks that outlive the stage, allocated between its large ones (as a loaded model leaves them)

class Holder:  # a stage that holds a model's worth of weight-sized blocks
    def __init__(self):
        np.ones(2**21)  # a freed 16 MB block raises glibc's mmap threshold, as a loaded model's matrices do
        self.blocks = []
        for _ in range(40):  # 40 x 8 MB in the heap, each followed by a small block that stays
            self.blocks.append(np.ones(2**20))
            KEEP.append(bytearray(4096))
    def __call__(self, batch):
        return {"n": np.asarray([len(self.blocks)])}

base = rss_mb()
task_pool.run_unit({"unit": np.asarray(["u"])}, "stage", (Holder, {}))
held = rss_mb()
assert task_pool.release_if_idle(time.monotonic() + 2 * task_pool.IDLE_RELEASE_S)
print(json.dumps({"held": held - base, "after": rss_mb() - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; malloc_trim is glibc's")
def test_released_instance_gives_its_memory_back_to_the_system():
    """After an idle release the process's resident memory falls back to about where it was before the stage's
    instance was built: the freed blocks are returned (malloc_trim), not kept in the heap for later."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mb = json.loads(out.stdout.strip().splitlines()[-1])
    assert mb["held"] > 300  # the 320 MB were resident
    assert mb["after"] < 0.25 * mb["held"], mb


def test_pool_plan_chooses_tasks_on_one_node_without_gpus():
    one = {"CPU": 2.0, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}
    two = {"CPU": 4.0, "node:10.0.0.1": 1.0, "node:10.0.0.2": 1.0, "node:__internal_head__": 1.0}
    same_ip = {"CPU": 4.0, "node:127.0.0.1": 3.0, "node:__internal_head__": 1.0}  # 3 raylets on one machine
    assert cluster_nodes(one) == 1 and cluster_nodes(two) == 2 and cluster_nodes(same_ip) == 3
    auto = ResourceConfig(actors=2)
    assert pool_plan(auto, one, 8).tasks
    assert not pool_plan(auto, two, 8).tasks and not pool_plan(auto, same_ip, 8).tasks
    assert not pool_plan(auto, {**one, "GPU": 1.0}, 8).tasks  # the model stays on the GPU of an actor
    assert pool_plan(ResourceConfig(pool="tasks"), two, 8).tasks
    assert not pool_plan(ResourceConfig(pool="actors"), one, 8).tasks
    plan = pool_plan(ResourceConfig(actors=4, pool="tasks"), one, 3)
    assert (plan.size, plan.num_cpus, plan.num_gpus) == (3, 0.5, 0.0)  # the same sizes as an actor pool
    assert ResourceConfig(pool="tasks").pool is Pool.TASKS
    with pytest.raises(ConfigError, match="resources.pool"):
        ResourceConfig(pool="threads")


def test_ledger_keeps_each_stage_apart():
    ledger = Ledger()
    for unit, ns in (("a", "s1"), ("a", "s1"), ("a", "s2")):
        ledger.started(unit, ns)
    assert ledger.counts("s1") == {"a": 2} and ledger.counts("s2") == {"a": 1}
    ledger.forget("s1")
    assert ledger.counts("s1") == {} and ledger.counts("s2") == {"a": 1}


@pytest.fixture
def shipped(ray_local):
    """This module's classes go to Ray's workers by value (they cannot import a test module)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_run_units_on_tasks_and_on_actors_give_the_same_rows(shipped):
    """One stage call each way on the session's Ray: the same rows; tasks build once per process, and a
    second call (a new stage) builds anew."""
    from pipelines.runtime.accounting import UnitLog
    from pipelines.runtime.ray_runtime import run_units

    import ray

    cluster = dict(ray.cluster_resources())
    units = [{"shard": f"s{i}"} for i in range(6)]
    rows, summaries = {}, {}
    for pool in ("tasks", "actors", "tasks"):
        log = UnitLog()
        got = list(run_units(Counted, {"tag": pool}, units, ResourceConfig(actors=2, pool=pool), cluster, log=log))
        rows.setdefault(pool, []).append(got)
        summaries.setdefault(pool, []).append(log.summary())
    for pool, calls in rows.items():
        for got in calls:
            assert sorted(r["tag"] for r in got) == [pool] * 6
        for s in summaries[pool]:
            assert s["pool"] == pool and s["units"] == 6 and s["retries"] == 0
    for got in rows["tasks"]:  # one instance per worker process within a call
        per_pid = {}
        for r in got:
            per_pid.setdefault(r["pid"], set()).add(r["instance"])
        assert all(len(v) == 1 for v in per_pid.values()), per_pid
        assert all(name.startswith("pid-") for name in summaries["tasks"][0]["actors"])
    first = {r["instance"] for r in rows["tasks"][0]}
    second = {r["instance"] for r in rows["tasks"][1]}
    assert first and second and not first & second  # the later stage built its own


def test_stage_code_a_worker_cannot_import_fails_once_with_its_reason(ray_local):
    """Ray retries a task whose arguments do not deserialize as a system failure, forever with
    task_retries = -1: the task pool raises it as the stage's own error instead (no retry, no hang)."""
    import ray

    from pipelines.runtime.ray_runtime import run_units

    ghost = types.ModuleType("ghost_stage_module")  # importable here only: pickled by reference
    ghost.Ghost = type("Ghost", (Counted,), {"__module__": "ghost_stage_module"})
    sys.modules["ghost_stage_module"] = ghost
    try:
        with pytest.raises(Exception, match="could not load the stage's code.*ghost_stage_module"):
            list(run_units(ghost.Ghost, {"tag": "x"}, [{"shard": "a"}], ResourceConfig(pool="tasks"),
                           dict(ray.cluster_resources())))
    finally:
        del sys.modules["ghost_stage_module"]
