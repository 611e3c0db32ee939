"""One run at a time in an output folder (``pipelines/runtime/run_lock.py``): a live holder refuses a second
run with one line; a lock left behind by a dead process, or not refreshed for STALE_S seconds from another
host, is taken over; the holder refreshes it and removes it at the end, also on failure."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.runtime import run_lock
from pipelines.runtime.run_lock import LOCK, OutputInUse, hold_output


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lock = {"run_id": "other", "host": socket.gethostname(), "pid": 1, "started": "2026-01-01T00:00:00+00:00",
            "heartbeat": time.time(), "token": "x", **fields}
    (out / LOCK).write_text(json.dumps(lock))


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    out = tmp_path / "out"
    with hold_output(str(out), "first"):
        held = json.loads((out / LOCK).read_text())
        assert held["run_id"] == "first" and held["host"] == socket.gethostname()
        with pytest.raises(OutputInUse, match=r"is in use by run 'first' \(process \d+ on .*\): wait for it"):
            with hold_output(str(out), "second"):
                pass
    assert not (out / LOCK).exists()  # removed at the end


def test_the_lock_is_removed_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with hold_output(str(out), "r"):
            raise RuntimeError("boom")
    assert not (out / LOCK).exists()


def test_a_lock_left_behind_is_taken_over(tmp_path):
    out = tmp_path / "out"
    write_lock(out, pid=dead_pid())  # this host, its process gone (kill -9, a crash)
    with hold_output(str(out), "mine"):
        assert json.loads((out / LOCK).read_text())["run_id"] == "mine"
    write_lock(out, host="elsewhere", heartbeat=time.time() - run_lock.STALE_S - 5)  # another host, silent
    with hold_output(str(out), "mine"):
        pass
    write_lock(out, host="elsewhere", heartbeat=time.time() - 10)  # another host, refreshed lately: alive
    with pytest.raises(OutputInUse, match="in use by run 'other' .* on elsewhere"):
        with hold_output(str(out), "mine"):
            pass


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    out = tmp_path / "out"
    with hold_output(str(out), "r"):
        first = json.loads((out / LOCK).read_text())["heartbeat"]
        deadline = time.time() + 10
        while json.loads((out / LOCK).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads((out / LOCK).read_text())["heartbeat"] > first


def test_run_in_an_output_in_use_is_one_line_before_ray(tmp_path, tiny_world, monkeypatch):
    from test_cli_errors import assert_one_line, write_job

    for mod in ("tokenize", "fit_factors", "score", "token_scores"):
        monkeypatch.setattr(f"pipelines.stages.{mod}.ensure_ray",
                            lambda *a, **k: pytest.fail("Ray started in an output in use"), raising=False)
    job = write_job(tmp_path, tiny_world)
    write_lock(tmp_path / "out", pid=os.getpid())  # a live process on this host
    line = assert_one_line(CliRunner().invoke(main, ["run", str(job)]), "is in use by run 'other'",
                           str(tmp_path / "out" / LOCK))
    assert "if it died, remove" in line
    assert json.loads((tmp_path / "out" / LOCK).read_text())["run_id"] == "other"  # the holder's lock is kept


def test_validate_warns_when_a_live_run_holds_the_output(tmp_path, tiny_world):
    from test_cli_errors import write_job

    job = write_job(tmp_path, tiny_world)
    quiet = CliRunner().invoke(main, ["validate", str(job)])
    assert "is in use" not in quiet.output
    write_lock(tmp_path / "out", pid=dead_pid())  # left behind: no warning, the next run takes it over
    assert "is in use" not in CliRunner().invoke(main, ["validate", str(job)]).output
    write_lock(tmp_path / "out", pid=os.getpid())
    result = CliRunner().invoke(main, ["validate", str(job)])
    assert result.exit_code == quiet.exit_code  # a warning, not an error
    assert f"warning: data.output = '{tmp_path / 'out'}' is in use by run 'other' (process {os.getpid()}" \
        in result.output, result.output


def _race(output: str, n: int = 2) -> tuple[list[str], list[str]]:
    """n runs start holding ``output`` at the same moment (threads); returns (who got in, who was refused)."""
    import threading

    start, entered, refused, lock = threading.Barrier(n), [], [], threading.Lock()

    def one(name: str) -> None:
        start.wait()
        try:
            with hold_output(output, name):
                with lock:
                    entered.append(name)
                time.sleep(1.0)  # still holding while the others try (they wait 0.1 s on a lock mid-write)
        except OutputInUse as err:
            with lock:
                refused.append(str(err))

    threads = [threading.Thread(target=one, args=(f"run{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return entered, refused


def test_runs_starting_at_the_same_moment_get_one_lock_between_them(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "UNREADABLE_WAIT_S", 0.1)
    for attempt in range(5):  # created with O_EXCL: exactly one, every time
        entered, refused = _race(str(tmp_path / f"out{attempt}"), 3)
        assert len(entered) == 1 and len(refused) == 2, (entered, refused)
        assert not (tmp_path / f"out{attempt}" / LOCK).exists()


def test_an_unreadable_lock_left_by_a_run_that_died_writing_it_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "UNREADABLE_WAIT_S", 0.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(b"")  # created, never written
    with hold_output(str(out), "next"):
        assert json.loads((out / LOCK).read_text())["run_id"] == "next"


def test_the_lock_on_s3_is_created_and_taken_over_conditionally(s3_server, monkeypatch):
    """On S3 the lock is written with If-None-Match (create) or If-Match (takeover): of racing runs one gets it."""
    import s3fs

    from pipelines.io import conditional_write

    monkeypatch.setattr(run_lock, "UNREADABLE_WAIT_S", 0.1)
    fs = s3fs.S3FileSystem()
    fs.mkdir("runlock")
    url = "s3://runlock/out/x.json"
    assert conditional_write.create_new(url, b"1") is True
    assert conditional_write.create_new(url, b"2") is False and fs.cat(url) == b"1"
    seen = conditional_write.version_of(url)
    assert conditional_write.replace_if_unchanged(url, b"3", seen) is True and fs.cat(url) == b"3"
    assert conditional_write.replace_if_unchanged(url, b"4", seen) is False and fs.cat(url) == b"3"  # it changed
    assert conditional_write.version_of("s3://runlock/out/none.json") is None
    assert conditional_write.create_new("memory://runlock/x", b"1") is None  # cannot say: the caller falls back

    for attempt in range(3):
        entered, refused = _race(f"s3://runlock/race{attempt}", 3)
        assert len(entered) == 1 and len(refused) == 2, (entered, refused)
        assert not fs.exists(f"runlock/race{attempt}/{LOCK}")
    stale = {"run_id": "gone", "host": "elsewhere", "pid": 1, "token": "t", "started": "2026-01-01T00:00:00+00:00",
             "heartbeat": time.time() - 2 * run_lock.STALE_S}
    fs.pipe(f"runlock/stale/{LOCK}", json.dumps(stale).encode())
    entered, refused = _race("s3://runlock/stale", 3)  # three runs take over one stale lock: one of them gets it
    assert len(entered) == 1 and len(refused) == 2, (entered, refused)
