"""Where a job's model and tokenizer are, and whether they can be loaded, from folder listings only.

``model.path`` may be
- a local folder;
- an object-storage folder (``s3://``, ``gs://``), used as it is (loading copies
  it once per node into the local cache: ``storage.local_copy``);
- a Hub name (``org/model``) that is already in the local Hugging Face cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``,
  read at call time). Nothing is ever downloaded: a name that is not cached is
  an error that says so (and that the machine is offline when
  ``HF_HUB_OFFLINE`` is set).

``check_model_folder`` finds a missing folder, ``config.json``, weights (in a
supported format) or tokenizer before any stage starts; the errors name the
job key and the folder.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from ..config import HUB_NAME, ModelConfig
from ..errors import UserError
from . import storage

def import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        hint = ""
        if isinstance(err, ModuleNotFoundError) and err.name and module_name.startswith(err.name):
            hint = ("; install it (pip install -e ...) or add its folder to PYTHONPATH (the `influence` command "
                    "does not search the current folder), and on a cluster ship it with the job")
        raise UserError(f"model.factory = {spec!r}: cannot import {module_name!r}: {err}{hint}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise UserError(f"model.factory = {spec!r}: {module_name!r} has no attribute {attr!r}") from err


CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that hold a tokenizer's vocabulary (one is enough): fast, BPE, WordPiece, SentencePiece.
# tokenizer_config.json alone is not a tokenizer (it loads as an empty vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
WEIGHT_INDEX = SAFETENSORS[1]
# Weight formats the loader does not read (named in the error so the user sees what was found).
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


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


def check_tokenizer(cfg: ModelConfig) -> None:
    """The job's tokenizer folder exists and holds a tokenizer (UserError naming the key and the folder)."""
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
        check_tokenizer(cfg)
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
            others = sorted(n for n in names if n.endswith(OTHER_WEIGHTS))
            found = f"only {others}" if others else "no weight file"
            raise UserError(f"model.path '{cfg.path}': no weights, found {found}; weights must be safetensors "
                            f"(model.safetensors or {WEIGHT_INDEX} with its shards) or pytorch_model.bin")
    if tokenizer:
        check_tokenizer(cfg)
