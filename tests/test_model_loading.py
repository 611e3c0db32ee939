"""Model loading as users expect: local folders, Hub names from the local cache, .bin weights, no pickles.

Nothing is downloaded: the Hugging Face cache is a folder built by the test
(``HF_HOME`` points at it) with the Hub's layout
(``hub/models--org--name/{refs/main, snapshots/<commit>/...}``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.config import ModelConfig, config_from_dict
from pipelines.errors import UserError
from pipelines.io.model_loading import load_model, load_tokenizer, model_identity
from pipelines.io.model_source import check_model_folder, model_source

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(home: Path, name: str, model_dir: Path) -> Path:
    """The Hub cache layout holding a copy of ``model_dir`` as ``name``; returns the snapshot folder."""
    repo = home / "hub" / ("models--" + name.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(model_dir.iterdir())):  # blobs + symlinks, as the Hub client writes them
        blob = blobs / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_hub_name_resolves_through_the_local_cache(tmp_path, tiny_world, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path / "hf", "someorg/tiny", tiny_world / "model")
    cfg = config_from_dict({"model": {"path": "someorg/tiny"},
                            "data": {"corpus": "c", "queries": "q", "output": "o"}}, base_dir=tmp_path)
    assert cfg.model.path == "someorg/tiny"  # no such folder next to the job file: a Hub name
    assert Path(model_source(cfg.model.path)) == snapshot
    check_model_folder(cfg.model, tokenizer=True)
    from_hub = load_model(cfg.model)
    from_folder = load_model(ModelConfig(path=str(tiny_world / "model")))
    want = params(from_folder.model)
    assert all(torch.equal(v, want[k]) for k, v in params(from_hub.model).items())
    assert load_tokenizer(cfg.model)("the cat")["input_ids"] == load_tokenizer(from_folder_cfg(tiny_world))(
        "the cat")["input_ids"]
    assert model_identity(cfg.model) == model_identity(ModelConfig(path=str(snapshot)))


def from_folder_cfg(world: Path) -> ModelConfig:
    return ModelConfig(path=str(world / "model"))


def test_hub_name_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UserError, match=r"model.path 'org/none' is not a folder and not in the Hugging Face "
                                        r"cache .*jobs never download models"):
        model_source("org/none")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"the machine is offline \(HF_HUB_OFFLINE is set\)"):
        check_model_folder(ModelConfig(path="org/none"))
    assert not (tmp_path / "hf" / "hub" / "models--org--none").exists()  # nothing was fetched or written


def test_pytorch_model_bin_loads(tmp_path, tiny_world):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bin"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world / "model"))
    model.config.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    check_model_folder(ModelConfig(path=str(folder)))
    got = params(load_model(ModelConfig(path=str(folder))).model)
    want = params(load_model(from_folder_cfg(tiny_world)).model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


class _Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_objects_in_a_bin_are_refused(tmp_path, tiny_world):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "evil"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world / "model"))
    model.config.save_pretrained(str(folder))
    marker = tmp_path / "pwned"
    state = dict(model.state_dict())
    state["evil"] = _Payload(str(marker))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin holds pickled Python objects.*weights_only=True"):
        load_model(ModelConfig(path=str(folder)))
    assert not marker.exists()


def test_remote_code_is_not_run_unless_the_job_allows_it(tmp_path, tiny_world):
    import json

    folder = tmp_path / "custom"
    shutil.copytree(tiny_world / "model", folder)
    marker = tmp_path / "ran"
    (folder / "modeling_custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_custom.C", "AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(ModelConfig(path=str(folder)))  # a known architecture: transformers' own class
    assert type(loaded.model).__module__.startswith("transformers.") and not marker.exists()
    config["model_type"] = "somethingcustom"  # only its own code can build it
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model.path '.*custom' ships its own code.*model.trust_remote_code"):
        load_model(ModelConfig(path=str(folder)))
    assert not marker.exists()


def test_missing_folder_file_and_weights(tmp_path, tiny_world):
    with pytest.raises(UserError, match=rf"model.path '{tmp_path}/nope' does not exist"):
        load_model(ModelConfig(path=str(tmp_path / "nope")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a model folder"):
        check_model_folder(ModelConfig(path=str(tmp_path / "file")))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_world / "model", bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    check_model_folder(ModelConfig(path=str(bare)))  # the model alone is fine
    with pytest.raises(UserError, match=rf"no tokenizer in model.path '{bare}'.*set model.tokenizer"):
        load_tokenizer(ModelConfig(path=str(bare)))
    with_tok = ModelConfig(path=str(bare), tokenizer=str(tiny_world / "model"))
    check_model_folder(with_tok, tokenizer=True)
    assert load_tokenizer(with_tok)("the cat")["input_ids"]


def test_object_storage_folder_is_checked_and_copied_once(s3_server, tiny_world, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem()
    fs.mkdir("models-6a")
    for f in (tiny_world / "model").iterdir():
        fs.put(str(f), f"models-6a/tiny/{f.name}")
        if f.name != "config.json":
            fs.put(str(f), f"models-6a/noconfig/{f.name}")
    cfg = ModelConfig(path="s3://models-6a/tiny")
    check_model_folder(cfg, tokenizer=True)
    got = params(load_model(cfg).model)
    want = params(load_model(from_folder_cfg(tiny_world)).model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    copies = list((tmp_path / "cache").iterdir())
    load_model(cfg)
    assert len(copies) == 1 and list((tmp_path / "cache").iterdir()) == copies  # one copy per node
    with pytest.raises(UserError, match=r"model.path 's3://models-6a/nope' does not exist"):
        check_model_folder(ModelConfig(path="s3://models-6a/nope"))
    with pytest.raises(UserError, match=r"model.path 's3://models-6a/noconfig': no config.json"):
        load_model(ModelConfig(path="s3://models-6a/noconfig"))
