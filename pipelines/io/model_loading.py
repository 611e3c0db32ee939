"""Loading the model (and its tokenizer) on a driver or an actor.

Two kinds of model:
- a Hugging Face folder (a local folder, an object-storage folder copied once
  per node into the local cache, or a Hub name from the local Hugging Face
  cache: ``model_source.py``, which also checks the folder before any stage
  starts), loaded with ``AutoModelForCausalLM``: weights in safetensors
  (preferred) or ``pytorch_model.bin``, which transformers reads with
  ``torch.load(weights_only=True)``, so a ``.bin`` that holds pickled Python
  objects other than tensors is refused, never unpickled; ``trust_remote_code``
  off unless the job turns it on;
- ``module:factory``, a function returning a plain ``torch.nn.Module`` whose
  ``forward(input_ids)`` returns logits [B, T, V].

transformers' progress bars and warnings are off while loading unless
``INFLUENCE_VERBOSE=1`` (``influence --verbose``). The model is always put in
``eval()`` mode (the engine refuses active dropout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_ops import TrackedLayer, find_mlp_layers

from ..config import VERBOSE_ENV, DType, ModelConfig
from ..errors import UserError
from . import storage
from .model_source import check_model_folder, check_tokenizer, import_factory, model_source

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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and warnings off (unless INFLUENCE_VERBOSE=1), restored afterwards."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _from_pretrained(cfg: ModelConfig, local: Path) -> nn.Module:
    """``AutoModelForCausalLM`` from a local folder: safetensors when present, else ``pytorch_model.bin``."""
    from transformers import AutoModelForCausalLM

    safetensors = any(local.glob("*.safetensors"))
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(str(local), use_safetensors=safetensors,
                                                        trust_remote_code=cfg.trust_remote_code,
                                                        local_files_only=True)
    except ValueError as err:
        if cfg.trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise UserError(f"model.path '{cfg.path}' ships its own code (auto_map in config.json), which is not run: "
                        "set model.trust_remote_code = true only for a model you trust") from err
    except (pickle.UnpicklingError, OSError) as err:
        if safetensors or ("weights_only" not in str(err) and not isinstance(err, pickle.UnpicklingError)):
            raise
        raise UserError(f"model.path '{cfg.path}': pytorch_model.bin holds pickled Python objects, not only "
                        "tensors; it is not unpickled (torch.load weights_only=True): convert it to safetensors"
                        ) from err


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
        check_model_folder(cfg)
        model = _from_pretrained(cfg, storage.local_copy(model_source(cfg.path)))
    model = model.to(device=device, dtype=weight_dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)  # activations need a graph; no .grad is ever written
    layers = find_mlp_layers(model, cfg.layer_pattern, cfg.track)
    return LoadedModel(model, layers, _vocab_size(model), _context(model), device,
                       torch.bfloat16 if dtype == torch.bfloat16 else None)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's Hugging Face tokenizer (a fast tokenizer is needed for chunk offsets)."""
    check_tokenizer(cfg)
    from transformers import AutoTokenizer

    local = storage.local_copy(model_source(cfg.tokenizer_path, "model.tokenizer" if cfg.tokenizer else "model.path"))
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(local), trust_remote_code=cfg.trust_remote_code,
                                             local_files_only=True)


def model_identity(cfg: ModelConfig) -> str:
    """A cheap key that changes when the model does.

    A Hugging Face folder: names, sizes and modification times (or ETags) of its
    files, from the listing only. A factory model: the fingerprint of its tracked
    weights (the model is built to compute it).
    """
    if cfg.factory is not None:
        from influence_ops import model_fingerprint

        return model_fingerprint(load_model(cfg).layers)
    return storage.folder_identity(model_source(cfg.path))
