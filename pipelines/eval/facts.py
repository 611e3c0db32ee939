"""`influence eval facts`: are the planted sources of a fact at the top, and are they the same after a refit?

Symbols: N documents, Q queries (two per fact: corpus phrasing, paraphrase).

1. A planted-fact corpus (``facts_corpus.py``, written by ``facts_world.py``: people, their town and job,
   each fact stated by several differently phrased documents among
   distractors) and a tiny GPT-2 trained on it here until it recalls the facts
   (greedy recall of each query's completion is reported per query set); one
   model per ``--model-seeds`` seed (default 0), every step below on each, and
   with several models their mean and range per method (``across_models``).
2. The real pipeline (``run_job``: tokenize, fit-factors, build-queries, score,
   merge, on a local Ray) for every ``model.track`` (mlp, mlp+attention) and
   ``scoring.normalize`` (none, cosine, train_norm), default Fisher, with
   ``top_k`` above N so that the merged table ranks every document; and the
   pipeline in ``scoring.mode = "tfidf"`` (mlp track, per normalize and
   ``scoring.candidates`` n): TF-IDF keeps each query's n best sequences,
   EK-FAC re-scores only those (``top_k`` above n: every candidate ranked). A
   query whose planted sources are all outside its candidates has not found
   them (reciprocal rank 0; ``first_ranks(..., restricted=True)``). These jobs
   share the mlp jobs' output folder, so their factors and queries are reused.
3. Baselines on the same tokenized shards: BM25 over token ids (``bm25.py``,
   query = prompt + completion ids), the plain gradient dot product q . g_m on
   the same tracked layers (no factors: identity preconditioner) and the
   gradient cosine (the same divided by ||g_m||; ||q|| does not change a
   query's ranking); the product's TF-IDF ranking alone (``tfidf_topn`` over
   every sequence: the tfidf mode's candidate order, no re-scoring).
4. recall@10 and MRR of the first planted source, per query set; the MRR
   difference to raw EK-FAC (mlp, none) with a paired bootstrap interval.
5. Seed to seed at the default Fisher, over every pair of seeds 0, 1, 2: the
   pipeline re-run with ``factors.seed`` = 1 and 2 (Spearman over all N
   documents and top-10 overlap per query and pair), and in process
   (``stability.measure``: dense queries, fits on the whole corpus) the old
   default (sampled k=1, the cost reference), the default and, if the default
   misses a top-10 overlap of 0.9, a candidate setting with more draws.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import influence_ops as ops

from .bm25 import BM25
from .facts_world import DEFAULT, FULL, OLD_DEFAULT, QUICK, SETS, Size, World, build_world, job
from .metrics import first_source_rank, paired_interval, retrieval, spearman, top_overlap
from .report import Progress, markdown_table, write_table
from .stability import Case, measure
from ..runtime.threads import torch_threads

__all__ = ["DEFAULT", "FULL", "OLD_DEFAULT", "QUICK", "SETS", "TOP", "World", "build_world", "first_ranks",
           "in_process", "in_process_row", "job", "pipeline_stability", "retrieval_row", "run_facts"]
TOP = 10


def pipeline_scores(world: World, cfg: Any, column: str) -> dict[str, dict[str, float]]:
    """Run the job; query id -> doc id -> ``column`` ('score', or 'rank' negated) from the merged table."""
    import pyarrow.dataset as pads

    from ..run import run_job

    run_job(cfg)
    table = pads.dataset(str(Path(cfg.data.output) / "topk"), partitioning="hive").to_table(
        columns=["query_id", "doc_id", column, "sign"]).to_pylist()
    out: dict[str, dict[str, float]] = {}
    for r in table:
        if r["sign"] == "top":
            v = -float(r[column]) if column == "rank" else float(r[column])
            out.setdefault(str(r["query_id"]), {})[r["doc_id"].split(":")[0]] = v
    return out


def first_ranks(world: World, scores: dict[str, dict[str, float]],
                restricted: bool = False) -> dict[str, list[float]]:
    """Query set -> first-source rank per query.

    A scan (``restricted`` False): a document missing from a query's row ranks last. Candidates
    (``restricted``): only the row's documents are ranked; a query whose row holds no planted
    source (or that has no row) gets rank inf (reciprocal rank 0, a recall miss).
    """
    out: dict[str, list[float]] = {s: [] for s in SETS}
    every = [d["id"] for d in world.docs]
    for q in world.queries:
        row = scores.get(q["query_id"], {}) if restricted else scores[q["query_id"]]
        ids = list(row) if restricted else every
        out[q["set"]].append(first_source_rank([row.get(i, -float("inf")) for i in ids],
                                               [world.sources[i] == q["fact"] for i in ids]))
    return out


@dataclass
class InProcess:
    """The trained model on the mlp track, the pipeline's shards, and the queries as token ids."""

    model: torch.nn.Module
    layers: list[ops.TrackedLayer]
    doc_ids: list[str]
    sequences: list[list[int]]
    prompts: list[list[int]]
    completions: list[list[int]]

    def batches(self, size: int = 16) -> list[ops.TokenBatch]:
        return [ops.collate(self.sequences[i:i + size]) for i in range(0, len(self.sequences), size)]

    def query_batch(self) -> ops.TokenBatch:
        return ops.query_batch(self.prompts, self.completions)


def in_process(world: World, cfg: Any) -> InProcess:
    from ..io.model_loading import load_model, load_tokenizer
    from ..io.shards import list_shards, read_rows

    loaded = load_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    ids, seqs = [], []
    for shard in list_shards(cfg.data.corpus):
        rows = read_rows(shard, None, None)
        ids += [d.split(":")[0] for d in rows.doc_ids]
        seqs += [x.tolist() for x in rows.input_ids]
    enc = (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    return InProcess(loaded.model, loaded.layers, ids, seqs, [enc(q["prompt"]) for q in world.queries],
                     [enc(q["completion"]) for q in world.queries])


def gradient_scores(ip: InProcess, normalize: ops.Normalize) -> torch.Tensor:
    """[Q, N] q . g_m (NONE) or q . g_m / ||g_m|| (TRAIN_NORM) on the tracked layers, no preconditioner."""
    from influence_ops.queries import query_gradients

    grads, measurement = query_gradients(ip.model, ip.layers, ip.query_batch(), ops.LanguageModelObjective())
    pq = ops.PreconditionedQueries({n: ops.LayerQuery(dense=g.detach()) for n, g in grads.items()},
                                   measurement.detach(), torch.zeros(measurement.shape[0], len(grads)), None,
                                   "", 1, {n: 0.0 for n in grads})
    return torch.cat([ops.score_batch(ip.model, pq, b, normalize=normalize).scores for b in ip.batches()], dim=1)


def tfidf_alone(world: World, cfg: Any) -> dict[str, dict[str, float]]:
    """The product's TF-IDF scores (``tfidf_topn``, query = prompt + completion) of every sequence that
    shares a token with the query: query id -> doc id -> score (rank with ``restricted=True``)."""
    from ..stages.tfidf import query_tokens, tfidf_topn

    found = tfidf_topn(cfg, query_tokens(cfg), len(world.docs))
    return {q: {d.split(":")[0]: s for d, _, s in rows} for q, rows in found.items()}


def bm25_scores(ip: InProcess) -> torch.Tensor:
    """[Q, N] BM25 of prompt + completion ids against every sequence."""
    index = BM25(ip.sequences)
    return torch.tensor([index.scores(p + c) for p, c in zip(ip.prompts, ip.completions)], dtype=torch.float64)


def as_rows(world: World, ip: InProcess, scores: torch.Tensor) -> dict[str, dict[str, float]]:
    return {q["query_id"]: dict(zip(ip.doc_ids, scores[i].tolist())) for i, q in enumerate(world.queries)}


def retrieval_row(method: str, track: str, normalize: str, ranks: dict[str, list[float]],
                  reference: dict[str, list[float]] | None, restricted: bool = False) -> dict[str, Any]:
    """One row of the table; ``restricted`` (candidate rows) adds ``*_in_candidates``: the share of queries
    whose candidates hold a planted source (the row's recall at any cut-off)."""
    row: dict[str, Any] = {"method": method, "track": track, "normalize": normalize}
    for s in SETS:
        m = retrieval(ranks[s], TOP)
        row[f"{s}_recall@{TOP}"], row[f"{s}_mrr"] = m[f"recall@{TOP}"], m["mrr"]
    for s in SETS:
        if reference is None:
            row[f"{s}_mrr_vs_ekfac"] = ""
        else:
            mean, lo, hi = paired_interval([1 / r for r in reference[s]], [1 / r for r in ranks[s]])
            row[f"{s}_mrr_vs_ekfac"] = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    for s in SETS:
        row[f"{s}_in_candidates"] = sum(r < float("inf") for r in ranks[s]) / max(len(ranks[s]), 1) \
            if restricted else None
    return row


def pipeline_stability(world: World, runs: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Spearman over all documents and top-10 overlap for every pair of pipeline runs (scores aligned by doc id);
    mean and worst over pairs and queries."""
    ids = [d["id"] for d in world.docs]
    scores = [torch.tensor([[run[q["query_id"]][i] for i in ids] for q in world.queries], dtype=torch.float64)
              for run in runs]  # each (Q, N)
    pairs = list(itertools.combinations(scores, 2))
    rho = torch.stack([spearman(a, b) for a, b in pairs])  # (pairs, Q)
    top = torch.stack([top_overlap(a, b, TOP) for a, b in pairs])
    return {"spearman_mean": float(rho.mean()), "spearman_min": float(rho.min()),
            f"top{TOP}_overlap_mean": float(top.mean()), f"top{TOP}_overlap_min": float(top.min())}


def run_facts(out: str | Path, quick: bool = False, command: str = "influence eval facts",
              echo: Callable[[str], Any] = print, model_seeds: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """The suite on one trained model per seed in ``model_seeds`` (default: seed 0).

    Every row carries its ``model_seed``. With several models, ``facts_models`` gives each
    method's mean and range over them: one model's numbers are one draw of the training's
    randomness (and of its floating-point rounding: the same seed on another CPU trains a
    different model).
    """
    started = time.perf_counter()
    size = QUICK if quick else FULL
    seeds = model_seeds or (0,)
    runs = len(size.tracks) * len(size.normalizes)
    steps = 1 + runs + len(size.tfidf) + 2 + size.tfidf_alone + size.pipeline_refit
    progress = Progress(len(seeds) * (steps + len(size.seeds) * (2 + len(size.candidates))), echo)
    rows: list[dict[str, Any]] = []
    stab: list[dict[str, Any]] = []
    worlds: dict[int, World] = {}
    with torch_threads(1):  # the driver's training, fits and scoring: tiny models, fastest on one thread
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="influence-facts-") as tmp:
                worlds[seed], model_rows, model_stab = _one_model(Path(tmp), size, seed, progress)
            rows += [{"model_seed": seed, **r} for r in model_rows]
            stab += [{"model_seed": seed, **r} for r in model_stab]
        parquet, md = write_table(out, "facts", rows, command, _notes(worlds, size, stab), started)  # threads as run
        write_table(out, "facts_stability", stab, command, "Seed to seed on the planted-fact corpus "
                    "(see facts.md).", started)
        if len(seeds) > 1:
            write_table(out, "facts_models", across_models(rows), command, MODELS_NOTES.format(
                n=len(seeds), seeds=", ".join(map(str, seeds))), started)
    echo(f"wrote {md}, {parquet} and facts_stability.parquet" + (" and facts_models" if len(seeds) > 1 else ""))
    return rows + stab


MODELS_NOTES = """
The facts suite's rows over {n} trained models (model seeds {seeds}: initialization and minibatch order; the
same corpus, queries and recipe; facts.md has every model's rows). Per method: the mean over models of recall@10
and MRR per query set, and the lowest and highest MRR of any model.
"""


def across_models(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, track, normalize), in first-seen order: mean recall@10 / MRR over the models, MRR min and max."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["track"], r["normalize"]), []).append(r)
    out = []
    for (method, track, normalize), rs in groups.items():
        row: dict[str, Any] = {"method": method, "track": track, "normalize": normalize, "models": len(rs)}
        for s in SETS:
            mrr = [r[f"{s}_mrr"] for r in rs]
            row[f"{s}_recall@{TOP}"] = sum(r[f"{s}_recall@{TOP}"] for r in rs) / len(rs)
            row.update({f"{s}_mrr": sum(mrr) / len(rs), f"{s}_mrr_min": min(mrr), f"{s}_mrr_max": max(mrr)})
        out.append(row)
    return out


def _one_model(work: Path, size: Size, model_seed: int, progress: Progress) -> tuple[World, list, list]:
    """Train the model of ``model_seed`` and measure every row on it: (world, retrieval rows, stability rows)."""
    seeds = ", ".join(map(str, size.seeds))
    t0 = time.perf_counter()
    world = build_world(work, size, model_seed)
    progress.step(f"model seed {model_seed}: trained a tiny GPT-2 on {len(world.docs)} documents: "
                  f"{world.training['epochs']} epochs, loss {world.training['loss']:.3f}; greedy recall corpus "
                  f"{world.recall['corpus']:.2f}, paraphrase {world.recall['paraphrase']:.2f}", t0)
    rows: list[dict[str, Any]] = []
    reference = None
    for track in size.tracks:
        for normalize in size.normalizes:
            t0 = time.perf_counter()
            cfg = job(world, track.replace("+", "-"), track, normalize)
            scores = pipeline_scores(world, cfg, "rank")
            ranks = first_ranks(world, scores)
            row = retrieval_row("EK-FAC", track, normalize, ranks, reference)
            reference = reference or ranks
            rows.append(row)
            progress.step(f"pipeline, track {track}, normalize {normalize}: paraphrase MRR "
                          f"{row['paraphrase_mrr']:.3f}", t0)
    for normalize, n in size.tfidf:  # the mlp scans' folder: its factors and queries are reused
        t0 = time.perf_counter()
        scores = pipeline_scores(world, job(world, "mlp", "mlp", normalize, candidates=n), "rank")
        row = retrieval_row(f"EK-FAC, tfidf mode ({n} candidates)", "mlp", normalize,
                            first_ranks(world, scores, restricted=True), reference, restricted=True)
        rows.append(row)
        progress.step(f"pipeline, scoring.mode tfidf, {n} candidates, normalize {normalize}: recall@{TOP} / MRR "
                      + ", ".join(f"{s} {row[f'{s}_recall@{TOP}']:.3f} / {row[f'{s}_mrr']:.3f} "
                                  f"(vs EK-FAC {row[f'{s}_mrr_vs_ekfac']})" for s in SETS), t0)
    base_cfg = job(world, "mlp", "mlp", "none")
    ip = in_process(world, base_cfg)
    t0 = time.perf_counter()
    for method, normalize in (("gradient dot product", ops.Normalize.NONE),
                              ("gradient cosine", ops.Normalize.TRAIN_NORM)):
        ranks = first_ranks(world, as_rows(world, ip, gradient_scores(ip, normalize)))
        rows.append(retrieval_row(method, "mlp", "(no factors)", ranks, reference))
    progress.step("gradient dot product and cosine (no preconditioner)", t0)
    t0 = time.perf_counter()
    rows.append(retrieval_row("BM25 (token ids, k1=1.5, b=0.75)", "", "", first_ranks(
        world, as_rows(world, ip, bm25_scores(ip))), reference))
    progress.step("BM25", t0)
    if size.tfidf_alone:
        t0 = time.perf_counter()
        rows.append(retrieval_row("TF-IDF alone (the tfidf candidates' order: binary BM25, k1=1.5, b=0.75)", "",
                                  "", first_ranks(world, tfidf_alone(world, base_cfg), restricted=True),
                                  reference, restricted=True))
        progress.step("TF-IDF alone (tfidf_topn over every sequence)", t0)

    stab = []
    if size.pipeline_refit:
        t0 = time.perf_counter()
        assert size.seeds[0] == 0  # base_cfg's seed
        # score's units are complete (kept); merge re-runs, the tfidf rows having written topk/ in this folder
        runs = [pipeline_scores(world, base_cfg, "score")]
        runs += [pipeline_scores(world, job(world, f"mlp-seed{s}", "mlp", "none", seed=s), "score")
                 for s in size.seeds[1:]]
        stab.append({"variant": DEFAULT.label + ", pipeline (rank-32 queries)", "fisher": DEFAULT.fisher.value,
                     "samples": DEFAULT.samples, "lambda_samples": DEFAULT.lambda_samples, "seeds": seeds,
                     **pipeline_stability(world, runs),
                     "fit_cpu_seconds": float("nan"), "cost_vs_old_default": float("nan")})
        progress.step(f"pipeline refits with factors.seed = {seeds}: Spearman {stab[0]['spearman_mean']:.3f} "
                      f"(worst {stab[0]['spearman_min']:.3f}), top-10 overlap "
                      f"{stab[0][f'top{TOP}_overlap_mean']:.3f} (worst {stab[0][f'top{TOP}_overlap_min']:.3f})",
                      t0)
    case = Case(ip.model, ip.layers, ip.batches(), ip.query_batch(), len(ip.sequences), "")
    measured = [measure(case, v, progress, size.seeds) for v in (OLD_DEFAULT, DEFAULT)]
    if measured[1][f"top{TOP}_overlap_mean"] < 0.9:
        measured += [measure(case, v, progress, size.seeds) for v in size.candidates]
    stab += [in_process_row(m, seeds, measured[0]) for m in measured]
    return world, rows, stab


def in_process_row(m: dict[str, Any], seeds: str, old_default: dict[str, Any]) -> dict[str, Any]:
    """A ``stability.measure`` result as a facts_stability row; cost relative to ``old_default``'s (sampled k=1)."""
    return {"variant": m["variant"] + ", in process (dense queries)", "fisher": m["fisher"], "samples": m["samples"],
            "lambda_samples": m["lambda_samples"], "seeds": seeds,
            **{k: m[k] for k in ("spearman_mean", "spearman_min", f"top{TOP}_overlap_mean",
                                 f"top{TOP}_overlap_min", "fit_cpu_seconds")},
            "cost_vs_old_default": round(m["us_per_token"] / old_default["us_per_token"], 2)}


def _notes(worlds: dict[int, World], size: Size, stab: list[dict[str, Any]]) -> str:
    world = next(iter(worlds.values()))
    facts = len({q["fact"] for q in world.queries})
    trained = "; ".join(f"model seed {seed}: {w.training['epochs']} epochs, final loss {w.training['loss']:.3f}, "
                        f"greedy recall of the queries' completions {w.recall['corpus']:.2f} in the corpus's phrasing "
                        f"and {w.recall['paraphrase']:.2f} in the paraphrases" for seed, w in worlds.items())
    return f"""
Planted-fact corpus (`pipelines/eval/facts_corpus.py`): {size.people} people, each with a town ({size.towns} towns)
and a job ({size.jobs} jobs), {facts} facts, each stated by 3 documents in 3 different phrasings (one of them the
corpus-phrased query's), among {len(world.docs)} documents ({size.distractors} distractors that name people, towns
and jobs without stating a fact). Tiny GPT-2 (width {size.width}, {size.blocks} block(s), vocabulary {world.vocab},
random init, seeded by `model_seed`; the seed also orders the minibatches) trained per model seed: {trained}.

{facts} queries in the corpus's phrasing (`<person> lives in` -> town, `<person> works as a` -> job) and {facts} in a
phrasing no document uses, made of corpus words (`the town where <person> lives is`, `for a living , <person> is a`).
EK-FAC rows: the real pipeline (`run_job` on a local Ray: tokenize, fit-factors, build-queries, score, merge) with
the default Fisher ({DEFAULT.fisher.value}, {DEFAULT.samples} / {DEFAULT.lambda_samples} draws, seed 0), rank-32
queries, `top_k` above the corpus size (every document ranked). `tfidf mode (n candidates)` rows: the same
pipeline with `scoring.mode = "tfidf"` and `scoring.candidates = n` (mlp track, in the mlp rows' output folder, so
their factors and queries are reused): TF-IDF (binary-presence BM25, query = prompt + completion) keeps each query's
n best sequences and EK-FAC re-scores only those, all of them ranked (`top_k` above n); a query whose candidates hold
no planted source has not found it (reciprocal rank 0, a recall miss). `*_in_candidates`: the share of queries whose
candidates hold a planted source (the most such a row can recall). Baselines on the same shards and tracked layers
(mlp): the gradient dot product (no preconditioner), the gradient cosine (dot product / ||g_m||), BM25 over token
ids (query = prompt + completion, counts), and TF-IDF alone: the product's `tfidf_topn` over every sequence (the
tfidf mode's candidate order, no re-scoring; sequences sharing no token with the query are not ranked).
recall@10: share of queries with a planted source in the top 10; MRR: mean 1 / rank of the first planted source
(ties broken at random, in expectation). `*_mrr_vs_ekfac`: MRR minus EK-FAC mlp/none's, mean over queries with a
95% paired bootstrap interval.

Seed to seed at the default Fisher (fits differing only in the seed, {", ".join(map(str, size.seeds))}; for every
pair of seeds and every query, Spearman over all {len(world.docs)} documents and the overlap of the top-{TOP} sets;
mean and worst over pairs and queries). Pipeline row: rank-32 queries, `factors.seed` as listed. In-process rows
(`influence_ops.fit_ekfac` on the whole corpus, dense queries, as `influence eval stability`):
`cost_vs_old_default` = fitting CPU seconds per token relative to sampled k=1
(CPU seconds grow with the machine's load: compare them only within a run whose load stayed level).
Targets (issue 8): Spearman >= 0.95 and top-10 overlap >= 0.9 at <= 2x the old fitting cost.

{markdown_table(stab, list(stab[0]))}
"""
