"""Token batches: padded sequences with Hugging Face ``labels`` semantics.

Symbols: B sequences, T tokens (padded length).

``labels[b, t]`` is the token the model should predict *at* position t; the
prediction comes from the logits at position t - 1 (the shift happens inside the
objective, as in Hugging Face). ``-100`` marks a position that is not in the
loss (padding, prompt tokens, masked tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class TokenBatch:
    """A padded batch of token sequences.

    Attributes:
        input_ids: [B, T] int64.
        attention_mask: [B, T] int64, 1 for real tokens, 0 for padding.
        labels: [B, T] int64, HF semantics, -100 where not in the loss.
        seeds: optional [B] int64 (CPU): per-sequence seeds of the random label
            draws of the sampled / Gaussian Fisher. With them a sequence's draws
            do not depend on the batch it is in (batch size, padding, order);
            without them the draws come from one generator stream per call.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    seeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(self.input_ids.shape)}")
        for field in ("attention_mask", "labels"):
            shape = tuple(getattr(self, field).shape)
            if shape != tuple(self.input_ids.shape):
                raise ValueError(f"{field} has shape {shape}, input_ids {tuple(self.input_ids.shape)}")
        if self.input_ids.shape[0] == 0:
            raise ValueError("empty batch: no sequences")
        if self.seeds is not None and tuple(self.seeds.shape) != (self.input_ids.shape[0],):
            raise ValueError(f"seeds has shape {tuple(self.seeds.shape)}, want ({self.input_ids.shape[0]},)")

    @property
    def token_mask(self) -> torch.Tensor:
        """[B, T] bool: positions holding real tokens (their activations count)."""
        return self.attention_mask.bool()

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          self.seeds)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int] | None] | None = None,
    pad_id: int = 0,
) -> TokenBatch:
    """Right-pad token sequences into a batch.

    Args:
        sequences: B lists of token ids (lengths may differ, none empty).
        loss_masks: optional, per sequence a list of 0/1 of the same length
            (1 = the token counts in the loss) or None for all ones.
        pad_id: token id placed in padding (never in the loss).

    Returns:
        a TokenBatch; labels = input_ids where the loss mask is 1 and the token
        is real, -100 elsewhere. The first token of each sequence is never
        predicted (the shift drops it).
    """
    if len(sequences) == 0:
        raise ValueError("empty batch: no sequences")
    lengths = [len(s) for s in sequences]
    for row, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"sequence {row} is empty (input_ids has no tokens)")
    if loss_masks is not None and len(loss_masks) != len(sequences):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(sequences)} sequences")
    B, T = len(sequences), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids = torch.as_tensor(list(seq), dtype=torch.long)
        n = ids.numel()
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        mask = None if loss_masks is None else loss_masks[b]
        if mask is None:
            labels[b, :n] = ids
        else:
            mask_t = torch.as_tensor(list(mask), dtype=torch.bool)
            if mask_t.numel() != n:
                raise ValueError(f"sequence {b}: loss_mask has {mask_t.numel()} entries, input_ids {n}")
            labels[b, :n] = torch.where(mask_t, ids, torch.full_like(ids, IGNORE_INDEX))
        if not bool((labels[b, 1:n] != IGNORE_INDEX).any()):
            raise ValueError(
                f"sequence {b} has no token in the loss (loss_mask all 0, or a single token, "
                "which has nothing before it to predict it)"
            )
    return TokenBatch(input_ids, attention_mask, labels)


def query_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> TokenBatch:
    """Batch of (prompt, completion) pairs whose loss covers completion tokens only.

    Args:
        prompts: Q token-id lists (may be empty only if the completion has >= 2 tokens).
        completions: Q non-empty token-id lists.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    sequences, masks = [], []
    for q, (p, c) in enumerate(zip(prompts, completions)):
        p, c = list(p), list(c)
        if not c:
            raise ValueError(f"query {q}: empty completion")
        if not p and len(c) < 2:
            raise ValueError(f"query {q}: a completion of one token needs a prompt before it")
        sequences.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    return collate(sequences, masks, pad_id=pad_id)
