"""A real multi-node Ray cluster on one machine (a head and worker raylets on 127.0.0.1), for trying
the cluster path, tests and benchmarks.

Each node is its own raylet with its own object store and CPUs (fractions
allowed), started with ``ray.cluster_utils.Cluster`` in a private temp folder;
``Cluster.remove_node`` kills a node's processes, which is how node loss is
tested. Two things keep it from touching other Ray users of the machine:
Ray's ``Cluster`` would write its address to the machine-wide
``/tmp/ray/ray_current_cluster`` (where any ``ray.init()`` without an address
finds it and joins) and delete that file on shutdown; both are suppressed.

Drivers that join it must run with ``LOOPBACK_ENV`` in their environment, set
before Ray is imported: Ray otherwise rewrites a 127.0.0.1 address to the
machine's outward IP, where these nodes do not listen
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray's ``get_node_ip_address``
answer the loopback address, as it does on a laptop).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextmanager
def local_cluster(workers: int, worker_cpus: float = 1.0, head_cpus: float = 0.0,
                  store_mb: int = 100) -> Iterator[Any]:
    """A head (no CPUs by default: it schedules and hosts drivers, as on a real cluster) and ``workers`` nodes.

    Yields the ``ray.cluster_utils.Cluster``; its ``address`` is what a job's
    ``resources.ray_address`` takes. Everything is stopped on exit.
    """
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
