"""Candidate recall of the TF-IDF filter (pipelines/stages/tfidf.py) against the full influence scan.

For each query: the exact top-k of the full scan (every sequence of the corpus scored
in this process with the job's factors and preconditioned queries, ties by doc_id),
and TF-IDF's top-n candidates (``tfidf_topn``, two Ray Data passes, no model). Recall
= |scan top-k  &  TF-IDF top-n| / k, per query, then the mean (and the worst query).
The TF-IDF lists are prefixes of one another (one total order), so one run at the
largest n gives every smaller n. Both query token choices are measured: prompt +
completion (what the project uses) and the completion alone. ``--side bottom`` also
measures the scan's k most negative (opponents).

Run (after ``influence demo --output /tmp/demo-tfidf``, which writes factors and queries):
    PYTHONPATH=. .venv/bin/python benchmarks/tfidf_recall.py --job /tmp/demo-tfidf/job.toml \\
        --out bench_output/tfidf_recall.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from influence_ops import collate, load_queries, score_batch
from pipelines.config import load_config
from pipelines.io import storage
from pipelines.io.model_loading import load_model
from pipelines.io.shards import list_shards, read_rows
from pipelines.stages.tfidf import query_tokens, tfidf_topn


def full_scan(cfg, batch_size: int = 16) -> tuple[list[str], list[tuple[str, str]], np.ndarray]:
    """(query ids, (doc_id, shard) per sequence, scores [Q, N]) of every sequence of the corpus."""
    m = load_model(cfg.model)
    queries = load_queries(storage.local_copy(storage.join(cfg.data.output, "queries")))
    keys, parts = [], []
    for shard in list_shards(cfg.data.corpus):
        seqs = read_rows(shard, None, m.vocab_size, context=m.context, too_long=cfg.data.too_long)
        for i in range(0, len(seqs), batch_size):
            parts.append(score_batch(m.model, queries, collate(seqs.input_ids[i:i + batch_size])).scores)
            keys += [(d, shard) for d in seqs.doc_ids[i:i + batch_size]]
    return queries.query_ids, keys, torch.cat(parts, dim=1).to(torch.float64).numpy()


def scan_top(keys: list[tuple[str, str]], scores: np.ndarray, k: int, side: str) -> list[set[tuple[str, str]]]:
    sign = -1.0 if side == "top" else 1.0
    return [{keys[i] for i in sorted(range(len(keys)), key=lambda i: (sign * row[i], keys[i]))[:k]} for row in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="/tmp/demo-tfidf/job.toml")
    parser.add_argument("--k", type=int, default=10, help="the scan's top-k to recover")
    parser.add_argument("--n", type=int, nargs="+", default=[10, 20, 50, 100, 200], help="TF-IDF candidates")
    parser.add_argument("--sides", nargs="+", default=["top", "bottom"], choices=["top", "bottom"])
    parser.add_argument("--out", default="bench_output/tfidf_recall.json")
    args = parser.parse_args()
    cfg = load_config(args.job)

    cache = Path(args.out).with_suffix(".scan.json")  # the scan is reused by a re-run on the same job
    t0 = time.perf_counter()
    if cache.exists() and json.loads(cache.read_text())["job"] == args.job:
        saved = json.loads(cache.read_text())
        qids, keys, scores = saved["qids"], [tuple(k) for k in saved["keys"]], np.asarray(saved["scores"])
    else:
        qids, keys, scores = full_scan(cfg)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"job": args.job, "qids": qids, "keys": keys, "scores": scores.tolist()}))
    scan_s = time.perf_counter() - t0
    result = {"job": args.job, "sequences": len(keys), "queries": len(qids), "k": args.k, "n": args.n,
              "scan_seconds": round(scan_s, 3), "recall": {}, "tfidf_seconds": {}}
    lines = ["| query tokens | scan side | " + " | ".join(f"recall@{n} mean (worst)" for n in args.n) + " |",
             "|---|---|" + "---|" * len(args.n)]
    for part in ("all", "completion"):
        tokens = query_tokens(cfg, part)
        t0 = time.perf_counter()
        for attempt in range(3):  # a local Ray may fail to start on an overloaded machine: try again
            try:
                cands = tfidf_topn(cfg, {q: tokens[q] for q in qids}, max(args.n))
                break
            except Exception as err:  # noqa: BLE001  (Ray's start-up timeout is a bare Exception)
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                time.sleep(10)
        result["tfidf_seconds"][part] = round(time.perf_counter() - t0, 3)
        for side in args.sides:
            want = scan_top(keys, scores, args.k, side)
            per_n = {}
            for n in args.n:
                rec = [len(w & {(d, s) for d, s, _ in cands[q][:n]}) / len(w) for q, w in zip(qids, want)]
                per_n[n] = {"mean": float(np.mean(rec)), "worst": float(min(rec)), "per_query": dict(zip(qids, rec))}
            result["recall"][f"{part}/{side}"] = per_n
            lines.append(f"| {'prompt + completion' if part == 'all' else 'completion'} | {side}-{args.k} | "
                         + " | ".join(f"{per_n[n]['mean']:.2f} ({per_n[n]['worst']:.1f})" for n in args.n) + " |")
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "loadavg": os.getloadavg()}
    table = "\n".join(lines)
    print(table)
    print(f"\n{len(keys)} sequences, {len(qids)} queries; scan {scan_s:.1f} s (in process), "
          f"TF-IDF {result['tfidf_seconds']} s (Ray, two passes each)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
