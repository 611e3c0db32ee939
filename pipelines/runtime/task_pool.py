"""A stage's units as Ray tasks on Ray's reused worker processes (``resources.pool = "tasks"``).

An actor pool starts new processes for every stage, and each imports torch and
transformers and loads the model before its first unit: about 5 s per stage on
2 cores, most of a small job's time (a scan run has 7 such stages). Ray keeps its
task worker processes and hands them the next tasks, so with tasks the imports
are paid once per process and job, and a stage's callable is built once per
process and stage, then kept here for that stage's later units.

What one worker process holds: the instance of the stage it ran last (a model,
factors, queries), keyed by the stage's ``key`` (a fresh id per ``run_units``
call, so no stage ever sees another stage's or an earlier run's instance, even
when the files behind the same arguments changed). A newer key replaces it; a
process that has run no unit for ``IDLE_RELEASE_S`` drops it (a daemon thread),
so an idle Ray (a notebook between jobs) does not keep models in memory. Dropping
it is not enough by itself: glibc keeps freed blocks of up to 32 MB (a model's weight
matrices) in the process's heap, so after the release ``malloc_trim`` hands the free
pages back to the system (measured: a GPT-2 of 6 blocks at width 768 after a backward
pass, 879 MB resident after ``gc.collect()``, 414 MB after the trim, 380 MB before it
was built).

Failures: a unit whose worker process dies is run again (``max_retries``), as
an actor's unit is; errors raised by the code are not retried (Ray Data's
default), and an error of the constructor is raised on every unit of the stage,
as on an actor (``accounting.UnitActor``).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any

IDLE_RELEASE_S = 30.0

_LOCK = threading.Lock()
_HELD: dict[str, Any] = {}  # key -> the stage callable's instance (at most one)
_STATE = {"busy": 0, "last": 0.0, "watching": False}


def _free_memory() -> None:
    """Collect the dropped instance and return the freed heap pages to the system (glibc's ``malloc_trim``;
    nothing more where the C library has none)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's, without searching for the library
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own policy
        pass


def release_if_idle(now: float) -> bool:
    """Drop the held instance when no unit runs and none ended in the last ``IDLE_RELEASE_S`` before ``now``
    (``time.monotonic()``); True when one was dropped."""
    with _LOCK:
        if _HELD and not _STATE["busy"] and now - _STATE["last"] > IDLE_RELEASE_S:
            _HELD.clear()
            _free_memory()
            return True
    return False


def _release_when_idle() -> None:
    while True:
        time.sleep(IDLE_RELEASE_S / 4)
        release_if_idle(time.monotonic())


def _instance(key: str, spec: Any) -> Any:
    """The instance for ``key``: kept, or built from ``spec`` = (class, constructor kwargs) (an object ref)."""
    with _LOCK:
        if key in _HELD:
            return _HELD[key]
        _HELD.clear()  # the previous stage's model and factors go before this stage's are loaded
        _free_memory()
    import ray

    try:
        cls, constructor = ray.get(spec) if isinstance(spec, ray.ObjectRef) else spec
    except Exception as err:  # noqa: BLE001 -- raised again as an error of the code: Ray retries its own forever
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise RuntimeError(f"a Ray worker could not load the stage's code or arguments: {first}") from None
    inst = cls(**constructor)
    with _LOCK:
        _HELD.clear()
        _HELD[key] = inst
        if not _STATE["watching"]:
            _STATE["watching"] = True
            threading.Thread(target=_release_when_idle, name="release-idle-stage", daemon=True).start()
    return inst


def run_unit(batch: dict[str, Any], key: str, spec: Any) -> dict[str, Any]:
    """The Ray Data task function: ``batch`` (one unit) through the stage's instance in this process."""
    with _LOCK:
        _STATE["busy"] += 1
    try:
        return _instance(key, spec)(batch)
    finally:
        with _LOCK:
            _STATE["busy"] -= 1
            _STATE["last"] = time.monotonic()


def held_keys() -> list[str]:
    """The keys this process holds an instance for (tests)."""
    with _LOCK:
        return list(_HELD)
