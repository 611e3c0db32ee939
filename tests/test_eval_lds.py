"""`influence eval lds`: the LDS arithmetic on hand-computed cases, the kronfluence side, the CLI table."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import influence_ops as ops
from pipelines.cli import main
from pipelines.eval import kron, lds_cases
from pipelines.eval.datamodels import bootstrap_interval, lds, random_subsets
from pipelines.eval.exact import factor_scores
from pipelines.eval.lds import DEFAULT, FITS, IDENTITY, KFAC, KRONFLUENCE, method_scores
from pipelines.eval.lds_cases import lm_case
from pipelines.eval.metrics import spearman
from pipelines.eval.report import Progress


def test_lds_on_a_hand_computed_case():
    # scores of 3 training examples for 2 queries (the second is the first negated); 4 subsets
    scores = torch.tensor([[3.0, 1.0, -2.0], [-3.0, -1.0, 2.0]], dtype=torch.float64)
    masks = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    # subset sums for query 0: 4, 1, -1, 3 (ranks 3, 1, 0, 2)
    losses = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.1, 0.5, 0.3, 0.2]])
    # -loss: -0.1, -0.5, -0.3, -0.2 (ranks 3, 0, 1, 2): d = (0, 1, -1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8
    # query 1: ranks 0, 2, 3, 1 against 3, 0, 1, 2: d = (-3, 2, 2, -1), rho = 1 - 6 * 18 / 60 = -0.8
    got = lds(scores, masks, losses)
    assert torch.allclose(got, torch.tensor([0.8, -0.8], dtype=torch.float64))
    # a loss that falls exactly as the subset sum rises: LDS 1 (the sign convention)
    assert torch.allclose(lds(scores[:1], masks, -(scores[:1] @ masks.double().T)), torch.ones(1, dtype=torch.float64))


def test_random_halves_are_halves_distinct_and_reproducible():
    masks = random_subsets(11, 20, 0.5, seed=3)
    assert masks.shape == (20, 11) and masks.dtype == torch.bool
    assert masks.sum(1).tolist() == [6] * 20  # round(5.5) = 6
    assert len({tuple(m.tolist()) for m in masks}) > 15
    assert torch.equal(masks, random_subsets(11, 20, 0.5, seed=3))
    assert not torch.equal(masks, random_subsets(11, 20, 0.5, seed=4))


def test_bootstrap_interval_brackets_the_mean_and_widens_with_spread():
    assert bootstrap_interval(torch.full((10,), 0.3)) == pytest.approx((0.3, 0.3))
    g = torch.Generator().manual_seed(0)
    narrow = 0.5 + 0.01 * torch.randn(40, generator=g, dtype=torch.float64)
    wide = 0.5 + 0.2 * torch.randn(40, generator=g, dtype=torch.float64)
    for v in (narrow, wide):
        lo, hi = bootstrap_interval(v)
        assert lo < float(v.mean()) < hi
    assert bootstrap_interval(wide)[1] - bootstrap_interval(wide)[0] > 5 * (bootstrap_interval(narrow)[1]
                                                                          - bootstrap_interval(narrow)[0])


def test_without_kronfluence_its_row_says_not_installed(monkeypatch):
    monkeypatch.setattr(kron, "available", lambda: None)
    scores = method_scores(lm_case(quick=True), quick=False, progress=Progress(10, lambda s: None))
    assert set(scores) == {fit[0] for fit in FITS} | {KFAC, IDENTITY, KRONFLUENCE}
    sc, note, _ = scores[KRONFLUENCE]
    assert sc is None and note.startswith("not installed")
    assert scores[DEFAULT][0].shape == (4, 16)  # quick LM: 4 queries x 16 training sequences


@pytest.mark.skipif(kron.available() is None, reason="kronfluence (benchmark extra) not installed")
def test_kronfluence_side_matches_our_empirical_ekfac():
    """Same model, data, damping heuristic and empirical Fisher: the two EK-FACs must rank alike."""
    case = lm_case(quick=True)
    theirs = kron.kronfluence_scores(case.model, **case.kron, empirical=True)
    factors = ops.fit_ekfac(case.model, case.layers, case.fit_batches, fisher=ops.Fisher.EMPIRICAL,
                            objective=case.objective)
    ours = factor_scores(case, factors, {layer.name: None for layer in case.layers})
    assert theirs.shape == ours.shape
    assert float(spearman(ours, theirs).min()) > 0.99
    assert float(((ours - theirs).abs().max() / theirs.abs().max())) < 1e-3


def test_lds_suite_quick_writes_its_table(tmp_path):
    pytest.importorskip("sklearn")
    result = CliRunner().invoke(main, ["eval", "lds", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    assert "[1/" in result.output
    rows = pq.read_table(tmp_path / "lds.parquet").to_pylist()
    assert list(rows[0]) == ["model", "method", "subsets", "seeds", "lds", "ci95_low", "ci95_high", "vs_default",
                             "vs_default_ci95_low", "vs_default_ci95_high", "seconds", "note"]
    models = {r["model"] for r in rows}
    assert len(models) == 2 and any(m.startswith("digits") for m in models)
    assert len(rows) == 2 * (len(FITS) + 3)  # + K-FAC, identity, kronfluence
    for r in rows:
        if r["method"] == KRONFLUENCE:
            assert r["lds"] is None and r["note"] == "skipped with --quick"
            continue
        assert -1.0 <= r["ci95_low"] <= r["lds"] <= r["ci95_high"] <= 1.0, r
        if r["method"] == DEFAULT:
            assert r["vs_default"] == 0.0
    md = (tmp_path / "lds.md").read_text()
    assert f"influence eval lds --out {tmp_path} --quick" in md and "| lds |" in md


def test_without_scikit_learn_the_digits_setup_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(RuntimeError, match=r"scikit-learn.*corpus-influence\[eval\]"):
        lds_cases.load_digits_tensors()
