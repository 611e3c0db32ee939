#!/usr/bin/env bash
# The merge stage before (main: topk/ + token_scores/) and after issue 7 (also text, token counts, token
# strings, layer_scores/), alternating, on one demo output. Each run starts its own local Ray (about 5 s,
# in both). Usage: benchmarks/merge_cost.sh DEMO_DIR BEFORE_CHECKOUT AFTER_CHECKOUT [ROUNDS]
set -euo pipefail
demo=$1; before=$2; after=$3; rounds=${4:-3}
py=${PYTHON:-.venv/bin/python}
for i in $(seq "$rounds"); do
  for side in before after; do
    tree=$before; [ "$side" = after ] && tree=$after
    rm -f "$demo/results/topk/_pipeline.json"
    PYTHONPATH=$tree RAY_TMPDIR=${RAY_TMPDIR:-/tmp} "$py" - "$demo/job.toml" "$side" <<'PY'
import sys, time
from pipelines.config import load_config
from pipelines.run import run_job
cfg = load_config(sys.argv[1])
t = time.perf_counter()
record = run_job(cfg, stages=("merge",))
m = record["stages"]["merge"]
print(f"{sys.argv[2]:<6} merge {m['seconds']:.2f} s (whole call {time.perf_counter() - t:.2f} s)", flush=True)
PY
  done
done
