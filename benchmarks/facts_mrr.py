"""Does a general change lift EK-FAC's corpus-phrasing MRR on the facts suite toward the 0.85 target?

Usage:

    OMP_NUM_THREADS=1 python benchmarks/facts_mrr.py [--models w64b2e100,w128b2e100] \
        [--cache DIR] [--markdown benchmarks/eval/facts_mrr.md]

(``--cache``: each model's scores are kept as DIR/<model>.pt and reused, so several processes can compute
models in parallel and a last run renders them all.)

For each model configuration (``w<width>b<blocks>e<epochs>``; w64b2e100 is the
suite's) the corpus is built and the tiny GPT-2 trained exactly as ``influence
eval facts`` does (``build_world``, seeded, only the width / blocks / epochs
changed), factors fitted in process on the whole corpus with the job's default
Fisher and damping (``fit_ekfac``), and then, with DENSE preconditioned queries
(``apply_inverse`` on each query gradient; the suite uses rank 32, whose anchor
row is reported too), every combination of:

- query (Q = 96 queries: 48 corpus-phrased, 48 paraphrases; q = gradient of a NLL on the tracked layers):
  ``completion``  the suite's: NLL of the completion tokens;
  ``whole``       NLL of every token of prompt + completion;
  ``prompt_only`` NLL of the prompt tokens after the first (= whole - completion; no cosine);
  ``centered``    completion minus the mean of the 96 queries' completion gradients
                  (removes the direction every query shares);
  ``centered_set`` completion minus the mean over the queries of the same set (48 corpus-phrased, or
                  48 paraphrases): the batch a user submits is usually of one kind;
  ``contrastive`` q(answer) - mean over the relation's other values v of q(v), the gradient of
                  -(log p(answer) - mean_v log p(v)) = -(logit answer - mean_v logit v): "why this
                  value rather than the other values of the relation" (needs the candidate values);
- preconditioner: EK-FAC (H^-1, damping 0.1 x mean(Lambda); the completion query also at 0.001, 0.01 and
  1 x mean(Lambda)) or identity (plain gradients);
- normalize: none, train_norm (/ ||g_m||), cosine (/ sqrt(self_inf(q) self_inf(m)), in the metric of the
  preconditioner: TrackStar's unit normalization of both sides);
- tracked layers: all MLP layers (the suite's), each block, each layer alone.

Metrics as the suite: recall@10 and MRR of the first planted source per query set; the corpus MRR difference
to the CURRENT BEST EK-FAC setting (suite model, completion query, EK-FAC, train_norm, all layers) with a
95% paired bootstrap interval over the 48 corpus queries; BM25 over token ids for reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import influence_ops as ops  # noqa: E402
from influence_ops.queries import query_gradients  # noqa: E402
from pipelines.eval.bm25 import BM25  # noqa: E402
from pipelines.eval.facts import FULL, SETS, build_world, job  # noqa: E402
from pipelines.eval.facts_corpus import make_facts_corpus  # noqa: E402
from pipelines.eval.metrics import first_source_rank, paired_interval, retrieval  # noqa: E402
from pipelines.eval.report import markdown_table  # noqa: E402

VARIANTS = ("completion", "whole", "centered", "contrastive")
DAMPINGS = (0.001, 0.01, 1.0)  # besides the default 0.1: damping = c x mean(Lambda) per layer
NORMALIZES = ("none", "train_norm", "cosine")
TOP = 10


def parse_model(spec: str) -> tuple[int, int, int]:
    w, rest = spec[1:].split("b")
    b, e = rest.split("e")
    return int(w), int(b), int(e)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def query_vectors(model: Any, layers: list, tok: Any, queries: list[dict], values: dict[str, list[str]],
                  relation: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """variant -> layer -> [Q, d_out * d_in'] float64 raw query gradients (NLL gradients)."""
    enc = (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    prompts, comps = [enc(q["prompt"]) for q in queries], [enc(q["completion"]) for q in queries]
    obj = ops.LanguageModelObjective()

    def grads(batch: ops.TokenBatch) -> dict[str, torch.Tensor]:
        g, _ = query_gradients(model, layers, batch, obj)
        return {n: flat(t.detach()).double() for n, t in g.items()}

    out = {"completion": grads(ops.query_batch(prompts, comps)),
           "whole": grads(ops.collate([p + c for p, c in zip(prompts, comps)]))}
    mean = {n: t.mean(0, keepdim=True) for n, t in out["completion"].items()}
    out["centered"] = {n: t - mean[n] for n, t in out["completion"].items()}
    other = {n: torch.zeros_like(t) for n, t in out["completion"].items()}
    for i, q in enumerate(queries):  # mean gradient over the relation's other values
        alts = [v for v in values[relation[i]] if v != q["completion"]]
        g = grads(ops.query_batch([prompts[i]] * len(alts), [enc(v) for v in alts]))
        for n in other:
            other[n][i] = g[n].mean(0)
    out["contrastive"] = {n: t - other[n] for n, t in out["completion"].items()}
    return out


def run_model(spec: str, echo: Any) -> dict[str, Any]:
    width, blocks, epochs = parse_model(spec)
    size = dataclasses.replace(FULL, width=width, blocks=blocks, epochs=epochs, max_train_seconds=3600.0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facts-mrr-") as tmp:
        world = build_world(Path(tmp), size)
        cfg = job(world, "mlp", "mlp", "none")
        from pipelines.io.model_loading import load_model, load_tokenizer

        loaded, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    train_s = time.perf_counter() - t0
    echo(f"{spec}: trained {world.training}; greedy recall {world.recall} ({train_s:.0f} s)")
    model, layers = loaded.model, loaded.layers
    docs, queries = world.docs, world.queries
    seqs = [tok(d["text"], add_special_tokens=False)["input_ids"][:64] for d in docs]
    batches = [ops.collate(seqs[i:i + 16]) for i in range(0, len(seqs), 16)]
    f = cfg.factors
    t0 = time.perf_counter()
    factors = ops.fit_ekfac(model, layers, batches, fisher=f.fisher, seed=f.seed, samples=f.fisher_samples,
                            lambda_samples=f.lambda_samples)
    fit_s = time.perf_counter() - t0
    _, fact_list, _ = make_facts_corpus(FULL.people, FULL.towns, FULL.jobs, 3, FULL.distractors, seed=0)
    facts = {x.key: x for x in fact_list}
    values = {r: sorted({x.value for x in fact_list if x.relation == r}) for r in ("town", "job")}
    relation = [facts[q["fact"]].relation for q in queries]
    t0 = time.perf_counter()
    raw = query_vectors(model, layers, tok, queries, values, relation)
    names = [l.name for l in layers]
    lf = factors.layers
    pre = {v: {n: flat(ops.apply_inverse(lf[n], t.reshape(t.shape[0], *lf[n].eigenvalues.shape), f.damping))
               for n, t in layer.items()} for v, layer in raw.items()}
    for c in DAMPINGS:  # the completion query at other dampings (c x mean(Lambda) per layer)
        key = f"completion, damping {c}"
        pre[key] = {n: flat(ops.apply_inverse(lf[n], t.reshape(t.shape[0], *lf[n].eigenvalues.shape),
                                              c * float(lf[n].eigenvalues.mean())))
                    for n, t in raw["completion"].items()}
    # anchor: the suite's rank-32 queries and score_batch (completion, all layers)
    enc = (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    qb = ops.query_batch([enc(q["prompt"]) for q in queries], [enc(q["completion"]) for q in queries])
    prep = ops.QueryPrep(precision=cfg.scoring.query_precision, lowrank=cfg.scoring.query_lowrank)
    pq = ops.precondition_queries(model, factors, [qb], rank=cfg.scoring.rank, damping=f.damping, prep=prep)
    # per layer: [Q, N] scores for each (variant, preconditioner); train norm^2 and self-influence [N]
    S = {(v, p): {n: [] for n in names} for v in VARIANTS for p in ("ekfac", "identity")}
    S |= {(f"completion, damping {c}", "ekfac"): {n: [] for n in names} for c in DAMPINGS}
    tself_d = {c: {n: [] for n in names} for c in DAMPINGS}
    tnorm = {n: [] for n in names}
    tself = {n: [] for n in names}
    anchor = {k: [] for k in NORMALIZES}
    for b in batches:
        out = ops.backward_pass(model, layers, ops.LanguageModelObjective(), b, ops.Fisher.EMPIRICAL)
        G = {n: flat(t).double() for n, t in ops.per_sequence_gradients(out.captured).items()}
        for n in names:
            tnorm[n].append((G[n] ** 2).sum(1))
            HG = flat(ops.apply_inverse(lf[n], G[n].reshape(G[n].shape[0], *lf[n].eigenvalues.shape), f.damping))
            tself[n].append((G[n] * HG).sum(1))
            for c in DAMPINGS:
                key = f"completion, damping {c}"
                S[(key, "ekfac")][n].append(pre[key][n] @ G[n].T)
                HG = flat(ops.apply_inverse(lf[n], G[n].reshape(G[n].shape[0], *lf[n].eigenvalues.shape),
                                            c * float(lf[n].eigenvalues.mean())))
                tself_d[c][n].append((G[n] * HG).sum(1))
            for v in VARIANTS:
                S[(v, "ekfac")][n].append(pre[v][n] @ G[n].T)
                S[(v, "identity")][n].append(raw[v][n] @ G[n].T)
        res = ops.score_batch(model, pq, b, factors=factors)  # raw; the normalizations as normalize.py
        anchor["none"].append(res.scores)
        anchor["train_norm"].append(res.scores / res.train_norm[None, :])
        anchor["cosine"].append(res.scores / torch.sqrt(pq.self_influence[:, None] * res.self_influence[None, :]))
    S = {k: {n: torch.cat(x, 1) for n, x in d.items()} for k, d in S.items()}
    tnorm = {n: torch.cat(x) for n, x in tnorm.items()}
    tself = {n: torch.cat(x) for n, x in tself.items()}
    qself = {(v, "ekfac"): {n: (raw[v][n] * pre[v][n]).sum(1) for n in names} for v in VARIANTS}
    qself |= {(v, "identity"): {n: (raw[v][n] ** 2).sum(1) for n in names} for v in VARIANTS}
    qself |= {(f"completion, damping {c}", "ekfac"): {
        n: (raw["completion"][n] * pre[f"completion, damping {c}"][n]).sum(1) for n in names} for c in DAMPINGS}
    tself_d = {c: {n: torch.cat(x) for n, x in d.items()} for c, d in tself_d.items()}
    # [Q, Q] q_i^T M q_j of the completion queries (M = H^-1 or I): the self-influence of any linear combination
    gram = {p: {n: raw["completion"][n] @ (pre if p == "ekfac" else raw)["completion"][n].T for n in names}
            for p in ("ekfac", "identity")}
    score_s = time.perf_counter() - t0
    echo(f"{spec}: fit {fit_s:.0f} s, queries + scores {score_s:.0f} s")
    bm25 = BM25(seqs)
    return {"spec": spec, "world": world, "names": names, "S": S, "tnorm": tnorm, "tself": tself, "qself": qself, "gram": gram, "tself_d": tself_d,
            "anchor": {k: torch.cat(x, 1) for k, x in anchor.items()},
            "bm25": torch.tensor([bm25.scores(enc(q["prompt"]) + enc(q["completion"])) for q in queries],
                                 dtype=torch.float64),
            "seconds": {"train": train_s, "fit": fit_s, "score": score_s}}


def set_centering(world: Any) -> torch.Tensor:
    """[Q, Q] C with (C q)_i = q_i - mean of q_j over the queries j of i's query set (corpus / paraphrase)."""
    sets = [q["set"] for q in world.queries]
    same = torch.tensor([[a == b for b in sets] for a in sets], dtype=torch.float64)
    return torch.eye(len(sets), dtype=torch.float64) - same / same.sum(1, keepdim=True)


def combine(r: dict, variant: str, precond: str, normalize: str, subset: list[str]) -> torch.Tensor | None:
    """[Q, N] scores of one setting from the per-layer parts (None: not computable from this cache).

    ``centered_set`` is derived exactly from the completion query's parts: scores are linear in the query, so
    (C q) . g = C (q . g), and its self-influence is diag(C K C^T) with K the queries' Gram matrix in the metric.
    """
    if variant == "centered_set":
        C = set_centering(r["world"])
        num = C @ sum(r["S"][("completion", precond)][n] for n in subset)
        if normalize == "cosine" and "gram" not in r:
            return None
        q = torch.diagonal(C @ sum(r["gram"][precond][n] for n in subset) @ C.T) if normalize == "cosine" else None
    elif variant == "prompt_only":  # the loss is a sum over tokens: q(prompt tokens) = q(whole) - q(completion)
        if normalize == "cosine":
            return None
        num = sum(r["S"][("whole", precond)][n] - r["S"][("completion", precond)][n] for n in subset)
        q = None
    else:
        num = sum(r["S"][(variant, precond)][n] for n in subset)
        q = sum(r["qself"][(variant, precond)][n] for n in subset)
    if normalize == "none":
        return num
    if normalize == "train_norm":
        return num / torch.sqrt(sum(r["tnorm"][n] for n in subset)).clamp_min(1e-30)[None, :]
    t = r["tself"] if precond == "ekfac" else r["tnorm"]
    if variant.startswith("completion, damping "):
        t = r["tself_d"][float(variant.rsplit(" ", 1)[1])]
    return num / torch.sqrt(q.clamp_min(0)[:, None] * sum(t[n] for n in subset).clamp_min(0)[None, :]).clamp_min(1e-30)


def first_ranks(world: Any, scores: torch.Tensor) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {s: [] for s in SETS}
    for i, q in enumerate(world.queries):
        out[q["set"]].append(first_source_rank(scores[i].tolist(), [d["source_of"] == q["fact"] for d in world.docs]))
    return out


def row(r: dict, label: dict[str, Any], scores: torch.Tensor, best: list[float] | None) -> tuple[dict, list[float]]:
    ranks = first_ranks(r["world"], scores)
    out = {"model": r["spec"], **label}
    for s in SETS:
        m = retrieval(ranks[s], TOP)
        out[f"{s}_recall@{TOP}"], out[f"{s}_mrr"] = round(m[f"recall@{TOP}"], 4), round(m["mrr"], 4)
    if "own" not in r:  # the reference setting on this model
        r["own"] = first_ranks(r["world"], combine(r, "completion", "ekfac", "train_norm", r["names"]))["corpus"]
    own = r["own"]
    for column, ref in (("corpus_mrr_vs_best", best), ("corpus_mrr_vs_same_model", own)):
        mean, lo, hi = paired_interval([1 / x for x in ref], [1 / x for x in ranks["corpus"]])
        out[column] = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return out, ranks["corpus"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="w64b2e100,w64b2e200,w128b2e100,w128b4e100")
    ap.add_argument("--markdown", help="write the tables here")
    ap.add_argument("--cache", help="keep each model's scores here (<model>.pt) and reuse them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started, load = time.perf_counter(), os.getloadavg()
    results = []
    for m in args.models.split(","):  # the tables are rewritten after each model: a slow last model loses nothing
        cached = Path(args.cache) / f"{m}.pt" if args.cache else None
        if cached is not None and cached.exists():
            results.append(torch.load(cached, weights_only=False))
        else:
            results.append(run_model(m, lambda s: print(s, flush=True)))
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(results[-1], cached)
        text = render(results, args.models, load, time.perf_counter() - started)
        if args.markdown:
            Path(args.markdown).write_text(text)
    print(text)


def render(results: list[dict], spec: str, load: tuple[float, ...], seconds: float) -> str:
    best: list[float] | None = None
    models, main_rows, layer_rows = [], [], []
    for r in results:
        w = r["world"]
        models.append({"model": r["spec"], "epochs_done": w.training["epochs"], "final_loss": round(w.training["loss"], 4),
                       "greedy_recall_corpus": round(w.recall["corpus"], 4),
                       "greedy_recall_paraphrase": round(w.recall["paraphrase"], 4),
                       **{f"{k}_s": round(v) for k, v in r["seconds"].items()}})
        if best is None:
            best = first_ranks(w, combine(r, "completion", "ekfac", "train_norm", r["names"]))["corpus"]
        for k in NORMALIZES:
            main_rows.append(row(r, {"query": "completion", "preconditioner": "EK-FAC rank 32 (suite's)",
                                     "normalize": k, "layers": "all"}, r["anchor"][k], best)[0])
        for v in ("completion", "whole", "prompt_only", "centered", "centered_set", "contrastive"):
            for p in ("ekfac", "identity"):
                for k in NORMALIZES:
                    if combine(r, v, p, k, r["names"]) is None:
                        continue
                    main_rows.append(row(r, {"query": v, "preconditioner": "EK-FAC dense" if p == "ekfac" else
                                             "identity", "normalize": k, "layers": "all"},
                                         combine(r, v, p, k, r["names"]), best)[0])
        for c in DAMPINGS if "tself_d" in r else ():
            for k in NORMALIZES:
                main_rows.append(row(r, {"query": "completion", "preconditioner": f"EK-FAC dense, damping {c} x "
                                         "mean(Lambda)", "normalize": k, "layers": "all"},
                                     combine(r, f"completion, damping {c}", "ekfac", k, r["names"]), best)[0])
        main_rows.append(row(r, {"query": "prompt + completion ids", "preconditioner": "BM25", "normalize": "",
                                 "layers": ""}, r["bm25"], best)[0])
        blocks = sorted({n.split(".mlp")[0] for n in r["names"]})
        subsets = [(b, [n for n in r["names"] if n.startswith(b + ".")]) for b in blocks] + [(n, [n]) for n in r["names"]]
        for v in ("completion", "contrastive"):
            for k in ("none", "train_norm", "cosine"):
                for label, sub in subsets:
                    layer_rows.append(row(r, {"query": v, "preconditioner": "EK-FAC dense", "normalize": k,
                                              "layers": label}, combine(r, v, "ekfac", k, sub), best)[0])
    cols = list(main_rows[0])
    text = f"""# Facts suite: what lifts EK-FAC's corpus-phrasing MRR? (issue 8)

Command: `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/facts_mrr.py --models {spec} --markdown
benchmarks/eval/facts_mrr.md` ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()},
{os.cpu_count()} CPUs shared with other jobs, load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f},
torch {torch.__version__}, {torch.get_num_threads()} thread, {seconds:.0f} s).

For each model configuration{__doc__.split('For each model configuration', 1)[1]}
Models (`w<width>b<blocks>e<epochs>`; GPT-2, 4 heads, context 64, AdamW 3e-3, batch 16, seeded; w64b2e100 is
the suite's): greedy recall is the share of queries whose completion is the model's greedy continuation.

{markdown_table(models, list(models[0]))}

All tracked MLP layers. `corpus_mrr_vs_best`: corpus MRR minus that of the current best EK-FAC setting
(w64b2e100, completion, EK-FAC dense, train_norm, all layers), mean over the 48 corpus queries with a 95% paired
bootstrap interval; `corpus_mrr_vs_same_model`: the same against that setting on the row's own model (the
interval for a change of scoring alone, without the model-to-model spread).

{markdown_table(main_rows, cols)}

Per block and per layer (EK-FAC dense; a subset's train_norm and cosine use that subset's norms):

{markdown_table(layer_rows, cols)}
"""
    return text


if __name__ == "__main__":
    main()
