"""Candidate sets for ``scoring.mode = index | tfidf``: found, stored, read back for the exact re-scoring.

A candidate set is ``{query_id: {(doc_id, shard): found_by}}``. ``find_candidates`` asks the
influence index (``index_query.py``) or TF-IDF (``tfidf.py``'s ``tfidf_topn``) for the best
``scoring.candidates`` sequences per query and writes them to
``<output>/candidates/candidates.parquet`` (query_id, doc_id, shard, found_by), which the
merge step (``rescore.py``) reads, so `score` and `merge` can run as separate commands.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..config import JobConfig, ScoringMode
from ..errors import UserError
from ..io import storage
from .index_query import Candidates, query_index
from .tfidf import query_tokens, tfidf_topn

CANDIDATES = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("shard", pa.string()),
                        ("found_by", pa.string())])


def candidates_url(cfg: JobConfig) -> str:
    return storage.join(cfg.data.output, "candidates", "candidates.parquet")


def save_candidates(cfg: JobConfig, candidates: Candidates) -> None:
    rows = sorted((q, d, s, f) for q, found in candidates.items() for (d, s), f in found.items())
    storage.write_parquet(candidates_url(cfg), pa.table(list(map(list, zip(*rows))) if rows else [[]] * 4,
                                                        schema=CANDIDATES))


def load_candidates(cfg: JobConfig) -> Candidates:
    url = candidates_url(cfg)
    if not storage.exists(url):
        raise UserError(f"{url} does not exist: run `influence score` (scoring.mode = {cfg.scoring.mode.value}) first")
    out: Candidates = {}
    for r in storage.read_parquet(url).to_pylist():
        out.setdefault(r["query_id"], {})[(r["doc_id"], r["shard"])] = r["found_by"]
    return out


def tfidf_candidates(cfg: JobConfig) -> Candidates:
    """TF-IDF's best ``scoring.candidates`` per query (query tokens: prompt + completion, ``tfidf.query_tokens``)."""
    tokens = query_tokens(cfg)
    found = tfidf_topn(cfg, tokens, cfg.scoring.candidates)
    return {q: {(d, s): "tfidf" for d, s, _ in found.get(q, [])} for q in tokens}


def find_candidates(cfg: JobConfig) -> dict[str, Any]:
    """Candidates of the job's mode (index: the index must be built), written to candidates/; returns counts."""
    if cfg.scoring.mode == ScoringMode.INDEX:
        found, info = query_index(cfg)
    elif cfg.scoring.mode == ScoringMode.TFIDF:
        found, info = tfidf_candidates(cfg), {}
    else:
        raise ValueError(f"scoring.mode = {cfg.scoring.mode.value!r} has no candidates")
    save_candidates(cfg, found)
    return {**info, "mode": cfg.scoring.mode.value, "pairs": sum(len(f) for f in found.values())}
