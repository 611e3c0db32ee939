"""The two tiny models of ``influence eval exact``, one trained model per model seed, with brute-force gradients.

Symbols: N training examples (sequences for the LM), Q queries, P tracked parameters.

The data (training set and queries) is the same for every model seed; the seed
sets the initialization of the model and, for the LM, the order of its training
minibatches (the classifier trains full-batch, so its seed is the initialization
alone). Everything is float64. The fitting batches hold the whole training set in
one batch: EK-FAC's sums do not depend on the batching, and the expected Fisher
costs one backward pass per (label position, class) pair per batch, so one batch
is the cheapest way to fit it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import influence_ops as ops
from influence_ops.objectives import token_nll

from .ggn import flat_gradient, num_params
from .tiny import (ClassBatch, ClassifierObjective, classifier_data, mlp_classifier, pattern_sequences, tiny_lm,
                   train_classifier, train_lm)


@dataclass
class Setup:
    """A tiny trained model with its data and the brute-force gradients.

    Attributes:
        train_grads: [N, P] gradients of the training losses (true labels).
        query_grads: [Q, P] gradients of the queries' NLL.
        examples: N callables returning an example's outputs [M, V] (for the GGN).
        fit_batches: the training set as batches for ``ops.fit_ekfac``.
    """

    name: str
    model: nn.Module
    layers: list[ops.TrackedLayer]
    objective: Any
    fit_batches: list[Any]
    examples: list[Callable[[], torch.Tensor]]
    train_grads: torch.Tensor
    query_grads: torch.Tensor


def classifier_setup(quick: bool, seed: int = 0) -> Setup:
    """MLP 6 -> 32 -> 32 -> 5 (tanh), 256 Gaussian-cluster examples (10% label noise), 32 held-out queries."""
    n, d, hidden, classes, q = (16, 4, 6, 3, 4) if quick else (256, 6, 32, 5, 32)
    x, y = classifier_data(n + q, d, classes, seed=0)
    (x, xq), (y, yq) = x.split([n, q]), y.split([n, q])  # training set, held-out queries
    model = mlp_classifier(d, hidden, classes, seed=seed)
    train_classifier(model, x, y, steps=30 if quick else 100)
    layers = ops.find_mlp_layers(model, pattern=r"^(0|2|4)$")
    ce = nn.functional.cross_entropy

    def grad(xs: torch.Tensor, ys: torch.Tensor, i: int) -> torch.Tensor:
        return flat_gradient(ce(model(xs[i:i + 1]), ys[i:i + 1], reduction="sum"), layers)

    train_grads = torch.stack([grad(x, y, i) for i in range(n)])
    query_grads = torch.stack([grad(xq, yq, i) for i in range(q)])
    examples = [lambda i=i: model(x[i:i + 1]) for i in range(n)]
    return Setup(f"MLP classifier ({num_params(layers)} tracked parameters, {n} examples)", model, layers,
                 ClassifierObjective(), [ClassBatch(x, y)], examples, train_grads, query_grads)


def lm_setup(quick: bool, seed: int = 0) -> Setup:
    """2-block GPT-2 (width 16, MLP 32, vocabulary 32) on 48 arithmetic-progression sequences; 32 queries."""
    vocab, width, inner, blocks, n, q = (12, 8, 8, 1, 8, 3) if quick else (32, 16, 32, 2, 48, 32)
    seqs = pattern_sequences(n, vocab, 5, 9, seed=0)
    model = tiny_lm(vocab, width, inner, blocks, seed=seed)
    train_lm(model, pattern_sequences(4 * n, vocab, 5, 9, seed=1) + seqs, steps=20 if quick else 200, seed=seed)
    layers = ops.find_mlp_layers(model)
    train_grads = []
    for s in seqs:
        b = ops.collate([s])
        logits = model(input_ids=b.input_ids).logits
        train_grads.append(flat_gradient(token_nll(logits, b.labels).sum(), layers))
    query_grads = []
    for s in pattern_sequences(q, vocab, 6, 8, seed=2):
        b = ops.query_batch([s[:4]], [s[4:]])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        query_grads.append(flat_gradient(token_nll(logits, b.labels).sum(), layers))
    examples = [lambda s=s: model(input_ids=torch.tensor([s])).logits[0, :-1] for s in seqs]
    return Setup(f"GPT-2, {blocks} block(s) ({num_params(layers)} tracked parameters, {n} sequences)", model,
                 layers, ops.LanguageModelObjective(), [ops.collate(seqs)], examples, torch.stack(train_grads),
                 torch.stack(query_grads))
