"""Fisher modes and label draws: where fitting's labels come from, how many draws, how many passes.

Fisher modes (docs/design.md section 2): ``SAMPLED`` draws every label from the
model's own predictive distribution with a seeded generator (the true Fisher /
Gauss-Newton form); ``EMPIRICAL`` uses the data's labels (deterministic, used for
comparisons and always for scoring); ``EXPECTED`` is the exact expectation over
the softmax (a reference for tiny models: T x V backward passes per batch);
``GAUSSIAN`` replaces the one-hot label draw by a Gaussian probe of the logit
gradient with the same covariance, diag(p) - p p^T; ``TOPM`` is the sampled
Fisher Rao-Blackwellized over the labels (the m = k - 1 most probable labels
enumerated exactly plus one draw from the tail; the default). The losses each
mode yields are built in ``label_draws``.

A stage's k draws (``default_draws``) share one forward pass; their statistics
get the weight ``draw_weight`` each, and ``effective_passes`` / ``summed_draws``
may add them into fewer backward passes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import torch


class Fisher(str, enum.Enum):
    """Where labels come from when fitting curvature."""

    SAMPLED = "sampled"
    EMPIRICAL = "empirical"
    EXPECTED = "expected"
    GAUSSIAN = "gaussian"
    TOPM = "topm"


DEFAULT_FISHER = Fisher.TOPM
DEFAULT_DRAWS: dict[Fisher, tuple[int, int]] = {Fisher.TOPM: (5, 2)}
"""The default fit: TOPM with 5 label draws per position in stage 1 and 2 in stage 3, the steadiest
across fitting seeds at <= 2x the cost of one sampled draw (README "Accuracy"). Other Fishers: 1 and 1."""


def default_draws(fisher: Fisher, samples: int | None = None, lambda_samples: int | None = None) -> tuple[int, int]:
    """(stage-1 draws, stage-3 draws) of a fit: ``samples`` and ``lambda_samples`` where given; a missing
    ``lambda_samples`` is ``samples`` when that is given, else both come from ``DEFAULT_DRAWS`` (1 and 1 for a
    Fisher without an entry)."""
    k, k_lambda = DEFAULT_DRAWS.get(Fisher(fisher), (1, 1))
    if samples is not None:
        k = k_lambda = samples
    return check_samples(k), check_samples(k_lambda if lambda_samples is None else lambda_samples)


def is_random(fisher: Fisher) -> bool:
    """True for the modes that draw from a seeded generator (SAMPLED, GAUSSIAN, TOPM)."""
    return fisher in (Fisher.SAMPLED, Fisher.GAUSSIAN, Fisher.TOPM)


def draw_weight(fisher: Fisher, samples: int) -> float:
    """The weight of one draw's statistics: 1/k for k SAMPLED or GAUSSIAN draws, else 1 (TOPM weighs in the loss)."""
    return 1.0 / samples if fisher in (Fisher.SAMPLED, Fisher.GAUSSIAN) else 1.0


def check_samples(samples: int) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"fisher samples must be an integer >= 1, got {samples!r}")
    return samples


def effective_passes(fisher: Fisher, samples: int, passes: int | None) -> int | None:
    """The backward passes a stage's k label draws are summed into, or None for one pass per draw.

    ``passes`` p < k (random Fishers only) sums the draws' losses round-robin into p losses
    (draws j, j + p, j + 2p, ... in pass j), each backpropagated once. Every draw's logit
    gradient has mean zero given the forward pass (sampled: p - e_y with y ~ p; Gaussian
    probes; topm: random signs), and different draws are independent, so the cross terms
    of a summed pass vanish in expectation: the statistics stay unbiased for the same
    Fisher, at p backward passes instead of k, with the cross terms as extra variance
    (measured: benchmarks/eval/facts_passes/). None, p >= k and non-random Fishers: one pass
    per draw (today's estimator, exactly). GAUSSIAN refuses p < k: a sum of independent
    Gaussian probes is itself one Gaussian probe (of k times the covariance), so summing
    would only be fewer draws at the memory of k (fewer ``samples`` does that directly).
    """
    if passes is None or not is_random(fisher):
        return None
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"fisher passes must be an integer >= 1 or None (one backward pass per draw), got {passes!r}")
    if passes >= samples:
        return None
    if fisher == Fisher.GAUSSIAN:
        raise ValueError(f"gaussian probes summed into {passes} passes are {passes} probes: set the draws to "
                         f"{passes} instead of summing {samples}")
    return passes


def summed_draws(losses: Iterable[torch.Tensor], passes: int) -> list[torch.Tensor]:
    """[B] losses of k draws summed round-robin into min(passes, k) losses (``effective_passes``): draw j
    goes into sum j mod passes."""
    sums: list[torch.Tensor] = []
    for j, loss in enumerate(losses):
        if j < passes:
            sums.append(loss)
        else:
            sums[j % passes] = sums[j % passes] + loss
    return sums
