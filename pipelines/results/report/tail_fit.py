"""A power-law fit of the top of a distribution of influence scores (the paper's sparsity analysis).

For the n largest positive scores x_1 >= ... >= x_n (x_min = x_n), the
continuous power law p(x) ~ x^(-alpha) for x >= x_min has the maximum-likelihood
exponent (Clauset, Shalizi and Newman 2009, eq. 3.1)

    alpha = 1 + n / sum_i ln(x_i / x_min),   standard error (alpha - 1) / sqrt(n),

and its survival function P(X > x | X >= x_min) = (x / x_min)^(1 - alpha).
``ks`` is the largest gap between that and the empirical survival function of
the n points (small = the points follow the fitted line). Fewer than
``MIN_POINTS`` points, or points that are all equal, give no fit and a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_POINTS = 10


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float | None
    stderr: float | None
    x_min: float | None
    n: int
    ks: float | None
    reason: str  # why there is no fit ('' when there is one)

    @property
    def ok(self) -> bool:
        return self.alpha is not None


def fit_power_law(values: list[float], min_points: int = MIN_POINTS) -> PowerLawFit:
    """Fit the positive ``values`` (any order): all of them form the tail."""
    xs = sorted((v for v in values if v > 0), reverse=True)
    n = len(xs)
    if n < min_points:
        return PowerLawFit(None, None, None, n, None,
                           f"{n} positive scores are known exactly at the top of the distribution; a power-law "
                           f"fit needs at least {min_points} (raise scoring.top_k or split the corpus into more "
                           "shards)")
    x_min = xs[-1]
    logs = sum(math.log(x / x_min) for x in xs)
    if logs <= 0:
        return PowerLawFit(None, None, x_min, n, None, "the top scores are all equal: no tail to fit")
    alpha = 1.0 + n / logs
    ks = 0.0
    for i, x in enumerate(xs):  # empirical survival at x_i: i / n above it, (i + 1) / n at or above
        model = (x / x_min) ** (1.0 - alpha)
        ks = max(ks, abs(model - i / n), abs(model - (i + 1) / n))
    return PowerLawFit(alpha, (alpha - 1.0) / math.sqrt(n), x_min, n, ks, "")
