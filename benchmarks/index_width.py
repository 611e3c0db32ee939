"""How wide must an influence index be for recall 0.95? A prediction from the scores' gap, and low-rank rows (issue 10).

Part 1, the prediction. A linear sketch of D numbers estimates an inner product <q, g> in the
preconditioner's metric with an error of about ||q|| ||g|| / sqrt(D) (Johnson-Lindenstrauss; the
norms are sqrt of the self-influences). For the exact top-10 to stay inside the index's top-100
the error must be smaller than the gap between a query's 10th and 100th exact scores, so

    D_needed ~ 1 / gap^2,   gap = (s_10 - s_100) / sqrt(SI_q x median SI_g)

per query (dense queries; SI: self-influence, ``score_batch(factors=...)``). Reported: the
median and quartiles of D_needed over the queries, the tracked dimension, and the k (k_out = k_in,
clipped to each layer's widths) whose index holds D_needed numbers. ``eigen`` is not a random sketch,
so this is a scale, not a bound: compare it with the recall ``index_recall.py`` measures at that k.

Part 2 (--lowrank-ranks), another kind of row: per sequence and layer, the best rank-p approximation
of the gradient G = sum_t g_t a_t^T in the metric of the damped K-FAC factors (whitening
(C + delta I)^(-1/2) per side, delta as ``index_projection.whitening_damping``), stored in float16
as p (d_out + d_in') numbers; the index score of a rank-r query P = sum u v^T is then
sum (u . x_j)(y_j . v). Its recall of the exact top-10 (``score_batch`` with rank --rank queries) in
its top-100, beside the Kronecker ``eigen`` rows at the widths of --k.

Models (--model): ``random`` (GPT-2-shaped, random weights, topic corpus, top-m 3 / 3 fit on 512
sequences: ``index_recall.py``'s), ``tiny`` (``index_search.py``'s trained tiny GPT-2, empirical
fit), ``job`` (a job that has run fit-factors and build-queries, e.g. ``influence demo``'s; its
model, shards, factors and query prompts; dense queries are prepared here).

Run:
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/index_width.py --model random --width 256 \\
        --corpus 4096 --out bench_output/index_width_random_w256.json
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/index_width.py --model random --width 128 \\
        --corpus 2048 --lowrank-ranks 1,2,4,8,16 --k 32,48,64,72,96 --out bench_output/index_width_random_w128.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import influence_ops as io  # noqa: E402
from influence_ops.index_projection import compress, make_projection, precondition, whitening_damping  # noqa: E402
from influence_ops.objectives import LanguageModelObjective  # noqa: E402

TOP, M = 10, 100


def setup(args) -> dict:
    """model, layers, factors, the query batch, the corpus in batches, the damping (None: 0.1 x mean Lambda)."""
    if args.model == "job":
        from pipelines.config import load_config
        from pipelines.io import storage
        from pipelines.io.model_loading import load_model
        from pipelines.io.shards import list_shards, read_rows

        cfg = load_config(args.job)
        m = load_model(cfg.model)
        out = cfg.data.output
        factors = io.load_factors(storage.local_copy(storage.join(out, "factors")))
        table = storage.read_parquet(storage.join(out, "queries", "queries.parquet"))
        qbatch = io.query_batch(table.column("prompt_ids").to_pylist(), table.column("completion_ids").to_pylist())
        corpus = []
        for shard in list_shards(cfg.data.corpus):
            seqs = read_rows(shard, None, m.vocab_size, context=m.context, too_long=cfg.data.too_long)
            corpus += [list(map(int, x)) for x in seqs.input_ids]
        return {"model": m.model, "layers": m.layers, "factors": factors, "qbatch": qbatch, "damping":
                cfg.factors.damping, "batches": [io.collate(corpus[i:i + 16]) for i in range(0, len(corpus), 16)],
                "sequences": len(corpus)}
    from index import gpt2  # benchmarks/index.py
    from index_search import topic_corpus, trained_tiny  # benchmarks/index_search.py

    if args.model == "random":
        gen = torch.Generator().manual_seed(args.seed)
        corpus, _ = topic_corpus(args.corpus, args.tokens, args.vocab, 32, gen)
        model = gpt2(args.width, 2, args.vocab, args.tokens, args.seed, torch.float32).eval()
        fisher = dict(fisher=io.Fisher.TOPM, samples=3, lambda_samples=3)
    else:
        model, corpus, gen, _ = trained_tiny(args.width, args.tokens, args.corpus, 300, args.seed, "cpu")
        fisher = dict(fisher=io.Fisher.EMPIRICAL)
    layers = io.find_mlp_layers(model)
    fit = [io.collate(corpus[i:i + 32]) for i in range(0, min(512, len(corpus)), 32)]
    factors = io.fit_ekfac(model, layers, fit, **fisher)
    qids = torch.randint(0, len(corpus), (args.queries,), generator=gen).tolist()
    qbatch = io.query_batch([corpus[i][:8] for i in qids], [corpus[i][8:12] for i in qids])
    return {"model": model, "layers": layers, "factors": factors, "qbatch": qbatch, "damping": None,
            "batches": [io.collate(corpus[i:i + 32]) for i in range(0, len(corpus), 32)], "sequences": len(corpus)}


def k_holding(numbers: float, shapes: list[tuple[int, int]]) -> int:
    """The smallest k whose index (k clipped to each layer's widths) holds at least ``numbers`` numbers."""
    for k in range(1, max(max(s) for s in shapes) + 1):
        if sum(min(k, a) * min(k, b) for a, b in shapes) >= numbers:
            return k
    return max(max(s) for s in shapes)


def predicted_width(s: dict) -> dict:
    """Part 1: D_needed per query from the gap between the exact 10th and 100th scores in cosine units."""
    pq = io.precondition_queries(s["model"], s["factors"], [s["qbatch"]], rank=None, damping=s["damping"])
    res = [io.score_batch(s["model"], pq, b, factors=s["factors"]) for b in s["batches"]]
    scores = torch.cat([r.scores.double() for r in res], 1)
    si = torch.cat([r.self_influence.double() for r in res])
    top = scores.sort(dim=1, descending=True).values
    unit = (pq.self_influence.double() * si.median()).sqrt()
    gap = (top[:, TOP - 1] - top[:, min(M, top.shape[1]) - 1]) / unit
    need = gap.pow(-2)
    shapes = [(lf.eigen.q_s.shape[0], lf.eigen.q_a.shape[0]) for lf in s["factors"].layers.values()]
    q = lambda t, x: float(t.quantile(x))  # noqa: E731
    return {"tracked_numbers": sum(a * b for a, b in shapes), "layer_shapes": shapes,
            "cosine_10th_median": q(top[:, TOP - 1] / unit, 0.5), "gap_median": q(gap, 0.5),
            "numbers_needed": {"median": q(need, 0.5), "q25": q(need, 0.25), "q75": q(need, 0.75)},
            "k_needed": {"median": k_holding(q(need, 0.5), shapes), "q25": k_holding(q(need, 0.25), shapes),
                         "q75": k_holding(q(need, 0.75), shapes)}}


def recall(top10: torch.Tensor, approx: torch.Tensor) -> float:
    idx = approx.topk(min(M, approx.shape[1]), dim=1).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) / TOP for a, b in zip(top10, idx)) / len(top10)


def lowrank_rows(g: torch.Tensor, a: torch.Tensor, lf, delta: tuple[float, float], p: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-p factors X [B, d_out, p], Y [B, d_in', p] (weight basis) of each sequence's G = sum_t g_t a_t^T, best
    in the metric whitened by (S + delta_S I)^(-1/2), (A + delta_A I)^(-1/2). g: [B, T, d_out], a: [B, T, d_in']."""
    e = lf.eigen
    q_s, q_a = e.q_s.double(), e.q_a.double()
    w_s = (e.e_s.double().clamp_min(0) + delta[0]).rsqrt()
    w_a = (e.e_a.double().clamp_min(0) + delta[1]).rsqrt()
    basis_g, r_g = torch.linalg.qr(((g @ q_s) * w_s).transpose(1, 2))  # whitened G = basis_g (r_g r_a^T) basis_a^T
    basis_a, r_a = torch.linalg.qr(((a @ q_a) * w_a).transpose(1, 2))
    u, sv, vh = torch.linalg.svd(r_g @ r_a.transpose(1, 2))
    x = (basis_g @ u[:, :, :p]) * sv[:, None, :p]
    y = basis_a @ vh[:, :p, :].transpose(1, 2)
    return q_s @ (x / w_s[None, :, None]), q_a @ (y / w_a[None, :, None])


def lowrank_against_eigen(s: dict, args) -> dict:
    """Part 2: recall of low-rank rows (ranks of --lowrank-ranks) and of Kronecker eigen rows (k of --k)."""
    ranks, ks = [int(r) for r in args.lowrank_ranks.split(",")], [int(k) for k in args.k.split(",")]
    model, layers, factors = s["model"], s["layers"], s["factors"]
    pq = io.precondition_queries(model, factors, [s["qbatch"]], rank=args.rank or None, damping=s["damping"])
    exact = torch.cat([io.score_batch(model, pq, b).scores.double() for b in s["batches"]], 1)
    obj = LanguageModelObjective()
    projs = {k: make_projection(factors, "eigen", k, k, damping=s["damping"]) for k in ks}
    qc = io.backward_pass(model, layers, obj, s["qbatch"], io.Fisher.EMPIRICAL).captured
    pre = {k: precondition(p, compress(p, qc.activations, qc.output_grads)) for k, p in projs.items()}
    rows: dict = {k: [] for k in ks}
    queries = {n: lq.to_weight_basis() for n, lq in pq.layers.items()}
    left = {n: q.left.double() if q.left is not None else None for n, q in queries.items()}
    delta = {n: whitening_damping(lf, pq.damping[n]) for n, lf in factors.layers.items()}
    est = {p: [] for p in ranks}
    for b in s["batches"]:
        cap = io.backward_pass(model, layers, obj, b, io.Fisher.EMPIRICAL).captured
        for k, p in projs.items():
            rows[k].append(compress(p, cap.activations, cap.output_grads).half())
        part = {p: 0.0 for p in ranks}
        for n, lf in factors.layers.items():
            g, a = cap.output_grads[n].double(), cap.activations[n].double()
            for p in ranks:
                x, y = lowrank_rows(g, a, lf, delta[n], p)
                x, y = x.half().double(), y.half().double()  # stored in float16
                if left[n] is not None:  # rank-r query: sum_rj (u_r . x_j)(y_j . v_r)
                    ux = torch.einsum("qor,bop->qbrp", left[n], x)
                    vy = torch.einsum("qir,bip->qbrp", queries[n].right.double(), y)
                    part[p] = part[p] + (ux * vy).sum((2, 3))
                else:
                    part[p] = part[p] + torch.einsum("qoi,bop,bip->qb", queries[n].dense.double(), x, y)
        for p in ranks:
            est[p].append(part[p])
    top10 = exact.topk(TOP, dim=1).indices
    shapes = [(lf.eigen.q_s.shape[0], lf.eigen.q_a.shape[0]) for lf in factors.layers.values()]
    sign = 1.0  # the index rows score -dL/dw against the queries' d(log p)/dw: check the sign on the widest rank
    full = torch.cat(est[max(ranks)], 1)
    if float(torch.corrcoef(torch.stack([full.flatten(), exact.flatten()]))[0, 1]) < 0:
        sign = -1.0
    out = {"eigen": {}, "lowrank": {}, "rank": args.rank or "dense"}
    for k in ks:
        approx = pre[k] @ torch.cat(rows[k]).double().T
        out["eigen"][k] = {"numbers": sum(min(k, a) * min(k, b) for a, b in shapes), "recall": recall(top10, approx)}
        print(f"eigen k={k}: {out['eigen'][k]}", flush=True)
    for p in ranks:
        numbers = sum(min(p, a, b) * (a + b) for a, b in shapes)
        out["lowrank"][p] = {"numbers": numbers, "recall": recall(top10, sign * torch.cat(est[p], 1))}
        print(f"low-rank p={p}: {out['lowrank'][p]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["random", "tiny", "job"], default="random")
    p.add_argument("--job", default="/tmp/demo/job.toml")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--corpus", type=int, default=2048)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--rank", type=int, default=32, help="part 2: rank of the scan's queries (0: dense)")
    p.add_argument("--lowrank-ranks", default="", help="part 2: ranks p of the low-rank rows, comma-separated")
    p.add_argument("--k", default="32,48,64", help="part 2: k of the eigen rows beside them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_output/index_width.json")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    start, load = time.perf_counter(), os.getloadavg()
    s = setup(args)
    res = {"model": args.model, "sequences": s["sequences"], "prediction": predicted_width(s)}
    print(json.dumps(res, indent=1), flush=True)
    if args.lowrank_ranks:
        res["rows"] = lowrank_against_eigen(s, args)
    res.update({"args": vars(args), "seconds": time.perf_counter() - start,
                "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "threads": torch.get_num_threads(), "loadavg_start": load,
                            "loadavg_end": os.getloadavg()}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
