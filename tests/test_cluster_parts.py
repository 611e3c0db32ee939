"""Parts of the cluster path without a cluster: ranged tensor reads, per-layer reductions, unit
accounting, the shipped job file and working_dir."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from influence_ops import Covariances, Fisher, LambdaSums, LayerCovariance
from pipelines import config_from_dict
from pipelines.cluster.jobfile import local_paths, to_toml
from pipelines.io import storage
from pipelines.io.payloads import covariances_to_bytes, lambda_to_bytes
from pipelines.io.tensor_files import open_header, read_tensor
from pipelines.runtime.accounting import PREFIX, Ledger, UnitLog, unit_key
from pipelines.stages.factor_layers import LayerEigenWorker, LayerFinalWorker, reduce_covariance, reduce_lambda


@pytest.mark.parametrize("root", ["memory://tensor-files", "local"])
def test_ranged_tensor_reads_equal_the_saved_tensors(root, tmp_path):
    root = str(tmp_path) if root == "local" else root
    tensors = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0, 4)}
    url = storage.join(root, "t.safetensors")
    storage.write_bytes(url, st_save(tensors, metadata={"k": "v"}))
    tf = open_header(url)
    assert tf.metadata == {"k": "v"} and sorted(tf.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(read_tensor(tf, name), t), name
    with pytest.raises(KeyError, match="no tensor 'zz'"):
        read_tensor(tf, "zz")
    storage.write_bytes(storage.join(root, "bad.safetensors"), b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):
        open_header(storage.join(root, "bad.safetensors"))


def partial_covariances(seed: int, tokens: tuple[int, int]) -> Covariances:
    g = torch.Generator().manual_seed(seed)
    return Covariances({name: LayerCovariance(torch.randn(d, d, generator=g), torch.randn(e, e, generator=g), t)
                        for name, d, e, t in (("l0", 4, 3, tokens[0]), ("l1", 5, 2, tokens[1]))}, 3, Fisher.SAMPLED)


def test_per_layer_reductions_equal_the_in_memory_merge_in_unit_order(tmp_path):
    parts = [partial_covariances(i, (10 + i, 20 + i)) for i in range(3)]
    urls = []
    for i, part in enumerate(parts):
        urls.append(str(tmp_path / f"s1-{i}.safetensors"))
        storage.write_bytes(urls[-1], covariances_to_bytes(part, {"key": "k"}))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for name in ("l0", "l1"):
        cov, sequences = reduce_covariance(name, urls)
        assert torch.equal(cov.a_sum, merged.layers[name].a_sum) and torch.equal(cov.s_sum, merged.layers[name].s_sum)
        assert cov.tokens == merged.layers[name].tokens and sequences == 9
    lams = [LambdaSums({"l0": torch.randn(3, 4), "l1": torch.randn(2, 5)}, 2 + i, Fisher.SAMPLED) for i in range(3)]
    lam_urls = []
    for i, lam in enumerate(lams):
        lam_urls.append(str(tmp_path / f"s3-{i}.safetensors"))
        storage.write_bytes(lam_urls[-1], lambda_to_bytes(lam, {"key": "k"}))
    total, sequences = reduce_lambda("l1", lam_urls)
    assert torch.equal(total, lams[0].merge(lams[1]).merge(lams[2]).sums["l1"]) and sequences == 9
    with pytest.raises(ValueError, match="no layer 'l9'"):
        reduce_lambda("l9", lam_urls)

    # the two layer workers, called directly: the final file loads as influence_ops factors would
    eig = LayerEigenWorker()({"unit": np.array([json.dumps({"name": "l0", "partials": urls, "blocks": 1, "key": "k",
                                                             "out": str(tmp_path / "e0.safetensors")})])})
    assert eig["name"].tolist() == ["l0"] and eig["d_out"].tolist() == [3] and eig["d_in_h"].tolist() == [4]
    final = LayerFinalWorker()({"unit": np.array([json.dumps({"name": "l0", "stage2": str(tmp_path / "e0.safetensors"),
                                                               "partials": lam_urls,
                                                               "out": str(tmp_path / "000_l0.safetensors")})])})
    entry = json.loads(final["entry"][0])
    assert entry == {"name": "l0", "file": "000_l0.safetensors", "d_out": 3, "d_in_h": 4, "tokens": 33,
                     "sequences": 9, "dtype": "float32"}
    tf = open_header(str(tmp_path / "000_l0.safetensors"))
    q_a, e_a = read_tensor(tf, "q_a"), read_tensor(tf, "e_a")
    a = (merged.layers["l0"].a_sum / 33).double()  # normalized in the sums' dtype, then eigh in float64
    a = (a + a.T) / 2
    torch.testing.assert_close(q_a @ torch.diag(e_a) @ q_a.T, a, rtol=1e-10, atol=1e-10)


def test_unit_log_counts_units_nodes_busy_time_retries_and_gaps():
    log = UnitLog()
    log.stage_start = 100.0
    calls = [("n1", "a1", 1, 101.0, 103.0, False), ("n1", "a1", 1, 103.5, 104.0, False),
             ("n2", "a2", 2, 101.0, 106.0, False), ("n3", "a2", 3, 107.0, 108.0, True)]
    for node, actor, pid, start, end, restarted in calls:
        for _ in range(2):  # a unit may return several rows: counted once
            row = log.add({"x": 1, **{PREFIX + k: v for k, v in dict(
                node=node, actor=actor, pid=pid, start=start, end=end, restarted=restarted).items()}})
            assert row == {"x": 1}
    log.starts = {unit_key("u1"): 1, unit_key("u2"): 3, unit_key("u3"): 2, unit_key("u4"): 1}  # from the ledger
    s = log.summary()
    assert s["units"] == 4 and s["retries"] == 3 and s["restarted_actors"] == ["a2"]
    assert s["nodes"]["n1"] == {"units": 2, "busy_s": 2.5, "actors": 1}
    assert s["actors"]["a2"] == {"node": "n3", "units": 2, "busy_s": 6.0, "incarnations": 2}
    assert s["gap_between_units_s"]["count"] == 1 and s["gap_between_units_s"]["mean"] == 0.5
    assert s["wall_s"] == 8.0 and s["first_unit_start_s"] == 1.0


def test_ledger_counts_unit_starts():
    ledger = Ledger()
    for unit in ("a", "b", "a"):
        ledger.started(unit_key(unit))
    assert ledger.counts() == {unit_key("a"): 2, unit_key("b"): 1}


def test_shipped_job_file_round_trips_with_absolute_paths(tmp_path):
    from pipelines.config import load_config

    (tmp_path / "job.toml").write_text('[model]\npath = "model"\n[data]\ncorpus = "s3://b/shards"\n'
                                       'queries = "q.jsonl"\noutput = "s3://b/out"\n[scoring]\nrank = 0\n'
                                       '[resources]\nactors = 3\ngpus_per_actor = "auto"\n')
    cfg = load_config(tmp_path / "job.toml")
    shipped = tmp_path / "shipped" / "job.toml"
    shipped.parent.mkdir()
    shipped.write_text(to_toml(cfg))
    again = load_config(shipped)
    assert again == cfg and again.model.path == str(tmp_path / "model") and again.scoring.rank is None
    assert local_paths(cfg) == [str(tmp_path / "model"), str(tmp_path / "q.jsonl")]
    assert config_from_dict({"model": {"path": "m"}, "data": {"corpus": "c", "queries": "q", "output": "o"},
                             "resources": {"task_retries": -1, "actor_restarts": 2}}).resources.actor_restarts == 2
    with pytest.raises(ValueError, match="resources.task_retries = -2"):
        config_from_dict({"model": {"path": "m"}, "data": {"corpus": "c", "queries": "q", "output": "o"},
                          "resources": {"task_retries": -2}})


def test_submission_working_dir_holds_the_code_and_the_job(tmp_path):
    from pipelines.cluster.submit import stage_working_dir

    staged = stage_working_dir("run_id = \"x\"\n", tmp_path)
    assert (staged / "job.toml").read_text() == "run_id = \"x\"\n"
    assert (staged / "pipelines" / "cli.py").exists() and (staged / "influence_ops" / "scores.py").exists()
    assert not list(staged.rglob("__pycache__"))
