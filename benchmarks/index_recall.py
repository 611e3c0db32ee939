"""Candidate recall of the influence index per projection kind and width (issue 10), on a job or a test model.

For each query: the exact top-10 of a full scan (``score_batch`` with the preconditioned
queries, every sequence of the corpus), and the index's top-M and bottom-M (M = --candidates)
from compressed gradients stored in float16 (``compress``, ``precondition``: what
``index_build`` / ``index_query`` compute). Reported per projection kind and k = k_out = k_in:
  - recall = |exact top-10 & index top-M| / 10, mean over queries (and the worst query),
    also at the smaller M of --also-m;
  - final_equal = the fraction of queries whose final top-10 (exact scores of the top-M and
    bottom-M candidates, as ``rescore`` re-scores them) equals the full scan's top-10;
  - bytes per sequence in float16, per layer (2 k_out k_in, k clipped to the layer's widths)
    and in total (the rows are stored as --row-dtype: float16 by default, or int8 at half the bytes);
  - the index health signals the pipeline reports from the same numbers (``pipelines/stages/index_health.py``:
    per query and side, the Spearman between index estimates and exact scores over the candidates, the
    deepest index rank among the final top-10, how many final top-10 rows came from the last half of the
    list; ``summarize``'s medians and worst, and whether its rule calls the index loose), and per query
    the final_equal / recall of the queries whose own top side is shallow (deepest rank <= M / 2) or deep.
TF-IDF (BM25 of ``pipelines/stages/tfidf.py``, prompt + completion tokens, in process) beside
them: its top-M's recall of the same exact top-10.

Models (--model):
  - ``job``: a job that has run fit-factors and build-queries (--job job.toml), e.g. the one
    ``influence demo --output DIR`` writes: its model, shards, fitted factors and queries, the
    damping of ``factors.damping``. Everything runs in this process: small corpora only.
  - ``random``: a GPT-2-shaped model with random weights (``benchmarks/index.py`` ``gpt2``:
    width --width, --layers blocks, vocabulary --vocab), a corpus of --corpus sequences of
    --tokens tokens from 32 topic Markov chains (``index_search.topic_corpus``), EK-FAC fitted
    on 512 of them (top-m Fisher, 3 draws: the project's default), --queries queries
    (prompt: a corpus sequence's first 8 tokens, completion: the next 4), rank --rank.
  - ``tiny``: ``index_search.py`` part 2's model and setup (trained --train-steps steps; vocabulary
    256, 2 blocks; empirical Fisher); its defaults there: --width 128 --corpus 4096 --queries 32.
The scan's queries are rank-r (the job's ``scoring.rank``; the demo job's: 16), so its "exact"
scores carry the truncation of the preconditioned queries; --rank 0 scans with dense queries.

Run:
    influence demo --output /tmp/demo
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/index_recall.py --model job \\
        --job /tmp/demo/job.toml --out bench_output/index_recall_demo.json
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/index_recall.py --model random \\
        --width 256 --layers 2 --out bench_output/index_recall_random.json
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/index_recall.py --model tiny --width 128 \\
        --out bench_output/index_recall_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import influence_ops as io  # noqa: E402
from influence_ops.index_projection import compress, make_projection, precondition  # noqa: E402
from influence_ops.objectives import LanguageModelObjective  # noqa: E402
from pipelines.io.shards import Sequences  # noqa: E402
from pipelines.stages.index_health import IndexEstimate, health_rows, summarize  # noqa: E402
from pipelines.stages.tfidf import TopNScorer, idf, matched_terms, query_terms  # noqa: E402

TOP = 10


def tfidf_scores(corpus: list[list[int]], queries: list[list[int]]) -> np.ndarray:
    """BM25 scores [Q, N] of ``pipelines/stages/tfidf.py`` (binary presence), computed in process."""
    seqs = Sequences([str(i) for i in range(len(corpus))], [np.asarray(s, dtype=np.int64) for s in corpus], None,
                     np.arange(len(corpus)))
    terms = sorted({int(t) for q in queries for t in q})
    _, pos = matched_terms(seqs, np.asarray(terms, dtype=np.int64))
    df = np.bincount(pos, minlength=len(terms))
    scorer = TopNScorer(terms, [idf(int(f), len(corpus)) for f in df], query_terms(dict(enumerate(queries)), terms),
                        float(seqs.lengths.mean()), 1)
    rows, scores = scorer.window_scores(seqs)
    out = np.zeros((len(queries), len(corpus)))
    out[:, rows] = scores.T
    return out


def recall_of(top10: torch.Tensor, approx: torch.Tensor, m: int, extra: torch.Tensor | None = None,
              n: int = 0) -> list[float]:
    """Per query |top10 & the m largest of approx (and the n largest of extra)| / 10. top10: [Q, 10] indices,
    approx, extra: [Q, N] (extra: TF-IDF scores, -inf where a sequence shares no token with the query)."""
    found = approx.topk(min(m, approx.shape[1]), dim=1).indices
    more = lexical_top(extra, n, top10.shape[0])
    return [len(set(top10[q].tolist()) & (set(found[q].tolist()) | more[q])) / TOP for q in range(top10.shape[0])]


def lexical_top(extra: torch.Tensor | None, n: int, queries: int) -> list[set[int]]:
    """Per query (of ``queries``) the indices of the n largest finite scores of extra [Q, N] (none without extra
    or at n = 0)."""
    if extra is None or n == 0:
        return [set() for _ in range(queries)]
    vals, idx = extra.topk(min(n, extra.shape[1]), dim=1)
    return [set(i for i, v in zip(idx[q].tolist(), vals[q].tolist()) if v > -np.inf) for q in range(extra.shape[0])]


def final_equal(exact: torch.Tensor, approx: torch.Tensor, m: int, extra: torch.Tensor | None = None,
                n: int = 0) -> list[bool]:
    """Per query: the top-10 of the exact scores of the index's top-m and bottom-m (and TF-IDF's top-n of extra)
    equals the scan's."""
    m = min(m, approx.shape[1])
    keep = torch.cat([approx.topk(m, dim=1).indices, (-approx).topk(m, dim=1).indices], dim=1)  # (Q, 2m)
    masked = torch.full_like(exact, -torch.inf).scatter(1, keep, exact.gather(1, keep))
    for q, more in enumerate(lexical_top(extra, n, exact.shape[0])):
        for i in more:
            masked[q, i] = exact[q, i]
    return [set(a) == set(b) for a, b in zip(masked.topk(TOP, dim=1).indices.tolist(),
                                             exact.topk(TOP, dim=1).indices.tolist())]


def health(exact: torch.Tensor, approx: torch.Tensor, m: int, top_k: int = TOP) -> tuple[dict, list[dict]]:
    """The pipeline's index health (``summarize`` over ``health_rows``) of the index's top-m and bottom-m per query,
    re-scored exactly; and the HEALTH rows. exact, approx: [Q, N]."""
    import pyarrow as pa

    m = min(m, approx.shape[1])
    top, bottom = approx.topk(m, dim=1).indices, (-approx).topk(m, dim=1).indices  # (Q, m) each
    estimates, cols = {}, {"query_id": [], "doc_id": [], "shard": [], "score": []}
    for q in range(approx.shape[0]):
        ranks = {"top": {int(i): r for r, i in enumerate(top[q].tolist(), 1)},
                 "bottom": {int(i): r for r, i in enumerate(bottom[q].tolist(), 1)}}
        named = sorted(set(ranks["top"]) | set(ranks["bottom"]))
        qid = f"q{q:04d}"
        estimates[qid] = {(f"{i:08d}", "s"): IndexEstimate(float(approx[q, i]), ranks["top"].get(i),
                                                           ranks["bottom"].get(i)) for i in named}
        cols["query_id"] += [qid] * len(named)
        cols["doc_id"] += [f"{i:08d}" for i in named]
        cols["shard"] += ["s"] * len(named)
        cols["score"] += [float(exact[q, i]) for i in named]
    table = health_rows(pa.table(cols), estimates, top_k)
    return summarize(table, m), table.to_pylist()


def by_depth(rows: list[dict], m: int, hits: list[float], equal: list[bool], sign: str = "top") -> dict:
    """Recall and final_equal of the queries whose ``sign`` side's deepest final top-10 rank is <= m / 2 (shallow)
    or deeper; rows: HEALTH rows in query order (q0000, ...)."""
    deep = {r["query_id"]: r["deepest_rank_top10"] for r in rows if r["sign"] == sign}
    out = {}
    for name, pick in (("shallow", lambda d: d <= m / 2), ("deep", lambda d: d > m / 2)):
        qs = [q for q in range(len(hits)) if pick(deep[f"q{q:04d}"])]
        out[name] = {"queries": len(qs), "recall": sum(hits[q] for q in qs) / len(qs) if qs else None,
                     "final_equal": sum(equal[q] for q in qs) / len(qs) if qs else None}
    return out


def summary(hits: list[float], equal: list[bool] | None = None) -> dict:
    out = {"recall": sum(hits) / len(hits), "worst": min(hits)}
    if equal is not None:
        out["final_equal"] = sum(equal) / len(equal)
    return out


def measure(model, layers, factors, qbatch, batches: list, exact: torch.Tensor, args, damping: float | None,
            device: str, lexical: torch.Tensor | None = None) -> dict:
    """Recall and bytes of every (kind, k, seed) of args; exact: [Q, N] scan scores of the sequences of batches;
    lexical: [Q, N] TF-IDF scores (``tfidf_approx``) for the union with TF-IDF's top --tfidf-union."""
    obj = LanguageModelObjective()
    kinds, ks = args.kinds.split(","), [int(k) for k in args.k.split(",")]
    seeds = [int(s) for s in args.projection_seeds.split(",")]
    configs = [(kind, k, s) for k in ks for kind in kinds for s in (seeds[:1] if kind == "eigen" else seeds)]
    projs = {c: make_projection(factors, c[0], c[1], c[1], seed=c[2], damping=damping) for c in configs}
    on = {c: p.to(device, torch.float32) for c, p in projs.items()}
    qc = io.backward_pass(model, layers, obj, qbatch, io.Fisher.EMPIRICAL).captured
    P = {c: precondition(projs[c], compress(on[c], qc.activations, qc.output_grads).cpu()) for c in configs}  # (Q, D)
    rows: dict = {c: [] for c in configs}
    for b in batches:  # one backward pass per batch, compressed by every projection
        cap = io.backward_pass(model, layers, obj, b, io.Fisher.EMPIRICAL).captured
        for c in configs:
            rows[c].append(stored(compress(on[c], cap.activations, cap.output_grads).cpu(), args.row_dtype))
    top10 = exact.topk(TOP, dim=1).indices
    also = [int(m) for m in args.also_m.split(",") if m]
    res: dict = {}
    for kind, k, seed in configs:
        approx = P[(kind, k, seed)] @ torch.cat(rows[(kind, k, seed)]).double().T  # (Q, N), the index as stored
        hits, equal = recall_of(top10, approx, args.candidates), final_equal(exact, approx, args.candidates)
        one = {"seed": seed, **summary(hits, equal)}
        low_hits = recall_of((-exact).topk(TOP, dim=1).indices, -approx, args.candidates)  # the bottom side
        low_equal = final_equal(-exact, -approx, args.candidates)
        one.update({f"bottom_{k}": v for k, v in summary(low_hits, low_equal).items()})
        signals, health_table = health(exact, approx, args.candidates)
        one["health"] = {k: v for k, v in signals.items() if k not in ("queries", "candidates")}
        one["by_depth"] = by_depth(health_table, min(args.candidates, approx.shape[1]), hits, equal)
        one["bottom_by_depth"] = by_depth(health_table, min(args.candidates, approx.shape[1]), low_hits, low_equal,
                                          "bottom")
        one.update({f"recall_top{m}": summary(recall_of(top10, approx, m))["recall"] for m in also})
        if lexical is not None and args.tfidf_union:  # scoring.tfidf_candidates: the union with TF-IDF's top-n
            n = args.tfidf_union
            union = summary(recall_of(top10, approx, args.candidates, lexical, n),
                            final_equal(exact, approx, args.candidates, lexical, n))
            one.update({"union_recall": union["recall"], "union_final_equal": union["final_equal"]})
        entry = res.setdefault(f"{kind}_k{k}", {"kind": kind, "k": k, "per_seed": [],
                                                "bytes_per_layer_float16": {n: 2 * p.width for n, p in
                                                                            projs[(kind, k, seed)].layers.items()},
                                                "bytes_per_sequence_float16": 2 * projs[(kind, k, seed)].width})
        entry["per_seed"].append(one)
        for key in [x for x in one if x not in ("seed", "health", "by_depth", "bottom_by_depth")]:  # mean over seeds
            entry[key] = sum(e[key] for e in entry["per_seed"]) / len(entry["per_seed"])
        entry["recall_range"] = [min(e["recall"] for e in entry["per_seed"]),
                                 max(e["recall"] for e in entry["per_seed"])]
        print(f"{kind} k={k} seed {seed}: {one}", flush=True)
    return res


def stored(rows: torch.Tensor, dtype: str) -> torch.Tensor:
    """Index rows [B, D] as the index stores them: float16 (cast, as in the earlier runs), or encoded and decoded by
    ``index_build`` (``int8``: integers in [-127, 127] times a per-row scale; ``bfloat16``, ``float32``)."""
    if dtype == "float16":
        return rows.half()
    from pipelines.stages.index_build import decode_rows, encode_rows
    import pyarrow as pa

    vector, scale = encode_rows(rows, dtype)
    return torch.from_numpy(decode_rows(pa.table({"vector": vector, "scale": scale}), dtype))


def scan(model, queries, batches: list) -> torch.Tensor:
    """The full scan's exact scores [Q, N] (float64) of every sequence of ``batches``."""
    return torch.cat([io.score_batch(model, queries, b).scores.double() for b in batches], dim=1)


def tfidf_approx(corpus: list[list[int]], query_tokens: list[list[int]]) -> torch.Tensor:
    """TF-IDF scores [Q, N] as candidates are picked: ties by position (doc_id order), -inf where no token is shared."""
    scores = torch.from_numpy(tfidf_scores(corpus, query_tokens))  # (Q, N)
    approx = scores - 1e-9 * torch.arange(scores.shape[1], dtype=scores.dtype)
    approx[scores <= 0] = -torch.inf  # no shared token: not a candidate
    return approx


def tfidf_entry(exact: torch.Tensor, approx: torch.Tensor, args) -> dict:
    top10 = exact.topk(TOP, dim=1).indices
    out = summary(recall_of(top10, approx, args.candidates))
    out.update({f"recall_top{m}": summary(recall_of(top10, approx, int(m)))["recall"]
                for m in args.also_m.split(",") if m})
    return out


def job_model(args) -> dict:
    from influence_ops import collate, load_factors, load_queries
    from pipelines.config import load_config
    from pipelines.io import storage
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import list_shards, read_rows

    cfg = load_config(args.job)
    m = load_model(cfg.model)
    out = cfg.data.output
    queries = load_queries(storage.local_copy(storage.join(out, "queries")))
    factors = load_factors(storage.local_copy(storage.join(out, "factors")))
    table = storage.read_parquet(storage.join(out, "queries", "queries.parquet"))
    assert table.column("query_id").to_pylist() == list(queries.query_ids)
    prompts, completions = table.column("prompt_ids").to_pylist(), table.column("completion_ids").to_pylist()
    qbatch = io.query_batch(prompts, completions)
    if args.rank == 0:  # dense queries prepared here instead of the job's rank-r ones
        queries = io.precondition_queries(m.model, factors, [qbatch], rank=None, damping=cfg.factors.damping,
                                          query_ids=list(queries.query_ids))
    corpus: list[list[int]] = []
    for shard in list_shards(cfg.data.corpus):
        seqs = read_rows(shard, None, m.vocab_size, context=m.context, too_long=cfg.data.too_long)
        corpus += [list(map(int, x)) for x in seqs.input_ids]
    bs = 16
    batches = [collate(corpus[i:i + bs]) for i in range(0, len(corpus), bs)]
    exact = scan(m.model, queries, batches)
    res = {"model": "job", "job": args.job, "sequences": len(corpus), "queries": len(queries.query_ids),
           "rank": queries.rank or "dense", "truncation_error_mean": float(queries.truncation_error.mean()),
           "damping": cfg.factors.damping, "fisher": cfg.factors.fisher.value}
    lexical = tfidf_approx(corpus, [p + c for p, c in zip(prompts, completions)])
    res["tfidf"] = tfidf_entry(exact, lexical, args)
    res["kinds"] = measure(m.model, m.layers, factors, qbatch, batches, exact, args, cfg.factors.damping, "cpu",
                           lexical)
    res["refits"] = {}
    for spec in [x for x in args.refit.split(",") if x]:  # the same measurement on factors refitted here
        fisher, k, k_lambda, seed = spec.split(":")
        refit = io.fit_ekfac(m.model, m.layers, batches, fisher=io.Fisher(fisher), seed=int(seed), samples=int(k),
                             lambda_samples=int(k_lambda))
        q = io.precondition_queries(m.model, refit, [qbatch], rank=queries.rank, damping=cfg.factors.damping,
                                    query_ids=list(queries.query_ids))
        res["refits"][spec] = measure(m.model, m.layers, refit, qbatch, batches, scan(m.model, q, batches), args,
                                      cfg.factors.damping, "cpu")
    return res


def random_model(args) -> dict:
    from index import gpt2  # benchmarks/index.py
    from index_search import topic_corpus  # benchmarks/index_search.py

    gen = torch.Generator().manual_seed(args.seed)
    corpus, _ = topic_corpus(args.corpus, args.tokens, args.vocab, 32, gen)
    model = gpt2(args.width, args.layers, args.vocab, args.tokens, args.seed, torch.float32).eval()
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]) for i in range(0, min(512, len(corpus)), 32)]
    t0 = time.perf_counter()
    factors = io.fit_ekfac(model, layers, fit, fisher=io.Fisher.TOPM, samples=3, lambda_samples=3)
    fit_s = time.perf_counter() - t0
    qids = torch.randint(0, len(corpus), (args.queries,), generator=gen).tolist()
    prompts, completions = [corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids]
    qbatch = io.query_batch(prompts, completions)
    pq = io.precondition_queries(model, factors, [qbatch], rank=args.rank or None)
    batches = [io.collate(corpus[i:i + 32]) for i in range(0, len(corpus), 32)]
    t0 = time.perf_counter()
    exact = scan(model, pq, batches)
    res = {"model": "random", "width": args.width, "blocks": args.layers, "vocab": args.vocab,
           "tracked_layers": {l.name: list(l.shape) for l in layers}, "sequences": len(corpus),
           "tokens": args.tokens, "queries": len(qids), "rank": args.rank or "dense", "fisher": "topm 3/3",
           "truncation_error_mean": float(pq.truncation_error.mean()),
           "damping": "0.1 x mean(Lambda) per layer", "fit_seconds": fit_s,
           "scan_seconds": time.perf_counter() - t0}
    lexical = tfidf_approx(corpus, [p + c for p, c in zip(prompts, completions)])
    res["tfidf"] = tfidf_entry(exact, lexical, args)
    res["kinds"] = measure(model, layers, factors, qbatch, batches, exact, args, None, "cpu", lexical)
    return res


def tiny_model(args) -> dict:
    from index_search import trained_tiny  # benchmarks/index_search.py

    model, corpus, gen, loss = trained_tiny(args.width, args.tokens, args.corpus, args.train_steps, args.seed, "cpu")
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]) for i in range(0, min(512, len(corpus)), 32)]
    factors = io.fit_ekfac(model, layers, fit, fisher=io.Fisher.EMPIRICAL)
    qids = torch.randint(0, len(corpus), (args.queries,), generator=gen).tolist()
    prompts, completions = [corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids]
    qbatch = io.query_batch(prompts, completions)
    pq = io.precondition_queries(model, factors, [qbatch], rank=args.rank or None)
    batches = [io.collate(corpus[i:i + 64]) for i in range(0, len(corpus), 64)]
    exact = scan(model, pq, batches)
    res = {"model": "tiny", "width": args.width, "final_train_loss": float(loss.detach()), "sequences": len(corpus),
           "queries": len(qids), "rank": args.rank or "dense", "fisher": "empirical",
           "truncation_error_mean": float(pq.truncation_error.mean())}
    lexical = tfidf_approx(corpus, [p + c for p, c in zip(prompts, completions)])
    res["tfidf"] = tfidf_entry(exact, lexical, args)
    res["kinds"] = measure(model, layers, factors, qbatch, batches, exact, args, None, "cpu", lexical)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["job", "random", "tiny"], default="job")
    p.add_argument("--job", default="/tmp/demo/job.toml", help="job: its job.toml (e.g. `influence demo`'s)")
    p.add_argument("--kinds", default="eigen,random,weighted")
    p.add_argument("--k", default="16,32,48", help="k_out = k_in, comma-separated")
    p.add_argument("--projection-seeds", default="0,1,2", help="seeds of random / weighted (mean reported)")
    p.add_argument("--candidates", type=int, default=100, help="M: index candidates per query and side")
    p.add_argument("--row-dtype", default="float16", choices=["float16", "int8", "bfloat16", "float32"],
                   help="how the index rows are stored (index.dtype)")
    p.add_argument("--tfidf-union", type=int, default=100,
                   help="n: also report the recall of the index's top-M with TF-IDF's top-n added "
                        "(scoring.tfidf_candidates)")
    p.add_argument("--also-m", default="20,50", help="smaller M at which recall is also reported")
    p.add_argument("--width", type=int, default=256, help="random, tiny: model width")
    p.add_argument("--layers", type=int, default=2, help="random: blocks")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--corpus", type=int, default=4096)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--rank", type=int, default=32,
                   help="rank of the scan's queries, 0 = dense (job: 0 = dense queries prepared here, else the job's)")
    p.add_argument("--train-steps", type=int, default=300, help="tiny: training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refit", default="",
                   help="job: also measure on factors refitted in process, comma-separated fisher:k:k_lambda:seed "
                        "(e.g. topm:5:2:1,gaussian:4:4:0): does recall depend on the fit?")
    p.add_argument("--out", default="bench_output/index_recall.json")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    start, load = time.perf_counter(), os.getloadavg()
    res = {"job": job_model, "random": random_model, "tiny": tiny_model}[args.model](args)
    res.update({"args": vars(args), "seconds": time.perf_counter() - start,
                "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "threads": torch.get_num_threads(), "loadavg_start": load,
                            "loadavg_end": os.getloadavg()}})
    print(json.dumps({k: v for k, v in res.items() if k != "kinds"}, indent=1))
    for name, e in res["kinds"].items():
        print(name, {k: v for k, v in e.items() if k not in ("per_seed", "bytes_per_layer_float16")})
    for spec, kinds in res.get("refits", {}).items():
        print("refit", spec, {name: round(e["recall"], 3) for name, e in kinds.items()})
    print("| kind | k | seed | side | recall | final | Spearman median | deepest rank median (worst) | last-half share "
          "| loose | final: shallow / deep queries (count) |")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for name, e in res["kinds"].items():
        for one in e["per_seed"]:
            for sign, pre in (("top", ""), ("bottom", "bottom_")):
                h, d = one["health"]["sides"][sign], one[f"{pre}by_depth"]
                print(f"| {e['kind']} | {e['k']} | {one['seed']} | {sign} | {one[pre + 'recall']:.3f} | "
                      f"{one[pre + 'final_equal']:.2f} | {fmt(h['spearman_median'])} | "
                      f"{h['deepest_rank_top10_median']:g} ({h['deepest_rank_top10_worst']}) | "
                      f"{fmt(h['last_half_top10_share'])} | {'yes' if h['loose'] else 'no'} | "
                      f"{fmt(d['shallow']['final_equal'])} ({d['shallow']['queries']}) / "
                      f"{fmt(d['deep']['final_equal'])} ({d['deep']['queries']}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
