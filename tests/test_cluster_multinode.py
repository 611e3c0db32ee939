"""The whole job on a real multi-node Ray cluster on this machine (a head and 3 worker raylets).

- Run with ``ray_address`` set (the driver is a separate process, as for a user):
  every table, the factor files and the queries equal the local run's.
- A worker node running a scoring actor is removed in the middle of `score`:
  the job completes, the tables are identical to the undisturbed run's, every
  shard is counted once, and the run record shows the retries.
- The driver of `fit-factors` holds no factor tensors: its peak memory stays
  within a fixed bound for a model whose factors take gigabytes.

One cluster for the module (about 15 s to start here); tiny data.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from cluster_helpers import actor_nodes, local_cluster, run_driver, start_driver, table_rows
from conftest import make_texts

from pipelines import config_from_dict
from pipelines.cluster.jobfile import to_toml
from pipelines.run import run_job

pytestmark = pytest.mark.cluster

SHARDS = 9
DOCS = 150  # per shard: enough work per unit (about a second) to remove a node while scoring


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(workers=3, worker_cpus=1.0) as c:
        yield c


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 (width 96, context 64), 9 raw files of 150 texts each (one shard each), 3 queries."""
    from pipelines.demo.model import build_tokenizer, save_model, tiny_gpt2

    root = tmp_path_factory.mktemp("cluster-world")
    texts = [" ".join(make_texts(3, seed=i)) for i in range(SHARDS * DOCS)]
    tok = build_tokenizer(texts, root / "model")
    save_model(tiny_gpt2(len(tok), context=64, width=96, layers=2, heads=2, seed=5), root / "model")
    (root / "raw").mkdir()
    for f in range(SHARDS):
        with open(root / "raw" / f"part{f}.jsonl", "w") as out:
            for i, t in enumerate(texts[f * DOCS:(f + 1) * DOCS]):
                out.write(json.dumps({"id": f"d{f}-{i}", "text": t}) + "\n")
    with open(root / "queries.jsonl", "w") as out:
        for qid, p, c in (("q-cat", "the cat", "sits on the hill"), ("q-fish", "a blue fish", "swims under"),
                          ("q-dog", "the big dog", "eats quickly")):
            out.write(json.dumps({"query_id": qid, "prompt": p, "completion": c}) + "\n")
    return root


def job(world: Path, root: Path, address: str) -> dict:
    return {
        "run_id": "multinode",
        "model": {"path": str(world / "model")},
        "data": {"raw": str(world / "raw"), "corpus": str(root / "shards"), "queries": str(world / "queries.jsonl"),
                 "output": str(root / "out")},
        "factors": {"fisher": "sampled", "sample_sequences": 60, "seed": 3, "unit_sequences": 10},
        "scoring": {"top_k": 4, "rank": 4, "per_token": True, "sort_window": 64},
        "resources": {"ray_address": address, "actors": 3, "cpus_per_actor": 0.5, "threads_per_actor": 1,
                      "batch_size": 8},
    }


def write_job(root: Path, spec: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "job.toml"
    path.write_text(to_toml(config_from_dict(spec)))
    return path


def record(root: Path) -> dict:
    return json.loads((root / "out" / "runs" / "multinode.json").read_text())


@pytest.fixture(scope="module")
def cluster_run(cluster, world, tmp_path_factory):
    root = tmp_path_factory.mktemp("on-cluster")
    path = write_job(root, job(world, root, cluster.address))
    done = run_driver(["run", str(path), "-q"])
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def tables(root: Path) -> dict[str, list[dict]]:
    out = {}
    for sub in ("scores", "topk", "token_scores", "queries"):
        out.update(table_rows(root, f"out/{sub}", {str(root): "ROOT"}))
    return out


def test_cluster_run_equals_local_run(cluster, ray_local, cluster_run, world, tmp_path_factory):
    local = tmp_path_factory.mktemp("local")
    run_job(config_from_dict(job(world, local, "")))
    got, want = tables(cluster_run), tables(local)
    assert sorted(got) == sorted(want) and len([k for k in got if k.startswith("out/scores/")]) == SHARDS
    for name in want:
        assert got[name] == want[name], name
    factor_files = sorted(p.name for p in (local / "out" / "factors").glob("*.safetensors"))
    assert len(factor_files) == 4  # two MLP layers in each of two blocks
    for name in factor_files + ["../queries/queries.safetensors"]:
        assert (cluster_run / "out" / "factors" / name).read_bytes() == (local / "out" / "factors" / name).read_bytes()
    rec = record(cluster_run)
    units = rec["stages"]["score"]["units"]
    assert units["pool"] == "actors"  # pool = "auto" on several nodes; the local run above ran on a task pool
    assert record(local)["stages"]["score"]["units"]["pool"] == "tasks"
    workers = {n.node_id[:12] for n in cluster.worker_nodes}
    assert units["units"] == SHARDS and len(units["nodes"]) >= 2 and set(units["nodes"]) <= workers, units
    assert sum(a["units"] for a in units["actors"].values()) == SHARDS
    assert all(a["busy_s"] > 0 for a in units["actors"].values())
    eigh = rec["stages"]["fit-factors"]["tasks"]["eigh"]
    assert eigh["units"] == 4 and rec["stages"]["fit-factors"]["eigh_device"] == ["cpu"]


def remove_a_node_while_scoring(cluster, job_path: Path, out: Path) -> tuple[object, int, str, list]:
    """Run the job in a driver process; remove the first worker node seen with a scoring actor inside a unit.

    Removal is tried while at least 3 shards are still unscored, so the lost
    unit has somewhere to run again. Returns (removed node or None, the
    driver's exit code, its output, a timeline of (seconds, shards done, busy
    actor nodes) whenever that changed).
    """
    driver = start_driver(["run", str(job_path), "-q"])
    removed, timeline, start = None, [], time.time()
    while removed is None and driver.poll() is None and time.time() < start + 900:
        done = len(list((out / "scores").glob("*.parquet"))) if (out / "scores").exists() else 0
        if done < SHARDS - 2:
            busy = actor_nodes(cluster, "ShardScorer", settle=0.3)
            if not timeline or timeline[-1][1:] != (done, len(busy)):
                timeline.append((round(time.time() - start, 1), done, len(busy)))
            if busy:
                removed = busy[0]
                cluster.remove_node(removed, allow_graceful=False)
        time.sleep(0.05)
    output, _ = driver.communicate(timeout=1200)
    return removed, driver.returncode, output, timeline


def test_node_lost_mid_score_gives_identical_tables(cluster, cluster_run):
    """Up to 3 tries: on a fast machine the scoring window (a few seconds) can pass between two polls.

    A try that removes nothing must still give the same tables; only the
    removal's timing is retried, never a wrong result.
    """
    out = cluster_run / "out"
    before, sequences = tables(cluster_run), record(cluster_run)["stages"]["score"]["sequences"]
    tries = []
    for _ in range(3):
        for sub in ("scores", "topk", "token_scores"):
            shutil.rmtree(out / sub, ignore_errors=True)
        removed, code, output, timeline = remove_a_node_while_scoring(cluster, cluster_run / "job.toml", out)
        assert code == 0, output
        assert tables(cluster_run) == before
        tries.append(timeline)
        if removed is not None:
            break
    assert removed is not None, f"no worker node with a scoring actor was found while scoring in 3 tries: {tries}"
    score = record(cluster_run)["stages"]["score"]
    assert (score["scored"], score["skipped"], score["failed"]) == (SHARDS, 0, 0)
    assert score["units"]["units"] == SHARDS and score["sequences"] == sequences  # each shard counted once
    assert score["units"]["retries"] >= 1, score["units"]  # the lost actor's unit ran again elsewhere


DRIVER_BOUND_MB = 150  # what fit-factors may add to its driver's peak memory, whatever the layers


def test_fit_factors_driver_memory_stays_bounded_for_wide_layers(cluster, tmp_path):
    """8 blocks with d_ff 2048 (16 tracked layers, 0.8 GB of factors): the driver's peak grows < 150 MB.

    The driver only plans units, receives small rows and writes the manifest; the
    partial sums, the eigendecompositions and the layer files stay with the
    actors and storage. Before this, the driver summed every unit's stage-1
    sums of all layers (here 270 MB per copy) and held every eigenbasis.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipelines.demo.model import save_model

    torch.manual_seed(0)
    save_model(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=128, n_inner=2048, n_layer=8,
                                          n_head=2, bos_token_id=0, eos_token_id=0)).eval(), tmp_path / "model")
    (tmp_path / "shards").mkdir()
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1)).tolist()
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(16)], "input_ids": pa.array(ids, pa.list_(pa.int32()))}),
                   tmp_path / "shards" / "s.parquet")
    spec = {"run_id": "wide", "model": {"path": str(tmp_path / "model")},
            "data": {"corpus": str(tmp_path / "shards"), "queries": str(tmp_path / "unused.jsonl"),
                     "output": str(tmp_path / "out")},
            "factors": {"fisher": "empirical", "unit_sequences": 8, "blocks": 4},
            "resources": {"ray_address": cluster.address, "actors": 2, "cpus_per_actor": 0.5, "batch_size": 8}}
    done = run_driver(["fit-factors", str(write_job(tmp_path, spec)), "-q"])
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((tmp_path / "out" / "runs" / "wide.json").read_text())["stages"]["fit-factors"]
    factor_mb = sum(p.stat().st_size for p in (tmp_path / "out" / "factors").glob("*.safetensors")) / 2**20
    assert info["layers"] == 16 and factor_mb > 5 * DRIVER_BOUND_MB, factor_mb
    grown = info["driver_peak_rss_mb"] - info["driver_peak_rss_at_start_mb"]
    assert grown < DRIVER_BOUND_MB, (grown, info)
    assert not (tmp_path / "out" / "factors" / "_partials").exists()  # transient sums removed
