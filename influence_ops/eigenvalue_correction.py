"""Stage 3: eigenvalue correction Lambda as mergeable sums (docs/design.md section 2).

Symbols: N_seq sequences, d_out, d_in'.

    Lambda = (1/N_seq) sum_n (Q_S^T G_n Q_A) ** 2      [d_out, d_in'] elementwise

(paper Eq. 20 with the transpose it drops restored). G_n is the per-sequence
gradient with (by default) sampled labels, so token correlations within a
sequence are kept. Computed without materializing G_n in the original basis:
rotate first, g' = g Q_S [B, T, d_out], a' = a Q_A [B, T, d_in'], then
G'_n = sum_t g'_t a'_t^T. With ``samples = k`` sampled draws, the squared
rotated gradient is averaged over the k draws of the same forward pass:
Lambda = (1/N_seq) sum_n (1/k) sum_j (Q_S^T G_nj Q_A) ** 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .covariance import accumulation_dtype, effective_samples, make_generator
from .eigen import LayerEigen
from .gradients import draw_passes, model_device, sequence_gradient
from .layers import TrackedLayer
from .fisher import DEFAULT_FISHER, Fisher, default_draws, effective_passes, is_random
from .objectives import LanguageModelObjective, Objective


@dataclass
class LambdaSums:
    """Per layer sum_n (Q_S^T G_n Q_A)^2 [d_out, d_in'] and the sequence count N_seq."""

    sums: dict[str, torch.Tensor]
    sequences: int
    fisher: Fisher
    samples: int = 1  # random label draws per position (1 unless fisher is SAMPLED, GAUSSIAN or TOPM)
    passes: int | None = None  # backward passes the draws were summed into; None: one per draw

    def merge(self, other: LambdaSums) -> LambdaSums:
        """Exact sum of two partial results over disjoint data."""
        if list(self.sums) != list(other.sums):
            raise ValueError(f"cannot merge Lambda of layers {list(self.sums)} and {list(other.sums)}")
        if self.fisher != other.fisher:
            raise ValueError(f"cannot merge {self.fisher.value} and {other.fisher.value} Lambda sums")
        if self.samples != other.samples:
            raise ValueError(f"cannot merge Lambda sums of {self.samples} and {other.samples} label samples")
        if self.passes != other.passes:
            raise ValueError(f"cannot merge Lambda sums of draws summed into {self.passes} and {other.passes} passes")
        return LambdaSums({n: s + other.sums[n].to(s) for n, s in self.sums.items()},
                          self.sequences + other.sequences, self.fisher, self.samples, self.passes)

    def normalized(self) -> dict[str, torch.Tensor]:
        """name -> Lambda = sums / N_seq."""
        if self.sequences <= 0:
            raise ValueError("Lambda has no sequences")
        return {n: s / self.sequences for n, s in self.sums.items()}


def rotated_sequence_gradient(a: torch.Tensor, g: torch.Tensor, eigen: LayerEigen) -> torch.Tensor:
    """Q_S^T G_n Q_A for each sequence, [B, d_out, d_in'].

    Args:
        a: [B, T, d_in'], g: [B, T, d_out].
    """
    q_a = eigen.q_a.to(a.device, a.dtype)
    q_s = eigen.q_s.to(g.device, g.dtype)
    return sequence_gradient(a @ q_a, g @ q_s)


def fit_lambda(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    eigen: dict[str, LayerEigen],
    batches: Iterable[Any],
    fisher: Fisher = DEFAULT_FISHER,
    seed: int | None = 0,
    objective: Objective | None = None,
    autocast_dtype: torch.dtype | None = None,
    samples: int | None = None,
    passes: int | None = None,
) -> LambdaSums:
    """Sum the squared rotated per-sequence gradients over ``batches``.

    Args: as ``fit_covariances`` (``samples``: k draws averaged; None = the Fisher's stage-3 default, TOPM 2,
    others 1; ``passes``: the k draws summed into that many backward passes, None = one per draw), plus
    ``eigen`` from ``eigendecompose``.

    Returns:
        LambdaSums (sums and N_seq).
    """
    objective = objective or LanguageModelObjective()
    device = model_device(model)
    dtype = accumulation_dtype(model)
    samples = effective_samples(fisher, default_draws(fisher, lambda_samples=samples)[1])
    passes = effective_passes(fisher, samples, passes)
    generator = make_generator(seed, device) if is_random(fisher) else None
    sums = {l.name: torch.zeros(l.d_out, l.d_in_h, dtype=dtype, device=device) for l in layers}
    missing = [l.name for l in layers if l.name not in eigen]
    if missing:
        raise ValueError(f"no eigendecomposition for layers {missing}")
    sequences = 0
    for batch in batches:
        for captured, weight in draw_passes(model, layers, objective, batch, fisher, generator, samples,
                                            autocast_dtype, passes):
            for layer in layers:
                a = captured.activations[layer.name].to(dtype)
                g = captured.output_grads[layer.name].to(dtype)
                rotated = rotated_sequence_gradient(a, g, eigen[layer.name])  # (B, d_out, d_in')
                square = (rotated ** 2).sum(dim=0)  # (d_out, d_in')
                sums[layer.name] += square if weight == 1.0 else weight * square
        sequences += objective.batch_size(batch)
    if sequences == 0:
        raise ValueError("fit_lambda got no batches")
    return LambdaSums(sums, sequences, fisher, samples, passes)
