"""Agreement measures between score matrices [Q, N] (one row per query), and retrieval of known sources."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis (average ranks for ties), float64."""
    x = x.to(torch.float64)
    order = torch.argsort(x, dim=-1, stable=True)
    r = torch.empty_like(x)
    r.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    # average ties: equal values get the mean of their ranks
    out = torch.empty_like(r)
    for i in range(x.shape[0]):
        _, inverse, counts = torch.unique(x[i], return_inverse=True, return_counts=True)
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r[i])
        out[i] = (sums / counts)[inverse]
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Q] Pearson correlation of the rows of a and b ([Q, N] each)."""
    a = a.to(torch.float64) - a.to(torch.float64).mean(-1, keepdim=True)
    b = b.to(torch.float64) - b.to(torch.float64).mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Q] Spearman rank correlation of the rows."""
    return pearson(ranks(a), ranks(b))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """[Q] |top-k(a) & top-k(b)| / k per row."""
    k = min(k, a.shape[-1])
    ta, tb = torch.topk(a, k, dim=-1).indices, torch.topk(b, k, dim=-1).indices
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)], dtype=torch.float64)


def per_query_correlations(scores: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    p, s = pearson(scores, exact), spearman(scores, exact)
    return {"pearson": float(p.mean()), "spearman": float(s.mean()), "pearson_min": float(p.min()),
            "spearman_min": float(s.min())}


def first_source_rank(scores: Sequence[float], is_source: Sequence[bool]) -> float:
    """Rank (1 = best) of the highest-scored source among N scores; inf if there is no source.

    Ties are broken at random, in expectation: with k non-sources tied with the
    best source's score and m sources at that score, the first source's
    expected position in the tie is 1 + k / (m + 1).
    """
    best = max((s for s, src in zip(scores, is_source) if src), default=None)
    if best is None:
        return math.inf
    above = sum(1 for s, src in zip(scores, is_source) if not src and s > best)
    tied = sum(1 for s, src in zip(scores, is_source) if not src and s == best)
    tied_sources = sum(1 for s, src in zip(scores, is_source) if src and s == best)
    return 1.0 + above + tied / (tied_sources + 1)


def retrieval(first_ranks: Sequence[float], k: int = 10) -> dict[str, float]:
    """recall@k (share of queries whose first source ranks <= k) and MRR (mean 1 / first rank)."""
    n = max(len(first_ranks), 1)
    return {f"recall@{k}": sum(r <= k for r in first_ranks) / n, "mrr": sum(1.0 / r for r in first_ranks) / n}


def paired_interval(a: Sequence[float], b: Sequence[float], draws: int = 10000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over paired items, with a 95% paired bootstrap interval: (mean, low, high)."""
    import random

    rng = random.Random(seed)
    d = [y - x for x, y in zip(a, b)]
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(draws))
    return sum(d) / len(d), means[int(0.025 * draws)], means[int(0.975 * draws)]


def nested_paired_interval(a: torch.Tensor, b: torch.Tensor, draws: int = 10000, seed: int = 0,
                           resample_groups: bool = True) -> tuple[float, float, float]:
    """Mean of b - a over paired items in groups, with a 95% two-level bootstrap interval: (mean, low, high).

    Items are (group, item) pairs, e.g. (model seed, query): a and b are [S, Q] (S
    groups of Q items, the same items for both). Each bootstrap draw resamples the S
    groups with replacement, then the Q items within each drawn group with replacement,
    and takes the mean difference; the interval is the 2.5% and 97.5% points of the
    draws. ``resample_groups=False`` keeps every group once (queries resampled within
    each group only): an interval for these S groups, not for groups like them.
    """
    d = (b.to(torch.float64) - a.to(torch.float64))  # (S, Q)
    if d.ndim != 2 or d.numel() == 0:
        raise ValueError(f"paired values must be [groups, items], got shape {tuple(d.shape)}")
    S, Q = d.shape
    gen = torch.Generator().manual_seed(seed)
    groups = (torch.randint(S, (draws, S), generator=gen) if resample_groups
              else torch.arange(S).expand(draws, S))  # (draws, S)
    items = torch.randint(Q, (draws, S, Q), generator=gen)  # (draws, S, Q)
    means = d[groups.unsqueeze(-1), items].mean(dim=(1, 2)).sort().values  # (draws,)
    return float(d.mean()), float(means[int(0.025 * draws)]), float(means[int(0.975 * draws)])
