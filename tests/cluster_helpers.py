"""Real multi-node Ray clusters and job drivers on this machine, for the cluster tests.

``local_cluster`` starts a head and worker nodes with ``ray.cluster_utils.Cluster``:
each node is its own raylet with its own object store, all on 127.0.0.1, in a
private temp folder. Ray's ``Cluster`` writes its address to the machine-wide
``/tmp/ray/ray_current_cluster`` (and deletes that file on shutdown), where any
``ray.init()`` without an address on this machine would find it and join the
test's cluster; both calls are suppressed here so that other Ray users on the
machine are never affected.

``run_driver`` runs ``python -m pipelines.cli ...`` in a subprocess (a job's
driver, as a user would run it), with this checkout first on the path.

Loopback only: the nodes listen on 127.0.0.1, and ``LOOPBACK_ENV`` keeps a driver
on 127.0.0.1 too (Ray otherwise rewrites a 127.0.0.1 address to the machine's
outward IP; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is the switch that makes its
``get_node_ip_address`` answer the loopback address, as it does on a laptop).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def driver_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(LOOPBACK_ENV)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@contextmanager
def local_cluster(workers: int, worker_cpus: float = 1.0, head_cpus: float = 0.0,
                  store_mb: int = 100) -> Iterator[Any]:
    """A head (no CPUs: it only schedules, as on a real cluster) and ``workers`` worker nodes."""
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rayc", dir="/tmp")
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    node = {"object_store_memory": store_mb * 2**20, "node_ip_address": "127.0.0.1"}
    with mock.patch.object(ray._private.utils, "write_ray_address", lambda *a, **k: None):
        cluster = Cluster(initialize_head=True, head_node_args={
            **node, "num_cpus": head_cpus, "temp_dir": temp, "include_dashboard": False})
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=worker_cpus, **node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        with mock.patch.object(ray._common.utils, "reset_ray_address", lambda *a, **k: None):
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)


def to_toml(job: dict[str, Any]) -> str:
    """A job dict as TOML (strings, numbers, booleans and one level of tables)."""
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    lines = [f"{k} = {value(v)}" for k, v in job.items() if not isinstance(v, dict)]
    for section, table in job.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]", *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def run_driver(args: list[str], timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=driver_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def start_driver(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=driver_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def actor_nodes(cluster: Any, name: str) -> list[Any]:
    """Worker nodes of ``cluster`` where an actor of the stage callable ``name`` is running a unit now.

    Ray titles an actor's process ``ray::MapWorker(MapBatches(<name>)).submit`` while it runs a
    task (``...__init__`` while it starts, no suffix while idle).
    """
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
    import psutil

    found = []
    for node in list(cluster.worker_nodes):
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        try:
            titles = [" ".join(c.cmdline()) for c in raylet.children(recursive=True)]
        except psutil.Error:
            continue
        if any(t.strip().endswith(f"({name})).submit") for t in titles):
            found.append(node)
    return found


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
