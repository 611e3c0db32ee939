"""Shared fixtures of the pipeline tests: a local S3 server (moto), a local Ray, a tiny model and corpus.

Ray is started once per session (num_cpus=2, 512 MB object store, no dashboard,
its own temp folder, quiet). The S3 server's environment variables are set
before Ray starts so that Ray's workers inherit them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

WORDS = ("the a cat dog bird fish red blue green small big runs sits flies swims eats sleeps on under near "
         "tree house river hill and then quickly slowly today") .split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL (AWS_* variables set for the session)."""
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray for the session (started after the S3 variables are set)."""
    import ray

    from pipelines.runtime.ray_runtime import data_context

    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    cache = tempfile.mkdtemp(prefix="infl-cache-")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["INFLUENCE_CACHE_DIR"] = cache
    if ray.is_initialized():  # a test that ran a stage in-process started Ray on its own: use the session's
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, _temp_dir=temp,
             logging_level=logging.ERROR, log_to_driver=False)
    data_context().enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def make_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny GPT-2 with its tokenizer, raw JSONL texts, and a queries file, in a session folder."""
    from pipelines.demo.model import build_tokenizer, save_model, tiny_gpt2

    root = tmp_path_factory.mktemp("world")
    texts = make_texts(36, seed=1)
    tok = build_tokenizer(texts + [" ".join(WORDS)], root / "model")
    model = tiny_gpt2(len(tok), context=16, width=16, layers=2, heads=2, seed=3)
    save_model(model, root / "model")
    raw = root / "raw"
    raw.mkdir()
    for f in range(3):
        with open(raw / f"part{f}.jsonl", "w") as out:
            for i, t in enumerate(texts[f * 12:(f + 1) * 12]):
                out.write(json.dumps({"id": f"d{f}-{i}", "text": t}) + "\n")
    queries = root / "queries.jsonl"
    with open(queries, "w") as out:
        for qid, p, c in (("q-cat", "the cat", "sits on the hill"), ("q-fish", "a blue fish", "swims under"),
                          ("q-dog", "the big dog", "eats quickly")):
            out.write(json.dumps({"query_id": qid, "prompt": p, "completion": c}) + "\n")
    return root


@pytest.fixture(scope="session")
def brute_force_topk():
    """f(cfg) -> (query ids, TopKAccumulator): every sequence scored alone in this process, then sorted."""
    from influence_ops import TopKAccumulator, collate, load_queries, score_batch
    from pipelines.io import storage
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import list_shards, read_rows

    def compute(cfg):
        m = load_model(cfg.model)
        queries = load_queries(storage.local_copy(storage.join(cfg.data.output, "queries")))
        acc = TopKAccumulator(queries.num_queries, cfg.scoring.top_k)
        for shard in list_shards(cfg.data.corpus):
            seqs = read_rows(shard, None, None)
            for doc, ids in zip(seqs.doc_ids, seqs.input_ids):
                acc.update(score_batch(m.model, queries, collate([ids])).scores, [doc])
        return queries.query_ids, acc

    return compute


def topk_matches(table: list[dict], qids: list[str], acc, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert the topk/ rows equal the accumulator's: same docs in the same ranks, scores to tolerance."""
    import numpy as np

    for q, qid in enumerate(qids):
        for sign, side in (("top", acc.top), ("bottom", acc.bottom)):
            rows = sorted((r for r in table if r["query_id"] == qid and r["sign"] == sign), key=lambda r: r["rank"])
            assert [r["doc_id"] for r in rows] == list(side.ids[q]), f"{qid} {sign}"
            np.testing.assert_allclose([r["score"] for r in rows], side.scores[q], rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def assert_topk_equal():
    """The ``topk_matches`` check, for test modules."""
    return topk_matches


@pytest.fixture(scope="session")
def assert_factors_match_fit():
    """f(cfg) -> n: the pipeline's factors equal ``fit_ekfac`` in this process on the recorded sample of n sequences.

    Empirical Fisher. Stage-1 sums to float32 tolerance (added in another order);
    Lambda, which passes through eigh of those sums, to 1e-4 in relative Frobenius norm.
    """
    import torch

    from influence_ops import Fisher, collate, fit_ekfac, load_factors
    from pipelines.io import storage
    from pipelines.io.model_loading import load_model
    from pipelines.io.shards import read_rows

    def check(cfg) -> int:
        folder = storage.join(cfg.data.output, "factors")
        factors = load_factors(storage.local_copy(folder))
        sample = storage.read_parquet(storage.join(folder, "sample.parquet")).to_pylist()
        chosen = []
        for shard in sorted({r["shard"] for r in sample}):
            seqs = read_rows(shard, None, None, doc_ids={r["doc_id"] for r in sample if r["shard"] == shard})
            chosen += seqs.input_ids
        m = load_model(cfg.model)
        want = fit_ekfac(m.model, m.layers, [collate(chosen[i:i + 5]) for i in range(0, len(chosen), 5)],
                         fisher=Fisher.EMPIRICAL)
        assert factors.tokens == want.tokens and factors.lambda_sequences == want.lambda_sequences == len(sample)
        assert factors.fingerprint == want.fingerprint
        for name, lf in want.layers.items():
            got = factors.layers[name]
            torch.testing.assert_close(got.a_sum, lf.a_sum, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got.s_sum, lf.s_sum, rtol=1e-4, atol=1e-9)
            rel = float((got.lambda_sum - lf.lambda_sum).norm() / lf.lambda_sum.norm())
            assert rel < 1e-4, f"{name} lambda_sum: relative Frobenius error {rel:.2e}"
        return len(sample)

    return check


from results_fixtures import results_run, results_s3  # noqa: E402,F401  (the readers' shared run)
