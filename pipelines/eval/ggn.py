"""The exact damped Gauss-Newton matrix of the tracked layers, by brute force (pure torch).

Symbols: P tracked parameters (sum over layers of d_out * d_in'), M output rows
of one example (label positions), V outputs per row (vocabulary or classes).

Parameters are laid out as the engine lays out gradients: per layer the
[d_out, d_in'] matrix W' = [W b] (GPT-2 Conv1D transposed), flattened row-major,
layers concatenated in tracked order. For each example n with outputs z_n [M, V]
and per-row output Hessians H_n [M, V, V]:

    GGN = sum_n J_n^T H_n J_n,        J_n = d z_n / d theta   [M * V, P]

For softmax cross-entropy H_m = diag(p_m) - p_m p_m^T (so the GGN is the true
Fisher, the expectation over labels drawn from the softmax); for squared error
0.5 ||z - y||^2, H_m = I and the GGN equals the Hessian of a linear model.
J is built one output entry at a time (M * V backward passes, or one batched
pass with ``is_grads_batched`` where the model supports it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from influence_ops import TrackedLayer


def _params(layer: TrackedLayer) -> list[torch.Tensor]:
    return [layer.module.weight] + ([layer.module.bias] if layer.has_bias else [])


def flatten_layer_grads(layers: Sequence[TrackedLayer], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """[..., P] from per-parameter gradients (weight, then bias, per layer; a leading batch axis allowed)."""
    out, i = [], 0
    for layer in layers:
        w = grads[i]
        i += 1
        w = w.transpose(-1, -2) if layer.transposed else w  # (..., d_out, d_in)
        if layer.has_bias:
            w = torch.cat([w, grads[i].unsqueeze(-1)], dim=-1)  # (..., d_out, d_in + 1)
            i += 1
        out.append(w.reshape(*w.shape[:-2], -1))
    return torch.cat(out, dim=-1)


def layer_slices(layers: Sequence[TrackedLayer]) -> dict[str, slice]:
    """name -> the layer's entries of the [P] parameter vector (the layout of ``flatten_layer_grads``)."""
    out, lo = {}, 0
    for layer in layers:
        out[layer.name] = slice(lo, lo + layer.d_out * layer.d_in_h)
        lo = out[layer.name].stop
    return out


def split_layers(flat: torch.Tensor, layers: Sequence[TrackedLayer]) -> dict[str, torch.Tensor]:
    """name -> [..., d_out, d_in'] views of [..., P]."""
    return {layer.name: flat[..., sl].reshape(*flat.shape[:-1], layer.d_out, layer.d_in_h)
            for layer, sl in zip(layers, layer_slices(layers).values())}


def num_params(layers: Sequence[TrackedLayer]) -> int:
    return sum(l.d_out * l.d_in_h for l in layers)


def flat_gradient(loss: torch.Tensor, layers: Sequence[TrackedLayer]) -> torch.Tensor:
    """[P] gradient of a scalar loss w.r.t. the tracked parameters."""
    params = [p for l in layers for p in _params(l)]
    return flatten_layer_grads(layers, torch.autograd.grad(loss, params))


def jacobian(outputs: torch.Tensor, layers: Sequence[TrackedLayer]) -> torch.Tensor:
    """[M, V, P] Jacobian of ``outputs`` [M, V] (with graph) w.r.t. the tracked parameters."""
    params = [p for l in layers for p in _params(l)]
    M, V = outputs.shape
    eye = torch.eye(M * V, dtype=outputs.dtype, device=outputs.device).reshape(M * V, M, V)
    try:
        grads = torch.autograd.grad(outputs, params, grad_outputs=eye, is_grads_batched=True, retain_graph=True)
        rows = flatten_layer_grads(layers, grads)  # (M*V, P)
    except RuntimeError:  # an op without a batching rule: one backward per output entry
        rows = torch.stack([flatten_layer_grads(layers, torch.autograd.grad(outputs, params, grad_outputs=e,
                                                                            retain_graph=True)) for e in eye])
    return rows.reshape(M, V, -1)


def softmax_hessian(outputs: torch.Tensor) -> torch.Tensor:
    """[M, V, V] diag(p) - p p^T of the cross-entropy in the logits."""
    p = torch.softmax(outputs.detach(), dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def identity_hessian(outputs: torch.Tensor) -> torch.Tensor:
    """[M, V, V] identity: the output Hessian of 0.5 ||z - y||^2."""
    M, V = outputs.shape
    return torch.eye(V, dtype=outputs.dtype, device=outputs.device).expand(M, V, V)


def exact_ggn(examples: Iterable[Callable[[], torch.Tensor]], layers: Sequence[TrackedLayer],
              output_hessian: Callable[[torch.Tensor], torch.Tensor] = softmax_hessian) -> torch.Tensor:
    """sum_n J_n^T H_n J_n, [P, P] float64.

    Args:
        examples: callables, each running the model on one example and returning
            its outputs [M, V] with the graph (rows = the positions that carry a loss).
        layers: the tracked layers.
        output_hessian: outputs [M, V] -> [M, V, V].
    """
    P = num_params(layers)
    ggn = None
    for make in examples:
        z = make()
        if z.shape[0] == 0:
            continue
        J = jacobian(z, layers).to(torch.float64)  # (M, V, P)
        H = output_hessian(z).to(torch.float64)  # (M, V, V)
        HJ = H @ J  # (M, V, P)
        part = J.reshape(-1, P).T @ HJ.reshape(-1, P)  # (P, P)
        ggn = part if ggn is None else ggn + part
    if ggn is None:
        return torch.zeros(P, P, dtype=torch.float64)
    return (ggn + ggn.T) / 2
