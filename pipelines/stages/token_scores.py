"""The merged rows in detail (a second, small pass): their text, token counts, per-layer and per-token scores.

Only the sequences named in topk/ are read again (grouped by shard, one unit
per shard) and scored with ``per_layer=True`` (and ``per_token=True`` when the
job asks for token scores). For training token position t, the contribution
is c_t = sum_l g_{t,l}^T P_l a_{t,l}: a_{t,l} the layer's input at token t,
g_{t,l} the gradient of the sequence's loss with respect to the layer's output
at position t (the loss of predicting token t+1, plus later positions' losses
through attention; 0 for the last token). sum_t c_t and the sum over layers
both equal the sequence's score.

Text: the shard's ``text`` column when present, else the ids decoded with the
model's tokenizer (``io.token_text``); with neither, null.

``<output>/token_scores/query_id=<id>/part-0.parquet`` (hive partitioning).
Columns: doc_id string, shard string, token_index int32, token_id int32, token
string (the token's text, with the whitespace before it: a sequence's tokens
concatenated give its decoded text; null without a tokenizer), score float64.

``<output>/layer_scores/query_id=<id>/part-0.parquet``. Columns: doc_id string,
shard string, layer_index int32, layer string (module name), score float64,
score_normalized float64; a row's layers sum to its score.

Every row is keyed by (doc_id, shard), like topk/: the details of two
sequences that share a doc_id in different shards are never mixed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_ops import score_batch

from ..config import JobConfig
from ..io import storage
from ..io.model_loading import load_tokenizer
from ..io.model_source import has_tokenizer
from ..io.shards import read_rows
from ..io.token_text import read_texts, token_pieces
from ..runtime.batching import token_batches
from ..runtime.progress import bar
from ..runtime.ray_runtime import ensure_ray, run_units, units_of
from .score import ShardScorer

TOKEN_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.string()), ("token_index", pa.int32()),
                          ("token_id", pa.int32()), ("token", pa.string()), ("score", pa.float64())])
LAYER_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.string()), ("layer_index", pa.int32()),
                          ("layer", pa.string()), ("score", pa.float64()), ("score_normalized", pa.float64())])
DOC_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("shard", pa.string()),
                        ("tokens", pa.int32()), ("text", pa.string()), ("layer_scores", pa.list_(pa.float64()))])


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class TokenScorer(ShardScorer):
    """Ray Data callable: ``{"unit": [JSON {shard, pairs: [[query_id, doc_id], ...]}]}`` -> one row per unit.

    The row holds two Arrow IPC payloads: ``docs`` (DOC_SCHEMA: one row per
    pair) and ``tokens`` (query_id + TOKEN_SCHEMA; empty unless ``per_token``).
    """

    def __init__(self, *args: Any, per_token: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_token = per_token
        self.tokenizer = load_tokenizer(kwargs["model"]) if has_tokenizer(kwargs["model"]) else None

    def detail(self, unit: dict[str, Any]) -> tuple[pa.Table, pa.Table]:
        """(doc rows, token rows) of one unit."""
        docs: dict[str, list] = {n: [] for n in DOC_SCHEMA.names}
        toks: dict[str, list] = {"query_id": [], **{n: [] for n in TOKEN_SCHEMA.names}}
        q_index = {q: i for i, q in enumerate(self.queries.query_ids)}
        wanted: dict[str, list[str]] = defaultdict(list)
        for qid, doc in unit["pairs"]:
            wanted[doc].append(qid)
        seqs = read_rows(unit["shard"], None, self.m.vocab_size, doc_ids=set(wanted), context=self.m.context,
                         too_long=self.too_long)
        texts = read_texts(unit["shard"], set(wanted))
        for part, tb in token_batches(seqs, self.batch_size, device=self.m.device):
            result = score_batch(self.m.model, self.queries, tb, per_layer=True, per_token=self.per_token,
                                 autocast_dtype=self.m.autocast, factors=self.factors, normalize=self.normalize)
            per_layer = result.per_layer.cpu().double().numpy()
            per_token = result.per_token.cpu().double().numpy() if self.per_token else None
            for b, doc in enumerate(part.doc_ids):
                ids = part.input_ids[b]
                pieces = token_pieces(self.tokenizer, ids) if self.tokenizer is not None else None
                text = texts.get(doc, "".join(pieces) if pieces is not None else None)
                for qid in wanted[doc]:
                    for name, value in (("query_id", qid), ("doc_id", doc), ("shard", unit["shard"]),
                                        ("tokens", len(ids)), ("text", text),
                                        ("layer_scores", per_layer[q_index[qid], b].tolist())):
                        docs[name].append(value)
                    if per_token is not None:
                        toks["query_id"] += [qid] * len(ids)
                        toks["doc_id"] += [doc] * len(ids)
                        toks["shard"] += [unit["shard"]] * len(ids)
                        toks["token_index"] += range(len(ids))
                        toks["token_id"] += ids.tolist()
                        toks["token"] += pieces if pieces is not None else [None] * len(ids)
                        toks["score"] += per_token[q_index[qid], b, :len(ids)].tolist()
        token_schema = pa.schema([("query_id", pa.string()), *TOKEN_SCHEMA])
        return pa.table(docs, schema=DOC_SCHEMA), pa.table(toks, schema=token_schema)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"docs": [], "tokens": []}
        for unit in units_of(batch):
            docs, tokens = self.detail(unit)
            out["docs"].append(_ipc(docs))
            out["tokens"].append(_ipc(tokens))
        return {k: np.asarray(v, dtype=object) for k, v in out.items()}


def token_units(tables: dict[str, pa.Table]) -> list[dict[str, Any]]:
    """One unit per shard: the (query_id, doc_id) pairs of the merged rows held in that shard."""
    by_shard: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for qid, t in tables.items():
        for doc, shard in zip(t.column("doc_id").to_pylist(), t.column("shard").to_pylist()):
            by_shard[shard].add((qid, doc))
    return [{"shard": s, "pairs": sorted(p)} for s, p in sorted(by_shard.items())]


def _keys(table: pa.Table) -> list[tuple[str, str]]:
    """(doc_id, shard) of each row: the key of a sequence."""
    return list(zip(table.column("doc_id").to_pylist(), table.column("shard").to_pylist()))


def attach_details(table: pa.Table, docs: pa.Table) -> pa.Table:
    """One query's merged rows with ``tokens`` and ``text`` appended from DOC_SCHEMA rows, matched by (doc_id, shard).

    ``docs`` holds each sequence once; a sequence can be both a top and a bottom row of a small corpus.
    """
    by_key = {key: i for i, key in enumerate(_keys(docs))}
    matched = docs.take([by_key[key] for key in _keys(table)])
    return table.append_column("tokens", matched.column("tokens")).append_column("text", matched.column("text"))


def _max_sum_error(parts: pa.Table, value: str, tables: dict[str, pa.Table], qid: str) -> float:
    """Largest |sum over a row's parts - its score| / largest |score| of the query (rows keyed by (doc_id, shard))."""
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for key, s in zip(_keys(parts), parts.column(value).to_pylist()):
        sums[key] += s
    ref = dict(zip(_keys(tables[qid]), tables[qid].column("score").to_pylist()))
    scale = max(abs(v) for v in ref.values()) or 1.0
    return max(abs(sums[d] - ref[d]) / scale for d in ref)


def write_token_scores(cfg: JobConfig, tables: dict[str, pa.Table],
                       show_progress: bool = False) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Score the merged rows in detail; write layer_scores/ (and token_scores/ when asked).

    Returns the merged tables with ``tokens`` and ``text`` appended, and counts,
    the sum checks and the pass's time.
    """
    from .merge import partition

    start = time.perf_counter()
    units = token_units(tables)
    cluster = ensure_ray(cfg.resources)
    args = {"model": cfg.model, "queries_url": storage.join(cfg.data.output, "queries"),
            "top_k": cfg.scoring.top_k, "batch_size": cfg.resources.batch_size,
            "sort_window": cfg.scoring.sort_window, "threads": cfg.resources.threads_per_actor,
            "use_gpu": cluster.get("GPU", 0) > 0 and cfg.resources.gpus_per_actor != 0,
            "per_token": cfg.scoring.per_token, "too_long": cfg.data.too_long.value,
            "normalize": cfg.scoring.normalize.value,  # as the scores
            "factors_url": storage.join(cfg.data.output, "factors") if cfg.scoring.normalize == "cosine" else None}
    docs, tokens = [], []
    with bar(len(units), "merge (details)", show_progress) as progress:
        for row in run_units(TokenScorer, args, units, cfg.resources, cluster, progress):
            docs.append(_from_ipc(row["docs"]))
            tokens.append(_from_ipc(row["tokens"]))
    docs_t = pa.concat_tables(docs) if docs else DOC_SCHEMA.empty_table()
    tokens_t = pa.concat_tables(tokens) if tokens and cfg.scoring.per_token else None
    layer_names = _layer_names(cfg)
    factor_tokens = 1 if cfg.scoring.normalize == "cosine" else _factor_tokens(cfg)  # as score_normalized
    info: dict[str, Any] = {"layer_rows": 0, "max_relative_layer_sum_error": 0.0}
    if cfg.scoring.per_token:
        info.update(rows=0, max_relative_sum_error=0.0)
    enriched = {}
    for qid, table in sorted(tables.items()):
        mine = docs_t.filter(pc.equal(docs_t.column("query_id"), qid))
        enriched[qid] = attach_details(table, mine)
        layers = _layer_table(mine, layer_names, factor_tokens)
        storage.write_parquet(partition(cfg.data.output, "layer_scores", qid), layers)
        info["layer_rows"] += layers.num_rows
        info["max_relative_layer_sum_error"] = max(info["max_relative_layer_sum_error"],
                                                   _max_sum_error(layers, "score", tables, qid))
        if tokens_t is not None and cfg.scoring.per_token:
            t = tokens_t.filter(pc.equal(tokens_t.column("query_id"), qid)).drop_columns(["query_id"])
            t = t.sort_by([("doc_id", "ascending"), ("shard", "ascending"), ("token_index", "ascending")])
            storage.write_parquet(partition(cfg.data.output, "token_scores", qid), t)
            info["rows"] += t.num_rows
            info["max_relative_sum_error"] = max(info["max_relative_sum_error"],
                                                 _max_sum_error(t, "score", tables, qid))
    info["seconds"] = round(time.perf_counter() - start, 3)
    return enriched, info


def _layer_table(docs: pa.Table, layer_names: list[str], factor_tokens: int) -> pa.Table:
    """LAYER_SCHEMA rows sorted by (doc_id, shard), then layer order, from DOC_SCHEMA rows in any order.

    The units' rows arrive in the order the actors finish them; sorting makes the file the same on every run
    (a resumed job rewrites it byte for byte).
    """
    docs = docs.sort_by([("doc_id", "ascending"), ("shard", "ascending")])
    cols: dict[str, list] = {n: [] for n in LAYER_SCHEMA.names}
    for (doc, shard), scores in zip(_keys(docs), docs.column("layer_scores").to_pylist()):
        for i, (name, s) in enumerate(zip(layer_names, scores)):
            for key, value in (("doc_id", doc), ("shard", shard), ("layer_index", i), ("layer", name), ("score", s),
                               ("score_normalized", s / factor_tokens)):
                cols[key].append(value)
    return pa.table(cols, schema=LAYER_SCHEMA)


def _queries_meta(cfg: JobConfig) -> dict[str, Any]:
    return storage.read_json(storage.join(cfg.data.output, "queries", "queries.json")) or {}


def _layer_names(cfg: JobConfig) -> list[str]:
    return list(_queries_meta(cfg)["layers"])


def _factor_tokens(cfg: JobConfig) -> int:
    return int(_queries_meta(cfg)["factor_tokens"])
