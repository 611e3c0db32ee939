"""`influence demo`: a whole job on a fresh machine, no downloads.

1. Generate a corpus with planted facts (``demo_corpus``) as raw JSONL files.
2. Build a word-level tokenizer and train a tiny GPT-2 on the corpus (150
   epochs: 30-60 s on a 2-core CPU, capped at 120 s), saved as a Hugging Face folder.
3. Write ``job.toml`` and run every stage on a local Ray.
4. Print, for each query, the most influential training sequences with their
   text, and how many planted sources were found.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from ..config import load_config
from ..results.show import next_steps
from ..run import run_job
from .corpus import make_corpus, make_queries
from .model import build_tokenizer, save_model, tiny_gpt2, train

JOB = """\
# The demo job: written by `influence demo`, runnable with `influence run {out}/job.toml`.
run_id = "demo"

[model]
path = "model"

[data]
raw = "raw"
corpus = "shards"
queries = "queries.jsonl"
output = "results"

[factors]
fisher = "topm"
seed = 0

[scoring]
top_k = {top_k}
rank = 16
per_token = true

[resources]
actors = 1
batch_size = 16
object_store_mb = 512
"""


def prepare(out: Path, epochs: int, max_seconds: float, echo: Any = print) -> dict[str, Any]:
    """Write raw text, queries, the trained model and job.toml into ``out``; returns what was made."""
    docs, facts = make_corpus()
    queries = make_queries(facts)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part in range(4):
        with open(raw / f"part-{part}.jsonl", "w") as f:
            for d in docs[part::4]:
                f.write(json.dumps(d) + "\n")
    with open(out / "queries.jsonl", "w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")
    model_dir = out / "model"
    tokenizer = build_tokenizer([d["text"] for d in docs], model_dir)
    model = tiny_gpt2(len(tokenizer), context=64, width=64, layers=2, heads=4)
    sequences = [tokenizer(d["text"])["input_ids"][:64] for d in docs]
    echo(f"training a tiny GPT-2 ({sum(p.numel() for p in model.parameters()):,} parameters) on "
         f"{len(docs)} documents for {epochs} epochs (at most {max_seconds:.0f} s) ...")
    stats = train(model, sequences, epochs=epochs, max_seconds=max_seconds)
    echo(f"  {stats['epochs']} epochs, {stats['steps']} steps in {stats['seconds']:.0f} s, "
         f"final loss {stats['loss']:.3f}")
    save_model(model, model_dir)
    return {"docs": docs, "queries": queries, "training": stats}


def show_results(results: Path, queries: list[dict], docs: list[dict], per_query: int = 3,
                 echo: Any = print) -> dict[str, int]:
    """Print the top sequences per query; count the planted sources found."""
    table = pads.dataset(str(results / "topk"), partitioning="hive").to_table().to_pylist()
    text = {}
    for shard in pads.dataset(str(results.parent / "shards")).to_table(columns=["doc_id", "text"]).to_pylist():
        text[shard["doc_id"]] = shard["text"]
    sources = {d["id"]: d["source_of"] for d in docs}
    top1 = found = 0
    for q in queries:
        echo(f"\nquery {q['query_id']}:  \"{q['prompt']}\" -> \"{q['completion']}\"")
        rows = sorted((r for r in table if r["query_id"] == q["query_id"] and r["sign"] == "top"),
                      key=lambda r: r["rank"])
        planted = [sources.get(r["doc_id"].split(":")[0]) == q["query_id"] for r in rows]
        for r, is_source in list(zip(rows, planted))[:per_query]:
            echo(f"  {'*' if is_source else ' '} #{r['rank']}  {r['score_normalized']:+.3e}  {r['doc_id']:<24} "
                 f"{text.get(r['doc_id'], '')}")
        top1 += bool(planted and planted[0])
        found += sum(planted)
    k = max((r["rank"] for r in table), default=0)
    echo("\n* = a document that states the queried fact (2 per fact are planted in the corpus).")
    echo(f"top-1 is a planted source for {top1} of {len(queries)} queries; "
         f"planted sources in the top {k}: {found} of {2 * len(queries)}.")
    return {"top1_is_source": top1, "sources_in_topk": found, "queries": len(queries)}


def run_demo(output: str | Path, epochs: int = 150, max_seconds: float = 120.0, show_progress: bool = True,
             echo: Any = print) -> dict[str, Any]:
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    made = prepare(out, epochs, max_seconds, echo)
    (out / "job.toml").write_text(JOB.format(out=out, top_k=5))
    cfg = load_config(out / "job.toml")
    echo("running the job (tokenize, fit-factors, build-queries, score, merge) on a local Ray ...")
    record = run_job(cfg, show_progress=show_progress)
    summary = show_results(Path(cfg.data.output), made["queries"], made["docs"], echo=echo)
    report = write_report(cfg.data.output)
    shown = Path(output) / "results"  # as the user named it (relative paths stay relative)
    steps = next_steps(str(shown))
    steps.insert(1, f"  open {shown / 'report.html'}   # the report, already written ({report})")
    return {**summary, "record": record, "seconds": time.perf_counter() - start, "config": cfg,
            "next_steps": [""] + steps}


def write_report(output: str) -> str:
    """Write ``<output>/report.html``; returns its size."""
    from ..io import storage
    from ..results.load import open_run
    from ..results.report.page import render_report

    html = render_report(open_run(output))
    storage.write_bytes(storage.join(output, "report.html"), html.encode("utf-8"))
    return f"{len(html) / 1024:,.0f} KiB"
