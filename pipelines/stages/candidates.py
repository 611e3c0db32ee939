"""Candidate sets for ``scoring.mode = index | tfidf``: found, stored, read back for the exact re-scoring.

A candidate set is ``{query_id: {(doc_id, shard): found_by}}``. ``find_candidates`` asks the
influence index (``index_query.py``) or TF-IDF (``tfidf.py``'s ``tfidf_topn``) for the best
``scoring.candidates`` sequences per query (in index mode, with ``scoring.tfidf_candidates`` > 0,
TF-IDF's best that many are added: ``with_tfidf``) and writes them to
``<output>/candidates/candidates.parquet`` (query_id, doc_id, shard, found_by, and for the index
index_score, index_top_rank, index_bottom_rank: its estimate and rank on each side's list, null
for TF-IDF or off that list), which the merge step (``rescore.py``) reads, so `score` and `merge`
can run as separate commands. A file written before the index columns existed still reads: its
candidates are re-scored as before, without the index health report (``read_candidates``).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ..config import JobConfig, ScoringMode
from ..errors import UserError
from ..io import storage
from .index_health import Estimates, IndexEstimate
from .index_query import Candidates, query_index
from .tfidf import query_tokens, tfidf_topn

CANDIDATES = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("shard", pa.string()),
                        ("found_by", pa.string()), ("index_score", pa.float64()), ("index_top_rank", pa.int32()),
                        ("index_bottom_rank", pa.int32())])
ESTIMATE_COLUMNS = ("index_score", "index_top_rank", "index_bottom_rank")


def candidates_url(cfg: JobConfig) -> str:
    return storage.join(cfg.data.output, "candidates", "candidates.parquet")


def save_candidates(cfg: JobConfig, candidates: Candidates, estimates: Estimates | None = None) -> None:
    """Write candidates.parquet; ``estimates`` (index mode) fill the index columns, else they are null."""
    rows = []
    for q, found in candidates.items():
        for (d, s), f in found.items():
            e = (estimates or {}).get(q, {}).get((d, s))
            rows.append((q, d, s, f) + ((e.score, e.top_rank, e.bottom_rank) if e else (None, None, None)))
    rows.sort(key=lambda r: r[:4])
    cols = list(map(list, zip(*rows))) if rows else [[]] * len(CANDIDATES)
    storage.write_parquet(candidates_url(cfg), pa.table(cols, schema=CANDIDATES))


def read_candidates(cfg: JobConfig) -> tuple[Candidates, Estimates | None]:
    """The candidates, and their index estimates (None when the file has none: TF-IDF candidates, or a file
    written before the index columns existed)."""
    url = candidates_url(cfg)
    if not storage.exists(url):
        raise UserError(f"{url} does not exist: run `influence score` (scoring.mode = {cfg.scoring.mode.value}) first")
    table = storage.read_parquet(url)
    with_estimates = set(ESTIMATE_COLUMNS) <= set(table.column_names) and table.num_rows > 0 and \
        table.column("index_score").null_count < table.num_rows
    out: Candidates = {}
    estimates: Estimates = {}
    for r in table.to_pylist():
        key = (r["doc_id"], r["shard"])
        out.setdefault(r["query_id"], {})[key] = r["found_by"]
        if with_estimates and r["index_score"] is not None:
            estimates.setdefault(r["query_id"], {})[key] = IndexEstimate(r["index_score"], r["index_top_rank"],
                                                                         r["index_bottom_rank"])
    return out, (estimates if with_estimates else None)


def load_candidates(cfg: JobConfig) -> Candidates:
    return read_candidates(cfg)[0]


def tfidf_candidates(cfg: JobConfig, n: int) -> Candidates:
    """TF-IDF's best n per query (query tokens: prompt + completion, ``tfidf.query_tokens``)."""
    tokens = query_tokens(cfg)
    found = tfidf_topn(cfg, tokens, n)
    return {q: {(d, s): "tfidf" for d, s, _ in found.get(q, [])} for q in tokens}


def with_tfidf(index: Candidates, tfidf: Candidates) -> Candidates:
    """The union of the index's and TF-IDF's candidates per query (``scoring.tfidf_candidates``); found_by says
    which found each: ``index``, ``tfidf`` or ``index+tfidf``."""
    out: Candidates = {q: dict(found) for q, found in index.items()}
    for q, found in tfidf.items():
        mine = out.setdefault(q, {})
        for key in found:
            mine[key] = "index+tfidf" if key in mine else "tfidf"
    return out


def find_candidates(cfg: JobConfig) -> dict[str, Any]:
    """Candidates of the job's mode (index: the index must be built), written to candidates/; returns counts."""
    estimates = None
    if cfg.scoring.mode == ScoringMode.INDEX:
        found, estimates, info = query_index(cfg)
        if cfg.scoring.tfidf_candidates:
            lexical = tfidf_candidates(cfg, cfg.scoring.tfidf_candidates)
            found = with_tfidf(found, lexical)
            info["tfidf_candidates"] = cfg.scoring.tfidf_candidates
            info["tfidf_only"] = sum(f == "tfidf" for q in found.values() for f in q.values())
    elif cfg.scoring.mode == ScoringMode.TFIDF:
        found, info = tfidf_candidates(cfg, cfg.scoring.candidates), {}
    else:
        raise ValueError(f"scoring.mode = {cfg.scoring.mode.value!r} has no candidates")
    save_candidates(cfg, found, estimates)
    return {**info, "mode": cfg.scoring.mode.value, "pairs": sum(len(f) for f in found.values())}
