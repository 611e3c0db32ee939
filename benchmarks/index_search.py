"""The influence index (issue 10, items 2-4): build cost, query cost against a scan, recall, bytes.

Part 1, timing (a GPT-2-shaped model: width --width, d_ff 4 x width, --layers blocks,
c_fc and c_proj tracked, random weights and factors of the right shapes; batches of
--batch sequences of --tokens tokens):
  - training step: forward + backward with weight gradients (tokens/s);
  - index build: forward + backward capturing a, g, then G~ = sum_t (R_out g_t)(R_in a_t)^T
    with k_out = k_in = --k (tokens/s, and the ratio to the training step);
  - scan: ``score_batch`` with --scan-queries rank-r queries (tokens/s);
  - re-scoring as ``pipelines/stages/rescore.py`` runs it: each candidate sequence is scored
    only against the queries that named it, a batch with the union of its sequences' queries,
    timed as ``score_batch`` with min(--queries, --nominations x --batch) queries (every
    sequence of the batch named by --nominations queries of its own: conservative); and, for
    comparison, as it ran before (every candidate against all --queries queries);
  - search: X [rows, D] (float16) @ P~ [D, --queries] and top-M, timed on --search-rows rows.
  From these, for each corpus size N of --corpus (sequences of --tokens tokens), the modeled
  cost of answering --queries queries: (a) scans of --scan-queries queries each, (b) the index
  (build once + search of N rows + re-scoring), both divided by one full scan at Q =
  --scan-queries. Re-scoring covers 2 x --candidates x --queries (query, sequence) pairs on
  min(N, 2 x --candidates x --queries) distinct sequences (the upper bound: no two queries
  share a candidate). The scan grows with N, the re-scoring does not once N exceeds the pairs,
  so the ratio falls as 1/N towards the search term; ``corpus_for_ratio_0.1`` is the N where
  it reaches 0.1.

Part 2, recall: a tiny GPT-2 (width --tiny-width, 2 blocks) trained for --train-steps steps
on a synthetic corpus of topic Markov chains (each topic: its own sparse successor table),
EK-FAC fitted (empirical Fisher), --tiny-queries queries from the same topics. Exact
scores (``score_batch``, rank-r queries, as the scan) of --tiny-corpus sequences give each
query's top-10; reported: the fraction of it inside the index's top-100 (M = --candidates)
for every projection kind (--tiny-kinds: eigen, random, whitened, weighted) at each k of
--tiny-k, mean over the projection seeds --tiny-projection-seeds (per seed in the JSON); and
bytes per sequence of a float16 Parquet part.

Run (numbers in README "Choosing a scoring mode"):
    PYTHONPATH=. .venv/bin/python benchmarks/index_search.py --device cuda
"""

from __future__ import annotations

import argparse
import io as pyio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import influence_ops as io  # noqa: E402
from influence_ops.index_projection import ProjectionKind, compress, make_projection, precondition  # noqa: E402
from influence_ops.objectives import LanguageModelObjective  # noqa: E402
from index import gpt2, random_factors, sync  # noqa: E402  (benchmarks/index.py)


def timed(device: str, fn, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def lowrank_queries(layers, q: int, r: int, device: str, seed: int) -> io.PreconditionedQueries:
    gen = torch.Generator().manual_seed(seed)
    qs = {l.name: io.LayerQuery(left=torch.randn(q, l.shape[0], r, generator=gen).to(device) / l.shape[0],
                                right=torch.randn(q, l.shape[1], r, generator=gen).to(device) / l.shape[1])
          for l in layers}
    return io.PreconditionedQueries(qs, torch.zeros(q), torch.zeros(q, len(layers)), r, "x", 1,
                                    {l.name: 0.0 for l in layers})


def timing(args) -> dict:
    dev = args.device
    model = gpt2(args.width, args.layers, args.vocab, args.tokens, args.seed, torch.float32).to(dev)
    layers = io.find_mlp_layers(model)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=gen)
    batch = io.collate(ids.tolist()).to(dev)
    tokens = args.batch * args.tokens
    factors = io.EKFACFactors(random_factors(layers, "cpu", args.seed), {l.name: l.shape for l in layers}, "x",
                              io.Fisher.EMPIRICAL, 1)
    proj = make_projection(factors, "eigen", args.k, args.k).to(dev, torch.float32)
    obj = LanguageModelObjective()

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=batch.input_ids, labels=batch.input_ids).loss.backward()

    def build() -> None:
        out = io.backward_pass(model, layers, obj, batch)
        compress(proj, out.captured.activations, out.captured.output_grads)

    res: dict = {"train_step_tokens_s": tokens / timed(dev, train_step, args.repeats)}
    model.zero_grad(set_to_none=True)
    res["index_build_tokens_s"] = tokens / timed(dev, build, args.repeats)
    res["build_over_train"] = res["index_build_tokens_s"] / res["train_step_tokens_s"]
    union = min(args.queries, args.nominations * args.batch)  # queries of one re-scoring batch
    timed_q = [("scan", args.scan_queries), ("rescore", union)] + \
        ([("rescore_all_queries", args.queries)] if not args.skip_all_queries else [])
    for name, q in timed_q:
        pq = lowrank_queries(layers, q, args.rank, dev, args.seed)
        res[f"{name}_tokens_s_q{q}"] = tokens / timed(dev, lambda: io.score_batch(model, pq, batch), args.repeats)
    width = proj.width
    X = torch.randn(args.search_rows, width, generator=gen).to(dev, torch.float16)
    P = torch.randn(width, args.queries, generator=gen).to(dev, torch.float32)

    def search() -> None:
        for lo in range(0, args.search_rows, 65536):
            s = X[lo:lo + 65536].float() @ P  # (rows, Q)
            torch.topk(s, min(args.candidates, s.shape[0]), dim=0)
            torch.topk(-s, min(args.candidates, s.shape[0]), dim=0)

    res["search_rows_s_q%d" % args.queries] = args.search_rows / timed(dev, search, args.repeats)
    res["model"] = cost_model(args, res, union)
    res["index_width"] = width
    res["bytes_per_sequence_float16"] = 2 * width
    return res


def cost_model(args, res: dict, union: int) -> dict:
    """Modeled cost of answering --queries queries, per corpus size of --corpus, in units of one scan at
    Q = --scan-queries (formulas in the module docstring)."""
    scan_rate = res[f"scan_tokens_s_q{args.scan_queries}"]
    rescore_rate = res[f"rescore_tokens_s_q{union}"]
    search_rate = res["search_rows_s_q%d" % args.queries]
    pairs = 2 * args.candidates * args.queries
    out: dict = {"pairs": pairs, "queries_per_rescore_batch": union, "per_corpus": {}}
    for n in [int(float(c)) for c in str(args.corpus).split(",")]:
        corpus_tokens = n * args.tokens
        scan_once = corpus_tokens / scan_rate
        distinct = min(n, pairs)
        search = n / search_rate
        rescore = distinct * args.tokens / rescore_rate
        build = corpus_tokens / res["index_build_tokens_s"]
        row = {"one_scan_s": scan_once, "scans_over_one_scan": math.ceil(args.queries / args.scan_queries),
               "rescored_sequences": distinct, "index_build_s": build, "search_s": search, "rescore_s": rescore,
               "index_queries_over_one_scan": (search + rescore) / scan_once,
               "index_total_over_one_scan": (build + search + rescore) / scan_once}
        if f"rescore_all_queries_tokens_s_q{args.queries}" in res:  # re-scoring as it ran before
            before = distinct * args.tokens / res[f"rescore_all_queries_tokens_s_q{args.queries}"]
            row["index_queries_over_one_scan_all_queries_rescore"] = (search + before) / scan_once
        out["per_corpus"][str(n)] = row
    # for N >= pairs: ratio(N) = search term + pairs * scan_rate / (N * rescore_rate)
    search_term = scan_rate / (args.tokens * search_rate)
    flat = search_term + scan_rate / rescore_rate  # the ratio while N <= pairs
    out["search_term"] = search_term
    out["corpus_for_ratio_0.1"] = (1 if flat <= 0.1 else None if search_term >= 0.1 else
                                   max(pairs, math.ceil(pairs * scan_rate / rescore_rate / (0.1 - search_term))))
    return out


def topic_corpus(n: int, tokens: int, vocab: int, topics: int, gen: torch.Generator) -> tuple[list, list]:
    """n sequences from ``topics`` Markov chains (4 successors per token per topic); their topics."""
    succ = torch.randint(0, vocab, (topics, vocab, 4), generator=gen)
    seqs, labels = [], []
    for i in range(n):
        t = i % topics
        x = [int(torch.randint(0, vocab, (1,), generator=gen))]
        for _ in range(tokens - 1):
            x.append(int(succ[t, x[-1], int(torch.randint(0, 4, (1,), generator=gen))]))
        seqs.append(x)
        labels.append(t)
    return seqs, labels


def trained_tiny(width: int, tokens: int, sequences: int, steps: int, seed: int, dev: str):
    """Part 2's model: a GPT-2 (width, 2 blocks, vocabulary 256) trained ``steps`` AdamW steps of 64
    sequences on a topic corpus. Returns (model in eval mode, corpus, the generator (drawn on), last loss)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = 256
    corpus, _ = topic_corpus(sequences, tokens, vocab, 32, gen)
    model = gpt2(width, 2, vocab, tokens, seed, torch.float32).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(corpus, device=dev)
    for step in range(steps):
        idx = torch.randint(0, len(corpus), (64,), generator=gen).to(dev)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), corpus, gen, loss


def recall(args) -> dict:
    dev = args.device
    model, corpus, gen, loss = trained_tiny(args.tiny_width, args.tiny_tokens, args.tiny_corpus, args.train_steps,
                                            args.seed, dev)
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]).to(dev) for i in range(0, min(512, len(corpus)), 32)]
    factors = io.fit_ekfac(model, layers, fit, fisher=io.Fisher.EMPIRICAL)
    qids = torch.randint(0, len(corpus), (args.tiny_queries,), generator=gen).tolist()
    qbatch = io.query_batch([corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids]).to(dev)
    pq = io.precondition_queries(model, factors, [qbatch], rank=args.rank)
    exact = []
    batches = [io.collate(corpus[i:i + 64]).to(dev) for i in range(0, len(corpus), 64)]
    for b in batches:
        exact.append(io.score_batch(model, pq, b).scores.double().cpu())
    exact = torch.cat(exact, 1)  # (Q, N)
    top10 = exact.topk(10, dim=1).indices
    res: dict = {"final_train_loss": float(loss.detach()), "queries": len(qids), "corpus": len(corpus)}
    obj = LanguageModelObjective()
    kinds = [k.value for k in ProjectionKind] if args.tiny_kinds == "all" else args.tiny_kinds.split(",")
    seeds = [int(s) for s in args.tiny_projection_seeds.split(",")]
    configs = [(kind, int(k), s) for k in args.tiny_k.split(",") for kind in kinds
               for s in (seeds[:1] if kind == "eigen" else seeds)]  # eigen has no randomness
    projs = {c: make_projection(factors, c[0], c[1], c[1], seed=c[2]) for c in configs}
    on = {c: p.to(dev, torch.float32) for c, p in projs.items()}
    qc = io.backward_pass(model, layers, obj, qbatch).captured
    P = {c: precondition(projs[c], compress(on[c], qc.activations, qc.output_grads).cpu()) for c in configs}  # (Q, D)
    rows: dict = {c: [] for c in configs}
    for b in batches:  # one backward pass per batch, compressed by every projection
        cap = io.backward_pass(model, layers, obj, b).captured
        for c in configs:
            rows[c].append(compress(on[c], cap.activations, cap.output_grads).cpu().half())
    key = "recall_top10_in_top%d" % args.candidates
    for kind, k, seed in configs:
        X = torch.cat(rows[(kind, k, seed)])  # (N, D) float16, as stored
        approx = P[(kind, k, seed)] @ X.double().T
        found = approx.topk(args.candidates, dim=1).indices
        hits = [len(set(top10[q].tolist()) & set(found[q].tolist())) / 10 for q in range(len(qids))]
        one = {key: sum(hits) / len(hits), "min": min(hits), "width": projs[(kind, k, seed)].width, "seed": seed}
        entry = res.setdefault(f"{kind}_k{k}", {key: 0.0, "per_seed": []})
        entry["per_seed"].append(one)
        entry[key] = sum(e[key] for e in entry["per_seed"]) / len(entry["per_seed"])  # mean over seeds
        print(f"recall k={k} {kind} seed {seed}: {one}", flush=True)
        if kind == kinds[0] and seed == seeds[0]:  # as index_build.py stores it: fixed_size_list<float16>, zstd
            import numpy as np
            import pyarrow as pa
            import pyarrow.parquet as pq_

            flat = pa.array(X.numpy().astype(np.float16).reshape(-1), pa.float16())
            buf = pyio.BytesIO()
            pq_.write_table(pa.table({"doc_id": [f"doc-{i:08d}" for i in range(len(corpus))],
                                      "vector": pa.FixedSizeListArray.from_arrays(flat, X.shape[1])}), buf,
                            compression="zstd")
            res[f"parquet_bytes_per_sequence_float16_k{k}"] = len(buf.getvalue()) / len(corpus)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--scan-queries", type=int, default=32)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--corpus", default="1000000,10000000", help="corpus sizes (sequences), comma-separated")
    p.add_argument("--nominations", type=int, default=2, help="queries naming each re-scored sequence (timing)")
    p.add_argument("--skip-all-queries", action="store_true", help="do not time re-scoring against all queries")
    p.add_argument("--search-rows", type=int, default=262144)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny-width", type=int, default=128)
    p.add_argument("--tiny-tokens", type=int, default=32)
    p.add_argument("--tiny-corpus", type=int, default=4096)
    p.add_argument("--tiny-queries", type=int, default=32)
    p.add_argument("--tiny-k", default="8,16,32", help="projected widths k_out = k_in, comma-separated")
    p.add_argument("--tiny-kinds", default="all", help="projection kinds of the recall part, comma-separated")
    p.add_argument("--tiny-projection-seeds", default="0", help="seeds of the random projections (recall: mean)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_output/index_search.json")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    out = {"args": vars(args), "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                           "cpus": os.cpu_count(),
                                           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}}
    if not args.skip_timing:
        out["timing"] = timing(args)
        print(json.dumps(out["timing"], indent=1), flush=True)
    if not args.skip_recall:
        out["recall"] = recall(args)
        print(json.dumps(out["recall"], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
