"""Stage 1: Kronecker factors A and S as mergeable sums (docs/design.md section 2).

Symbols: N_tok counted tokens, d_in' homogeneous input width, d_out.

    A = (1/N_tok) sum_t a_t a_t^T   [d_in', d_in']
    S = (1/N_tok) sum_t g_t g_t^T   [d_out, d_out]

(paper Eq. 17-18, tokens treated as independent). Only sums and counts are kept,
so results of many workers add exactly; ``normalized()`` divides at the end.
Labels are sampled from the model (true Fisher) or replaced by Gaussian probes
with the same covariance (``GAUSSIAN``), unless ``fisher=EMPIRICAL``.
With ``samples = k`` sampled draws per position, the g g^T term is the mean over
the k draws, (1/k) sum_j g_tj g_tj^T (one forward, k backward passes); A does
not depend on labels and is summed once. ``EXPECTED`` sums the exact
expectation over the softmax instead (label_draws.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gradients import draw_passes, model_device
from .layers import TrackedLayer
from .fisher import DEFAULT_FISHER, Fisher, check_samples, default_draws, effective_passes, is_random
from .objectives import LanguageModelObjective, Objective


@dataclass
class LayerCovariance:
    """Sums for one layer: a_sum [d_in', d_in'], s_sum [d_out, d_out], tokens N_tok."""

    a_sum: torch.Tensor
    s_sum: torch.Tensor
    tokens: int

    def merge(self, other: LayerCovariance) -> LayerCovariance:
        if self.a_sum.shape != other.a_sum.shape or self.s_sum.shape != other.s_sum.shape:
            raise ValueError(
                f"cannot merge covariances of shapes {tuple(self.a_sum.shape)}/{tuple(self.s_sum.shape)} "
                f"and {tuple(other.a_sum.shape)}/{tuple(other.s_sum.shape)}"
            )
        return LayerCovariance(self.a_sum + other.a_sum.to(self.a_sum), self.s_sum + other.s_sum.to(self.s_sum),
                               self.tokens + other.tokens)

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, S) = sums / N_tok."""
        if self.tokens <= 0:
            raise ValueError("covariance has no tokens (every token was masked)")
        return self.a_sum / self.tokens, self.s_sum / self.tokens


@dataclass
class Covariances:
    """Stage-1 result for all tracked layers (ordered by layer)."""

    layers: dict[str, LayerCovariance]
    sequences: int
    fisher: Fisher
    samples: int = 1  # random label draws per position (1 unless fisher is SAMPLED, GAUSSIAN or TOPM)
    passes: int | None = None  # backward passes the draws were summed into; None: one per draw

    def merge(self, other: Covariances) -> Covariances:
        """Exact sum of two partial results over disjoint data."""
        if list(self.layers) != list(other.layers):
            raise ValueError(f"cannot merge covariances of layers {list(self.layers)} and {list(other.layers)}")
        if self.fisher != other.fisher:
            raise ValueError(f"cannot merge {self.fisher.value} and {other.fisher.value} covariances")
        if self.samples != other.samples:
            raise ValueError(f"cannot merge covariances of {self.samples} and {other.samples} label samples")
        if self.passes != other.passes:
            raise ValueError(f"cannot merge covariances of draws summed into {self.passes} and {other.passes} passes")
        return Covariances({n: c.merge(other.layers[n]) for n, c in self.layers.items()},
                           self.sequences + other.sequences, self.fisher, self.samples, self.passes)

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).tokens


def empty_covariances(layers: Sequence[TrackedLayer], fisher: Fisher, dtype: torch.dtype,
                      device: torch.device | str = "cpu", samples: int = 1, passes: int | None = None) -> Covariances:
    return Covariances(
        {l.name: LayerCovariance(torch.zeros(l.d_in_h, l.d_in_h, dtype=dtype, device=device),
                                 torch.zeros(l.d_out, l.d_out, dtype=dtype, device=device), 0)
         for l in layers},
        sequences=0, fisher=fisher, samples=samples, passes=passes,
    )


def effective_samples(fisher: Fisher, samples: int) -> int:
    """k for SAMPLED, GAUSSIAN and TOPM, 1 otherwise (``samples`` only applies to random draws)."""
    return check_samples(samples) if is_random(fisher) else 1


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (tests), float32 otherwise."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def fit_covariances(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    batches: Iterable[Any],
    fisher: Fisher = DEFAULT_FISHER,
    seed: int | None = 0,
    objective: Objective | None = None,
    autocast_dtype: torch.dtype | None = None,
    samples: int | None = None,
    passes: int | None = None,
) -> Covariances:
    """Sum a a^T and g g^T over every counted token of ``batches``.

    Args:
        model: the model (its weights are not modified, no .grad is written).
        layers: tracked layers (``find_mlp_layers``).
        batches: iterable of batches for ``objective`` (``TokenBatch`` by default).
        fisher: where labels come from (``fisher.Fisher``): drawn from the model (SAMPLED, GAUSSIAN
            probes, TOPM), the data's (EMPIRICAL) or every label weighted by its probability (EXPECTED);
            default TOPM, as ``fit_ekfac`` and the job.
        seed: seed of the label-sampling generator.
        objective: defaults to ``LanguageModelObjective``.
        autocast_dtype: optional bf16/fp16 autocast; sums stay float32.
        samples: k label draws per position (SAMPLED, GAUSSIAN, TOPM only), averaged into g g^T (TOPM: summed,
            weights in the losses); None = the Fisher's stage-1 default (``fisher.default_draws``: TOPM 5,
            others 1).
        passes: p < k sums the k draws into p backward passes (``fisher.effective_passes``: unbiased,
            noisier, cheaper); None = one backward pass per draw.

    Returns:
        Covariances with per-layer sums and token counts (sequences counted too).
    """
    objective = objective or LanguageModelObjective()
    device = model_device(model)
    dtype = accumulation_dtype(model)
    samples = effective_samples(fisher, default_draws(fisher, samples)[0])
    passes = effective_passes(fisher, samples, passes)
    generator = make_generator(seed, device) if is_random(fisher) else None
    result = empty_covariances(layers, fisher, dtype, device, samples, passes)
    for batch in batches:
        tokens = int(objective.token_mask(batch).sum())
        for i, (captured, weight) in enumerate(draw_passes(model, layers, objective, batch, fisher, generator,
                                                           samples, autocast_dtype, passes)):
            for layer in layers:
                cov = result.layers[layer.name]
                g = captured.output_grads[layer.name].to(dtype)  # (B, T, d_out)
                g2 = g.reshape(-1, g.shape[-1])  # (B*T, d_out)
                cov.s_sum += g2.T @ g2 if weight == 1.0 else weight * (g2.T @ g2)
                if i == 0:  # activations do not depend on the labels
                    a = captured.activations[layer.name].to(dtype)  # (B, T, d_in')
                    a2 = a.reshape(-1, a.shape[-1])  # (B*T, d_in')
                    cov.a_sum += a2.T @ a2
                    cov.tokens += tokens
        result.sequences += objective.batch_size(batch)
    if result.sequences == 0:
        raise ValueError("fit_covariances got no batches")
    return result
