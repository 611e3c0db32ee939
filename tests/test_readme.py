"""The README's examples: the Python example runs as written, the TOML job example is a valid job file."""

import re
from pathlib import Path

from pipelines.config import ResourceConfig, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})


def test_readme_toml_example_is_a_valid_job(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, f"expected one TOML job example in the README, found {len(blocks)}"
    job = tmp_path / "job.toml"
    job.write_text(blocks[0])
    cfg = load_config(job)
    # Every section is there, with the keys the README shows set to non-default values where it matters.
    assert cfg.model.path == "s3://bucket/models/pythia-160m"
    assert cfg.data.corpus.startswith("s3://") and cfg.data.raw.startswith("s3://")
    assert cfg.factors.sample_sequences == 100000 and cfg.factors.unit_sequences == 256
    assert cfg.scoring.rank == 32 and cfg.scoring.top_k == 50
    assert cfg.resources.actors == 4
    # Every key of [resources] appears in the example (object_store_mb included).
    shown = set(re.findall(r"^(\w+) =", blocks[0].split("[resources]", 1)[1], flags=re.M))
    assert shown == {f for f in ResourceConfig.__dataclass_fields__}, shown
