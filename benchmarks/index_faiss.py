"""Searching the influence index: the scan (``index.search = "scan"``) against FAISS in memory (``"faiss"``).

For each index size N of --rows: X [N, --width] Gaussian rows stored as float16 (as the index
stores them), --queries Gaussian queries P, M = --candidates per query and side.
  - scan: what the actors compute (``index_search.part_top`` on each part of --part-rows rows,
    float64 products in chunks of ``SEARCH_ROWS``) and the driver's fold into a
    ``TopKAccumulator``, on one process: the compute of the Ray pass without Ray, reading or
    transfers (with A actors the part work divides by about A);
  - faiss: ``index_faiss.faiss_top`` on the whole X (IndexFlatIP add, float32 search of K rows per
    query, float64 re-scoring of the K, cut to M) and the same fold; ``add_s`` is the index build.
Both give the same candidates: checked on every run (``same_candidates``). Threads: torch and
OpenMP (FAISS) as the environment says; run with OMP_NUM_THREADS=1 for one core each.

Run (numbers in benchmarks/RESULTS.md section 6):
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/index_faiss.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from influence_ops import TopKAccumulator
from influence_ops.topk import TopKSide
from pipelines.stages import index_faiss
from pipelines.stages.index_faiss import faiss_top, require_faiss
from pipelines.stages.index_search import part_top


def fold(acc: TopKAccumulator, keys: np.ndarray, sides: tuple) -> None:
    ts, tr, bs, br = sides
    acc.add_sides(TopKSide(ts, keys[tr]), TopKSide(bs, keys[br]), len(keys))


def scan(X: np.ndarray, keys: np.ndarray, P: np.ndarray, m: int, part_rows: int) -> TopKAccumulator:
    acc = TopKAccumulator(P.shape[0], m)
    for lo in range(0, len(X), part_rows):
        part = keys[lo:lo + part_rows]
        fold(acc, part, part_top(X[lo:lo + part_rows], list(part), P, m))
    return acc


def in_memory(X: np.ndarray, keys: np.ndarray, P: np.ndarray, m: int, stats: dict) -> TopKAccumulator:
    faiss = require_faiss()
    original = faiss.IndexFlatIP

    class Timed(original):  # the index build and the searches, timed apart from the re-scoring
        def add(self, x):
            start = time.perf_counter()
            super().add(x)
            stats["add_s"] = time.perf_counter() - start

        def search(self, x, k):
            start = time.perf_counter()
            out = super().search(x, k)
            stats["search_s"] = stats.get("search_s", 0.0) + time.perf_counter() - start
            stats.setdefault("searches", []).append([int(x.shape[0]), int(k)])
            return out

    class Shim:
        IndexFlatIP = Timed

    acc = TopKAccumulator(P.shape[0], m)
    fold(acc, keys, faiss_top(X, list(keys), P, m, Shim))
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="32768,100000", help="index sizes N, comma-separated")
    p.add_argument("--width", type=int, default=1024, help="D (4 tracked layers x k_out 16 x k_in 16)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--part-rows", type=int, default=4096, help="rows of an index part (the scan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_output/index_faiss.json")
    args = p.parse_args()
    faiss = require_faiss()
    out: dict = {"args": vars(args), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                             "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
                             "faiss_threads": faiss.omp_get_max_threads(),
                             "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                 "load_before": os.getloadavg(), "runs": {}}
    rng = np.random.default_rng(args.seed)
    P = rng.standard_normal((args.queries, args.width))
    for n in [int(float(r)) for r in args.rows.split(",")]:
        X = rng.standard_normal((n, args.width)).astype(np.float16).astype(np.float32)
        keys = np.asarray([f"doc-{i:08d}\x00shard" for i in rng.permutation(n)], dtype=object)
        start = time.perf_counter()
        exact = scan(X, keys, P, args.candidates, args.part_rows)
        scan_s = time.perf_counter() - start
        stats: dict = {}
        start = time.perf_counter()
        fast = in_memory(X, keys, P, args.candidates, stats)
        faiss_s = time.perf_counter() - start
        same = all(getattr(fast, s).ids.tolist() == getattr(exact, s).ids.tolist() for s in ("top", "bottom"))
        diff = max(float(np.abs(getattr(fast, s).scores - getattr(exact, s).scores).max()) for s in ("top", "bottom"))
        row = {"scan_s": scan_s, "faiss_s": faiss_s, "scan_over_faiss": scan_s / faiss_s,
               "faiss_add_s": stats["add_s"], "faiss_search_s": stats["search_s"],
               "faiss_rescore_and_cut_s": faiss_s - stats["add_s"] - stats["search_s"],
               "faiss_searches": stats["searches"], "same_candidates": same, "max_score_difference": diff,
               "faiss_memory_bytes": index_faiss.faiss_bytes(n, args.width), "load_after": os.getloadavg()}
        out["runs"][str(n)] = row
        print(n, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
