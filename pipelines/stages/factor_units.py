"""The per-unit workers of `fit-factors`: stage 1 (covariance sums) and stage 3 (Lambda sums) on one unit.

A unit (``sampling.Unit``) is a slice of the fitting sample within one shard. Each worker is a
Ray Data callable on the actor pool: it loads the model once, reads its unit's rows, and writes
the unit's partial sums as safetensors bytes to ``<factors>/_partials/stage{1,3}/unit-NNNNN.safetensors``
(metadata: the inputs key, the unit's doc ids and tokens, the model's fingerprint), returning one
small row per unit. Label draws are seeded per sequence (``sequence_seed``: seed, stage, doc_id),
so the sums do not depend on the batch size or the order of the work. The driver side
(``fit_factors.py``) plans the units and adds nothing itself; the per-layer tasks that reduce the
partials are in ``factor_layers.py``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from influence_ops import Fisher, fit_covariances, fit_lambda, model_fingerprint

from ..config import ModelConfig
from ..io import storage
from ..io.model_loading import load_model, pick_device
from ..io.payloads import covariances_to_bytes, lambda_to_bytes
from ..io.shards import read_rows
from ..runtime.batching import token_batches
from ..runtime.failures import guard
from ..runtime.ray_runtime import set_threads, units_of
from .factor_layers import load_layer_eigen
from .sampling import Unit


def unit_seed(seed: int, stage: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, stage, index]).generate_state(1)[0])


def sequence_seed(seed: int, stage: int, doc_id: str) -> int:
    """The seed of one sequence's label draws in a fitting stage: fixed by (seed, stage, doc_id) alone.

    So the draws do not depend on the batch size, the padding, the unit size or the
    order of the work (``TokenBatch.seeds``), and batch size is a performance setting only.
    """
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int(np.random.SeedSequence([seed, stage, int.from_bytes(digest, "little")]).generate_state(1)[0]) >> 1


class _FitWorker:
    """Shared part of the two fitting callables: the model, and a unit's batches.

    A unit is ``{index, shard, rows, partial, key}``: the callable writes the
    unit's partial sums to ``partial`` (metadata: ``key``, the unit's doc ids and
    tokens) and returns a small row (index, tokens, the model's fingerprint).
    """

    stage = 0  # 1: covariances, 3: Lambda (the stage's label draws are seeded per sequence with it)

    def __init__(self, model: ModelConfig, fisher: str, seed: int, batch_size: int, threads: int = 0,
                 use_gpu: bool = False, too_long: str = "error", samples: int = 1, passes: int | None = None) -> None:
        set_threads(threads)
        self.m = load_model(model, pick_device(use_gpu))
        self.fisher, self.seed, self.batch_size, self.samples = Fisher(fisher), seed, batch_size, samples
        self.passes = passes  # factors.fisher_passes (stage 1) or lambda_passes (stage 3)
        self.too_long = too_long  # data.too_long: sequences longer than the model's context
        self.fingerprint = model_fingerprint(self.m.layers)
        self.layers = json.dumps([[l.name, list(l.shape)] for l in self.m.layers])

    def _batches(self, unit: Unit) -> tuple[list[str], list[Any], int]:
        seqs = read_rows(unit.shard, np.asarray(unit.rows), self.m.vocab_size, context=self.m.context,
                         too_long=self.too_long)
        pairs = list(token_batches(seqs, self.batch_size, device=self.m.device))
        for part, batch in pairs:
            batch.seeds = torch.tensor([sequence_seed(self.seed, self.stage, d) for d in part.doc_ids],
                                       dtype=torch.int64)
        tokens = int(sum(b.attention_mask.sum() for _, b in pairs))
        return [d for p, _ in pairs for d in p.doc_ids], [b for _, b in pairs], tokens

    def fit(self, unit: Unit, batches: list[Any], extra: dict[str, str]) -> bytes:
        raise NotImplementedError

    def fit_unit(self, u: dict[str, Any]) -> int:
        """Fit one unit and write its partial sums; returns its tokens."""
        unit = Unit.from_json(u)
        doc_ids, batches, tokens = self._batches(unit)
        extra = {"key": u["key"], "doc_ids": json.dumps(doc_ids), "unit_tokens": str(tokens),
                 "fingerprint": self.fingerprint}
        storage.write_bytes(u["partial"], self.fit(unit, batches, extra))
        return tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"index": [], "tokens": [], "fingerprint": [], "layers": [], "error": [],
                                "doc_id": []}
        for u in units_of(batch):
            tokens, failure = guard(u["shard"], self.fit_unit, u)
            out["index"].append(int(u["index"]))
            out["tokens"].append(tokens or 0)
            out["fingerprint"].append(self.fingerprint)
            out["layers"].append(self.layers)
            out["error"].append(failure["error"] if failure else "")
            out["doc_id"].append((failure or {}).get("doc_id") or "")
        return {"index": np.asarray(out["index"]), "tokens": np.asarray(out["tokens"]),
                **{k: np.asarray(out[k], dtype=object) for k in ("fingerprint", "layers", "error", "doc_id")}}


class CovarianceWorker(_FitWorker):
    """Stage 1 on a unit: the stage-1 sums as safetensors bytes."""

    stage = 1

    def fit(self, unit: Unit, batches: list[Any], extra: dict[str, str]) -> bytes:
        cov = fit_covariances(self.m.model, self.m.layers, batches, self.fisher, unit_seed(self.seed, 1, unit.index),
                              autocast_dtype=self.m.autocast, samples=self.samples, passes=self.passes)
        return covariances_to_bytes(cov, extra)


class LambdaWorker(_FitWorker):
    """Stage 3 on a unit, given every layer's stage-2 file (in layer order): Lambda sums as bytes."""

    stage = 3

    def __init__(self, stage2: list[str], lambda_samples: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples = lambda_samples
        self.eigen = {l.name: load_layer_eigen(url) for l, url in zip(self.m.layers, stage2)}

    def fit(self, unit: Unit, batches: list[Any], extra: dict[str, str]) -> bytes:
        lam = fit_lambda(self.m.model, self.m.layers, self.eigen, batches, self.fisher,
                         unit_seed(self.seed, 3, unit.index), autocast_dtype=self.m.autocast, samples=self.samples,
                         passes=self.passes)
        return lambda_to_bytes(lam, extra)
