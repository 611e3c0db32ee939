"""Discovery of the layers whose influence is tracked (the MLP linear layers).

A tracked layer computes s = W' a with W' = [W b] of shape [d_out, d_in'] where
d_in' = d_in + 1 when the layer has a bias (homogeneous input a = [x; 1]) and
d_in otherwise. Two module types are supported:

- ``torch.nn.Linear``: weight [d_out, d_in].
- Hugging Face GPT-2 ``Conv1D``: weight stored transposed, [d_in, d_out].

Architectures are recognised by the module names their MLPs use; any other
model can be tracked with a regular expression over module names. ``track``
names the layer set: ``mlp`` (the MLP linear layers, the paper's choice) or
``mlp+attention`` (also the attention projections: query/key/value and output).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch
from torch import nn

# Regular expressions (matched with re.search against the qualified module name)
# for the MLP linear layers of known Hugging Face causal LMs.
ARCHITECTURE_PATTERNS: dict[str, str] = {
    "gpt2": r"\.mlp\.(c_fc|c_proj)$",
    "gpt_neox": r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)$",
    "llama": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
    "qwen2": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
    "qwen3": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
    "mistral": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
    "gemma": r"\.mlp\.(gate_proj|up_proj|down_proj)$",
    "phi3": r"\.mlp\.(gate_up_proj|down_proj)$",
    "opt": r"\.(fc1|fc2)$",
}
# The attention projections (query/key/value, fused or not, and the output projection).
ATTENTION_PATTERNS: dict[str, str] = {
    "gpt2": r"\.attn\.(c_attn|c_proj)$",
    "gpt_neox": r"\.attention\.(query_key_value|dense)$",
    "llama": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "qwen2": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "qwen3": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "mistral": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "gemma": r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",
    "phi3": r"\.self_attn\.(qkv_proj|o_proj)$",
    "opt": r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
}


class Track(str, enum.Enum):
    """Which layers of a known architecture are tracked."""

    MLP = "mlp"
    MLP_ATTENTION = "mlp+attention"


@dataclass(frozen=True)
class TrackedLayer:
    """One tracked linear layer.

    Attributes:
        name: qualified module name in the model (``model.named_modules()``).
        module: the module itself (``nn.Linear`` or ``Conv1D``).
        d_in: input features (without the homogeneous 1).
        d_out: output features.
        has_bias: whether a = [x; 1] (then d_in' = d_in + 1).
        transposed: True for ``Conv1D`` (weight [d_in, d_out]).
    """

    name: str
    module: nn.Module
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool

    @property
    def d_in_h(self) -> int:
        """d_in' : input width including the homogeneous coordinate."""
        return self.d_in + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in'): the shape of G, P and W' for this layer."""
        return (self.d_out, self.d_in_h)

    def weight_matrix(self) -> torch.Tensor:
        """W' = [W b] as [d_out, d_in'], detached."""
        w = self.module.weight.detach()
        w = w.t() if self.transposed else w  # (d_out, d_in)
        if self.has_bias:
            w = torch.cat([w, self.module.bias.detach()[:, None]], dim=1)  # (d_out, d_in + 1)
        return w


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 Conv1D, recognised by type name so that transformers
    # is not imported here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _as_tracked(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, module.in_features, module.out_features,
                            module.bias is not None, transposed=False)
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        return TrackedLayer(name, module, d_in, d_out, module.bias is not None, transposed=True)
    return None


def linear_names(model: nn.Module, limit: int = 40) -> str:
    """The names of the model's ``nn.Linear`` / ``Conv1D`` modules, the candidates for a layer pattern."""
    names = [name for name, module in model.named_modules() if name and _as_tracked(name, module) is not None]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class UnknownArchitecture(ValueError):
    """No layer pattern is known for the model's type: the caller must give one. ``model_type``,
    ``class_name`` and ``linears`` (the module names a pattern could pick) say what the model is."""

    def __init__(self, model: nn.Module) -> None:
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.class_name = type(model).__name__
        self.linears = linear_names(model)
        super().__init__(f"no MLP layer pattern is known for model type {self.model_type!r} ({self.class_name}); "
                         f"pass pattern=<regex over module names> (its Linear/Conv1D modules: {self.linears}). "
                         f"Known types: {sorted(ARCHITECTURE_PATTERNS)}")


def architecture_pattern(model: nn.Module, track: Track | str = Track.MLP) -> str | None:
    """The name pattern of the ``track`` layers for a Hugging Face model's ``config.model_type``, if known."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    mlp = ARCHITECTURE_PATTERNS.get(model_type) if model_type else None
    if mlp is None or Track(track) == Track.MLP:
        return mlp
    return f"(?:{mlp})|(?:{ATTENTION_PATTERNS[model_type]})"


def find_mlp_layers(model: nn.Module, pattern: str | None = None, track: Track | str = Track.MLP) -> list[TrackedLayer]:
    """Find the layers to track, in module order.

    Args:
        model: the model.
        pattern: regular expression searched in each qualified module name. When
            None, the pattern of the model's architecture (``config.model_type``)
            for ``track`` is used.
        track: ``mlp`` (default) or ``mlp+attention``; only with ``pattern=None``.

    Returns:
        the matching ``nn.Linear`` / ``Conv1D`` layers, in ``named_modules`` order.

    Raises:
        UnknownArchitecture (a ValueError): no pattern is known for the model.
        ValueError: the pattern is invalid, or nothing matches (the message lists the module names seen).
    """
    track = Track(track)
    if pattern is not None and track != Track.MLP:
        raise ValueError(f"give a layer pattern or track = {track.value!r}, not both")
    if pattern is None:
        pattern = architecture_pattern(model, track)
        if pattern is None:
            raise UnknownArchitecture(model)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid layer pattern {pattern!r}: {err}") from err
    layers: list[TrackedLayer] = []
    seen: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        seen.append(name)
        if regex.search(name) is None:
            continue
        tracked = _as_tracked(name, module)
        if tracked is not None:
            layers.append(tracked)
    if not layers:
        shown = ", ".join(seen[:60]) + (" ..." if len(seen) > 60 else "")
        raise ValueError(
            f"no nn.Linear or Conv1D module of {type(model).__name__} matches pattern "
            f"{pattern!r}; module names seen: {shown}"
        )
    return layers


def layers_by_name(model: nn.Module, names: list[str]) -> list[TrackedLayer]:
    """The tracked layers named ``names`` (in that order); ValueError if one is missing."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        module = modules.get(name)
        tracked = None if module is None else _as_tracked(name, module)
        if tracked is None:
            raise ValueError(f"model {type(model).__name__} has no Linear/Conv1D module named {name!r}")
        out.append(tracked)
    return out
