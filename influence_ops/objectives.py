"""Objectives: per-sequence summed losses, with true-Fisher or empirical labels.

Symbols: B sequences, T tokens, V vocabulary.

The training loss of a sequence is the SUM of token negative log-likelihoods
(not the mean), so a sequence's gradient does not depend on batching or padding.
The query measurement is the same sum over completion tokens only (prompt
tokens carry label -100), so the query gradient is grad of -log p(completion |
prompt).

Which labels fitting uses is the ``Fisher`` mode (``fisher``); the losses of
each mode's draws are built in ``label_draws``. ``draw_losses`` runs one forward
pass, then yields one summed loss [B] per draw, all sharing the forward graph:
SAMPLED with k samples gives k independent label sets (the fitting stages
average the k draws' statistics, weight 1/k each, so k = 1 is exactly the
single-draw sampled Fisher); EXPECTED gives T x V weighted losses whose summed
statistics are the exact expectation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE_INDEX, TokenBatch
from .fisher import Fisher, is_random
from .label_draws import (expected_label_losses, gaussian_losses, row_generators, row_lengths, sample_labels,
                          sample_labels_by_row, topm_losses)


class Objective(Protocol):
    """What the engine needs to know about a model and its batches."""

    def sequence_losses(self, model: nn.Module, batch: Any, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        """[B] per-sequence summed loss (their sum is differentiated)."""

    def token_mask(self, batch: Any) -> torch.Tensor:
        """[B, T] bool, the positions whose activations count."""

    def batch_size(self, batch: Any) -> int:
        """B."""


class DrawObjective(Objective, Protocol):
    """An objective that also yields several label draws from one forward pass."""

    def draw_losses(self, model: nn.Module, batch: Any, fisher: Fisher, generator: torch.Generator | None,
                    samples: int) -> Iterator[torch.Tensor]:
        """Run the forward pass now; return an iterator of [B] summed losses, one per draw."""


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


class LanguageModelObjective:
    """Summed next-token NLL of a causal LM on ``TokenBatch`` batches."""

    def sequence_losses(self, model: nn.Module, batch: TokenBatch, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        if fisher == Fisher.EXPECTED:
            raise ValueError("the expected Fisher is a sum over many label draws: fit it through draw_passes "
                             "(fit_covariances / fit_lambda), not sequence_losses")
        logits = model_logits(model, batch.input_ids, batch.attention_mask)
        labels = batch.labels
        rows = row_generators(batch, logits.device) if is_random(fisher) else None
        if fisher == Fisher.GAUSSIAN:
            return gaussian_losses(logits, labels, generator, rows, row_lengths(batch) if rows else None)
        if fisher in (Fisher.SAMPLED, Fisher.TOPM):  # one TOPM draw is one sampled draw
            labels = (sample_labels(logits, labels, generator) if rows is None
                      else sample_labels_by_row(logits, labels, rows, row_lengths(batch)))
        return token_nll(logits, labels).sum(dim=1)  # (B,)

    def draw_losses(self, model: nn.Module, batch: TokenBatch, fisher: Fisher, generator: torch.Generator | None,
                    samples: int) -> Iterator[torch.Tensor]:
        logits = model_logits(model, batch.input_ids, batch.attention_mask)  # the one forward pass
        if fisher == Fisher.EXPECTED:
            return expected_label_losses(logits, batch.labels)
        if fisher == Fisher.EMPIRICAL:
            return iter([token_nll(logits, batch.labels).sum(dim=1)])
        rows = row_generators(batch, logits.device)
        lengths = row_lengths(batch) if rows is not None else None
        if fisher == Fisher.GAUSSIAN:
            return (gaussian_losses(logits, batch.labels, generator, rows, lengths) for _ in range(samples))
        if fisher == Fisher.TOPM and samples > 1:
            return iter(topm_losses(logits, batch.labels, samples, generator, rows, lengths))

        def draws() -> Iterator[torch.Tensor]:
            for _ in range(samples):  # draw j uses the generator after j draws: k = 1 is today's single draw
                labels = (sample_labels(logits, batch.labels, generator) if rows is None
                          else sample_labels_by_row(logits, batch.labels, rows, lengths))
                yield token_nll(logits, labels).sum(dim=1)  # (B,)
        return draws()

    def token_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.token_mask

    def batch_size(self, batch: TokenBatch) -> int:
        return len(batch)

    def loss_tokens(self, batch: TokenBatch) -> int:
        """Number of tokens in the loss (labels != -100 after the shift)."""
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
