"""The facts suite: BM25 and the retrieval metrics by hand, the corpus generator's invariants, the CLI end to end."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipelines.eval.bm25 import BM25
from pipelines.eval.facts_corpus import PARAPHRASES, TEMPLATES, make_facts_corpus
from pipelines.eval.metrics import first_source_rank, retrieval


def test_bm25_matches_a_hand_computation():
    docs = [[1, 2, 2], [2, 3], [4]]  # N = 3, avgdl = 2
    index = BM25(docs, k1=1.5, b=0.75)
    idf = {t: math.log(1 + (3 - n + 0.5) / (n + 0.5)) for t, n in {1: 1, 2: 2, 3: 1, 4: 1}.items()}

    def term(t: int, tf: int, length: int) -> float:
        return idf[t] * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * length / 2))

    got = index.scores([2, 3, 3])  # token 3 twice in the query: counted twice
    want = [term(2, 2, 3), term(2, 1, 2) + 2 * term(3, 1, 2), 0.0]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[1] > got[0] > got[2] == 0.0
    assert index.scores([9]) == [0.0, 0.0, 0.0]  # a token no document has


def test_first_source_rank_recall_and_mrr_on_a_hand_case():
    # sources are docs 1 and 3; doc 1 ranks 3rd (scores 9, 8 above it)
    assert first_source_rank([9.0, 7.0, 8.0, 1.0], [False, True, False, True]) == 3.0
    assert first_source_rank([1.0, 5.0], [False, False]) == math.inf
    # a tie with 2 non-sources and 1 source at the best score: expected rank 1 + 2 / 2 = 2
    assert first_source_rank([3.0, 3.0, 3.0, 0.0], [False, True, False, False]) == 2.0
    ranks = [1.0, 2.0, 12.0, math.inf]
    m = retrieval(ranks, k=10)
    assert m["recall@10"] == 0.5
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1 / 12 + 0) / 4)


def test_the_corpus_generator_keeps_its_invariants():
    docs, facts, queries = make_facts_corpus(people=8, towns=4, jobs=4, sources=3, distractors=40, seed=3)
    texts = [d["text"] for d in docs]
    assert len({d["id"] for d in docs}) == len(docs)
    assert len(docs) == 3 * len(facts) + 40
    vocab = {w for t in texts for w in t.split()}
    for f in facts:
        mine = [d["text"] for d in docs if d["source_of"] == f.key]
        assert len(mine) >= 2
        # every source states the fact, each in its own phrasing
        stated = [[t for t in TEMPLATES[f.relation] if t.format(p=f.person, v=f.value) in text] for text in mine]
        assert all(len(s) >= 1 for s in stated)
        assert len({s[0] for s in stated}) == len(mine)
        # no other document states it
        others = [d["text"] for d in docs if d["source_of"] != f.key]
        assert not any(t.format(p=f.person, v=f.value) in text for t in TEMPLATES[f.relation] for text in others)
    assert {q["set"] for q in queries} == {"corpus", "paraphrase"} and len(queries) == 2 * len(facts)
    for q in queries:
        source_texts = [d["text"] for d in docs if d["source_of"] == q["fact"]]
        if q["set"] == "corpus":  # a source uses the query's words
            assert any(f"{q['prompt']} {q['completion']}" in t for t in source_texts)
        else:  # no document uses the paraphrase, yet every one of its words is a corpus word
            assert not any(q["prompt"] in t for t in texts)
            fixed = [w for w in PARAPHRASES[q["fact"].split("-")[0]].split() if w != "{p}"]
            assert not any(" ".join(fixed) in t for t in texts)
            assert set(q["prompt"].split()) <= vocab
    # a town or job is shared: the completion word alone does not point at the sources
    assert len({f.value for f in facts if f.relation == "town"}) < len([f for f in facts if f.relation == "town"])


def test_pipeline_stability_takes_mean_and_worst_over_every_pair_of_runs(tmp_path):
    from pipelines.eval.facts import World, pipeline_stability

    docs = [{"id": f"d{i}"} for i in range(20)]
    queries = [{"query_id": "q0"}, {"query_id": "q1"}]
    world = World(tmp_path, docs, queries, {}, {}, {}, 0)
    up = {q["query_id"]: {d["id"]: float(i) for i, d in enumerate(docs)} for q in queries}
    down = {q["query_id"]: {d["id"]: -float(i) for i, d in enumerate(docs)} for q in queries}
    same = pipeline_stability(world, [up, dict(up), dict(up)])
    assert same["spearman_min"] == pytest.approx(1.0) and same["top10_overlap_min"] == 1.0
    # pairs (up, up) agree, (up, down) twice reverse: mean over 3 pairs, worst is the reversed pair
    got = pipeline_stability(world, [up, up, down])
    assert got["spearman_mean"] == pytest.approx((1 - 1 - 1) / 3) and got["spearman_min"] == pytest.approx(-1.0)
    assert got["top10_overlap_mean"] == pytest.approx(1 / 3) and got["top10_overlap_min"] == 0.0


def test_candidate_rows_rank_only_the_candidates_and_miss_a_source_outside_them(tmp_path):
    from pipelines.eval.facts import World, first_ranks, retrieval_row

    docs = [{"id": f"d{i}"} for i in range(6)]
    sources = {"d0": "f1", "d1": "", "d2": "", "d3": "f2", "d4": "", "d5": "f1"}
    queries = [{"query_id": "a", "set": "corpus", "fact": "f1"}, {"query_id": "b", "set": "corpus", "fact": "f2"},
               {"query_id": "c", "set": "paraphrase", "fact": "f1"}, {"query_id": "d", "set": "paraphrase",
                                                                     "fact": "f2"}]
    world = World(tmp_path, docs, queries, sources, {}, {}, 0)
    scores = {"a": {"d1": 9.0, "d2": 8.0, "d5": 7.0},  # f1's source d5 third among 3 candidates
              "b": {"d1": 9.0, "d0": 8.0},  # f2's only source d3 is not a candidate
              "c": {"d0": 1.0, "d5": 5.0}}  # both sources are candidates, d5 first; "d" has no candidates at all
    ranks = first_ranks(world, scores, restricted=True)
    assert ranks == {"corpus": [3.0, math.inf], "paraphrase": [1.0, math.inf]}
    # a scan ranks a missing document last instead: d3 after d1 and d0, tied with the other 3 absent ones
    scan = first_ranks(world, {q["query_id"]: scores.get(q["query_id"], {}) for q in queries})
    assert scan["corpus"][1] == pytest.approx(1 + 2 + 3 / 2)
    row = retrieval_row("x", "mlp", "none", ranks, None, restricted=True)
    assert row["corpus_mrr"] == pytest.approx((1 / 3 + 0) / 2) and row["corpus_recall@10"] == 0.5
    assert row["corpus_in_candidates"] == 0.5 and row["paraphrase_in_candidates"] == 0.5
    assert retrieval_row("x", "mlp", "none", ranks, None)["corpus_in_candidates"] is None


@pytest.mark.usefixtures("ray_local")
def test_eval_facts_quick_runs_the_pipeline_and_writes_its_tables(tmp_path):
    from pipelines.cli import main

    threads_before = torch.get_num_threads()
    result = CliRunner().invoke(main, ["eval", "facts", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads_before  # one torch thread inside the suite, the count given back
    assert pq.read_table(tmp_path / "facts.parquet").schema.metadata[b"torch_threads"] == b"1"
    assert "[1/" in result.output and "greedy recall" in result.output
    rows = pq.read_table(tmp_path / "facts.parquet").to_pylist()
    methods = [(r["method"], r["normalize"]) for r in rows]
    assert [m for m in methods if m[0] == "EK-FAC"] == [("EK-FAC", "none"), ("EK-FAC", "cosine")]
    assert {"gradient dot product", "gradient cosine"} <= {r["method"] for r in rows}
    assert any(r["method"].startswith("BM25") for r in rows)
    for r in rows:
        for s in ("corpus", "paraphrase"):
            assert 0.0 <= r[f"{s}_recall@10"] <= 1.0 and 0.0 < r[f"{s}_mrr"] <= 1.0
    # the tfidf mode with 10 candidates: every candidate is in the top 10, so recall@10 is the share of queries
    # whose candidates hold a source; the scan rows have no candidates
    tfidf = [r for r in rows if r["method"].startswith("EK-FAC, tfidf")]
    assert [(r["method"], r["normalize"]) for r in tfidf] == [("EK-FAC, tfidf mode (10 candidates)", "none")]
    for s in ("corpus", "paraphrase"):
        assert tfidf[0][f"{s}_recall@10"] == tfidf[0][f"{s}_in_candidates"] > 0.0
    assert all(r["corpus_in_candidates"] is None for r in rows if r["method"] == "EK-FAC")
    # BM25 on the corpus phrasing: prompt + completion name the person and the value of every source
    bm25 = next(r for r in rows if r["method"].startswith("BM25"))
    assert bm25["corpus_recall@10"] == 1.0
    stab = pq.read_table(tmp_path / "facts_stability.parquet").to_pylist()
    assert len(stab) == 2 and all(-1.0 <= r["spearman_mean"] <= 1.0 for r in stab)
    md = (tmp_path / "facts.md").read_text()
    assert "influence eval facts" in md and "--quick" in md and "top-10" in md


def test_across_models_gives_mean_and_range_per_method():
    from pipelines.eval.facts import across_models

    def row(seed, method, c_mrr, p_mrr, c_rec):
        return {"model_seed": seed, "method": method, "track": "mlp", "normalize": "none", "corpus_recall@10": c_rec,
                "corpus_mrr": c_mrr, "paraphrase_recall@10": 0.5, "paraphrase_mrr": p_mrr}

    rows = [row(0, "EK-FAC", 0.5, 0.1, 1.0), row(0, "BM25", 1.0, 0.8, 1.0),
            row(1, "EK-FAC", 0.7, 0.3, 0.5), row(1, "BM25", 1.0, 0.9, 1.0), row(2, "EK-FAC", 0.9, 0.2, 0.0)]
    out = across_models(rows)
    assert [r["method"] for r in out] == ["EK-FAC", "BM25"]
    ek = out[0]
    assert ek["models"] == 3 and ek["corpus_recall@10"] == pytest.approx(0.5)
    assert (ek["corpus_mrr"], ek["corpus_mrr_min"], ek["corpus_mrr_max"]) == pytest.approx((0.7, 0.5, 0.9))
    assert (ek["paraphrase_mrr"], ek["paraphrase_mrr_min"], ek["paraphrase_mrr_max"]) == pytest.approx((0.2, 0.1, 0.3))
    assert out[1]["models"] == 2 and out[1]["paraphrase_mrr"] == pytest.approx(0.85)


def test_a_model_seed_trains_its_own_model_and_the_same_seed_the_same_one(tmp_path):
    from safetensors.torch import load_file

    from pipelines.eval.facts_world import QUICK, build_world

    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_world(tmp_path / name, QUICK, seed)
        weights[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    assert weights["a"].keys() == weights["c"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert not all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
