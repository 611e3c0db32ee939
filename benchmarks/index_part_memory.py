"""Peak memory of writing and searching one influence-index part: whole part in memory against streaming (issue 10).

A part holds one unit's compressed gradients, N rows of D numbers. Before 1117e80 the builder kept the unit's
N x D rows (float32), encoded them all, and wrote the file from memory; the search read the whole part and
decoded it to float32. Now the builder writes row groups of about ``index_build.GROUP_BYTES`` as it goes
(``PartWriter``, then ``storage.write_file``) and the search reads one row group at a time
(``index_search.part_chunks_top``). Each way runs in a fresh process on the same random rows (batches of 16,
as the builder receives them); reported: the process's peak resident memory above where it stood before the
step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux only), in MB.

Run:
    PYTHONPATH=. .venv/bin/python benchmarks/index_part_memory.py --rows 4096 --width 36864 --dtype float16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BATCH = 16


def _status(key: str) -> float:
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) / 1024


def reset_peak() -> float:
    """Resident MB now, after setting the peak to it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def write(way: str, url: str, rows: int, width: int, dtype: str) -> dict:
    import pyarrow as pa
    import torch

    from pipelines.io import storage
    from pipelines.stages.index_build import DTYPE_META, GROUP_BYTES, PartWriter, encode_rows

    gen = torch.Generator().manual_seed(0)
    batches = ((list(map(str, range(lo, min(lo + BATCH, rows)))), torch.randn(min(BATCH, rows - lo), width,
                                                                                generator=gen))
               for lo in range(0, rows, BATCH))
    start = reset_peak()
    if way == "whole":  # the builder before 1117e80
        ids, vectors = [], []
        for i, v in batches:
            ids += i
            vectors.append(v)
        vector, scale = encode_rows(torch.cat(vectors), dtype)
        table = pa.table({"doc_id": ids, "shard": ["s"] * rows, "tokens": pa.array([3] * rows, pa.int32()),
                          "vector": vector, "scale": scale})
        storage.write_parquet(url, table.replace_schema_metadata({DTYPE_META: dtype}))
    else:
        with tempfile.TemporaryDirectory() as tmp:  # row groups as IndexBuilder.score_unit sizes them
            part = PartWriter(f"{tmp}/part.parquet", "s", width, dtype, max(1, GROUP_BYTES // (4 * width)))
            for i, v in batches:
                part.add(i, [3] * len(i), v)
            part.close({DTYPE_META: dtype})
            storage.write_file(url, f"{tmp}/part.parquet")
    return {"step": f"write, {way}", "peak_mb": round(_status("VmHWM") - start),
            "part_mb": round(os.path.getsize(url) / 2**20)}


def search(way: str, url: str, width: int, queries: int) -> dict:
    import numpy as np

    from pipelines.stages import index_search

    P = np.random.default_rng(0).standard_normal((queries, width))
    start = reset_peak()
    if way == "whole":  # the search before 1117e80
        X, keys = index_search.read_part(url)
        index_search.part_top(X, keys, P, 100)
    else:
        chunk = max(1, min(index_search.SEARCH_ROWS, index_search.SEARCH_BYTES // (8 * width)))
        index_search.part_chunks_top(url, P, 100, chunk)
    return {"step": f"search, {way}", "peak_mb": round(_status("VmHWM") - start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--width", type=int, default=36864, help="D: numbers a row (e.g. 4 layers x 96 x 96)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--step", default="", help=argparse.SUPPRESS)  # one step, in a child process
    p.add_argument("--url", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench_output/index_part_memory.json")
    args = p.parse_args()
    if args.step:
        kind, way = args.step.split(":")
        res = (write(way, args.url, args.rows, args.width, args.dtype) if kind == "write"
               else search(way, args.url, args.width, args.queries))
        print(json.dumps(res))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("whole", "streaming"):
            url = f"{tmp}/{way}.parquet"
            for kind in ("write", "search"):
                out = subprocess.run([sys.executable, __file__, "--step", f"{kind}:{way}", "--url", url,
                                      "--rows", str(args.rows), "--width", str(args.width), "--dtype", args.dtype,
                                      "--queries", str(args.queries)], capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(results[-1], flush=True)
    res = {"rows": args.rows, "width": args.width, "dtype": args.dtype, "queries": args.queries,
           "rows_float32_mb": round(args.rows * args.width * 4 / 2**20), "steps": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
