"""The world of ``influence eval facts``: its sizes, the planted-fact corpus on disk, the tiny GPT-2 trained on
it, and the job of each row of the suite.

``build_world`` writes the corpus (``facts_corpus.py``) as two JSONL files and the
queries file, trains the model until it recalls the corpus-phrased facts (greedy
recall per query set: ``lm_recall``) and saves it; ``job`` is the pipeline job of one
row (a scan, or ``scoring.mode = "tfidf"`` with n candidates), relative to that folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import influence_ops as ops

from ..demo.model import build_tokenizer, save_model, tiny_gpt2, train
from .exact import DEFAULT_FIT
from .facts_corpus import make_facts_corpus
from .stability import Variant

TRACKS = ("mlp", "mlp+attention")
NORMALIZES = ("none", "cosine", "train_norm")
SETS = ("corpus", "paraphrase")


@dataclass(frozen=True)
class Size:
    people: int
    towns: int
    jobs: int
    distractors: int
    width: int
    blocks: int
    epochs: int
    max_train_seconds: float
    tracks: tuple[str, ...]
    normalizes: tuple[str, ...]
    candidates: tuple[Variant, ...]
    pipeline_refit: bool  # also re-run the pipeline with the other factors.seed values
    seeds: tuple[int, ...]  # fitting seeds compared pairwise
    tfidf: tuple[tuple[str, int], ...]  # (scoring.normalize, scoring.candidates) of the tfidf-mode rows (mlp)
    tfidf_alone: bool  # the TF-IDF ranking alone (two more Ray passes)


FULL = Size(24, 10, 10, 216, 64, 2, 100, 600.0, TRACKS, NORMALIZES,
            (Variant("topm k=4 (4 / 4)", ops.Fisher.TOPM, 4),), True, (0, 1, 2),
            tuple((norm, n) for norm in NORMALIZES for n in (100, 50, 20)), True)  # 100: the product default
QUICK = Size(4, 3, 3, 16, 16, 1, 40, 10.0, ("mlp",), ("none", "cosine"), (), False, (0, 1), (("none", 10),), False)
OLD_DEFAULT = Variant("sampled k=1 (1 / 1), the old default", ops.Fisher.SAMPLED, 1)
_FISHER, _K, _K_LAMBDA = DEFAULT_FIT  # a job's default fit
DEFAULT = Variant(f"{_FISHER.value} k={_K} ({_K} / {_K_LAMBDA}), the default", _FISHER, _K, _K_LAMBDA)


@dataclass
class World:
    """The corpus, its trained model and the files a job reads."""

    work: Path
    docs: list[dict]
    queries: list[dict]
    sources: dict[str, str]  # doc id -> fact key ('' for distractors)
    recall: dict[str, float]  # query set -> greedy recall of the completion
    training: dict[str, float]
    vocab: int


def build_world(work: Path, size: Size, model_seed: int = 0) -> World:
    """Write the corpus and queries under ``work`` and train the model of ``model_seed`` (initialization and
    minibatch order) on it."""
    docs, facts, queries = make_facts_corpus(size.people, size.towns, size.jobs, 3, size.distractors, seed=0)
    raw = work / "raw"
    raw.mkdir(parents=True)
    for part in range(2):
        (raw / f"part-{part}.jsonl").write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n"
                                                        for d in docs[part::2]))
    (work / "queries.jsonl").write_text("".join(
        json.dumps({k: q[k] for k in ("query_id", "prompt", "completion")}) + "\n" for q in queries))
    tok = build_tokenizer([d["text"] for d in docs], work / "model")
    model = tiny_gpt2(len(tok), context=64, width=size.width, layers=size.blocks, heads=4 if size.width >= 32 else 2,
                      seed=model_seed)
    stats = train(model, [tok(d["text"])["input_ids"][:64] for d in docs], epochs=size.epochs,
                  max_seconds=size.max_train_seconds, seed=model_seed)
    save_model(model, work / "model")
    return World(work, docs, queries, {d["id"]: d["source_of"] for d in docs}, lm_recall(model, tok, queries),
                 stats, len(tok))


def lm_recall(model: torch.nn.Module, tok: Any, queries: list[dict]) -> dict[str, float]:
    """Per query set, the share of queries whose completion is the model's greedy continuation of the prompt."""
    hits: dict[str, list[bool]] = {s: [] for s in SETS}
    for q in queries:
        p = tok(q["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(q["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]  # (len(c), V)
        hits[q["set"]].append(logits.argmax(-1).tolist() == c)
    return {s: sum(h) / max(len(h), 1) for s, h in hits.items()}


def job(world: World, name: str, track: str, normalize: str, seed: int = 0, candidates: int | None = None) -> Any:
    """The job of one row: a scan, or with ``candidates`` the tfidf mode with that many per query."""
    from ..config import config_from_dict

    scoring = {"top_k": len(world.docs) + 10, "per_token": False, "normalize": normalize}
    if candidates is not None:
        scoring.update(mode="tfidf", candidates=candidates)
    raw = {"run_id": f"facts-{name}", "model": {"path": "model", "track": track},
           "data": {"raw": "raw", "corpus": "shards", "queries": "queries.jsonl", "output": name},
           "factors": {"seed": seed}, "scoring": scoring,
           "resources": {"actors": 1, "batch_size": 16, "object_store_mb": 512}}
    return config_from_dict(raw, base_dir=world.work)
