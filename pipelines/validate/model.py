"""The model folder: config readable, weights in a supported format, tokenizer when text is involved, tracked layers.

Fast: no weight is read. A Hugging Face folder's model is built from its
``config.json`` on the ``meta`` device (shapes, no memory) and the tracked
layers are found on it with ``influence_ops.find_mlp_layers``, exactly as the
stages will find them; a factory model is built on the meta device too (or
normally when it cannot be). Every problem is a ``ConfigError`` naming the job
key (``model.path``, ``model.tokenizer``, ``model.layer_pattern``, ``model.factory``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig
from ..io import storage
from ..io.model_source import check_model_folder, model_source
from ..io.model_source import check_tokenizer as check_tokenizer_folder

CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass
class ModelInfo:
    """What the other checks need: vocab size V (ids < V), context (longest sequence), layers, tokenizer."""

    description: str
    vocab_size: int | None
    context: int | None
    layers: list[str]
    tokenizer: Any = None

    @property
    def byte_level(self) -> bool:
        return self.tokenizer is not None and is_byte_level(self.tokenizer)


def is_byte_level(tokenizer: Any) -> bool:
    """True for byte-level BPE tokenizers (GPT-2 style: a leading space is part of the next token)."""
    if hasattr(tokenizer, "byte_encoder"):  # the slow GPT-2 tokenizer
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])


def _read_config(path: str) -> dict[str, Any]:
    url = storage.join(path, "config.json")
    try:
        config = json.loads(storage.read_bytes(url))
    except FileNotFoundError as err:
        raise ConfigError(f"model.path = {path!r}: no config.json (not a Hugging Face model folder)") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{url}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"{url}: no 'model_type' key (not a Hugging Face model config)")
    return config


def check_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer (loaded); UserError when there is none where the job says (``io.model_source``'s check)."""
    check_tokenizer_folder(cfg)
    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    url = model_source(cfg.tokenizer_path, key)
    from ..io.model_loading import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg)
    except (ValueError, OSError, ImportError) as err:
        raise ConfigError(f"{key} = {url!r}: the tokenizer does not load: {str(err).splitlines()[0]}") from err
    if len(tokenizer) == 0:
        raise ConfigError(f"{key} = {url!r}: the tokenizer has an empty vocabulary")
    return tokenizer


def _meta_model(config: dict[str, Any], trust_remote_code: bool) -> Any:
    """The architecture of ``config`` on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        hf_config = AutoConfig.from_pretrained(tmp, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)


def _factory_model(cfg: ModelConfig) -> Any:
    import torch

    from ..io.model_loading import import_factory

    try:
        factory = import_factory(cfg.factory)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.factory = {cfg.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _layers(cfg: ModelConfig, model: Any) -> list[str]:
    from influence_ops import find_mlp_layers
    from influence_ops.layers import UnknownArchitecture

    source = f"model.factory = {cfg.factory!r}" if cfg.factory else f"model.path = {cfg.path!r}"
    try:
        return [layer.name for layer in find_mlp_layers(model, cfg.layer_pattern, cfg.track)]
    except UnknownArchitecture as err:
        raise ConfigError(f"{source}: no tracked layers are known for {err.class_name} (model type "
                          f"{err.model_type!r}): set model.layer_pattern to a regular expression over its module "
                          f"names; its Linear modules: {err.linears}") from err
    except ValueError as err:
        key = f"model.layer_pattern = {cfg.layer_pattern!r}" if cfg.layer_pattern else source
        raise ConfigError(f"{key}: tracked layers not found: {str(err).splitlines()[0]}") from err


def _size(model: Any, config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(vocab size, context) from the config, else from the model (an embedding, a ``context`` attribute)."""
    import torch

    vocab = config.get("vocab_size")
    if vocab is None:
        vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    context = next((config[k] for k in CONTEXT_KEYS if config.get(k)), None) or getattr(model, "context", None)
    return (int(vocab) if vocab else None), (int(context) if context else None)


def check_model(cfg: ModelConfig, needs_tokenizer: bool) -> ModelInfo:
    """Check the model (and its tokenizer when ``needs_tokenizer`` or when one is set); returns what it found."""
    if cfg.factory is not None:
        model, config = _factory_model(cfg), {}
        description = f"factory {cfg.factory}"
    else:
        check_model_folder(cfg)  # the folder, config.json and weights, from the listing (the stages' own check)
        source = model_source(cfg.path)  # a folder, an object-storage URL, or a Hub name's cached snapshot
        config = _read_config(source)
        try:
            model = _meta_model(config, cfg.trust_remote_code)
        except (ValueError, KeyError, OSError, ImportError) as err:
            raise ConfigError(f"model.path = {cfg.path!r}: config.json does not describe a causal LM that "
                              f"transformers can build: {str(err).splitlines()[0]}") from err
        description = f"{cfg.path} ({config['model_type']})"
    layers = _layers(cfg, model)
    vocab, context = _size(model, config)
    tokenizer = check_tokenizer(cfg) if needs_tokenizer else None
    description += (f": vocab {vocab}, context {context}, {len(layers)} tracked layers"
                    + (", tokenizer ok" if tokenizer is not None else ""))
    return ModelInfo(description, vocab, context, layers, tokenizer)
