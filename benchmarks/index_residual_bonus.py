"""Does a bonus for what the index cannot see raise its recall? An exploration for issue 10 (a negative result).

With the `eigen` projection the index holds each gradient's part in the top-k x top-k eigen block, so the exact
score splits into what the index sees and a remainder: s = s_in + s_out, with |s_out| <= ||q_out|| ||g_out||
(Cauchy-Schwarz in the metric of the preconditioner; ||x_out||^2 = self-influence of x minus its in-block part).
The remainder is what makes the index miss sequences of the exact top-10. This script ranks candidates by
s_in + beta ||q_out|| ||g_out|| for a few beta (beta > 0: optimistic for sequences the index knows least about;
beta < 0: pessimistic), and by s_in + beta ||q|| ||g|| (the whole norms), and reports the recall of the exact
top-10 (a full scan with dense queries) in the top 100, on `index_search.py`'s tiny trained GPT-2 (width 128,
2,048 sequences of 64 tokens, 300 steps, empirical Fisher) at k = 16 and 32. Also: rho_std, the spread of
s_out / (||q_out|| ||g_out||), and share_out_g, the share of the training sequences' self-influence outside the block.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/index_residual_bonus.py \
        --out benchmarks/results/index_residual_bonus_tiny.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
import torch

import influence_ops as io
from influence_ops.index_projection import compress, make_projection, precondition
from influence_ops.objectives import LanguageModelObjective
import index_recall as ir

def setup_random(width, corpus_n, seed=0):
    from index import gpt2
    from index_search import topic_corpus
    gen = torch.Generator().manual_seed(seed)
    corpus, _ = topic_corpus(corpus_n, 64, 4096, 32, gen)
    model = gpt2(width, 2, 4096, 64, seed, torch.float32).eval()
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]) for i in range(0, 512, 32)]
    factors = io.fit_ekfac(model, layers, fit, fisher=io.Fisher.TOPM, samples=3, lambda_samples=3)
    qids = torch.randint(0, len(corpus), (32,), generator=gen).tolist()
    qbatch = io.query_batch([corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids])
    pq = io.precondition_queries(model, factors, [qbatch], rank=None)
    batches = [io.collate(corpus[i:i + 32]) for i in range(0, len(corpus), 32)]
    return model, layers, factors, qbatch, pq, batches

def setup_tiny():
    from index_search import trained_tiny
    model, corpus, gen, loss = trained_tiny(128, 64, 2048, 300, 0, "cpu")
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]) for i in range(0, 512, 32)]
    factors = io.fit_ekfac(model, layers, fit, fisher=io.Fisher.EMPIRICAL)
    qids = torch.randint(0, len(corpus), (32,), generator=gen).tolist()
    qbatch = io.query_batch([corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids])
    pq = io.precondition_queries(model, factors, [qbatch], rank=None)
    batches = [io.collate(corpus[i:i + 64]) for i in range(0, len(corpus), 64)]
    return model, layers, factors, qbatch, pq, batches

def run(name, model, layers, factors, qbatch, pq, batches, ks=(16, 32), M=100):
    obj = LanguageModelObjective()
    exact, selfs = [], []
    for b in batches:
        r = io.score_batch(model, pq, b, factors=factors)
        exact.append(r.scores.double()); selfs.append(r.self_influence.double())
    exact, gself = torch.cat(exact, 1), torch.cat(selfs)  # (Q, N), (N,)
    qself = pq.self_influence.double()
    top10 = exact.topk(10, dim=1).indices
    qc = io.backward_pass(model, layers, obj, qbatch, io.Fisher.EMPIRICAL).captured
    out = {}
    for k in ks:
        proj = make_projection(factors, "eigen", k, k)
        qrows = compress(proj, qc.activations, qc.output_grads).double()
        P = precondition(proj, qrows)
        rows = torch.cat([compress(proj, c.activations, c.output_grads).double() for c in
                          (io.backward_pass(model, layers, obj, b, io.Fisher.EMPIRICAL).captured for b in batches)])
        s_in = P @ rows.T  # (Q, N)
        g_in = (precondition(proj, rows) * rows).sum(1)
        q_in = (P * qrows).sum(1)
        g_out = (gself - g_in).clamp_min(0).sqrt(); q_out = (qself - q_in).clamp_min(0).sqrt()
        bound = q_out[:, None] * g_out[None, :]
        rho = ((exact - s_in) / bound.clamp_min(1e-30))
        res = {"rho_std": float(rho.std()), "share_out_g": float((gself - g_in).clamp_min(0).sum() / gself.sum())}
        for beta in (0.0, 0.0005, 0.001, 0.002, 0.005, 0.02, 0.1, -0.0005, -0.001, -0.002, -0.005):
            approx = s_in + beta * bound
            hits = ir.recall_of(top10, approx, M)
            res[f"beta={beta}"] = round(float(np.mean(hits)), 3)
        # a plain norm bonus (no residual): g's whole self-influence
        for beta in (0.01, 0.05, 0.2):
            approx = s_in + beta * qself.sqrt()[:, None] * gself.sqrt()[None, :]
            res[f"fullnorm beta={beta}"] = round(float(np.mean(ir.recall_of(top10, approx, M))), 3)
        out[f"k{k}"] = res
        print(name, k, res, flush=True)
    return out

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "random"], default="tiny")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    t = time.time()
    r = run("random w256", *setup_random(256, 2048)) if args.model == "random" else run("tiny", *setup_tiny())
    r = {"model": args.model, "command": " ".join(sys.argv), "seconds": round(time.time() - t, 1), "recall_top100": r}
    print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
