"""One run at a time in an output folder: ``<output>/run.lock``.

Two runs writing one output (a job started twice, a schedule that overlaps a
slow run, two people on one job file) would each remove files the other is
still writing: a stage removes what its own inputs do not claim. ``run_job``
holds this lock from its first write to its end. The lock is a small JSON file
naming the run, the host, the process and when it started; the holder rewrites
its ``heartbeat`` every ``HEARTBEAT_S`` seconds and removes the file at the end,
whether the run succeeded or failed.

A second run refuses at once with one line naming the holder, unless the lock
was left behind: its process is gone (a lock written on this host), or it was
not refreshed for ``STALE_S`` seconds (a lock from another host, which cannot be
asked). A left-behind lock is taken over, so a run killed outright (``kill -9``,
a lost node) never blocks the next one for longer than that.

Two runs starting at the same moment: the lock is created only if none is there
and taken over only if it is still the one judged left behind
(``io/conditional_write.py``: ``O_EXCL`` on local files, S3's ``If-None-Match``
and ``If-Match``), so exactly one of them gets it. Where the store cannot write
conditionally (a takeover on local files, GCS, Azure) the run writes the lock
and reads it back: best-effort, two runs within the same second can both pass.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import UserError
from ..io import conditional_write, storage

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats
UNREADABLE_WAIT_S = 1.0  # how long a lock that cannot be read may be mid-write
log = logging.getLogger(__name__)


class OutputInUse(UserError):
    """Another run holds the output folder."""


def _read(url: str) -> dict[str, Any] | None:
    try:
        data = storage.read_json(url)
    except (OSError, ValueError):  # unreadable or half-written by a dying run: treated as absent
        return None
    return data if isinstance(data, dict) else None


def _process_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, TypeError, ValueError):
        return True  # exists under another user, or cannot be told: assume alive
    return True


def left_behind(lock: dict[str, Any], now: float, host: str) -> str | None:
    """Why ``lock`` no longer holds the output (its process is gone; not refreshed for STALE_S seconds), or None
    when its run may still be going."""
    if lock.get("host") == host:
        return None if _process_alive(lock.get("pid")) else f"its process {lock.get('pid')} is gone"
    try:
        age = now - float(lock.get("heartbeat", 0))
    except (TypeError, ValueError):
        return "it is not a lock this program wrote"
    return f"it was not refreshed for {age:.0f} s" if age > STALE_S else None


def _holder(lock: dict[str, Any]) -> str:
    return (f"run {lock.get('run_id')!r} (process {lock.get('pid')} on {lock.get('host')}, started "
            f"{lock.get('started')})")


def _beat(url: str, mine: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            storage.write_json(url, {**mine, "heartbeat": time.time()})
        except Exception as err:  # noqa: BLE001 -- a heartbeat that fails must not end the run
            log.debug("run lock %s: heartbeat not written (%s)", url, err)


def in_use(output: str) -> str | None:
    """Who holds ``output`` now ("run '...' (process N on HOST, started ...)"), or None when no live run does."""
    held = _read(storage.join(output, LOCK))
    if held is None or left_behind(held, time.time(), socket.gethostname()) is not None:
        return None
    return _holder(held)


@contextmanager
def hold_output(output: str, run_id: str) -> Iterator[None]:
    """Hold ``<output>/run.lock`` for the block (OutputInUse when another live run holds it)."""
    url = storage.join(output, LOCK)
    host, now = socket.gethostname(), time.time()
    version = storage.retry(url, "lock", conditional_write.version_of, url)  # before the content: a change in
    # between fails the takeover
    held = _read(url)
    if held is not None:
        why = left_behind(held, now, host)
        if why is None:  # the same test as in_use, with the reason kept for the log
            raise OutputInUse(f"{output} is in use by {_holder(held)}: wait for it to end (or stop it); if it died, "
                              f"remove {url} (a lock from another host counts as left behind {STALE_S:.0f} s after "
                              "its last heartbeat)")
        log.info("run lock %s: taking over from %s (%s)", url, _holder(held), why)
    mine = {"run_id": run_id, "host": host, "pid": os.getpid(), "token": uuid.uuid4().hex,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "heartbeat": now}
    payload = json.dumps(mine, indent=2, sort_keys=True).encode()
    if held is None:
        written = storage.retry(url, "lock", conditional_write.create_new, url, payload)
    else:
        written = storage.retry(url, "lock", conditional_write.replace_if_unchanged, url, payload, version)
    if written is None:  # the store cannot write conditionally: write, then read back (below)
        storage.write_json(url, mine)
    back = _read(url)
    if written is False and back is None:  # a lock there that cannot be read: a writer mid-write, or debris
        time.sleep(UNREADABLE_WAIT_S)
        back = _read(url)
        if back is None and not storage.exists(url):  # its run ended meanwhile: create it again
            storage.retry(url, "lock", conditional_write.create_new, url, payload)
            back = _read(url)
        elif back is None:  # debris (a run that died writing it): taken over, best-effort
            log.info("run lock %s: taking over an unreadable lock", url)
            storage.write_json(url, mine)
            back = _read(url)
    if back is None or back.get("token") != mine["token"]:  # (a retried create that had succeeded is ours)
        raise OutputInUse(f"{output}: another run took its lock at the same moment"
                          + (f" ({_holder(back)})" if back else "") + "; run one at a time")
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(url, mine, stop), name="run-lock-heartbeat", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join(timeout=HEARTBEAT_S)
        try:
            current = _read(url)
            if current is not None and current.get("token") == mine["token"]:
                storage.remove(url)
        except Exception as err:  # noqa: BLE001 -- never hide the run's own outcome
            log.warning("the run lock %s was not removed (%s); the next run takes it over once its process is gone "
                        "or %.0f s after its last heartbeat", url, (str(err).splitlines() or [type(err).__name__])[0],
                        STALE_S)

