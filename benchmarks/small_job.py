"""A small job end to end with each kind of pool (``resources.pool``): what a stage's start costs.

The demo's world (``pipelines.demo.job.prepare``: 264 documents in 4 raw files, a tiny trained GPT-2,
6 queries) is made once; then ``influence run`` (a fresh process and a fresh local Ray each time,
as a user runs it) runs every stage (tokenize, fit-factors, build-queries, score, merge) into a fresh
output, alternating ``pool = "tasks"`` and ``pool = "actors"`` (the machine's load drifts). Reported per
run: the process's wall time, the run record's seconds and each stage's; per pair, actors / tasks;
and whether the tables of the two pools are the same rows (the shard path aside).

    .venv/bin/python benchmarks/small_job.py --repeats 3 --out benchmarks/results/small_job_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipelines.demo.job import JOB, prepare  # noqa: E402

TABLES = ("topk", "token_scores", "layer_scores")


def run(world: Path, pool: str, n: int) -> dict:
    name = f"{pool}-{n}"
    job = JOB.format(out=world, top_k=5).replace('corpus = "shards"', f'corpus = "shards-{name}"')
    job = job.replace('output = "results"', f'output = "out-{name}"').replace("[resources]\n",
                                                                           f'[resources]\npool = "{pool}"\n')
    (world / f"job-{name}.toml").write_text(job)
    start = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "influence"), "run", f"job-{name}.toml", "-q"],
                          cwd=world, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    record = json.loads(next((world / f"out-{name}" / "runs").glob("*.json")).read_text())
    return {"pool": pool, "wall_s": round(wall, 2), "record_s": record["seconds"],
            "stages": {k: v.get("seconds") for k, v in record["stages"].items()}, "output": f"out-{name}",
            "shards": f"shards-{name}"}


def rows(world: Path, r: dict) -> dict:
    out = {}
    for t in TABLES:
        got = pads.dataset(str(world / r["output"] / t), partitioning="hive").to_table().to_pylist()
        out[t] = sorted((json.dumps(x, sort_keys=True, default=str).replace(r["shards"], "S") for x in got))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (tasks, actors)")
    ap.add_argument("--work", default="", help="folder for the world and the runs (default: a temporary one)")
    ap.add_argument("--out", default="", help="write the results here as JSON")
    args = ap.parse_args()
    world = Path(args.work or tempfile.mkdtemp(prefix="small-job-")).resolve()
    world.mkdir(parents=True, exist_ok=True)
    if not (world / "model").exists():
        prepare(world, epochs=150, max_seconds=120.0)
    runs = []
    for n in range(args.repeats):
        for pool in ("tasks", "actors"):
            r = run(world, pool, n)
            runs.append(r)
            print(f"{pool:6s} run {n}: wall {r['wall_s']:6.1f} s, run record {r['record_s']:6.1f} s, "
                  f"stages {r['stages']}", flush=True)
    pairs = [(a, b) for a, b in zip(runs[::2], runs[1::2])]
    ratio_wall = [b["wall_s"] / a["wall_s"] for a, b in pairs]
    ratio_record = [b["record_s"] / a["record_s"] for a, b in pairs]
    same = all(rows(world, a) == rows(world, b) for a, b in pairs)
    summary = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()},
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "runs": runs,
               "actors_over_tasks_wall": [round(x, 2) for x in ratio_wall],
               "actors_over_tasks_record": [round(x, 2) for x in ratio_record],
               "median_actors_over_tasks_wall": round(statistics.median(ratio_wall), 2),
               "median_actors_over_tasks_record": round(statistics.median(ratio_record), 2),
               "same_tables": same}
    print(f"actors / tasks: wall {summary['actors_over_tasks_wall']} (median "
          f"{summary['median_actors_over_tasks_wall']}), run record {summary['actors_over_tasks_record']} "
          f"(median {summary['median_actors_over_tasks_record']}); same tables: {same}; "
          f"load average {summary['machine']['load_average']}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
