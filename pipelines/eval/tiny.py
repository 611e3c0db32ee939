"""Tiny models and data of the ``exact`` suite: an MLP classifier and a 2-block GPT-2, trained briefly.

Symbols: N examples, C classes, d input features.

The classifier runs through the engine with ``ClassifierObjective``: a batch is
(x [B, d], y [B]); each example is one "token" (mask [B, 1]); labels are the
data's (EMPIRICAL), drawn from the softmax (SAMPLED, k draws; TOPM: the k - 1 most probable
classes and one tail draw), or every class
weighted by its probability (EXPECTED), as ``LanguageModelObjective`` does for tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from influence_ops import Fisher
from influence_ops.label_draws import gaussian_probe, topm_terms


@dataclass
class ClassBatch:
    x: torch.Tensor  # (B, d)
    y: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return int(self.x.shape[0])


class ClassifierObjective:
    """Summed cross-entropy of a classifier; one position per example."""

    def _labels(self, logits: torch.Tensor, batch: ClassBatch, fisher: Fisher,
                generator: torch.Generator | None) -> torch.Tensor:
        if fisher == Fisher.EMPIRICAL:
            return batch.y
        with torch.no_grad():
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)

    def sequence_losses(self, model: nn.Module, batch: ClassBatch, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        logits = model(batch.x)  # (B, C)
        if fisher == Fisher.GAUSSIAN:
            return (gaussian_probe(logits, generator) * logits).sum(dim=-1)
        return F.cross_entropy(logits, self._labels(logits, batch, fisher, generator), reduction="none")

    def draw_losses(self, model: nn.Module, batch: ClassBatch, fisher: Fisher, generator: torch.Generator | None,
                    samples: int) -> Iterator[torch.Tensor]:
        logits = model(batch.x)  # (B, C)
        if fisher == Fisher.EXPECTED:
            with torch.no_grad():
                root_p = torch.softmax(logits, -1).sqrt()
            log_p = torch.log_softmax(logits, -1)
            return (-(root_p[:, v] * log_p[:, v]) for v in range(logits.shape[1]))
        if fisher == Fisher.EMPIRICAL:
            return iter([F.cross_entropy(logits, batch.y, reduction="none")])
        if fisher == Fisher.GAUSSIAN:
            return ((gaussian_probe(logits, generator) * logits).sum(dim=-1) for _ in range(samples))
        if fisher == Fisher.TOPM and samples > 1:
            ys, coef = topm_terms(logits, samples, generator)  # (B, k')
            nll = -torch.log_softmax(logits, -1).gather(-1, ys)  # (B, k')
            return iter(list((coef * nll).unbind(dim=1)))
        return (F.cross_entropy(logits, self._labels(logits, batch, fisher, generator), reduction="none")
                for _ in range(samples))

    def token_mask(self, batch: ClassBatch) -> torch.Tensor:
        return torch.ones(len(batch), 1, dtype=torch.bool, device=batch.x.device)

    def batch_size(self, batch: ClassBatch) -> int:
        return len(batch)


def classifier_data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters, one per class, with label noise: x [n, d] float64, y [n]."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g, dtype=torch.float64)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    return x, y


def mlp_classifier(d: int, hidden: int, classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).double()


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def pattern_sequences(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Arithmetic progressions mod (vocab - 1), shifted by 1 (id 0 is padding), with occasional noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, step = rng.randrange(vocab - 1), rng.choice([1, 2, 3])
        seq = [1 + (start + i * step) % (vocab - 1) for i in range(rng.randint(min_len, max_len))]
        if rng.random() < 0.3:
            seq[rng.randrange(len(seq))] = rng.randrange(1, vocab)
        out.append(seq)
    return out


def tiny_lm(vocab: int, width: int, inner: int, layers: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2, n_inner=inner,
                     bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()


def train_lm(model: nn.Module, sequences: list[list[int]], steps: int, lr: float = 1e-2, batch: int = 16,
             seed: int = 0) -> float:
    """Adam on random minibatches of ``sequences`` (their order drawn with ``seed``); returns the last loss."""
    from influence_ops import collate

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        b = collate(rng.sample(sequences, min(batch, len(sequences))))
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())
