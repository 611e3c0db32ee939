"""The exact suite's own math on tiny cases: the two-level paired bootstrap, EK-FAC and K-FAC curvature blocks
against the exact Gauss-Newton matrix, the multi-seed CLI table."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import influence_ops as ops
from pipelines.cli import main
from pipelines.eval.blocks import block_errors, kfac_layer, layer_curvature
from pipelines.eval.ggn import layer_slices
from pipelines.eval.exact import COMPARISONS, DEFAULT, TOPM3, classifier_setup, lm_setup
from pipelines.eval.ggn import exact_ggn
from pipelines.eval.metrics import nested_paired_interval
from tests.ops_helpers import assert_close


def test_nested_paired_interval_on_hand_made_cases():
    zeros = torch.zeros(2, 2)
    # two seeds, all queries +1 in one and +3 in the other: the mean is 2; resampling the seeds gives
    # 1, 2 or 3 (probabilities 1/4, 1/2, 1/4), so the 95% interval is [1, 3]; with the seeds kept, every
    # draw is 2 (the queries within a seed are equal)
    b = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert nested_paired_interval(zeros, b) == pytest.approx((2.0, 1.0, 3.0))
    assert nested_paired_interval(zeros, b, resample_groups=False) == pytest.approx((2.0, 2.0, 2.0))
    # one seed, differences 0 and 2: means 0, 1, 2 with probabilities 1/4, 1/2, 1/4
    assert nested_paired_interval(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 3.0]])) == pytest.approx(
        (1.0, 0.0, 2.0))
    # the difference is b - a, paired: a constant shift gives a zero-width interval at the shift
    a = torch.randn(3, 5, dtype=torch.float64)
    assert nested_paired_interval(a, a - 0.25) == pytest.approx((-0.25, -0.25, -0.25))
    with pytest.raises(ValueError, match="groups, items"):
        nested_paired_interval(torch.zeros(4), torch.zeros(4))


@pytest.mark.parametrize("make", [classifier_setup, lm_setup], ids=["mlp", "gpt2"])
def test_ekfac_expected_block_is_the_best_diagonal_in_the_kfac_eigenbasis(make):
    """Lambda (expected Fisher) = diag(K^T F_ll K) of the exact GGN block, so EK-FAC's block error <= K-FAC's."""
    s = make(True, 1)
    ggn = exact_ggn(s.examples, s.layers) / len(s.examples)
    f = ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=ops.Fisher.EXPECTED, objective=s.objective)
    slices = layer_slices(s.layers)
    for layer in s.layers:
        lf, sl = f.layers[layer.name], slices[layer.name]
        k = torch.kron(lf.eigen.q_s, lf.eigen.q_a)  # (P_l, P_l)
        best = torch.diagonal(k.T @ ggn[sl, sl] @ k).reshape(lf.eigenvalues.shape)
        assert_close(lf.eigenvalues, best, rtol=1e-9, atol=1e-12 * float(best.abs().max()),
                     name=f"Lambda vs diag(K^T F K), {layer.name}")
    errors = block_errors(ggn, s.layers, {"ekfac": f.layers,
                                          "kfac": {n: kfac_layer(lf) for n, lf in f.layers.items()}})
    for layer in s.layers:
        assert errors[layer.name]["ekfac"] <= errors[layer.name]["kfac"] + 1e-12, layer.name
        assert 0.0 < errors[layer.name]["ekfac"] < 1.0, layer.name
    assert errors["all"]["ekfac"] < errors["all"]["kfac"]
    # dropping the cross-layer blocks is part of every per-layer method's error
    assert 0.0 < errors["all"]["exact GGN, block-diagonal"] <= errors["all"]["ekfac"]
    # the damped inverses: per layer (F_hat + lambda I)^-1 against (F_ll + lambda I)^-1
    damping = {layer.name: 0.1 * (i + 1) for i, layer in enumerate(s.layers)}
    inverse = block_errors(ggn, s.layers, {"ekfac": f.layers}, damping)
    layer, sl = s.layers[-1], slices[s.layers[-1].name]
    eye = 0.1 * len(s.layers) * torch.eye(sl.stop - sl.start, dtype=torch.float64)
    want = torch.linalg.matrix_norm(torch.linalg.inv(layer_curvature(f.layers[layer.name]) + eye)
                                    - torch.linalg.inv(ggn[sl, sl] + eye)) / torch.linalg.matrix_norm(
        torch.linalg.inv(ggn[sl, sl] + eye))
    assert inverse[layer.name]["ekfac"] == pytest.approx(float(want), rel=1e-9)


def test_layer_curvature_is_what_apply_inverse_inverts():
    """K diag(Lambda) K^T in the GGN's layout: (F_hat + lambda I)^-1 v equals ``apply_inverse``."""
    s = classifier_setup(True, 0)
    f = ops.fit_ekfac(s.model, s.layers, s.fit_batches, fisher=ops.Fisher.EMPIRICAL, objective=s.objective)
    for lf in (f.layers[s.layers[1].name], kfac_layer(f.layers[s.layers[1].name])):
        v = torch.randn(2, *lf.eigenvalues.shape, dtype=torch.float64)
        dense = layer_curvature(lf) + 0.3 * torch.eye(v[0].numel(), dtype=torch.float64)
        want = torch.linalg.solve(dense, v.reshape(2, -1).T).T.reshape(v.shape)
        assert_close(ops.apply_inverse(lf, v, damping=0.3), want, name="apply_inverse vs dense solve")


def test_exact_suite_quick_reports_paired_intervals_and_blocks(tmp_path):
    result = CliRunner().invoke(main, ["eval", "exact", "--out", str(tmp_path), "--quick", "--model-seeds", "3,5"])
    assert result.exit_code == 0, result.output
    main_rows = pq.read_table(tmp_path / "exact.parquet").to_pylist()
    assert {r["model_seeds"] for r in main_rows} == {2}
    bound = [r for r in main_rows if r["method"].startswith("exact GGN, layer-block-diagonal")]
    assert len(bound) == 2 and all(r["spearman_bd"] == pytest.approx(1.0) for r in bound)
    paired = pq.read_table(tmp_path / "exact_paired.parquet")
    assert paired.schema.metadata[b"command"] == f"influence eval exact --out {tmp_path} --quick " \
                                                 f"--model-seeds 3,5".encode()
    rows = paired.to_pylist()
    assert {r["reference"] for r in rows} == {"exact", "block-diagonal exact"}
    assert len(rows) == 2 * 2 * len(COMPARISONS)  # models x references x comparisons
    assert {r["comparison"] for r in rows} >= {f"{DEFAULT} - {TOPM3}", "EK-FAC expected - K-FAC expected "
                                                 "(no eigenvalue correction)"}
    for r in rows:
        assert r["spearman_low"] <= r["spearman_diff"] <= r["spearman_high"]
        assert r["spearman_low_fixed_models"] <= r["spearman_diff"] <= r["spearman_high_fixed_models"]
    blocks = pq.read_table(tmp_path / "exact_blocks.parquet").to_pylist()
    per_layer = [r for r in blocks if r["layer"] != "all" and r["matrix"] == "F"]
    assert len(per_layer) == 3 + 2  # MLP 3 layers, GPT-2 1 block x (c_fc, c_proj)
    assert all(r["seeds_ekfac_expected_below_kfac"] == "2/2" for r in per_layer)
    assert {r["matrix"] for r in blocks} == {"F", "(F + D)^-1"} and len(blocks) == 2 * (3 + 2 + 2)
    md = (tmp_path / "exact.md").read_text()
    assert "EK-FAC expected - K-FAC expected" in md and "| all |" in md


@pytest.mark.parametrize("args, message", [(["exact", "--model-seeds", "0,x"], "comma-separated integers"),
                                           (["exact", "--model-seeds", "1,1"], "repeated seed"),
                                           (["stability", "--model-seeds", "0"], "exact and facts suites only")])
def test_model_seeds_option_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["eval", *args, "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 2 and message in result.output, result.output
