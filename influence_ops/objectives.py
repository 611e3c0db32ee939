"""Objectives: per-sequence summed losses, with true-Fisher or empirical labels.

Symbols: B sequences, T tokens, V vocabulary.

The training loss of a sequence is the SUM of token negative log-likelihoods
(not the mean), so a sequence's gradient does not depend on batching or padding.
The query measurement is the same sum over completion tokens only (prompt
tokens carry label -100), so the query gradient is grad of -log p(completion |
prompt).

Fisher modes (docs/design.md section 2): ``SAMPLED`` draws every label from the
model's own predictive distribution with a seeded generator (the true Fisher /
Gauss-Newton form, the default for fitting factors); ``EMPIRICAL`` uses the
data's labels (deterministic, used for comparisons and always for scoring).
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE_INDEX, TokenBatch


class Fisher(str, enum.Enum):
    """Where labels come from when fitting curvature."""

    SAMPLED = "sampled"
    EMPIRICAL = "empirical"


class Objective(Protocol):
    """What the engine needs to know about a model and its batches."""

    def sequence_losses(self, model: nn.Module, batch: Any, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        """[B] per-sequence summed loss (their sum is differentiated)."""

    def token_mask(self, batch: Any) -> torch.Tensor:
        """[B, T] bool, the positions whose activations count."""

    def batch_size(self, batch: Any) -> int:
        """B."""


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of a Hugging Face causal LM or of a plain module.

    Hugging Face models (those with a ``config``) get ``attention_mask``; a plain
    module is called on ``input_ids`` alone and must return logits (or an object
    with ``.logits``).
    """
    if hasattr(model, "config"):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise TypeError(f"model output must be logits [B, T, V]; got {type(logits).__name__}")
    return logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] NLL of labels[:, 1:] under logits[:, :-1]; 0 where label == -100.

    Args:
        logits: [B, T, V].
        labels: [B, T], HF semantics.
    """
    shift_logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    shift_labels = labels[:, 1:]
    B, T1, V = shift_logits.shape
    nll = F.cross_entropy(shift_logits.reshape(B * T1, V), shift_labels.reshape(B * T1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(B, T1)  # (B, T-1)


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution where labels != -100.

    Args:
        logits: [B, T, V]; position t - 1 predicts the label at t.
        labels: [B, T] data labels (only their -100 pattern is kept).
        generator: seeded generator on the logits' device (None: global RNG).

    Returns:
        [B, T] sampled labels, -100 where the data had -100.
    """
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        B, T1, V = probs.shape
        drawn = torch.multinomial(probs.reshape(B * T1, V), 1, generator=generator).reshape(B, T1)
        sampled = labels.clone()
        keep = labels[:, 1:] != IGNORE_INDEX
        sampled[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
    return sampled


class LanguageModelObjective:
    """Summed next-token NLL of a causal LM on ``TokenBatch`` batches."""

    def sequence_losses(self, model: nn.Module, batch: TokenBatch, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        logits = model_logits(model, batch.input_ids, batch.attention_mask)
        labels = batch.labels
        if fisher == Fisher.SAMPLED:
            labels = sample_labels(logits, labels, generator)
        return token_nll(logits, labels).sum(dim=1)  # (B,)

    def token_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.token_mask

    def batch_size(self, batch: TokenBatch) -> int:
        return len(batch)

    def loss_tokens(self, batch: TokenBatch) -> int:
        """Number of tokens in the loss (labels != -100 after the shift)."""
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
