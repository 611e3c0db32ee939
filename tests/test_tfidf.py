"""TF-IDF candidates (pipelines/stages/tfidf.py) against a direct plain-Python BM25 on a tiny corpus.

The corpus has 3 shards with repeated token sets (exact score ties, inside a
shard and across shards, one doc_id present in two shards), so the tie-break
by (doc_id, shard) is exercised at the cut.
"""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import config_from_dict
from pipelines.stages import tfidf

QUERIES = {"q-a": [3, 5, 5, 7], "q-b": [1, 2], "q-rare": [19, 0], "q-none": [99], "q-long": list(range(12))}


def write_corpus(root) -> list[tuple[str, str, list[int]]]:
    """3 shards of token lists; returns (doc_id, shard path, ids) for every row."""
    rng = random.Random(7)
    docs = []
    root.mkdir(parents=True, exist_ok=True)
    for s in range(3):
        shard = str(root / f"part-{s}.parquet")
        rows = []
        for i in range(9 + 3 * s):
            ids = [rng.randrange(0, 18) for _ in range(rng.randint(2, 12))]
            rows.append((f"d{i:02d}", ids))
        rows.append(("twin", [3, 5, 9]))  # the same doc_id and tokens in every shard: exact ties
        rows.append((f"copy{s}", [3, 5, 9]))
        rows.append((f"rare{s}", [19] + [4] * (s + 1)))  # a shard row has 2 tokens or more
        pq.write_table(pa.table({"doc_id": [d for d, _ in rows],
                                 "input_ids": pa.array([ids for _, ids in rows], pa.list_(pa.int32()))}), shard)
        docs += [(d, shard, ids) for d, ids in rows]
    return docs


def direct_scores(docs, queries) -> dict[str, list[tuple[str, str, float]]]:
    """BM25, binary presence, k1 = 1.5, b = 0.75, idf on the 2^-24 grid: every (doc, query) with a match."""
    n = len(docs)
    avgdl = sum(len(ids) for _, _, ids in docs) / n
    df = {}
    for _, _, ids in docs:
        for t in set(ids):
            df[t] = df.get(t, 0) + 1
    out = {}
    for qid, q in queries.items():
        found = []
        for doc_id, shard, ids in docs:
            common = set(q) & set(ids)
            if not common:
                continue
            s = sum(round(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * 2**24) / 2**24 for t in common)
            found.append((doc_id, shard, s * ((1.5 + 1) / (1 + 1.5 * (1 - 0.75 + 0.75 * len(ids) / avgdl)))))
        out[qid] = sorted(found, key=lambda c: (-c[2], c[0], c[1]))
    return out


def local_topn(docs, queries, n, window_rows=tfidf.WINDOW_ROWS):
    """``tfidf_topn``'s two passes with the Ray callables called directly, shard by shard."""
    shards = sorted({s for _, s, _ in docs})
    terms = sorted({t for ids in queries.values() for t in ids})
    counter = tfidf.TermCounter(terms, window_rows)
    counts = [counter.count(s) for s in shards]
    total = sum(c[0] for c in counts)
    dfs = sum(c[2] for c in counts)
    scorer = tfidf.TopNScorer(terms, [tfidf.idf(int(f), total) for f in dfs], tfidf.query_terms(queries, terms),
                              sum(c[1] for c in counts) / total, n, window_rows)
    merged = tfidf.merge_candidates((json.loads(json.dumps(scorer.top_shard(s))) for s in shards), len(queries), n)
    return dict(zip(queries, [[tuple(c) for c in m] for m in merged]))


@pytest.fixture
def corpus(tmp_path):
    return tmp_path, write_corpus(tmp_path / "shards")


def test_scores_equal_direct_bm25(corpus):
    _, docs = corpus
    want = direct_scores(docs, QUERIES)
    got = local_topn(docs, QUERIES, n=len(docs))  # n >= corpus: every matching sequence
    for qid in QUERIES:
        assert got[qid] == want[qid], qid  # exact: idf on the grid makes every sum exact
    assert want["q-none"] == [] and len(want["q-a"]) > 10
    twins = [c for c in want["q-a"] if c[0] == "twin"]
    assert len(twins) == 3 and len({c[2] for c in twins}) == 1  # a real tie across shards


@pytest.mark.parametrize("n", [1, 3, 4, 7])
@pytest.mark.parametrize("window_rows", [2, 5, tfidf.WINDOW_ROWS])
def test_topn_is_the_sorted_direct_scores(corpus, n, window_rows):
    _, docs = corpus
    want = direct_scores(docs, QUERIES)
    got = local_topn(docs, QUERIES, n, window_rows)
    for qid in QUERIES:
        assert got[qid] == want[qid][:n], (qid, n, window_rows)


def test_ties_at_the_cut_follow_doc_id_then_shard(corpus):
    _, docs = corpus
    got = local_topn(docs, {"q": [3, 5, 9]}, n=5)["q"]
    tied = [c for c in got if c[0] in ("copy0", "copy1", "copy2", "twin")]
    assert [c[0] for c in tied] == sorted(c[0] for c in tied)
    twins = [c[1] for c in got if c[0] == "twin"]
    assert twins == sorted(twins)


def test_tfidf_topn_on_ray_equals_direct(corpus, ray_local):
    tmp, docs = corpus
    cfg = config_from_dict({"model": {"path": str(tmp / "no-model-needed")},
                            "data": {"corpus": str(tmp / "shards"), "queries": str(tmp / "q.jsonl"),
                                     "output": str(tmp / "out")},
                            "resources": {"actors": 2}})
    want = direct_scores(docs, QUERIES)
    got = tfidf.tfidf_topn(cfg, QUERIES, 4)
    assert list(got) == list(QUERIES)
    for qid in QUERIES:
        assert got[qid] == want[qid][:4], qid
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        tfidf.tfidf_topn(cfg, QUERIES, 0)
