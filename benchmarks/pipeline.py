"""Scoring throughput of the Ray pipeline vs the in-process ``score_batch`` loop, and actor memory vs corpus size.

What is compared (same model, queries, shards, batch size, torch threads):
- in-process: one Python process reads each shard (``pipelines.io.shards.iter_shard``),
  cuts the same length-sorted batches and calls ``influence_ops.score_batch`` +
  ``TopKAccumulator`` in a loop, with ``torch.set_num_threads(threads)``;
- pipeline: ``pipelines.stages.score.score`` (the real stage: Ray Data, one actor with
  ``threads_per_actor = threads``, prefetching, per-shard Parquet outputs).
Steady-state pipeline throughput = tokens of shards 2..n / (time shard n
completed - time shard 1 completed); start-up = Ray start + the time to the first
shard beyond what the steady rate explains. The runs alternate (in-process,
pipeline, in-process, ...); each ratio = pipeline steady / mean of the in-process
runs around it (the machine's load drifts); the median ratio is reported.

Memory: the scoring stage is run on a small corpus and on one 10x larger (10x the
shards); the peak RSS each actor reports (``getrusage``) is compared.

    .venv/bin/python benchmarks/pipeline.py --out bench_output/pipeline.json

Multi-node mode (``--nodes 1 2 3``): the scoring stage on a real Ray cluster on
this machine (``pipelines.cluster.local``: a head with no CPUs and N worker
raylets of 1 CPU each, one actor per node with 1 torch thread), N in the given
order, repeated ``--rounds`` times (alternating N cancels slow drifts of the
machine's load). Per run: tokens/s over the window from the first unit's start
to the last unit's end (and over the whole stage, start-up included), each
node's busy fraction (its actors' busy seconds / (window x actors)), and the
scheduling overhead per unit (an actor's idle gap between finishing one unit and
starting the next; plus the stage's start-up to the first unit).

    .venv/bin/python benchmarks/pipeline.py --nodes 1 2 3 --shards 12 --rows 200 --out bench_output/multinode.json
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray loads: drivers reach nodes on 127.0.0.1

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from influence_ops import (
    Fisher,
    TopKAccumulator,
    collate,
    fit_ekfac,
    load_queries,
    precondition_queries,
    query_batch,
    save_queries,
    score_batch,
)
from pipelines import config_from_dict
from pipelines.demo.model import save_model, tiny_gpt2
from pipelines.io.model_loading import load_model
from pipelines.io.shards import iter_shard, list_shards
from pipelines.runtime.batching import token_batches
from pipelines.runtime.ray_runtime import ensure_ray
from pipelines.stages.score import score


def make_corpus(folder: Path, shards: int, rows: int, vocab: int, seed: int, lengths=(64, 128)) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        ids = [rng.integers(0, vocab, rng.integers(lengths[0], lengths[1] + 1)).tolist() for _ in range(rows)]
        pq.write_table(pa.table({"doc_id": [f"s{s}-{i}" for i in range(rows)],
                                 "input_ids": pa.array(ids, pa.list_(pa.int32()))}), folder / f"shard-{s:04d}.parquet")


def make_queries(cfg, out: Path, num_queries: int, rank: int, seed: int) -> None:
    """Factors from a small sample and preconditioned queries, in-process, saved where `score` reads them."""
    m = load_model(cfg.model)
    rng = np.random.default_rng(seed)
    sample = [rng.integers(0, m.vocab_size, 96).tolist() for _ in range(64)]
    factors = fit_ekfac(m.model, m.layers, [collate(sample[i:i + 16]) for i in range(0, 64, 16)],
                        fisher=Fisher.EMPIRICAL)
    prompts = [rng.integers(0, m.vocab_size, 12).tolist() for _ in range(num_queries)]
    completions = [rng.integers(0, m.vocab_size, 6).tolist() for _ in range(num_queries)]
    queries = precondition_queries(m.model, factors, [query_batch(prompts, completions)], rank=rank,
                                   query_ids=[f"q{i}" for i in range(num_queries)])
    save_queries(queries, out / "queries")


def in_process(cfg, threads: int) -> dict:
    torch.set_num_threads(threads)
    m = load_model(cfg.model)
    queries = load_queries(Path(cfg.data.output) / "queries")
    tokens, start = 0, time.perf_counter()
    for shard in list_shards(cfg.data.corpus):
        acc = TopKAccumulator(queries.num_queries, cfg.scoring.top_k)
        for window in iter_shard(shard, m.vocab_size, rows_per_read=cfg.scoring.sort_window):
            for part, batch in token_batches(window, cfg.resources.batch_size):
                acc.update(score_batch(m.model, queries, batch).scores, part.doc_ids)
                tokens += int(batch.attention_mask.sum())
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def pipeline(cfg) -> dict:
    summary = score(cfg, queries_digest="bench")
    timeline = summary["timeline"]
    (t1, _), (tn, _) = timeline[0], timeline[-1]
    steady_tokens = sum(tok for _, tok in timeline[1:])
    rate = steady_tokens / (tn - t1) if len(timeline) > 1 and tn > t1 else summary["tokens"] / summary["seconds"]
    return {"tokens": summary["tokens"], "seconds": summary["seconds"], "steady_tokens_per_s": rate,
            "actor_busy_tokens_per_s": summary["tokens"] / summary["actor_seconds"],
            "completed_at_s": [t for t, _ in timeline],
            "first_shard_s": t1, "stage_startup_s": t1 - timeline[0][1] / rate,
            "peak_rss_mb": summary["peak_rss_mb"], "shards": summary["shards"]}


def job(root: Path, corpus: str, output: str, threads: int, batch_size: int) -> dict:
    return {"model": {"path": str(root / "model")},
            "data": {"corpus": corpus, "queries": str(root / "unused.jsonl"), "output": output},
            "scoring": {"top_k": 10, "rank": 32, "sort_window": 512},
            "resources": {"actors": 1, "threads_per_actor": threads, "batch_size": batch_size, "cpus_per_actor": 1.0,
                          "object_store_mb": 512, "pool": "actors"}}  # as measured (README): one actor


def multinode(args, root: Path, vocab: int) -> dict:
    """Scoring on local clusters of 1, 2, 3... worker nodes (``args.nodes``), ``args.rounds`` times each."""
    import ray

    from pipelines.cluster.local import local_cluster

    runs = []
    for round_ in range(args.rounds):
        for nodes in args.nodes:
            with local_cluster(workers=nodes, worker_cpus=1.0, store_mb=150) as cluster:
                spec = job(root, str(root / "corpus"), str(root / "out"), 1, args.batch_size)
                spec["resources"].update({"ray_address": cluster.address, "actors": nodes, "object_store_mb": 0})
                shutil.rmtree(root / "out" / "scores", ignore_errors=True)
                summary = score(config_from_dict(spec), queries_digest="bench")
                ray.shutdown()
            units = summary["units"]
            window = units["wall_s"] - units["first_unit_start_s"]
            run = {"nodes": nodes, "round": round_, "tokens": summary["tokens"], "stage_s": summary["seconds"],
                   "window_s": round(window, 3), "tokens_per_s": summary["tokens"] / window,
                   "tokens_per_s_with_startup": summary["tokens"] / summary["seconds"],
                   "startup_to_first_unit_s": units["first_unit_start_s"],
                   "gap_between_units_s": units["gap_between_units_s"],
                   "unit_s_mean": sum(a["busy_s"] for a in units["actors"].values()) / units["units"],
                   "node_busy_fraction": {k: round(v["busy_s"] / (window * v["actors"]), 3)
                                          for k, v in units["nodes"].items()},
                   "units_per_node": {k: v["units"] for k, v in units["nodes"].items()}, "retries": units["retries"]}
            print("multinode:", json.dumps(run), flush=True)
            runs.append(run)
    by_nodes = {n: statistics.median(r["tokens_per_s"] for r in runs if r["nodes"] == n) for n in args.nodes}
    return {"runs": runs, "median_tokens_per_s": by_nodes,
            "speedup_vs_1_node": {n: v / by_nodes[args.nodes[0]] for n, v in by_nodes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="bench_output/pipeline_work")
    ap.add_argument("--out", default="bench_output/pipeline.json")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="pipeline runs, each between two in-process runs")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per actor")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--rss-shards", type=int, default=4, help="shards of the small corpus of the memory check")
    ap.add_argument("--nodes", type=int, nargs="*", help="multi-node mode: worker node counts to run (e.g. 1 2 3)")
    ap.add_argument("--rounds", type=int, default=2, help="multi-node mode: repeats of the node counts")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.root).resolve()
    shutil.rmtree(root, ignore_errors=True)
    vocab = 4096
    save_model(tiny_gpt2(vocab, context=128, width=128, layers=4, heads=4), root / "model")
    make_corpus(root / "corpus", args.shards, args.rows, vocab, seed=1)
    cfg = config_from_dict(job(root, str(root / "corpus"), str(root / "out"), args.threads, args.batch_size))
    make_queries(cfg, root / "out", args.queries, rank=32, seed=2)
    if args.nodes:
        report = {"workload": {"shards": args.shards, "rows_per_shard": args.rows, "queries": args.queries,
                               "rank": 32, "batch_size": args.batch_size, "threads_per_actor": 1,
                               "cpus": os.cpu_count()}, **multinode(args, root, vocab)}
        print(json.dumps(report, indent=2))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return

    report: dict = {"workload": {"shards": args.shards, "rows_per_shard": args.rows, "lengths": [64, 128],
                                 "queries": args.queries, "rank": 32, "batch_size": args.batch_size,
                                 "threads": args.threads, "actors": 1, "cpus": os.cpu_count()}}
    report["workload"]["model"] = f"GPT-2, 4 layers, width 128, vocab {vocab}, {len(load_model(cfg.model).layers)} tracked"
    # In-process and pipeline runs alternate (B P B P ... B): each pipeline run is compared with the
    # mean of the in-process runs just before and after it, which cancels slow drifts of the machine's load.
    runs: list[dict] = [in_process(cfg, args.threads)]
    print("in-process:", runs[-1], flush=True)
    start = time.perf_counter()
    ensure_ray(cfg.resources)
    report["ray_init_s"] = time.perf_counter() - start
    ratios = []
    for _ in range(args.repeats):
        shutil.rmtree(root / "out" / "scores", ignore_errors=True)
        runs.append(pipeline(cfg))
        print("pipeline:", {k: v for k, v in runs[-1].items() if k != "completed_at_s"}, flush=True)
        runs.append(in_process(cfg, args.threads))
        print("in-process:", runs[-1], flush=True)
        around = (runs[-3]["tokens_per_s"] + runs[-1]["tokens_per_s"]) / 2
        ratios.append(runs[-2]["steady_tokens_per_s"] / around)
    report["runs"] = runs
    report["ratios_steady_vs_in_process"] = ratios
    report["ratio_median"] = statistics.median(ratios)

    rss = {}
    for name, shards in (("small", args.rss_shards), ("10x", 10 * args.rss_shards)):
        make_corpus(root / f"rss-{name}", shards, 100, vocab, seed=3)
        out = root / f"rss-out-{name}"
        shutil.copytree(root / "out" / "queries", out / "queries")
        rcfg = config_from_dict(job(root, str(root / f"rss-{name}"), str(out), args.threads, args.batch_size))
        rss[name] = pipeline(rcfg)["peak_rss_mb"]
    report["actor_peak_rss_mb"] = rss
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
