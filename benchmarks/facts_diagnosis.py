"""What ranks above a corpus-phrased query's first planted source on the facts suite?

Usage:

    python benchmarks/facts_diagnosis.py [--markdown benchmarks/eval/facts_diagnosis.md]

Builds the corpus and trains the tiny GPT-2 exactly as ``influence eval facts``
does (``pipelines.eval.facts.build_world``, FULL size, seeded), then scores
in process (no Ray): ``influence_ops.fit_ekfac`` on the whole corpus with the
job's default Fisher (gaussian, 4 / 4 draws, seed 0), queries preconditioned
with the job's defaults (rank 32, randomized low-rank, damping 0.1 x
mean(Lambda)), ``score_batch`` over all 360 documents with
``normalize`` none and train_norm. The pipeline fits per shard and merges, so
its factors (and ranks) differ slightly from these; the table reports the
suite's metric recomputed here next to the suite's published numbers.

For each corpus-phrased query ("<person> lives in" -> town) every document
scored above the query's first planted source is put in one class:

- (a) ``same_value_other_person``: a source of another person's fact of the
  same relation and the same value ("<other> lives in <same town>");
- (b) ``same_person``: a document naming the query's person without stating
  the query's fact: (b1) a source of that person's other fact, (b2) a
  distractor naming the person;
- (c) ``other``: (c1) a source of another person's fact of the same relation
  with a different value, (c2) a source of another person's other-relation
  fact, (c3) a distractor naming the query's value, (c4) any other distractor.

DIAGNOSTIC ONLY (not the suite's metric): MRR and recall@10 recomputed with
the (a) documents removed from each query's ranking.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import influence_ops as ops  # noqa: E402
from pipelines.eval.facts import FULL, build_world, job  # noqa: E402
from pipelines.eval.metrics import first_source_rank, retrieval  # noqa: E402
from pipelines.eval.report import markdown_table  # noqa: E402

CLASSES = ("a_same_value_other_person", "b1_same_person_other_fact", "b2_same_person_distractor",
           "c1_same_relation_other_value", "c2_other_person_other_relation", "c3_distractor_naming_value",
           "c4_other_distractor")
SUITE = {"none": (0.9167, 0.4833), "train_norm": (0.9583, 0.7284)}  # benchmarks/eval/facts.md, 2026-12-04


def classify(doc: dict, fact: Any, facts: dict[str, Any]) -> str:
    """The class of a non-source document ``doc`` for the query of ``fact``."""
    words = set(re.findall(r"[a-z]+", doc["text"]))
    if doc["source_of"]:
        other = facts[doc["source_of"]]
        if other.person == fact.person:
            return "b1_same_person_other_fact"
        if other.relation == fact.relation:
            return "a_same_value_other_person" if other.value == fact.value else "c1_same_relation_other_value"
        return "c2_other_person_other_relation"
    if fact.person in words:
        return "b2_same_person_distractor"
    return "c3_distractor_naming_value" if fact.value in words else "c4_other_distractor"


def analyse(scores: torch.Tensor, docs: list[dict], queries: list[dict], facts: dict[str, Any]) -> dict[str, Any]:
    """Counts of each class above the first source (corpus queries) and the metric with and without (a)."""
    counts = dict.fromkeys(CLASSES, 0)
    queries_with = dict.fromkeys(CLASSES, 0)
    distinct: dict[str, set[str]] = {c: set() for c in CLASSES}
    hubs: dict[str, int] = {}  # doc id -> corpus queries whose first source it outranks
    ranks, ranks_no_a, ranks_no_ac3, a_only = [], [], [], 0
    for qi, q in enumerate(queries):
        if q["set"] != "corpus":
            continue
        fact = facts[q["fact"]]
        row = scores[qi].tolist()
        is_src = [d["source_of"] == q["fact"] for d in docs]
        ranks.append(first_source_rank(row, is_src))
        best = max(s for s, src in zip(row, is_src) if src)
        above_docs = [d for d, s, src in zip(docs, row, is_src) if not src and s > best]
        above = [classify(d, fact, facts) for d in above_docs]
        for d, c in zip(above_docs, above):
            distinct[c].add(d["id"])
            hubs[d["id"]] = hubs.get(d["id"], 0) + 1
        for c in CLASSES:
            counts[c] += above.count(c)
            queries_with[c] += c in above
        a_only += bool(above) and all(c == CLASSES[0] for c in above)
        cls = [classify(d, fact, facts) for d in docs]
        for out, drop in ((ranks_no_a, {CLASSES[0]}), (ranks_no_ac3, {CLASSES[0], "c3_distractor_naming_value"})):
            keep = [i for i in range(len(docs)) if is_src[i] or cls[i] not in drop]
            out.append(first_source_rank([row[i] for i in keep], [is_src[i] for i in keep]))
    total = sum(counts.values())
    return {"ranks": ranks, "ranks_no_a": ranks_no_a, "ranks_no_ac3": ranks_no_ac3, "counts": counts, "queries_with": queries_with,
            "distinct": {c: len(v) for c, v in distinct.items()}, "hubs": hubs,
            "total_above": total, "a_only": a_only, "n": len(ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args()
    started = time.perf_counter()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="facts-diagnosis-") as tmp:
        world = build_world(Path(tmp), FULL)
        print(f"trained: {world.training}; greedy recall {world.recall}", flush=True)
        cfg = job(world, "mlp", "mlp", "none")
        from pipelines.io.model_loading import load_model, load_tokenizer

        loaded, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    model, layers = loaded.model, loaded.layers
    docs, queries = world.docs, world.queries
    seqs = [tok(d["text"], add_special_tokens=False)["input_ids"][:64] for d in docs]
    batches = [ops.collate(seqs[i:i + 16]) for i in range(0, len(seqs), 16)]
    enc = (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    qb = ops.query_batch([enc(q["prompt"]) for q in queries], [enc(q["completion"]) for q in queries])
    f = cfg.factors
    t0 = time.perf_counter()
    factors = ops.fit_ekfac(model, layers, batches, fisher=f.fisher, seed=f.seed, samples=f.fisher_samples,
                            lambda_samples=f.lambda_samples)
    prep = ops.QueryPrep(precision=cfg.scoring.query_precision, lowrank=cfg.scoring.query_lowrank)
    pq = ops.precondition_queries(model, factors, [qb], rank=cfg.scoring.rank, damping=f.damping, prep=prep)
    print(f"fit + queries {time.perf_counter() - t0:.0f} s (rank {cfg.scoring.rank}, {f.fisher.value} "
          f"{f.fisher_samples} / {f.lambda_samples}, seed {f.seed})", flush=True)
    from pipelines.eval.facts_corpus import make_facts_corpus

    _, fact_list, _ = make_facts_corpus(FULL.people, FULL.towns, FULL.jobs, 3, FULL.distractors, seed=0)
    facts = {x.key: x for x in fact_list}
    shares, metrics, hubs = [], [], []
    for normalize in ("none", "train_norm"):
        scores = torch.cat([ops.score_batch(model, pq, b, normalize=ops.Normalize(normalize)).scores
                            for b in batches], dim=1)
        r = analyse(scores, docs, queries, facts)
        m, m_no_a, m_no_ac3 = (retrieval(r[k], 10) for k in ("ranks", "ranks_no_a", "ranks_no_ac3"))
        suite_recall, suite_mrr = SUITE[normalize]
        metrics.append({"normalize": normalize, "recall@10 (suite's metric, here)": round(m["recall@10"], 4),
                        "mrr (suite's metric, here)": round(m["mrr"], 4),
                        "suite facts.md recall@10 / mrr": f"{suite_recall:.4f} / {suite_mrr:.4f}",
                        "DIAGNOSTIC recall@10 without (a)": round(m_no_a["recall@10"], 4),
                        "DIAGNOSTIC mrr without (a)": round(m_no_a["mrr"], 4),
                        "DIAGNOSTIC recall@10 without (a), (c3)": round(m_no_ac3["recall@10"], 4),
                        "DIAGNOSTIC mrr without (a), (c3)": round(m_no_ac3["mrr"], 4),
                        "queries with a non-source above": sum(x > 1 for x in r["ranks"]),
                        "of them only (a) above": r["a_only"], "queries": r["n"]})
        for c in CLASSES:
            shares.append({"normalize": normalize, "class": c, "documents_above": r["counts"][c],
                           "share_of_documents_above": round(r["counts"][c] / max(r["total_above"], 1), 4),
                           "queries_with_it_above": r["queries_with"][c],
                           "distinct_documents": r["distinct"][c]})
        by_id = {d["id"]: d for d in docs}
        for doc_id, n in sorted(r["hubs"].items(), key=lambda kv: -kv[1])[:5]:
            hubs.append({"normalize": normalize, "doc_id": doc_id, "corpus_queries_outranked": n,
                         "tokens": len(seqs[[d["id"] for d in docs].index(doc_id)]),
                         "text": by_id[doc_id]["text"]})
        hubs.append({"normalize": normalize, "doc_id": "(all)", "corpus_queries_outranked": sum(r["hubs"].values()),
                     "tokens": "", "text": f"{len(r['hubs'])} distinct documents"})
        print(markdown_table(metrics[-1:], list(metrics[-1])), flush=True)
    seconds = time.perf_counter() - started
    text = f"""# Facts suite: what ranks above the first planted source (corpus phrasing)

Command: `PYTHONPATH=. python benchmarks/facts_diagnosis.py --markdown benchmarks/eval/facts_diagnosis.md`
({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs,
load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, torch {torch.__version__},
{torch.get_num_threads()} threads, {seconds:.0f} s).

Corpus and model as `influence eval facts` builds them (`build_world`, seeded): {len(docs)} documents, training
{world.training['epochs']} epochs, final loss {world.training['loss']:.3f}, greedy recall corpus
{world.recall['corpus']:.2f}. Scores in process: `fit_ekfac` on the whole corpus (the job's default Fisher,
{f.fisher.value} {f.fisher_samples} / {f.lambda_samples} draws, seed {f.seed}), rank-{cfg.scoring.rank} queries
({cfg.scoring.query_lowrank.value}), damping 0.1 x mean(Lambda), `score_batch` on all documents, track mlp. The
suite's pipeline fits per shard and merges, so its numbers (quoted) differ slightly.

Classes of the documents scored above a corpus-phrased query's first planted source: (a) a source of ANOTHER
person's fact with the SAME relation and value ("<other> lives in <same town>"); (b1) a source of the same
person's other fact; (b2) a distractor naming the same person; (c1) a source of another person's fact, same
relation, other value; (c2) a source of another person's other-relation fact; (c3) a distractor naming the
query's value; (c4) any other distractor.

{markdown_table(shares, list(shares[0]))}

The documents that outrank the first source for the most corpus queries (all classes; documents median
{sorted(map(len, seqs))[len(seqs) // 2]} tokens):

{markdown_table(hubs, list(hubs[0]))}

The "without ..." columns are a DIAGNOSTIC ONLY, not the suite's metric: MRR and recall@10 recomputed after
removing the (a) documents (and, in the last two, also the (c3) distractors naming the query's value) from each
query's ranking: what the metric would be if those documents did not compete.

{markdown_table(metrics, list(metrics[0]))}
"""
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
