"""`influence submit | status | logs | stop` against a real Ray head with its dashboard on 127.0.0.1.

The head is started here (``ray start --head --block`` with its own ports and
temp folder) and stopped by terminating that process and its children by PID:
never ``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner
from cluster_helpers import driver_env
from conftest import _free_port

from pipelines.cli import main

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def head():
    """The dashboard URL of a one-node Ray cluster (2 CPUs, 300 MB object store) started for this module."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
    import psutil

    port, dashboard = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    ray_bin = str(Path(sys.executable).parent / "ray")
    # No token authentication on this loopback-only head: Ray 2.60 would turn it on when the machine has
    # ~/.ray/auth_token, and this process's Ray client reads its auth mode once, at import.
    env = driver_env(PATH=f"{Path(sys.executable).parent}:{driver_env()['PATH']}", RAY_AUTH_MODE="disabled")
    log = open(Path(temp) / "ray-start.log", "w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--dashboard-agent-listen-port", str(_free_port()),  # the default 52365 may be taken by another Ray
         "--temp-dir", temp, "--num-cpus", "2", "--object-store-memory", str(300 * 2**20),
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:  # it answers (401 if it wants a token): up
                break
            except OSError as err:
                if time.time() > deadline or proc.poll() is not None:
                    log_text = (Path(temp) / "ray-start.log").read_text()[-2000:]
                    raise RuntimeError(f"the Ray head did not start: {log_text}") from err
                time.sleep(0.5)
        yield url
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.terminate()  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for child in tree:  # anything of this head still alive, by PID
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    return result


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo's files (corpus, queries, a briefly trained model, job.toml), not run."""
    from pipelines.demo.job import JOB, prepare

    out = tmp_path_factory.mktemp("demo")
    prepare(out, epochs=2, max_seconds=30, echo=lambda *_: None)
    (out / "job.toml").write_text(JOB.format(out=out, top_k=5))
    return out


def test_submit_follow_status_logs_and_tables(head, demo_files):
    submitted = cli("submit", str(demo_files / "job.toml"), "--address", head)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    followed = cli("logs", job_id, "--follow", "--address", head)
    assert followed.exit_code == 0, followed.output
    assert "run demo: ok" in followed.output
    status = cli("status", job_id, "--address", head)
    assert status.exit_code == 0 and status.output.startswith(f"{job_id}: SUCCEEDED"), status.output
    assert "run demo: ok" in cli("logs", job_id, "--address", head).output
    results = demo_files / "results"
    topk = pads.dataset(str(results / "topk"), partitioning="hive").to_table()
    assert topk.num_rows == 6 * 2 * 5 and set(topk.column("sign").to_pylist()) == {"top", "bottom"}
    record = json.loads((results / "runs" / "demo.json").read_text())
    assert record["status"] == "ok" and record["counts"]["failed"] == 0
    assert record["stages"]["score"]["units"]["units"] == record["counts"]["scored"] == 4


def test_stop_a_running_job(head, demo_files, tmp_path):
    job = (demo_files / "job.toml").read_text().replace('output = "results"', f'output = "{tmp_path / "out"}"')
    (demo_files / "job2.toml").write_text(job)
    submitted = cli("submit", str(demo_files / "job2.toml"), "--address", head)
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip().splitlines()[-1]
    deadline = time.time() + 120
    while "RUNNING" not in cli("status", job_id, "--address", head).output and time.time() < deadline:
        time.sleep(0.5)
    stopped = cli("stop", job_id, "--address", head)
    assert stopped.exit_code == 0 and "stop requested" in stopped.output, stopped.output
    while "STOPPED" not in (out := cli("status", job_id, "--address", head).output) and time.time() < deadline:
        time.sleep(0.5)
    assert out.startswith(f"{job_id}: STOPPED"), out
    assert cli("logs", job_id, "--follow", "--address", head).exit_code == 1  # not SUCCEEDED


def test_unknown_job_and_unreachable_head_are_named(head):
    unknown = cli("status", "raysubmit_nope", "--address", head)
    assert unknown.exit_code == 1 and "raysubmit_nope" in unknown.output
    unreachable = cli("status", "x", "--address", f"http://127.0.0.1:{_free_port()}")
    assert unreachable.exit_code == 1 and "cannot reach the Ray dashboard" in unreachable.output
