"""Bad days: the driver killed mid-score, a store that throttles, resets and cuts responses short, a store gone.

Each case ends with the same tables as an undisturbed run of the same job (run
in this process on the session's Ray) and every row of the corpus accounted
for. The disturbed runs are real ``influence`` processes (each starts its own
local Ray, in its own process group and temp folder); the S3 cases go through
``fault_proxy.FaultProxy`` on 127.0.0.1 in front of the session's moto server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fault_proxy import FaultProxy
from prepared import prepare_output
from pipelines import config_from_dict
from pipelines.run import run_job

TABLES = ("scores", "distribution", "topk", "token_scores", "layer_scores")
INFLUENCE = str(Path(sys.executable).parent / "influence")
ROOT = Path(__file__).resolve().parent.parent
TEMP_DIRS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _remove_temp_dirs():
    yield
    for d in TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rayf", dir="/tmp"), "INFLUENCE_CACHE_DIR": str(tmp / "cache"),
           **extra}
    env.pop("RAY_ADDRESS", None)
    TEMP_DIRS.append(env["RAY_TMPDIR"])
    return env


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``influence ARGS`` in a new session (its Ray processes share its process group)."""
    return subprocess.Popen([INFLUENCE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=str(ROOT))


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for the command, then end whatever it left in its process group (its local Ray)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, out, err


def toml(cfg: dict) -> str:
    def value(v):
        return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
    lines = [f"{k} = {value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for section, keys in cfg.items():
        if isinstance(keys, dict):
            lines += [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def local_tables(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for sub in TABLES for p in sorted((output / sub).rglob("*"))
            if p.is_file() and not p.name.startswith((".", "_"))}


# --- without Ray: retries, completeness, the run record -------------------------------------------------------


def test_retry_backs_off_on_transient_errors_then_names_the_url(monkeypatch):
    from pipelines.io import storage

    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    calls = []

    def flaky(errors):
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    slowdown = OSError("An error occurred (SlowDown) when calling the GetObject operation: reduce your request rate")
    assert storage.retry("s3://b/k", "read", flaky, [ConnectionResetError("reset"), slowdown]) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(storage.StorageError, match=r"^s3://b/k: read failed after 5 tries: ConnectionResetError"):
        storage.retry("s3://b/k", "read", flaky, [ConnectionResetError("reset")] * 9)
    assert len(calls) == storage.RETRIES == 5
    calls.clear()
    with pytest.raises(FileNotFoundError):  # not transient: at once
        storage.retry("s3://b/k", "read", flaky, [FileNotFoundError("s3://b/k")])
    calls.clear()
    with pytest.raises(ConnectionResetError):  # local paths: no retries
        storage.retry("/tmp/x", "read", flaky, [ConnectionResetError("reset")])
    assert len(calls) == 1


def test_truncated_or_foreign_outputs_are_not_complete(tmp_path, caplog):
    from pipelines.io import completion, storage
    from pipelines.stages.score import KEY, is_current

    url = str(tmp_path / "scores" / "s0.parquet")
    storage.write_parquet(url, pa.table({"a": [1, 2, 3]}).replace_schema_metadata({KEY: "k1"}))
    assert is_current(url, "k1") and not is_current(url, "k2")
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2])
    assert not is_current(url, "k1")
    assert f"{url}: unreadable" in caplog.text
    pq.write_table(pa.table({"a": [1]}), url)  # foreign: no key
    assert not is_current(url, "k1")

    folder = str(tmp_path / "factors")
    storage.write_bytes(f"{folder}/layer.safetensors", b"x" * 100)
    completion.mark_complete(folder, "k", {"digest": "d"})
    assert completion.completed(folder, "k") == {"key": "k", "digest": "d"}
    Path(folder, "layer.safetensors").write_bytes(b"x" * 50)  # truncated
    assert completion.completed(folder, "k") is None and "50 bytes, 100 when written" in caplog.text
    Path(folder, "layer.safetensors").write_bytes(b"x" * 100)
    Path(folder, "other.bin").write_bytes(b"y")  # foreign
    assert completion.completed(folder, "k") is None and "not written by this stage" in caplog.text
    Path(folder, "other.bin").unlink()
    Path(folder, "_pipeline.json").write_bytes(b'{"key": "k", "dig')  # a marker cut short
    assert completion.completed(folder, "k") is None


def test_run_record_failure_never_masks_the_error(tmp_path, monkeypatch, caplog):
    from pipelines.io import storage
    from pipelines.run import StageFailed

    cfg = config_from_dict({"model": {"path": str(tmp_path / "m")}, "run_id": "r",
                            "data": {"corpus": str(tmp_path / "c"), "queries": "q.jsonl", "output": str(tmp_path / "o")}})
    real = storage.write_json

    def write_json(url, payload):
        if "/runs/" in url:
            raise storage.StorageError(f"{url}: write failed after 5 tries: EndpointConnectionError")
        real(url, payload)

    monkeypatch.setattr(storage, "write_json", write_json)
    import pipelines.run as run_module
    for check in ("preflight", "preflight_corpus"):  # straight to the stage's own error
        monkeypatch.setattr(run_module, check, lambda *args, **kwargs: {})
    with pytest.raises(ValueError, match="is not complete: run `fit-factors` first"):  # the run's own error
        run_job(cfg, stages=("score",))
    assert "the run record" in caplog.text and "runs/r.json was not written" in caplog.text
    with pytest.raises(storage.StorageError):  # with no error on its way, the record's failure is the error
        run_job(cfg, stages=())
    assert StageFailed.__module__ == "pipelines.runtime.failures"


# --- (a) kill -9 of the driver mid-score ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_world(ray_local, tiny_world, tmp_path_factory):
    """8 shards of 30 random sequences, factors and queries prepared, and an undisturbed score + merge."""
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for s in range(8):
        ids = [rng.integers(1, 20, size=int(rng.integers(4, 17))).tolist() for _ in range(30)]
        pq.write_table(pa.table({"doc_id": [f"s{s}-{i}" for i in range(30)],
                                 "input_ids": pa.array(ids, pa.list_(pa.int32()))}), corpus / f"s{s}.parquet")

    def job(output: Path) -> dict:
        return {"run_id": "kill", "model": {"path": str(tiny_world / "model")},
                "data": {"corpus": str(corpus), "queries": str(tiny_world / "queries.jsonl"), "output": str(output)},
                "factors": {"fisher": "empirical", "sample_sequences": 24, "unit_sequences": 12},
                "scoring": {"top_k": 3, "rank": 4, "per_token": True},
                "resources": {"actors": 1, "batch_size": 1, "object_store_mb": 200}}

    prepare_output(config_from_dict(job(root / "prep")))
    shutil.copytree(root / "prep", root / "ref")
    record = run_job(config_from_dict(job(root / "ref")), stages=("score", "merge"))
    assert record["counts"]["scored"] == 8
    return {"root": root, "job": job, "ref": local_tables(root / "ref")}


def test_driver_killed_mid_score_resumes_to_identical_tables(kill_world, tmp_path):
    root, job = kill_world["root"], kill_world["job"]
    out = tmp_path / "out"
    shutil.copytree(root / "prep", out)
    shutil.rmtree(out / "runs", ignore_errors=True)
    (tmp_path / "job.toml").write_text(toml(job(out)))
    proc = start_cli(["score", str(tmp_path / "job.toml"), "-q"], cli_env(tmp_path))
    done: list[Path] = []
    deadline = time.time() + 300
    while not done and proc.poll() is None and time.time() < deadline:
        done = [p for p in (out / "scores").glob("*.parquet") if not p.name.startswith(".")] \
            if (out / "scores").exists() else []
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no finally, no run record
    code, _, err = finish(proc, 60)
    assert done and code == -signal.SIGKILL, err
    at_kill = len([p for p in (out / "scores").glob("*.parquet") if not p.name.startswith(".")])
    assert at_kill < 8, "every shard was scored before the kill: the test proves nothing"
    assert not (out / "runs" / "kill.json").exists()

    record = run_job(config_from_dict(job(out)), stages=("score", "merge"))
    counts = record["counts"]
    assert counts["skipped"] >= 1 and counts["scored"] + counts["skipped"] == 8 and counts["failed"] == 0
    assert counts["rows"] == {"rows": 240, "scored": 240, "skipped": 0, "unreadable_shards": 0}
    assert local_tables(out) == kill_world["ref"]


# --- (b), (c) object storage through a faulty proxy -----------------------------------------------------------


def s3_tables(fs, prefix: str, corpus_from: str, corpus_to: str) -> dict[str, list]:
    """Every table of an output prefix as rows, the corpus prefix in them renamed (the two runs read two copies)."""
    out = {}
    fs.invalidate_cache()  # this process listed the prefix while the run wrote it
    for sub in TABLES + ("queries",):
        for path in sorted(fs.find(f"{prefix}/{sub}")):
            name = path.rsplit("/", 1)[-1]
            if not path.endswith(".parquet") or name.startswith((".", "_")):
                continue
            with fs.open(path, "rb") as f:
                rows = pq.read_table(f).to_pylist()
            out[path[len(prefix):]] = [{k: v.replace(corpus_from, corpus_to) if isinstance(v, str) else v
                                        for k, v in r.items()} for r in rows]
    return out


@pytest.fixture(scope="module")
def s3_world(ray_local, s3_server, tiny_world, tmp_path_factory):
    """The world in a bucket, an undisturbed run (this process, straight to moto), and a faulty proxy."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("faults")
    for path in sorted(tiny_world.rglob("*")):
        if path.is_file():
            fs.put(str(path), f"faults/world/{path.relative_to(tiny_world)}")

    def job(name: str) -> dict:
        return {"run_id": name, "model": {"path": "s3://faults/world/model"},
                "data": {"raw": "s3://faults/world/raw/", "corpus": f"s3://faults/shards-{name}/",
                         "queries": "s3://faults/world/queries.jsonl", "output": f"s3://faults/{name}"},
                "factors": {"fisher": "empirical", "sample_sequences": 16, "unit_sequences": 8},
                "scoring": {"top_k": 2, "rank": 4, "per_token": True},
                "resources": {"actors": 1, "batch_size": 8, "object_store_mb": 200}}

    assert run_job(config_from_dict(job("ref")))["status"] == "ok"
    ref = s3_tables(fs, "faults/ref", "shards-ref", "shards-X")
    proxy = FaultProxy(int(s3_server.rsplit(":", 1)[1]), slowdown_every=5, reset_every=7, truncate_every=3,
                       max_each=4).start()
    yield {"fs": fs, "job": job, "ref": ref, "proxy": proxy, "root": tmp_path_factory.mktemp("s3faults")}
    proxy.stop()


def test_job_through_throttling_resetting_truncating_store_gives_identical_tables(s3_world):
    proxy, root = s3_world["proxy"], s3_world["root"]
    (root / "job.toml").write_text(toml(s3_world["job"]("proxied")))
    code, out, err = finish(start_cli(["run", str(root / "job.toml"), "-q"],
                                      cli_env(root, AWS_ENDPOINT_URL=proxy.endpoint)), 600)
    assert code == 0, err[-3000:]
    assert all(proxy.counts[k] >= 1 for k in ("slowdown", "reset", "truncate")), proxy.counts
    assert all(proxy.counts[k] <= 4 for k in ("slowdown", "reset", "truncate")), proxy.counts
    assert s3_tables(s3_world["fs"], "faults/proxied", "shards-proxied", "shards-X") == s3_world["ref"]
    assert "corpus rows: " in out


def test_store_gone_mid_run_one_line_then_rerun_completes(s3_world):
    """Scoring the proxied run's corpus again (its factors and queries are kept) when the store goes away."""
    fs, proxy, root = s3_world["fs"], s3_world["proxy"], s3_world["root"]
    job = root / "job.toml"
    job.write_text(toml(s3_world["job"]("proxied")))
    for sub in TABLES:
        if fs.exists(f"faults/proxied/{sub}"):
            fs.rm(f"faults/proxied/{sub}", recursive=True)
    proxy.disarm()
    env = cli_env(root, AWS_ENDPOINT_URL=proxy.endpoint, INFLUENCE_STORAGE_RETRIES="2",
                  INFLUENCE_STORAGE_BACKOFF_S="0.05", AWS_MAX_ATTEMPTS="2")
    proc = start_cli(["run", str(job), "-q"], env)
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists("faults/proxied/scores") and [p for p in fs.ls("faults/proxied/scores", refresh=True)
                                                    if p.endswith(".parquet")]:
            break
        time.sleep(0.05)
    proxy.stop()  # the store is gone: connections are refused
    code, out, err = finish(proc, 400)
    assert code not in (0, None), out
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "s3://faults/" in lines[0], err[-3000:]
    print("the store gone:", code, err, sep="\n")

    proxy.start()  # same port: the store is back
    code, out, err = finish(start_cli(["run", str(job), "-q"], {**env, "INFLUENCE_STORAGE_RETRIES": "5"}), 600)
    assert code == 0, err[-3000:]
    assert s3_tables(fs, "faults/proxied", "shards-proxied", "shards-X") == s3_world["ref"]
