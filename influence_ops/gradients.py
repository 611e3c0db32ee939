"""Forward/backward passes and per-sequence gradients of the tracked layers.

Symbols: B sequences, T tokens, d_out, d_in' (homogeneous input width).

Per-sequence gradient (docs/design.md section 2): G_n = sum_t g_t a_t^T, [d_out, d_in'],
with g_t = dL_n / ds_t and a_t the homogeneous input. Since the loss of a batch is
the sum of per-sequence summed losses and sequences do not interact, g_t of the
batch loss equals that of the sequence's own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import Captured, capture
from .layers import TrackedLayer
from .fisher import Fisher, check_samples, draw_weight, effective_passes, summed_draws
from .objectives import Objective


@dataclass
class BackwardResult:
    """What one forward/backward pass yields.

    Attributes:
        captured: per-token activations [B, T, d_in'] and output grads [B, T, d_out].
        losses: [B] per-sequence summed losses (detached).
    """

    captured: Captured
    losses: torch.Tensor


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_deterministic(model: nn.Module) -> None:
    """Raise ValueError if the model would apply dropout (training mode with p > 0).

    Influence needs the deterministic function the model computes at inference;
    the engine does not flip modes itself, the caller runs ``model.eval()``.
    """
    if not model.training:
        return
    active = [name for name, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training]
    if active:
        raise ValueError(f"model is in training mode with active dropout ({active[:3]}...); call model.eval() first")


def backward_pass(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    objective: Objective,
    batch: Any,
    fisher: Fisher = Fisher.EMPIRICAL,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> BackwardResult:
    """Run the model on ``batch`` and capture a and g of every tracked layer.

    Args:
        autocast_dtype: torch.bfloat16 / torch.float16 to run forward and backward
            under autocast; captured tensors are returned in float32 regardless.
    """
    check_deterministic(model)
    device = model_device(model)
    mask = objective.token_mask(batch)
    with capture(layers, token_mask=mask) as cap:
        with _autocast(device, autocast_dtype):
            losses = objective.sequence_losses(model, batch, fisher, generator)
        _check_losses(losses)
        cap.backward(losses.float().sum() if losses.dtype != torch.float64 else losses.sum())
    return BackwardResult(captured=cap, losses=losses.detach())


def _check_losses(losses: torch.Tensor) -> None:
    if losses.ndim != 1:
        raise ValueError(f"objective returned losses of shape {tuple(losses.shape)}, expected [B]")
    if not torch.isfinite(losses).all():
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        raise FloatingPointError(f"non-finite loss for sequences at batch rows {bad}")


def draw_passes(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    objective: Objective,
    batch: Any,
    fisher: Fisher,
    generator: torch.Generator | None,
    samples: int = 1,
    autocast_dtype: torch.dtype | None = None,
    passes: int | None = None,
) -> Iterator[tuple[Captured, float]]:
    """One forward pass, then one backward pass per label draw through the retained graph.

    Yields ``(captured, weight)`` per draw: the activations are the same for every
    draw, ``output_grads`` hold that draw's g; a draw's statistics count with
    ``weight`` (1/k for k sampled draws, 1 for EMPIRICAL and for each of the
    (T-1) x V terms of EXPECTED). The ``captured`` object is reused: read it
    before advancing the iterator.

    Cost: one forward + (number of draws) backward passes down to the first
    tracked layer (no weight gradients). With one sampled or empirical draw
    this is exactly ``backward_pass``.

    ``passes`` p < k (random Fishers): the k draws' losses summed round-robin into p
    losses, one backward pass each (``fisher.effective_passes``: unbiased, p backward
    passes instead of k); each summed pass counts with the same ``weight`` as one draw.
    """
    check_samples(samples)
    passes = effective_passes(fisher, samples, passes)
    if fisher != Fisher.EXPECTED and (samples == 1 or fisher == Fisher.EMPIRICAL):
        yield backward_pass(model, layers, objective, batch, fisher, generator, autocast_dtype).captured, 1.0
        return
    if not hasattr(objective, "draw_losses"):
        raise TypeError(f"{type(objective).__name__} has no draw_losses(); it supports only one sampled draw")
    check_deterministic(model)
    device = model_device(model)
    weight = draw_weight(fisher, samples)
    with capture(layers, token_mask=objective.token_mask(batch)) as cap:
        with _autocast(device, autocast_dtype):
            draws = objective.draw_losses(model, batch, fisher, generator, samples)
            if passes is not None:
                draws = iter(summed_draws(draws, passes))
    pending = next(draws, None)
    while pending is not None:
        _check_losses(pending)
        following = next(draws, None)
        cap.backward(pending.float().sum() if pending.dtype != torch.float64 else pending.sum(),
                     retain_graph=following is not None)
        yield cap, weight
        pending = following


def sequence_gradient(activations: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    """G_n = sum_t g_t a_t^T for each sequence.

    Args:
        activations: a, [B, T, d_in'].
        output_grads: g, [B, T, d_out].

    Returns:
        [B, d_out, d_in'].
    """
    return torch.einsum("bto,bti->boi", output_grads, activations)


def per_sequence_gradients(captured: Captured) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of all tracked layers: name -> [B, d_out, d_in']."""
    return {
        layer.name: sequence_gradient(captured.activations[layer.name], captured.output_grads[layer.name])
        for layer in captured.layers
    }
