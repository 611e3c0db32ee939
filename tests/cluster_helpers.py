"""Job drivers and checks for the cluster tests (the clusters: ``pipelines.cluster.local``).

``run_driver`` runs ``python -m pipelines.cli ...`` in a subprocess (a job's
driver, as a user would run it), with this checkout first on the path and
``LOOPBACK_ENV`` set, so it joins clusters on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.cluster.local import LOOPBACK_ENV, local_cluster  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parent.parent


def driver_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(LOOPBACK_ENV)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def run_driver(args: list[str], timeout: float = 1200, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=driver_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def start_driver(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=driver_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _busy_actors(cluster: Any, name: str) -> dict[int, Any]:
    """pid -> worker node, for actor processes of the stage callable ``name`` that are running a task."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
    import psutil

    found = {}
    for node in list(cluster.worker_nodes):
        try:
            for child in psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True):
                if " ".join(child.cmdline()).strip().endswith(f"({name})).submit"):
                    found[child.pid] = node
        except psutil.Error:
            continue
    return found


def actor_nodes(cluster: Any, name: str, settle: float = 0.5) -> list[Any]:
    """Worker nodes of ``cluster`` where an actor of the stage callable ``name`` is inside a unit.

    Ray titles an actor's process ``ray::MapWorker(MapBatches(<name>)).submit`` while it runs a
    task (``...__init__`` while it starts, no suffix while idle). A process seen running a task
    twice, ``settle`` seconds apart, is past the task's start and inside the unit.
    """
    first = _busy_actors(cluster, name)
    if not first:
        return []
    time.sleep(settle)
    second = _busy_actors(cluster, name)
    return [node for pid, node in second.items() if pid in first]


def table_rows(root: Path, sub: str, replace: dict[str, str]) -> dict[str, list[dict]]:
    """Rows of every Parquet file under ``root/sub`` (by relative path), with path prefixes replaced."""
    import pyarrow.parquet as pq

    out = {}
    for p in sorted((root / sub).rglob("*.parquet")):
        rows = pq.read_table(p).to_pylist()
        for row in rows:
            for k, v in row.items():
                if isinstance(v, str):
                    for old, new in replace.items():
                        v = v.replace(old, new)
                    row[k] = v
        out[str(p.relative_to(root))] = rows
    return out
