"""One small run shared by the tests of the readers (sql, show, report, ddl, browser, Spark).

A world of its own: 30 short texts plus two hostile documents (HTML that
would run script if it were not escaped), a whitespace tokenizer (so that
``<script>alert(1)</script>`` is one token and decodes verbatim), a random
tiny GPT-2, three shards, three queries, and ``top_k = 20``: every document
is then in each query's top-k or bottom-k, the hostile ones included. The
same output is also copied to the moto S3 server for the s3:// tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

HOSTILE = {"evil-script": "the cat sits <script>alert(1)</script> on the hill",
           "evil-img": "a blue fish <img src=x onerror=alert(2)> swims under the tree"}


def _tokenizer(texts: list[str], directory: Path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(directory))
    return fast


@pytest.fixture(scope="session")
def results_run(ray_local, tmp_path_factory):
    """(job config, run record, root folder) of the readers' run (local files)."""
    from conftest import WORDS, make_texts
    from pipelines import config_from_dict
    from pipelines.demo.model import save_model, tiny_gpt2
    from pipelines.run import run_job

    root = tmp_path_factory.mktemp("results")
    texts = make_texts(30, seed=5)
    tok = _tokenizer(texts + list(HOSTILE.values()) + [" ".join(WORDS)], root / "model")
    save_model(tiny_gpt2(len(tok), context=24, width=16, layers=2, heads=2, seed=4), root / "model")
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)] + [{"id": k, "text": v} for k, v in HOSTILE.items()]
    (root / "raw").mkdir()
    for f in range(3):
        with open(root / "raw" / f"part{f}.jsonl", "w") as out:
            for d in docs[f::3]:
                out.write(json.dumps(d) + "\n")
    with open(root / "queries.jsonl", "w") as out:
        for qid, p, c in (("q-cat", "the cat", "sits on the hill"), ("q-fish", "a blue fish", "swims under"),
                          ("q-dog", "the big dog", "eats quickly")):
            out.write(json.dumps({"query_id": qid, "prompt": p, "completion": c}) + "\n")
    job = {
        "run_id": "readers",
        "model": {"path": str(root / "model")},
        "data": {"raw": str(root / "raw"), "corpus": str(root / "shards"), "queries": str(root / "queries.jsonl"),
                 "output": str(root / "out")},
        "factors": {"fisher": "empirical", "seed": 0},
        "scoring": {"top_k": 20, "rank": 4, "per_token": True, "self_influence": True},
        "resources": {"actors": 1, "batch_size": 8},
    }
    cfg = config_from_dict(job)
    with open(root / "job.toml", "w") as f:  # the same job, for `influence run`
        f.write(f"run_id = {json.dumps(job['run_id'])}\n")
        for section, values in job.items():
            if isinstance(values, dict):
                f.write(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    record = run_job(cfg)
    assert record["status"] == "ok"
    return cfg, record, root


@pytest.fixture(scope="session")
def results_s3(results_run, s3_server):
    """The readers' run copied to s3://influence-results/ (shards too; its resolved config points there)."""
    import s3fs

    cfg, _, root = results_run
    fs = s3fs.S3FileSystem()
    fs.mkdir("influence-results")
    for folder in ("out", "shards"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                fs.put(str(path), f"influence-results/{folder}/{path.relative_to(root / folder)}")
    resolved = json.loads((root / "out" / "resolved_config.json").read_text())
    resolved["data"]["corpus"] = "s3://influence-results/shards"
    resolved["data"]["output"] = "s3://influence-results/out"
    with fs.open("influence-results/out/resolved_config.json", "w") as f:
        f.write(json.dumps(resolved))
    return "s3://influence-results/out"
