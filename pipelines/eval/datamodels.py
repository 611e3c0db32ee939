"""The linear datamodeling score (LDS; Park et al. 2023, TRAK) and its confidence interval.

Symbols: Q queries, N training examples, M random subsets of the training set.

For a query q and a subset S_j, attribution scores tau(q, n) predict the
query's output of a model trained on S_j as the subset sum
g(q, S_j) = sum_{n in S_j} tau(q, n). The LDS of q is the Spearman correlation
over the M subsets between g(q, S_j) and the measured output, here minus the
query's loss (this project's sign: a positive score means that training on n
lowers the query's loss). The suite reports the mean over queries.
"""

from __future__ import annotations

import torch

from .metrics import spearman


def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """[M, N] bool masks, each with round(fraction * N) examples drawn without replacement."""
    g = torch.Generator().manual_seed(seed)
    size = round(fraction * n)
    masks = torch.zeros(m, n, dtype=torch.bool)
    for j in range(m):
        masks[j, torch.randperm(n, generator=g)[:size]] = True
    return masks


def lds(scores: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """[Q] LDS per query.

    Args:
        scores: [Q, N] attribution scores (positive: lowers the query's loss).
        masks: [M, N] training subsets.
        losses: [Q, M] the query's loss of the models trained on each subset (mean over retraining seeds).
    """
    predicted = scores.to(torch.float64) @ masks.to(torch.float64).T  # (Q, M)
    return spearman(predicted, -losses.to(torch.float64))


def bootstrap_interval(values: torch.Tensor, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [Q] (resampling the queries)."""
    g = torch.Generator().manual_seed(seed)
    v = values.to(torch.float64)
    idx = torch.randint(0, len(v), (resamples, len(v)), generator=g)
    means = v[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)
