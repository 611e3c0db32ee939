"""EK-FAC factors of all tracked layers, and the chain of the three fitting stages.

Symbols: d_out, d_in' per layer; N_tok tokens (stage 1), N_seq sequences (stage 3).

Damping (docs/design.md section 2): ``None`` means lambda = 0.1 x mean(Lambda) per
layer (the heuristic of the paper's reference code); a float is an absolute value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .covariance import Covariances, fit_covariances
from .eigen import LayerEigen, eigendecompose
from .eigenvalue_correction import LambdaSums, fit_lambda
from .fingerprint import check_same_model, model_fingerprint
from .layers import TrackedLayer
from .fisher import DEFAULT_FISHER, Fisher, default_draws
from .objectives import Objective

log = logging.getLogger(__name__)

DAMPING_HEURISTIC_SCALE = 0.1


@dataclass
class LayerFactors:
    """Everything EK-FAC keeps for one layer.

    Attributes:
        a_sum: [d_in', d_in'] stage-1 sum; s_sum: [d_out, d_out]; tokens: N_tok.
        eigen: float64 eigenbases (Q_A, e_A, Q_S, e_S).
        lambda_sum: [d_out, d_in'] stage-3 sum; sequences: N_seq of stage 3.
    """

    a_sum: torch.Tensor
    s_sum: torch.Tensor
    tokens: int
    eigen: LayerEigen
    lambda_sum: torch.Tensor
    sequences: int

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Lambda = lambda_sum / N_seq, [d_out, d_in'] (float64)."""
        return self.lambda_sum.to(torch.float64) / self.sequences

    def damping(self, damping: float | None) -> float:
        """The damping value: ``damping`` if given, else 0.1 x mean(Lambda)."""
        if damping is not None:
            if damping < 0:
                raise ValueError(f"damping must be >= 0, got {damping}")
            return float(damping)
        return DAMPING_HEURISTIC_SCALE * float(self.eigenvalues.mean())


@dataclass
class EKFACFactors:
    """EK-FAC factors of a model.

    Attributes:
        layers: name -> LayerFactors, in tracked-layer order.
        shapes: name -> (d_out, d_in').
        fingerprint: ``model_fingerprint`` of the model they were fitted on.
        fisher: label mode used for fitting.
        covariance_sequences: sequences seen in stage 1.
        blocks: diagonal blocks per factor (1 = exact).
        samples: random label draws per position in stage 1 (1 unless fisher is SAMPLED, GAUSSIAN or TOPM).
        lambda_samples: the same in stage 3 (Lambda).
        passes, lambda_passes: backward passes the draws of stage 1 / stage 3 were summed into
            (``fisher.effective_passes``); None: one per draw.
    """

    layers: dict[str, LayerFactors]
    shapes: dict[str, tuple[int, int]]
    fingerprint: str
    fisher: Fisher
    covariance_sequences: int
    blocks: int = 1
    samples: int = 1
    lambda_samples: int = 1
    passes: int | None = None
    lambda_passes: int | None = None

    @property
    def tokens(self) -> int:
        """N_tok the factors were fitted on."""
        return next(iter(self.layers.values())).tokens

    @property
    def lambda_sequences(self) -> int:
        return next(iter(self.layers.values())).sequences

    def check_model(self, layers: Sequence[TrackedLayer]) -> None:
        """Raise ValueError unless ``layers`` are the ones these factors were fitted on."""
        check_same_model(layers, list(self.layers), self.fingerprint, "factors", "fitted on")


def assemble_factors(layers: Sequence[TrackedLayer], covariances: Covariances,
                     eigen: dict[str, LayerEigen], lambdas: LambdaSums, blocks: int = 1) -> EKFACFactors:
    """Combine the three stages' results into ``EKFACFactors``."""
    return EKFACFactors(
        layers={l.name: LayerFactors(
            a_sum=covariances.layers[l.name].a_sum, s_sum=covariances.layers[l.name].s_sum,
            tokens=covariances.layers[l.name].tokens, eigen=eigen[l.name],
            lambda_sum=lambdas.sums[l.name], sequences=lambdas.sequences) for l in layers},
        shapes={l.name: l.shape for l in layers},
        fingerprint=model_fingerprint(layers),
        fisher=covariances.fisher,
        covariance_sequences=covariances.sequences,
        blocks=blocks,
        samples=covariances.samples,
        lambda_samples=lambdas.samples,
        passes=covariances.passes,
        lambda_passes=lambdas.passes,
    )


def fit_ekfac(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    batches: Iterable[Any],
    fisher: Fisher = DEFAULT_FISHER,
    seed: int | None = 0,
    objective: Objective | None = None,
    lambda_batches: Iterable[Any] | None = None,
    blocks: int = 1,
    autocast_dtype: torch.dtype | None = None,
    samples: int | None = None,
    lambda_samples: int | None = None,
    same_lambda_draws: bool = False,
    passes: int | None = None,
    lambda_passes: int | None = None,
) -> EKFACFactors:
    """Stage 1 (covariances), stage 2 (eigh), stage 3 (Lambda) in one call.

    Args:
        batches: a re-iterable collection of batches (a list, not a generator):
            stage 1 and, unless ``lambda_batches`` is given, stage 3 read it.
        lambda_batches: optional separate batches for stage 3.
        blocks: diagonal blocks per factor (paper Appendix A).
        fisher: where labels come from; the default (TOPM with 5 / 2 draws, ``fisher.DEFAULT_DRAWS``)
            is the job's default, the steadiest across seeds at <= 2x the cost of one sampled draw.
        samples: k random label draws per position in stage 1 (SAMPLED, GAUSSIAN and TOPM only);
            None = the Fisher's default (TOPM 5, others 1).
        lambda_samples: draws per position in stage 3; None = ``samples`` when that is
            given, else the Fisher's default (TOPM 2, others 1) (``fisher.default_draws``).
        same_lambda_draws: stage 3 reuses stage 1's label draws (its generator
            seed); by default it draws independent labels (seed + 1).
        passes, lambda_passes: sum the k draws of stage 1 / stage 3 into this many backward passes
            (``fisher.effective_passes``: unbiased, cheaper, noisier; measured in
            benchmarks/eval/facts_passes/); None = one backward pass per draw (the default).
        Others as ``fit_covariances``.
    """
    if lambda_batches is None:
        if iter(batches) is batches:
            raise TypeError("batches is a one-shot iterator; fit_ekfac reads it twice: pass a list")
        lambda_batches = batches
    samples, lam_k = default_draws(fisher, samples, lambda_samples)
    covariances = fit_covariances(model, layers, batches, fisher, seed, objective, autocast_dtype, samples, passes)
    log.info("stage 1: %d sequences, %d tokens", covariances.sequences, covariances.tokens)
    eigen = eigendecompose(covariances, blocks=blocks)
    lam_seed = None if seed is None else seed + (0 if same_lambda_draws else 1)
    lambdas = fit_lambda(model, layers, eigen, lambda_batches, fisher, lam_seed, objective, autocast_dtype, lam_k,
                         lambda_passes)
    log.info("stage 3: %d sequences", lambdas.sequences)
    return assemble_factors(layers, covariances, eigen, lambdas, blocks)
