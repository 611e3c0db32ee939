"""Loading the model (and its tokenizer) on a driver or an actor.

Two kinds of model:
- a Hugging Face folder (``config.json`` and weights), given as
  - a local folder;
  - an object-storage folder (``s3://``, ``gs://``): copied once per node into
    the local cache (``storage.local_copy``);
  - a Hub name (``org/model``) that is already in the local Hugging Face cache
    (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
    Nothing is ever downloaded: a name that is not cached is an error that says
    so (and that the machine is offline when ``HF_HUB_OFFLINE`` is set);
  weights in safetensors (preferred) or ``pytorch_model.bin``, which
  transformers reads with ``torch.load(weights_only=True)``: a ``.bin`` that
  holds pickled Python objects other than tensors is refused, never unpickled.
  ``trust_remote_code`` is off unless the job turns it on.
- ``module:factory``, a function returning a plain ``torch.nn.Module`` whose
  ``forward(input_ids)`` returns logits [B, T, V].

``check_model_folder`` finds a missing folder, config, weights or tokenizer
before any stage starts (errors name the job key and the folder). The model is
always put in ``eval()`` mode (the engine refuses active dropout).
"""

from __future__ import annotations

import contextlib
import importlib
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

from ..config import HUB_NAME, VERBOSE_ENV, DType, ModelConfig
from ..errors import UserError
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
        raise UserError(f"model.factory = {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise UserError(f"model.factory = {spec!r}: {module_name!r} has no attribute {attr!r}") from err


CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def hub_cache() -> Path:
    """The Hugging Face Hub cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_snapshot(name: str) -> Path | None:
    """The folder of Hub model ``name`` in the local cache (its ``main`` snapshot), or None; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=str(hub_cache())))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None


def model_source(path: str, key: str = "model.path") -> str:
    """Where the folder named by ``path`` is: a local path or an object-storage URL.

    A local path is returned as given, an object-storage URL too (its contents
    are checked by ``check_model_folder``); a Hub name becomes its snapshot
    folder in the local Hugging Face cache.

    Raises:
        UserError: no such folder, or a Hub name that is not in the cache.
    """
    if not storage.is_local(path):
        return path
    local = Path(path.removeprefix("file://"))
    if local.is_dir():
        return path
    if local.exists():
        raise UserError(f"{key} '{path}' is a file, not a model folder")
    if not local.is_absolute() and HUB_NAME.match(path):
        snapshot = cached_snapshot(path)
        if snapshot is not None:
            return str(snapshot)
        why = ("the machine is offline (HF_HUB_OFFLINE is set)" if offline()
               else "jobs never download models")
        raise UserError(f"{key} '{path}' is not a folder and not in the Hugging Face cache ({hub_cache()}); "
                        f"{why}: download it first (hf download {path}) or set {key} to a model folder")
    raise UserError(f"{key} '{path}' does not exist")


def _names(url: str) -> set[str]:
    """Names of the files directly in the folder ``url`` (empty when there is none)."""
    fs, path = storage.filesystem(url)
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _tokenizer_check(cfg: ModelConfig) -> None:
    if cfg.tokenizer_path is None:
        raise UserError("model.tokenizer is not set: a factory model needs a tokenizer folder to tokenize text")
    key = "model.tokenizer" if cfg.tokenizer is not None else "model.path"
    source = model_source(cfg.tokenizer_path, key)
    names = _names(source)
    if not names:
        raise UserError(f"{key} '{cfg.tokenizer_path}' does not exist")
    if not names & set(TOKENIZER_FILES):
        hint = "" if cfg.tokenizer is not None else "; set model.tokenizer to a folder that has one"
        raise UserError(f"no tokenizer in {key} '{cfg.tokenizer_path}' (none of {', '.join(TOKENIZER_FILES[:4])}, "
                        f"...){hint}")


def has_tokenizer(cfg: ModelConfig) -> bool:
    """Whether the job names a tokenizer folder that holds a tokenizer (listing only)."""
    try:
        _tokenizer_check(cfg)
    except UserError:
        return False
    return True


def check_model_folder(cfg: ModelConfig, tokenizer: bool = False) -> None:
    """Check, before any work starts, that the model (and, with ``tokenizer``, its tokenizer) can be loaded.

    Reads folder listings only. A factory model is checked by importing its module.

    Raises:
        UserError: naming the job key and the folder: missing folder, no ``config.json``,
            no weights in a supported format, no tokenizer.
    """
    if cfg.factory is not None:
        import_factory(cfg.factory)
    else:
        source = model_source(cfg.path)
        names = _names(source)
        if not names:
            raise UserError(f"model.path '{cfg.path}' does not exist")
        if CONFIG not in names:
            raise UserError(f"model.path '{cfg.path}': no {CONFIG}, not a Hugging Face model folder "
                            "(for a plain torch model, set model.factory instead)")
        if not names & set(SAFETENSORS + TORCH_BIN) and not any(n.endswith(".safetensors") for n in names):
            raise UserError(f"model.path '{cfg.path}': no weights (model.safetensors or pytorch_model.bin)")
    if tokenizer:
        _tokenizer_check(cfg)


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
        if safetensors or "weights_only" not in str(err) and not isinstance(err, pickle.UnpicklingError):
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
    layers = find_mlp_layers(model, cfg.layer_pattern)
    return LoadedModel(model, layers, _vocab_size(model), _context(model), device,
                       torch.bfloat16 if dtype == torch.bfloat16 else None)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's Hugging Face tokenizer (a fast tokenizer is needed for chunk offsets)."""
    _tokenizer_check(cfg)
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
