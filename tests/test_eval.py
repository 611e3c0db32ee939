"""The eval suites' own code on very small settings: the exact GGN against autograd, the CLI tables."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import influence_ops as ops
from pipelines.cli import main
from pipelines.eval import exact
from pipelines.eval.ggn import exact_ggn, flat_gradient, identity_hessian, softmax_hessian
from pipelines.eval.metrics import ranks, spearman, top_overlap
from pipelines.runtime.threads import torch_threads
from tests.ops_helpers import assert_close


def _linear(d_in: int, d_out: int, bias: bool = True) -> tuple[nn.Module, list[ops.TrackedLayer]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=bias)).double()
    return model, ops.find_mlp_layers(model, pattern=r"^0$")


def _hessian(model: nn.Module, loss_of_weights) -> torch.Tensor:
    """Autograd Hessian of loss(W') over the flattened [d_out, d_in'] homogeneous weight."""
    lin = model[0]
    w0 = torch.cat([lin.weight, lin.bias[:, None]], 1) if lin.bias is not None else lin.weight
    shape = w0.shape
    return torch.autograd.functional.hessian(lambda flat: loss_of_weights(flat.reshape(shape)),
                                             w0.detach().reshape(-1).clone())


@pytest.mark.parametrize("bias", [True, False])
def test_ggn_equals_the_hessian_of_a_linear_model_with_squared_error(bias):
    model, layers = _linear(3, 2, bias)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    ggn = exact_ggn([lambda i=i: model(x[i:i + 1]) for i in range(5)], layers, identity_hessian)
    xh = torch.cat([x, torch.ones(5, 1, dtype=x.dtype)], 1) if bias else x
    hess = _hessian(model, lambda w: 0.5 * ((xh @ w.T - y) ** 2).sum())
    assert_close(ggn, hess, name="GGN vs Hessian (squared error)")


def test_ggn_equals_the_hessian_of_a_linear_softmax_classifier():
    """A model linear in its parameters: J^T H J is the whole Hessian, for cross-entropy too."""
    model, layers = _linear(3, 4)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 4, (6,))
    ggn = exact_ggn([lambda i=i: model(x[i:i + 1]) for i in range(6)], layers, softmax_hessian)
    xh = torch.cat([x, torch.ones(6, 1, dtype=x.dtype)], 1)
    hess = _hessian(model, lambda w: nn.functional.cross_entropy(xh @ w.T, y, reduction="sum"))
    assert_close(ggn, hess, name="GGN vs Hessian (softmax cross-entropy)")
    # and its layout is the engine's: the gradient in the same layout matches G_n = g a^T
    loss = nn.functional.cross_entropy(model(x[:1]), y[:1], reduction="sum")
    g = torch.softmax(model(x[:1]), -1) - nn.functional.one_hot(y[:1], 4)
    assert_close(flat_gradient(loss, layers), (g.T @ xh[:1]).reshape(-1), name="layout")


def test_rank_metrics_on_a_hand_computed_case():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 40.0, 30.0], [1.0, 2.0, 3.0, 4.0]])
    assert ranks(torch.tensor([[3.0, 1.0, 3.0]])).tolist() == [[1.5, 0.0, 1.5]]
    assert_close(spearman(a, b), torch.tensor([0.8, -1.0], dtype=torch.float64), name="spearman")
    assert top_overlap(a, b, 2).tolist() == [1.0, 0.0]  # {2, 3} both; {0, 1} vs {2, 3}
    assert top_overlap(a, b, 1).tolist() == [0.0, 0.0]  # 3 vs 2


def _run(suite: str, out) -> None:
    result = CliRunner().invoke(main, ["eval", suite, "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    assert "[1/" in result.output  # progress lines
    return result


def test_exact_suite_quick_writes_its_table(tmp_path):
    _run("exact", tmp_path)
    table = pq.read_table(tmp_path / "exact.parquet")
    rows = table.to_pylist()
    methods = {r["method"] for r in rows}
    assert {"EK-FAC sampled k=2", "EK-FAC gaussian k=4", exact.DEFAULT, "EK-FAC expected",
            "EK-FAC empirical", "identity (gradient dot product)", "K-FAC expected (no eigenvalue correction)"} <= methods
    assert len({r["model"] for r in rows}) == 2
    assert all(-1.0 - 1e-9 <= r["spearman"] <= 1.0 + 1e-9 for r in rows)
    meta = table.schema.metadata
    assert meta[b"command"] == f"influence eval exact --out {tmp_path} --quick".encode()
    assert b"torch" in meta and b"machine" in meta
    md = (tmp_path / "exact.md").read_text()
    assert "| EK-FAC expected |" in md and "influence eval exact" in md


def test_stability_suite_quick_writes_its_table(tmp_path):
    threads_before = torch.get_num_threads()
    _run("stability", tmp_path)
    rows = {r["variant"]: r for r in pq.read_table(tmp_path / "stability.parquet").to_pylist()}
    assert set(rows) >= {"sampled k=1", "sampled k=2", "empirical (data labels)"}
    assert rows["sampled k=1 in stage 1, k=4 in stage 3 (Lambda)"]["lambda_samples"] == 4
    # the empirical Fisher draws nothing: two seeds give the same scores
    assert rows["empirical (data labels)"]["spearman_mean"] == pytest.approx(1.0, abs=1e-12)
    assert rows["empirical (data labels)"]["top10_overlap_mean"] == 1.0
    assert rows["sampled k=1"]["cost_vs_k1"] == 1.0
    assert rows["sampled k=1"]["spearman_mean"] < 1.0  # different seeds do differ
    assert (tmp_path / "stability.md").exists()
    # the suite runs on one torch thread (its table says so) and gives the caller's count back
    assert pq.read_table(tmp_path / "stability.parquet").schema.metadata[b"torch_threads"] == b"1"
    assert torch.get_num_threads() == threads_before


def test_torch_threads_gives_the_count_back_also_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_fisher_samples_config_keys():
    from pipelines.config import ConfigError, config_from_dict

    base = {"model": {"path": "/m"}, "data": {"corpus": "/c", "queries": "/q.jsonl", "output": "/o"}}
    cfg = config_from_dict(base)
    assert (cfg.factors.fisher, cfg.factors.fisher_samples, cfg.factors.lambda_samples) == (
        ops.Fisher.TOPM, 5, 2)  # the default chosen in README "Accuracy"
    assert (ops.DEFAULT_FISHER, *ops.DEFAULT_DRAWS[ops.DEFAULT_FISHER]) == (ops.Fisher.TOPM, 5, 2)  # fit_ekfac's too
    cfg = config_from_dict({**base, "factors": {"fisher": "expected", "fisher_samples": 2, "lambda_samples": 8}})
    assert cfg.factors.fisher == ops.Fisher.EXPECTED and cfg.factors.lambda_samples == 8
    for key in ("fisher_samples", "lambda_samples"):
        with pytest.raises(ConfigError, match=f"factors.{key} = 0"):
            config_from_dict({**base, "factors": {key: 0}})


def test_interleaved_fit_seconds_fits_every_variant_once_per_round_in_turn():
    from dataclasses import dataclass

    from pipelines.eval.stability import Variant, interleaved_fit_seconds

    calls = []

    @dataclass(frozen=True)
    class Recorded(Variant):
        def fit(self, case, seed):
            calls.append((self.label, seed, case))

    a, b = Recorded("a", ops.Fisher.SAMPLED), Recorded("b", ops.Fisher.TOPM, 3, 2)
    lines = []
    cpu, wall = interleaved_fit_seconds("the case", [a, b], 2, lines.append)
    assert calls == [("a", 0, "the case"), ("b", 0, "the case"), ("a", 1, "the case"), ("b", 1, "the case")]
    for times in (cpu, wall):
        assert set(times) == {"a", "b"} and all(len(t) == 2 and min(t) >= 0 for t in times.values())
    assert [line.split(":")[0:2] for line in lines] == [["round 0", " a"], ["round 0", " b"], ["round 1", " a"],
                                                         ["round 1", " b"]]
