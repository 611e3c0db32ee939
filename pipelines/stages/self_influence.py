"""The self-influence of every scored sequence: ``<output>/self_influence/<shard name>.parquet``.

self_influence = g^T (G + lambda I)^-1 g summed over the tracked layers, with g
the gradient of the sequence's summed loss and the damping of the queries
(``influence_ops.self_influence``). It is the paper's outlier signal: sequences
the model finds hard to fit, memorized or mislabeled text rank high. Written by
the score stage (``scoring.self_influence = true``, or ``normalize = cosine``,
which needs it) before the shard's scores file. Columns:

    doc_id string, shard string, self_influence float64, tokens int32 (length in tokens)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

SELF_INFLUENCE_SCHEMA = pa.schema([("doc_id", pa.string()), ("shard", pa.string()),
                                   ("self_influence", pa.float64()), ("tokens", pa.int32())])


def self_influence_url(scores_url: str) -> str:
    """``<output>/self_influence/<name>.parquet`` for the scores file ``<output>/scores/<name>.parquet``."""
    folder, name = scores_url.rsplit("/", 1)
    return f"{folder.rsplit('/', 1)[0]}/self_influence/{name}"


class SelfInfluenceRows:
    """Collects (doc_id, self-influence, tokens) batch by batch for one shard."""

    def __init__(self) -> None:
        self.doc_ids: list[str] = []
        self.values: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []

    def update(self, doc_ids: list[str], values: torch.Tensor, lengths: np.ndarray) -> None:
        """values: [B] self-influence of the batch's sequences, in ``doc_ids`` order."""
        self.doc_ids += [str(d) for d in doc_ids]
        self.values.append(values.detach().to("cpu", torch.float64).numpy())
        self.tokens.append(np.asarray(lengths, dtype=np.int32))

    def table(self, shard: str) -> pa.Table:
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype))
        return pa.table({"doc_id": pa.array(self.doc_ids, pa.string()),
                         "shard": pa.array([shard] * len(self.doc_ids), pa.string()),
                         "self_influence": pa.array(cat(self.values, np.float64), pa.float64()),
                         "tokens": pa.array(cat(self.tokens, np.int32), pa.int32())}, schema=SELF_INFLUENCE_SCHEMA)
