"""kronfluence's EK-FAC scores on the same model and data, when kronfluence is installed (benchmark extra).

kronfluence is never a runtime dependency: ``available()`` says whether it
imports, and ``kronfluence_scores`` is called only then. Settings: its
defaults (EK-FAC, the true Fisher with one label drawn from the model per
position) with every dtype float64 and its damping heuristic
(``damping_factor=None``: 0.1 x mean(Lambda) per layer, as this project's
default). kronfluence wraps nn.Linear only, so a GPT-2 is scored through a
copy whose Conv1D MLP layers are nn.Linear with the weight transposed (the same
function; checked). Scores: [Q, N], q_grad^T (G + lambda I)^-1 g_n, this project's sign.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from influence_ops import IGNORE_INDEX


def available() -> str | None:
    """kronfluence's version, or None when it does not import."""
    try:
        import kronfluence
    except Exception:  # noqa: BLE001 - any import failure means "not installed" here
        return None
    return str(getattr(kronfluence, "__version__", "unknown"))


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """nn.Linear computing the same map as a HF Conv1D (weight [d_in, d_out] -> [d_out, d_in])."""
    d_in, d_out = conv.weight.shape
    lin = nn.Linear(d_in, d_out, bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of a GPT-2 whose MLP c_fc / c_proj are nn.Linear."""
    twin = copy.deepcopy(model)
    for block in twin.transformer.h:
        block.mlp.c_fc = linear_from_conv1d(block.mlp.c_fc)
        block.mlp.c_proj = linear_from_conv1d(block.mlp.c_proj)
    return twin.eval()


def _padded(rows: list[tuple[list[int], list[int]]], width: int) -> list[dict[str, torch.Tensor]]:
    """(input_ids, labels) rows -> dicts padded to ``width`` (pad id 0, label -100, mask 0)."""
    return [{"input_ids": torch.tensor(ids + [0] * (width - len(ids))),
             "attention_mask": torch.tensor([1] * len(ids) + [0] * (width - len(ids))),
             "labels": torch.tensor(labels + [IGNORE_INDEX] * (width - len(ids)))} for ids, labels in rows]


def _sampled(logits: torch.Tensor) -> torch.Tensor:
    """[R] labels drawn from softmax(logits [R, V])."""
    with torch.no_grad():
        return torch.multinomial(torch.softmax(logits, -1), 1).squeeze(-1)


def _task(kind: str, modules: list[str]) -> Any:
    from kronfluence.task import Task

    class SummedLossTask(Task):
        """Summed cross-entropy per example (classifier) or per sequence (LM); sampled labels when asked."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            if kind == "classifier":
                x, y = batch
                logits = model(x)
                return F.cross_entropy(logits, _sampled(logits) if sample else y, reduction="sum")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            if sample:
                flat_labels = torch.where(flat_labels == IGNORE_INDEX, flat_labels, _sampled(flat))
            return F.cross_entropy(flat, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return modules

        def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
            return None if kind == "classifier" else batch["attention_mask"]

    return SummedLossTask()


def kronfluence_scores(model: nn.Module, kind: str, train: list[Any], queries: list[Any], modules: list[str],
                       seed: int = 0, batch_size: int = 64, empirical: bool = False) -> torch.Tensor:
    """[Q, N] kronfluence EK-FAC pairwise scores.

    Args:
        kind: "classifier" (rows are (x [d], y) pairs) or "lm" (rows are (input_ids, labels) lists; a GPT-2).
        empirical: the empirical Fisher (data labels) instead of its default true Fisher (for tests).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="kronfluence")
    twin = copy.deepcopy(model).eval() if kind == "classifier" else linear_twin(model)
    if kind == "lm":
        width = max(len(r[0]) for r in train + queries)
        train, queries = _padded(train, width), _padded(queries, width)
        probe = train[0]["input_ids"][None]
        with torch.no_grad():
            gap = float((model(input_ids=probe).logits - twin(input_ids=probe).logits).abs().max())
        if gap > 1e-8:
            raise RuntimeError(f"the nn.Linear copy of the model differs from it by {gap:.2e}")
    task = _task(kind, modules)
    twin = prepare_model(twin, task)
    f64 = torch.float64
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical, activation_covariance_dtype=f64,
                                  gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
                                  per_sample_gradient_dtype=f64, lambda_dtype=f64)
    score_args = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64, query_gradient_svd_dtype=f64)
    torch.manual_seed(seed)  # the label draws
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="lds", model=twin, task=task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=batch_size, factor_args=factor_args,
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("scores", factors_name="ekfac", query_dataset=queries, train_dataset=train,
                                         per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"].to(torch.float64)
