"""Scoring variants (``scoring.normalize``) and tracked layers (``model.track``) on the demo's planted facts.

Usage (after ``influence demo --output DEMO``):

    python benchmarks/scoring_variants.py DEMO [--markdown benchmarks/eval/variants.md]

For every fact of the demo corpus (16 countries x capital and river = 32 facts,
each stated by two documents: one in the query's words, one paraphrased) it
asks two queries: in the corpus's phrasing (the demo's prompts) and in a
phrasing no document uses, made of corpus words. It re-runs the demo's job
(its model, shards and settings: its job's Fisher, rank 16) through the real
pipeline for each ``model.track`` (factors refitted) and each
``scoring.normalize`` (score + merge re-run), with ``top_k`` above the corpus
size so that the merged table ranks every document.

Metrics per query set: recall@10 = share of queries with a source in the top
10; MRR = mean of 1 / rank of the first source. Costs: tracked parameters and
factor floats; in-process seconds of fit_ekfac and of scoring the corpus
(``score_batch``, best of 3), relative to ``none`` / ``mlp``; the pipeline's
stage seconds are recorded too (Ray start-up dominates them on this corpus).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence_ops import Normalize, Track, collate, fit_ekfac, precondition_queries, query_batch, score_batch  # noqa: E402
from pipelines.config import config_from_dict  # noqa: E402
from pipelines.demo.corpus import QUERY_PROMPTS, make_corpus  # noqa: E402
from pipelines.eval.metrics import paired_interval  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Word orders no document uses, built only from corpus words (the tokenizer is word-level).
PARAPHRASES = {"capital": "in {c} the capital is", "river": "the river that crosses {c} is the"}
TRACKS = [Track.MLP, Track.MLP_ATTENTION]
NORMALIZES = [Normalize.NONE, Normalize.COSINE, Normalize.TRAIN_NORM]


def queries(facts) -> list[dict]:
    out = []
    for f in facts:
        out.append({"query_id": f.key, "prompt": QUERY_PROMPTS[f.relation].format(c=f.country), "completion": f.value,
                    "set": "corpus"})
        out.append({"query_id": f"{f.key}.para", "prompt": PARAPHRASES[f.relation].format(c=f.country),
                    "completion": f.value, "set": "paraphrase"})
    return out


def metrics(topk: list[dict], qs: list[dict], sources: dict[str, str]) -> dict[str, dict[str, float]]:
    """{set: {recall@10, mrr, queries}} from the merged top-k table (every document ranked)."""
    by_query: dict[str, list[tuple[int, str]]] = {}
    for r in topk:
        if r["sign"] == "top":
            by_query.setdefault(r["query_id"], []).append((r["rank"], r["doc_id"].split(":")[0]))
    out: dict[str, dict[str, float]] = {}
    for name in ("corpus", "paraphrase"):
        rr, hit = [], []
        for q in (q for q in qs if q["set"] == name):
            fact = q["query_id"].removesuffix(".para")
            ranks = [rank for rank, doc in sorted(by_query[q["query_id"]]) if sources.get(doc) == fact]
            first = ranks[0] if ranks else None
            rr.append(0.0 if first is None else 1.0 / first)
            hit.append(first is not None and first <= 10)
        out[name] = {"recall@10": sum(hit) / len(hit), "mrr": sum(rr) / len(rr), "queries": len(hit), "rr": rr}
    return out


def run_pipeline(demo: Path, work: Path, qfile: Path, track: Track, normalize: Normalize, docs: int) -> tuple:
    from pipelines.run import run_job

    raw = tomllib.loads((demo / "job.toml").read_text())
    raw.pop("run_id", None)
    raw["data"] = {"corpus": str(demo / "shards"), "queries": str(qfile), "output": str(work / track.value)}
    raw["model"]["track"] = track.value
    raw["scoring"].update({"top_k": docs + 10, "per_token": False, "normalize": normalize.value})
    cfg = config_from_dict(raw, base_dir=demo)
    record = run_job(cfg)
    topk = pads.dataset(str(Path(cfg.data.output) / "topk"), partitioning="hive").to_table().to_pylist()
    return cfg, record, topk


def in_process_costs(cfg, qs: list[dict], normalize_list, repeats: int = 3) -> dict:
    """Seconds of fit_ekfac and of scoring every shard per normalize (best of ``repeats``), in this process."""
    from pipelines.io.model_loading import load_model, load_tokenizer
    from pipelines.io.shards import list_shards, read_rows

    m = load_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    seqs = [ids.tolist() for s in list_shards(cfg.data.corpus) for ids in read_rows(s, None, None).input_ids]
    batches = [collate(seqs[i:i + 16]) for i in range(0, len(seqs), 16)]
    qb = query_batch([tok(q["prompt"], add_special_tokens=False)["input_ids"] for q in qs],
                     [tok(q["completion"], add_special_tokens=False)["input_ids"] for q in qs])
    best = (lambda f: min(_timed(f) for _ in range(repeats)))
    f = cfg.factors  # the job's fit, as the pipeline runs use
    fit = (lambda: fit_ekfac(m.model, m.layers, batches, fisher=f.fisher, seed=f.seed, samples=f.fisher_samples,
                             lambda_samples=f.lambda_samples))
    out = {"fit_seconds": best(fit),
           "tracked_parameters": sum(l.d_out * l.d_in_h for l in m.layers),
           "factor_floats": sum(l.d_in_h ** 2 + l.d_out ** 2 + l.d_out * l.d_in_h for l in m.layers),
           "layers": len(m.layers)}
    factors = fit()
    pq = precondition_queries(m.model, factors, [qb], rank=cfg.scoring.rank)
    for n in normalize_list:
        kw = {"factors": factors} if n == Normalize.COSINE else {}
        out[f"score_seconds_{n.value}"] = best(lambda: [score_batch(m.model, pq, b, normalize=n, **kw)
                                                        for b in batches])
    out["score_seconds_self_influence"] = best(lambda: [score_batch(m.model, pq, b, factors=factors)
                                                        for b in batches])
    return out


def model_costs(demo: Path, tokens_per_sequence: int, queries: int, rank: int, batch: int = 16) -> dict:
    """Multiply-adds per batch from the cost model (``influence_ops.strategy``), per track and normalize."""
    from influence_ops.strategy import Strategy, norm_costs, plan
    from pipelines.config import ModelConfig
    from pipelines.io.model_loading import load_model

    out = {}
    for track in TRACKS:
        layers = load_model(ModelConfig(path=str(demo / "model"), track=track.value)).layers
        B, T, Q = batch, tokens_per_sequence, queries
        row = {"none": 0, "cosine": 0, "train_norm": 0}
        for l in layers:
            d_out, d_in = l.shape
            base = plan(B, T, Q, d_out, d_in, rank)
            row["none"] += base.cost
            row["cosine"] += plan(B, T, Q, d_out, d_in, rank, self_influence=True).cost
            extra = B * d_out * d_in if base.strategy == Strategy.MATERIALIZE else min(
                norm_costs(B, T, d_out, d_in).values())
            row["train_norm"] += base.cost + extra
        out[track.value] = row
    return out


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def markdown(results: dict, command: str) -> str:
    base = results["mlp"]["costs"]
    lines = ["# Scoring variants and tracked layers on the demo's planted facts", "",
             f"Command: `{command}` (after `influence demo --output DEMO`).", "",
             f"Machine: {results['machine']}; {results['date']}. Demo corpus: {results['documents']} documents, "
             f"32 facts x 2 sources; 32 queries in the corpus's phrasing, 32 in a phrasing no document uses "
             "(corpus words only: `in <country> the capital is`, `the river that crosses <country> is the`). "
             f"Demo job settings ({results.get('fit', 'sampled Fisher')}, seed 0, rank-16 queries, damping 0.1 x "
             "mean Lambda); "
             "every document ranked. recall@10: share of queries with a planted source in the top 10; "
             "MRR: mean 1 / rank of the first planted source.", "",
             "| track | normalize | corpus recall@10 | corpus MRR | paraphrase recall@10 | paraphrase MRR |",
             "|---|---|---|---|---|---|"]
    t0 = base["score_seconds_none"]
    for track in TRACKS:
        r = results[track.value]
        for n in NORMALIZES:
            m = r["variants"][n.value]
            lines.append(f"| {track.value} | {n.value} | {m['corpus']['recall@10']:.2f} | {m['corpus']['mrr']:.3f} "
                         f"| {m['paraphrase']['recall@10']:.2f} | {m['paraphrase']['mrr']:.3f} |")
    ref = results["mlp"]["variants"]["none"]
    if "rr" in ref["corpus"]:
        lines += ["", "MRR difference to `mlp` / `none`, per query set: mean over queries with a 95% paired "
                  "bootstrap interval (10,000 draws):", "",
                  "| track | normalize | corpus | paraphrase |", "|---|---|---|---|"]
        for track in TRACKS:
            for n in NORMALIZES:
                if (track, n) == (Track.MLP, Normalize.NONE):
                    continue
                m = results[track.value]["variants"][n.value]
                cells = []
                for name in ("corpus", "paraphrase"):
                    mean, lo, hi = paired_interval(ref[name]["rr"], m[name]["rr"])
                    cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                lines.append(f"| {track.value} | {n.value} | {cells[0]} | {cells[1]} |")
    if "model_costs" in results:
        mc = results["model_costs"]
        unit = mc["mlp"]["none"]
        lines += ["", f"Cost model (`influence_ops.strategy.plan`, multiply-adds per batch of 16 sequences of "
                  f"{results['tokens_per_sequence']} tokens, {results['queries']} rank-16 queries; the cheapest "
                  "exact way for each layer), relative to `mlp` / `none`:", "",
                  "| track | none | cosine (self-influence of every sequence) | train_norm |", "|---|---|---|---|"]
        for track in TRACKS:
            r = mc[track.value]
            lines.append(f"| {track.value} | {r['none'] / unit:.2f}x | {r['cosine'] / unit:.2f}x "
                         f"| {r['train_norm'] / unit:.2f}x |")
    lines += ["", "Sizes of each track, and in-process seconds (best of 3, relative to `mlp`). The seconds were "
              "measured while other jobs kept this 2-core machine at a load average of about 30: they are not "
              "reliable (`mlp+attention` scoring cannot be faster than `mlp`); the cost model above is the "
              "reference for relative cost.", "",
              "| track | tracked layers | tracked parameters | factor floats (A, S, Lambda) | fit_ekfac s "
              "| score s (none) | score s with self-influence |", "|---|---|---|---|---|---|---|"]
    for track in TRACKS:
        c = results[track.value]["costs"]
        lines.append(f"| {track.value} | {c['layers']} | {c['tracked_parameters']:,} "
                     f"({c['tracked_parameters'] / base['tracked_parameters']:.2f}x) | {c['factor_floats']:,} "
                     f"({c['factor_floats'] / base['factor_floats']:.2f}x) | {c['fit_seconds']:.2f} "
                     f"({c['fit_seconds'] / base['fit_seconds']:.2f}x) | {c['score_seconds_none']:.2f} "
                     f"({c['score_seconds_none'] / t0:.2f}x) | {c['score_seconds_self_influence']:.2f} "
                     f"({c['score_seconds_self_influence'] / t0:.2f}x) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo", type=Path, help="the folder written by `influence demo --output`")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--json", type=Path, default=Path("bench_output/variants.json"))
    parser.add_argument("--render", action="store_true", help="only render --json as Markdown")
    parser.add_argument("--costs-from", type=Path, default=None,
                        help="take the in-process timings from this earlier --json instead of measuring them")
    args = parser.parse_args()
    command = "python benchmarks/scoring_variants.py DEMO" + (f" --markdown {args.markdown}" if args.markdown else "")
    if args.render:
        results = json.loads(args.json.read_text())
        results.setdefault("queries", 64)
        results.setdefault("tokens_per_sequence", 29)
        results["model_costs"] = model_costs(args.demo.resolve(), results["tokens_per_sequence"], results["queries"], 16)
        text = markdown(results, command)
        print(text)
        if args.markdown:
            args.markdown.write_text(text)
        return
    demo = args.demo.resolve()
    docs, facts = make_corpus()
    sources = {d["id"]: d["source_of"] for d in docs}
    qs = queries(facts)
    work = demo / "variants"
    work.mkdir(exist_ok=True)
    qfile = work / "queries.jsonl"
    qfile.write_text("".join(json.dumps({k: q[k] for k in ("query_id", "prompt", "completion")}) + "\n" for q in qs))
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} threads",
                     "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), "documents": len(docs)}
    results["queries"] = len(qs)
    results["tokens_per_sequence"] = round(sum(len(d["text"].split()) for d in docs) / len(docs))
    results["model_costs"] = model_costs(demo, results["tokens_per_sequence"], len(qs), 16)
    for track in TRACKS:
        entry: dict = {"variants": {}}
        for n in NORMALIZES:
            cfg, record, topk = run_pipeline(demo, work, qfile, track, n, len(docs))
            f = cfg.factors
            results.setdefault("fit", f"{f.fisher.value} Fisher, {f.fisher_samples} / {f.lambda_samples} draws")
            m = metrics(topk, qs, sources)
            m["score_stage_seconds"] = record["stages"]["score"]["seconds"]
            m["fit_stage_seconds"] = record["stages"]["fit-factors"].get("seconds")
            entry["variants"][n.value] = m
            print(track.value, n.value, json.dumps(m), flush=True)
        if args.costs_from is not None:
            entry["costs"] = json.loads(args.costs_from.read_text())[track.value]["costs"]
        else:
            entry["costs"] = in_process_costs(cfg, qs, NORMALIZES)
        print(track.value, json.dumps(entry["costs"]), flush=True)
        results[track.value] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    text = markdown(results, command)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
