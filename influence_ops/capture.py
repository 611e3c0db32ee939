"""Capture of layer inputs and output gradients with hooks.

Symbols: B sequences, T tokens, d_in / d_out layer widths, d_in' = d_in + 1 with
bias (homogeneous input a = [x; 1]).

``capture`` registers a forward hook on each tracked layer that keeps its input
and its output tensor. ``Captured.backward(loss)`` then asks autograd for
dL/ds (the gradient w.r.t. each layer's output) with ``torch.autograd.grad``,
which computes no parameter gradients at all: nothing is written to ``.grad``.
Every hook is removed on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .layers import TrackedLayer


@dataclass
class Captured:
    """Per-token inputs and output gradients of the tracked layers for one batch.

    After ``backward``:
        activations[name]: [B, T, d_in'] (float32 or the model dtype if float64),
            homogeneous, zero at positions outside ``token_mask``. With a token
            mask, layers that run on flattened tokens [B*T, d] (OPT) are
            reshaped to [B, T, d].
        output_grads[name]: [B, T, d_out], same dtype.
    """

    layers: Sequence[TrackedLayer]
    token_mask: torch.Tensor | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    output_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    _outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)  # layers whose activations are already homogeneous

    def _record(self, layer: TrackedLayer, inputs: tuple, output: torch.Tensor) -> None:
        if layer.name in self._outputs:
            raise RuntimeError(
                f"layer {layer.name} ran twice in one forward pass; a shared module cannot be tracked"
            )
        x = inputs[0].detach()
        self.activations[layer.name] = x
        self._outputs[layer.name] = output

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Fill ``output_grads`` with d loss / d s for every tracked layer.

        Args:
            loss: scalar (the sum of per-sequence losses).
            retain_graph: keep the forward graph for another ``backward`` (label
                draws of the same forward pass); each call replaces ``output_grads``.
        """
        if loss.ndim != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        missing = [layer.name for layer in self.layers if layer.name not in self._outputs]
        if missing:
            raise RuntimeError(f"tracked layers did not run in the forward pass: {missing}")
        outputs = [self._outputs[layer.name] for layer in self.layers]
        no_graph = [layer.name for layer, out in zip(self.layers, outputs) if not out.requires_grad]
        if no_graph:
            raise ValueError(
                f"outputs of layers {no_graph} do not require grad; the tracked layers' weights "
                "must have requires_grad=True"
            )
        grads = torch.autograd.grad(loss, outputs, allow_unused=True, retain_graph=retain_graph)
        for layer, out, grad in zip(self.layers, outputs, grads):
            if grad is None:
                grad = torch.zeros_like(out)
            self.output_grads[layer.name] = self._finish(grad.detach())
            if layer.name not in self._done:
                self.activations[layer.name] = self._homogeneous(layer, self.activations[layer.name])
                self._done.add(layer.name)
        if not retain_graph:
            self._outputs.clear()

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        t = t if t.dtype == torch.float64 else t.float()
        if self.token_mask is not None:
            t = self._as_tokens(t)
            t = t * self.token_mask.to(t.device, t.dtype).unsqueeze(-1)
        return t

    def _as_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, d] view of a layer tensor; some models (OPT) run their MLP on [B*T, d]."""
        B, T = self.token_mask.shape
        if tuple(t.shape[:-1]) == (B, T):
            return t
        if t.shape[:-1].numel() != B * T:
            raise ValueError(
                f"a tracked layer saw a tensor of shape {tuple(t.shape)}, which does not hold one row per "
                f"token of the [{B}, {T}] batch"
            )
        return t.reshape(B, T, t.shape[-1])  # (B*T, d) -> (B, T, d)

    def _homogeneous(self, layer: TrackedLayer, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float64 else x.float()
        if layer.has_bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (B, T, d_in + 1)
        return self._finish(x)


@contextmanager
def capture(layers: Sequence[TrackedLayer], token_mask: torch.Tensor | None = None) -> Iterator[Captured]:
    """Record inputs and outputs of ``layers`` during the forward pass in the body.

    Args:
        layers: the tracked layers.
        token_mask: optional [B, T] bool; activations and gradients are zeroed
            outside it (padding), so padding contributes exactly 0.

    Yields:
        a ``Captured``; call ``.backward(loss)`` after the forward pass.
    """
    captured = Captured(layers=layers, token_mask=token_mask)
    handles = []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(
                lambda _m, inp, out, layer=layer: captured._record(layer, inp, out)
            ))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
