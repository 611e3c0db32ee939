"""Loading the model (and its tokenizer) on a driver or an actor.

Two kinds of model:
- a Hugging Face directory (local, or in object storage: copied once per node
  into the local cache), loaded with ``AutoModelForCausalLM`` from safetensors
  only, ``trust_remote_code`` off unless the job turns it on;
- ``module:factory``, a function returning a plain ``torch.nn.Module`` whose
  ``forward(input_ids)`` returns logits [B, T, V].

The model is always put in ``eval()`` mode (the engine refuses active dropout).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influence_ops import TrackedLayer, find_mlp_layers

from ..config import DType, ModelConfig
from . import storage

log = logging.getLogger(__name__)

TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.FLOAT64: torch.float64, DType.BFLOAT16: torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for the engine.

    Attributes:
        model: in eval mode, on ``device``.
        layers: tracked layers.
        vocab_size: V (token ids must be < V).
        context: the longest sequence the model takes (None if unknown).
        autocast: bf16 autocast dtype for bfloat16 jobs (weights stay float32), else None.
    """

    model: nn.Module
    layers: list[TrackedLayer]
    vocab_size: int | None
    context: int | None
    device: torch.device
    autocast: torch.dtype | None


def pick_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def _vocab_size(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size:
        return int(size)
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return int(module.num_embeddings)
    return None


def _context(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return getattr(model, "context", None)


def import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.factory = {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"model.factory = {spec!r}: {module_name!r} has no attribute {attr!r}") from err


def load_model(cfg: ModelConfig, device: torch.device | None = None) -> LoadedModel:
    """Load, cast, move and ``eval()`` the model; find its tracked layers."""
    device = device or torch.device("cpu")
    dtype = TORCH_DTYPES[cfg.dtype]
    weight_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    if cfg.factory is not None:
        model = import_factory(cfg.factory)()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.factory = {cfg.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        from transformers import AutoModelForCausalLM

        local = storage.local_copy(cfg.path)
        model = AutoModelForCausalLM.from_pretrained(str(local), use_safetensors=True,
                                                     trust_remote_code=cfg.trust_remote_code)
    model = model.to(device=device, dtype=weight_dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)  # activations need a graph; no .grad is ever written
    layers = find_mlp_layers(model, cfg.layer_pattern, cfg.track)
    return LoadedModel(model, layers, _vocab_size(model), _context(model), device,
                       torch.bfloat16 if dtype == torch.bfloat16 else None)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's Hugging Face tokenizer (a fast tokenizer is needed for chunk offsets)."""
    if cfg.tokenizer_path is None:
        raise ValueError("model.tokenizer is not set: a factory model needs a tokenizer path to tokenize text")
    from transformers import AutoTokenizer

    local = storage.local_copy(cfg.tokenizer_path)
    return AutoTokenizer.from_pretrained(str(local), trust_remote_code=cfg.trust_remote_code)


def model_identity(cfg: ModelConfig) -> str:
    """A cheap key that changes when the model does.

    A Hugging Face folder: names, sizes and modification times (or ETags) of its
    files, from the listing only. A factory model: the fingerprint of its tracked
    weights (the model is built to compute it).
    """
    if cfg.factory is not None:
        from influence_ops import model_fingerprint

        return model_fingerprint(load_model(cfg).layers)
    return storage.folder_identity(cfg.path)
