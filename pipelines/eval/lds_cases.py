"""The two setups of ``influence eval lds``, each retrainable on any subset of its training set in a second or so.

Symbols: N training examples, Q queries, P tracked parameters, M subsets.

- ``digits_case``: scikit-learn's bundled 8x8 digits (1,797 images, no
  download), an MLP 64 -> h -> h -> 10 (tanh) trained full-batch with Adam and
  weight decay; queries are held-out images, their loss the cross-entropy.
- ``lm_case``: a 2-block word-level GPT-2 on generated arithmetic-progression
  "sentences" (``tiny.pattern_sequences``), trained full-batch; queries are
  held-out sequences split into a 4-token prompt and the completion, their
  loss the summed NLL of the completion tokens.

Every retraining starts from a fresh initialization (``seed``) and sees only the
subset; the model the scores are computed on is the one trained on all N with
seed 0. Gradients are brute force (one backward per example, float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import influence_ops as ops
from influence_ops.objectives import token_nll

from .ggn import flat_gradient, num_params
from .tiny import ClassBatch, ClassifierObjective, mlp_classifier, pattern_sequences, tiny_lm


@dataclass
class LdsCase:
    """A trained model, its data and a way to retrain it on a subset.

    Attributes:
        train_grads: [N, P] gradients of the training losses (true labels).
        query_grads: [Q, P] gradients of the queries' losses.
        retrain: (mask [N] bool, seed) -> a model trained on the masked examples.
        query_losses: model -> [Q] the queries' losses under that model.
        kron: what ``kron.kronfluence_scores`` needs (kind, datasets, tracked module names).
    """

    name: str
    model: nn.Module
    layers: list[ops.TrackedLayer]
    objective: Any
    fit_batches: list[Any]
    train_grads: torch.Tensor
    query_grads: torch.Tensor
    retrain: Callable[[torch.Tensor, int], nn.Module]
    query_losses: Callable[[nn.Module], torch.Tensor]
    kron: dict[str, Any]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """x [1797, 64] float64 in [0, 1], y [1797] int64 (scikit-learn's bundled copy; no download)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("influence eval lds needs scikit-learn for the digits data: "
                           "pip install 'corpus-influence[eval]'") from exc
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float64) / 16.0, torch.tensor(data.target, dtype=torch.int64)


def train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int, steps: int) -> nn.Module:
    """Full-batch Adam on the mean cross-entropy, weight decay 1e-3; deterministic given ``seed``."""
    model = mlp_classifier(x.shape[1], hidden, 10, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def digits_case(quick: bool) -> LdsCase:
    n, q, hidden, steps = (64, 8, 8, 60) if quick else (512, 64, 24, 300)
    x, y = load_digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    xt, yt, xq, yq = x[:n], y[:n], x[n:n + q], y[n:n + q]
    model = train_mlp(xt, yt, hidden, 0, steps)
    layers = ops.find_mlp_layers(model, pattern=r"^(0|2|4)$")

    def grad(m: nn.Module, i: int, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return flat_gradient(F.cross_entropy(m(xs[i:i + 1]), ys[i:i + 1], reduction="sum"), layers)

    def query_losses(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return F.cross_entropy(m(xq), yq, reduction="none")

    acc = float((model(xq).argmax(-1) == yq).double().mean())
    return LdsCase(
        f"digits MLP 64-{hidden}-{hidden}-10 ({num_params(layers)} parameters; {n} train, {q} queries, "
        f"query accuracy {acc:.2f})",
        model, layers, ClassifierObjective(), [ClassBatch(xt[i:i + 64], yt[i:i + 64]) for i in range(0, n, 64)],
        torch.stack([grad(model, i, xt, yt) for i in range(n)]),
        torch.stack([grad(model, i, xq, yq) for i in range(q)]),
        lambda mask, seed: train_mlp(xt[mask], yt[mask], hidden, seed, steps), query_losses,
        {"kind": "classifier", "train": list(zip(xt, yt)), "queries": list(zip(xq, yq)),
         "modules": [l.name for l in layers]})


def train_gpt2(seqs: list[list[int]], vocab: int, width: int, blocks: int, seed: int, steps: int) -> nn.Module:
    """Full-batch Adam on the mean token NLL; deterministic given ``seed``."""
    model = tiny_lm(vocab, width, 2 * width, blocks, seed=seed)
    b = ops.collate(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2, weight_decay=1e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def lm_case(quick: bool) -> LdsCase:
    vocab, width, blocks, n, q, steps = (12, 8, 1, 16, 4, 20) if quick else (24, 16, 1, 96, 32, 80)
    seqs = pattern_sequences(n, vocab, 5, 9, seed=0)
    held = pattern_sequences(q, vocab, 7, 9, seed=2)
    prompts, completions = [s[:4] for s in held], [s[4:] for s in held]
    qb = ops.query_batch(prompts, completions)
    model = train_gpt2(seqs, vocab, width, blocks, 0, steps)
    layers = ops.find_mlp_layers(model)

    def nll(m: nn.Module, b: ops.TokenBatch) -> torch.Tensor:
        return token_nll(m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels).sum(-1)

    def query_losses(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return nll(m, qb)

    train_grads = torch.stack([flat_gradient(nll(model, ops.collate([s])).sum(), layers) for s in seqs])
    query_grads = torch.stack([flat_gradient(nll(model, ops.query_batch([p], [c])).sum(), layers)
                               for p, c in zip(prompts, completions)])
    return LdsCase(
        f"GPT-2 {blocks} block(s), width {width}, vocab {vocab} ({num_params(layers)} MLP parameters; "
        f"{n} train sequences, {q} queries)",
        model, layers, ops.LanguageModelObjective(), [ops.collate(seqs[i:i + 16]) for i in range(0, n, 16)],
        train_grads, query_grads,
        lambda mask, seed: train_gpt2([s for s, k in zip(seqs, mask.tolist()) if k], vocab, width, blocks, seed,
                                      steps),
        query_losses,
        {"kind": "lm", "train": [(s, s) for s in seqs],
         "queries": [(p + c, [ops.IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions)],
         "modules": [l.name for l in layers]})
