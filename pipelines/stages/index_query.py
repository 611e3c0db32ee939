"""Queries against the influence index: top-M and bottom-M candidates per query, exact over the whole index.

The queries (tokenized by ``build-queries``: ``queries/queries.parquet``) are compressed
with the index's projections on an actor (``QueryCompressor``: one forward/backward per
query batch) and preconditioned in the projected space with Lambda~ of the current
factors (``refit_preconditioner``, ``precondition``). Every index part is then scored
with one matrix product [N, D] x [D, Q] on actors (a Ray Data pass over the parts:
``index_search.py``), each part's top-M and bottom-M per query folded into a
``TopKAccumulator`` on the driver: the union of the parts' top-M holds the global
top-M (ties broken by (doc_id, shard)), so the candidates are exactly the index's best M.
With ``index.search = "faiss"`` the driver searches the whole index in memory instead
(``index_faiss.py``: exact inner products, the same candidates) when it fits.

Candidates are ``{query_id: {(doc_id, shard): found_by}}`` (``found_by = "index"``), the
set that ``rescore.py`` scores exactly (``tfidf`` candidates have the same form); each one's index
estimate and rank on each side's list (``estimates_of``) go along for the index health report
(``index_health.py``).
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from influence_ops import TopKAccumulator, backward_pass, load_factors, query_batch
from influence_ops.index_projection import compress, load_projection, precondition, refit_preconditioner
from influence_ops.fisher import Fisher
from influence_ops.objectives import LanguageModelObjective

from ..config import IndexSearch, JobConfig, ModelConfig
from ..io import storage
from ..io.model_loading import load_model, pick_device
from ..runtime.ray_runtime import ensure_ray, run_units, set_threads, units_of
from .index_build import current_parts, index_url
from .index_faiss import faiss_candidates
from .index_health import Estimates, IndexEstimate
from .index_search import top_candidates
from .merge import split_key

Candidates = dict[str, dict[tuple[str, str], str]]


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


class QueryCompressor:
    """Ray Data callable: ``{"unit": [JSON {index, prompt_ids, completion_ids}]}`` -> compressed query gradients.

    Returns per unit ``rows``: an .npy of [Q_unit, D] float64 (not yet preconditioned).
    """

    def __init__(self, model: ModelConfig, projection_url: str, batch_size: int, threads: int = 0,
                 use_gpu: bool = False) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        compute = torch.float64 if next(self.m.model.parameters()).dtype == torch.float64 else torch.float32
        self.proj = load_projection(storage.local_copy(projection_url)).to(self.m.device, compute)
        self.batch_size = batch_size

    def compress(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> np.ndarray:
        out = []
        for lo in range(0, len(prompt_ids), self.batch_size):
            batch = query_batch(prompt_ids[lo:lo + self.batch_size], completion_ids[lo:lo + self.batch_size])
            res = backward_pass(self.m.model, self.m.layers, LanguageModelObjective(), batch.to(self.m.device),
                                Fisher.EMPIRICAL, None, self.m.autocast)
            out.append(compress(self.proj, res.captured.activations, res.captured.output_grads).cpu().double())
        return torch.cat(out).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"index": [], "rows": []}
        for unit in units_of(batch):
            rows["index"].append(unit["index"])
            rows["rows"].append(_npy(self.compress(unit["prompt_ids"], unit["completion_ids"])))
        return {"index": np.asarray(rows["index"]), "rows": np.asarray(rows["rows"], dtype=object)}


def query_rows(cfg: JobConfig) -> tuple[list[str], torch.Tensor]:
    """Query ids and their preconditioned compressed gradients P~ [Q, D] float64 (actors do the model work)."""
    table = storage.read_parquet(storage.join(cfg.data.output, "queries", "queries.parquet"))
    ids = table.column("query_id").to_pylist()
    prompts, completions = table.column("prompt_ids").to_pylist(), table.column("completion_ids").to_pylist()
    per_unit = cfg.scoring.query_batches_per_unit * cfg.resources.batch_size
    units = [{"index": i, "prompt_ids": prompts[lo:lo + per_unit], "completion_ids": completions[lo:lo + per_unit]}
             for i, lo in enumerate(range(0, len(ids), per_unit))]
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "projection_url": index_url(cfg, "projection"),
            "batch_size": cfg.resources.batch_size, "threads": cfg.resources.threads_per_actor,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0}
    parts = {int(r["index"]): np.load(io.BytesIO(r["rows"])) for r in run_units(QueryCompressor, args, units,
                                                                                  cfg.resources, cluster)}
    raw = torch.from_numpy(np.concatenate([parts[i] for i in range(len(units))]))  # (Q, D)
    proj = load_projection(storage.local_copy(index_url(cfg, "projection")))
    factors = load_factors(storage.local_copy(storage.join(cfg.data.output, "factors")))
    return ids, precondition(refit_preconditioner(proj, factors, cfg.factors.damping), raw)


def candidates_of(acc: TopKAccumulator, query_ids: list[str], found_by: str = "index") -> Candidates:
    """{query_id: {(doc_id, shard): found_by}} from the top and bottom sides of ``acc``."""
    out: Candidates = {}
    for q, qid in enumerate(query_ids):
        keys = list(acc.top.ids[q]) + list(acc.bottom.ids[q])
        out[qid] = {split_key(str(k)): found_by for k in keys}
    return out


def estimates_of(acc: TopKAccumulator, query_ids: list[str]) -> Estimates:
    """{query_id: {(doc_id, shard): IndexEstimate}}: each candidate's index score and its rank (1 = first) on the
    top and bottom lists of ``acc`` (None on a list that does not hold it)."""
    out: Estimates = {}
    for q, qid in enumerate(query_ids):
        score: dict[str, float] = {}
        ranks: dict[str, dict[str, int]] = {"top": {}, "bottom": {}}
        for name, side in (("top", acc.top), ("bottom", acc.bottom)):
            for r, (key, s) in enumerate(zip(side.ids[q], side.scores[q]), start=1):
                score[str(key)] = float(s)
                ranks[name][str(key)] = r
        out[qid] = {split_key(k): IndexEstimate(v, ranks["top"].get(k), ranks["bottom"].get(k))
                    for k, v in score.items()}
    return out


def search_index(cfg: JobConfig, part_urls: list[str], P: np.ndarray, m: int) -> tuple[TopKAccumulator, str]:
    """The top-M and bottom-M of each query (P: [Q, D]) with ``index.search``, and the search that ran
    (``faiss`` falls back to ``scan`` when the index does not fit in memory: ``index_faiss.py``)."""
    if cfg.index.search == IndexSearch.FAISS:
        acc = faiss_candidates(cfg, part_urls, P, m)
        if acc is not None:
            return acc, IndexSearch.FAISS.value
    return top_candidates(cfg, part_urls, P, m), IndexSearch.SCAN.value


def query_index(cfg: JobConfig) -> tuple[Candidates, Estimates, dict[str, Any]]:
    """Candidates of every query from the (current) index parts, their index estimates and ranks, and the time
    each step took."""
    start = time.perf_counter()
    present = current_parts(cfg)
    ids, P = query_rows(cfg)
    prepared = time.perf_counter()
    acc, search = search_index(cfg, present, P.numpy(), cfg.scoring.candidates)
    info = {"queries": len(ids), "parts": len(present), "sequences": acc.seen, "candidates": cfg.scoring.candidates,
            "search": search,
            "prepare_seconds": round(prepared - start, 3), "search_seconds": round(time.perf_counter() - prepared, 3)}
    return candidates_of(acc, ids), estimates_of(acc, ids), info
