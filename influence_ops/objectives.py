"""Objectives: per-sequence summed losses, with true-Fisher or empirical labels.

Symbols: B sequences, T tokens, V vocabulary.

The training loss of a sequence is the SUM of token negative log-likelihoods
(not the mean), so a sequence's gradient does not depend on batching or padding.
The query measurement is the same sum over completion tokens only (prompt
tokens carry label -100), so the query gradient is grad of -log p(completion |
prompt).

Fisher modes (docs/design.md section 2): ``SAMPLED`` draws every label from the
model's own predictive distribution with a seeded generator (the true Fisher /
Gauss-Newton form, the default for fitting factors); ``EMPIRICAL`` uses the
data's labels (deterministic, used for comparisons and always for scoring);
``EXPECTED`` is the exact expectation over the softmax (a reference for tiny
models: T x V backward passes per batch); ``GAUSSIAN`` replaces the one-hot
label draw by a Gaussian probe of the logit gradient with the same covariance,
diag(p) - p p^T (``gaussian_probe``): the same expectation as SAMPLED, with a
lighter-tailed estimator (measured: more stable across seeds, see the README's
Accuracy section). ``TOPM`` (``topm_terms``) is the sampled Fisher Rao-Blackwellized
over the labels: per position, the m = k - 1 most probable labels enumerated
exactly (each weighted by its probability) plus one draw from the remaining
tail weighted by the tail's mass; k = 1 is exactly SAMPLED with one draw.

Label draws (``draw_losses``): one forward pass, then one summed loss [B] per
draw, all sharing the forward graph. SAMPLED with k samples: k independent label
sets; the fitting stages average the k draws' statistics (weight 1/k each), so
k = 1 is exactly the single-draw sampled Fisher. EXPECTED: for every label
position t and vocabulary entry v, the loss sqrt(p_tv) * NLL_t(v) (sqrt(p_tv)
held constant), weight 1. Its logit gradient is r_tv = sqrt(p_tv) (p_t - e_v),
and sum_v r_tv r_tv^T = diag(p_t) - p_t p_t^T, the Hessian of the NLL in the
logits; with independent labels across positions, the cross terms of the
expectation vanish, so the sums over (t, v) of the draws' statistics equal the
expectations of the sampled statistics exactly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE_INDEX, TokenBatch


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


def topm_terms(logits: torch.Tensor, samples: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and coefficients of the k = m + 1 draws of ``Fisher.TOPM`` per position (no gradient flows).

    Per position with probabilities p: draws j < m take the j-th most probable
    label y_j with coefficient c_j = s_j sqrt(p_{y_j}); the last draw takes y
    from p restricted to the other labels (the tail), with c = s sqrt(P_tail).
    s = +-1 are independent random signs. A draw's loss c NLL(y) has the logit
    gradient c (p - e_y), so per position
        sum_j c_j^2 (p - e_{y_j})(p - e_{y_j})^T
            = sum_{top m} p_y (p - e_y)(p - e_y)^T + P_tail (p - e_y)(p - e_y)^T,   y ~ p | tail,
    whose expectation is E_{y ~ p}[(p - e_y)(p - e_y)^T] = diag(p) - p p^T, with
    no randomness left where the top m labels hold all the mass. The signs make
    the products of different positions' terms (which meet in the per-sequence
    gradient of Lambda and, through attention, in the covariances) vanish in
    expectation, as they do for independent sampled labels. With m >= V - 1 the
    enumeration is exact (the tail holds one label or none, c = 0).

    Args:
        logits: [..., V].
        samples: k >= 2 (k = 1 is ``Fisher.SAMPLED``: no signs, one draw from p).
        generator: seeded generator on the logits' device (None: global RNG).

    Returns:
        (labels [..., m' + 1] int64, coefficients [..., m' + 1] in the logits' dtype), m' = min(k - 1, V).
    """
    with torch.no_grad():
        p = torch.softmax(logits.double() if logits.dtype == torch.float64 else logits.float(), dim=-1)
        m = min(samples - 1, p.shape[-1])
        top_p, top_y = p.topk(m, dim=-1)  # (..., m)
        tail = p.scatter(-1, top_y, 0.0)  # (..., V)
        mass = tail.sum(dim=-1)  # (...)
        flat = tail.reshape(-1, p.shape[-1])
        has_tail = flat.sum(dim=-1, keepdim=True) > 0
        drawn = torch.multinomial(torch.where(has_tail, flat, torch.ones_like(flat)), 1,
                                  generator=generator).reshape(mass.shape)  # (...)
        signs = torch.randint(0, 2, (*mass.shape, m + 1), generator=generator, device=p.device).to(p.dtype) * 2 - 1
        labels = torch.cat([top_y, drawn.unsqueeze(-1)], dim=-1)  # (..., m + 1)
        coef = signs * torch.cat([top_p, mass.unsqueeze(-1)], dim=-1).sqrt()  # (..., m + 1)
    return labels, coef.to(logits.dtype)


def topm_losses(logits: torch.Tensor, labels: torch.Tensor, samples: int, generator: torch.Generator | None,
                row_gens: list[torch.Generator] | None = None,
                lengths: list[int] | None = None) -> list[torch.Tensor]:
    """``Fisher.TOPM`` (k >= 2): one [B] loss per draw, sum over label positions of c_tj NLL_t(y_tj).

    Args:
        logits: [B, T, V]; position t - 1 predicts the label at t.
        labels: [B, T] data labels (only their -100 pattern is kept).
        samples: k; draws: min(k - 1, V) + 1.
        generator: one stream for the batch; or ``row_gens`` (one per sequence) with
            ``lengths`` [B]: each sequence's terms drawn over its real positions only.
    """
    shift = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    keep = (labels[:, 1:] != IGNORE_INDEX).to(shift.dtype)  # (B, T-1)
    if row_gens is None:
        ys, coef = topm_terms(shift, samples, generator)  # (B, T-1, k')
    else:
        k = min(samples - 1, shift.shape[-1]) + 1
        ys = torch.zeros(*shift.shape[:2], k, dtype=torch.int64, device=shift.device)
        coef = torch.zeros(*shift.shape[:2], k, dtype=shift.dtype, device=shift.device)
        for b, (gen, n) in enumerate(zip(row_gens, lengths)):
            if n >= 2:
                ys[b, :n - 1], coef[b, :n - 1] = topm_terms(shift[b, :n - 1], samples, gen)
    nll = -torch.log_softmax(shift, dim=-1).gather(-1, ys)  # (B, T-1, k')
    weighted = (coef * nll * keep.unsqueeze(-1)).sum(dim=1)  # (B, k')
    return list(weighted.unbind(dim=1))


def gaussian_probe(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A random logit gradient u with E[u u^T] = diag(p) - p p^T per position (no gradient flows).

    u = sqrt(p) * z - p (sqrt(p) . z) with z ~ N(0, I_V): its covariance is
    diag(p) - p p^T, the same as that of the sampled-label gradient p - e_y, so a
    loss ``(u * logits).sum()`` gives pseudo-gradients whose second moments equal
    the true Fisher's in expectation, without the heavy tail of one-hot draws.

    Args:
        logits: [..., V] (float32 or float64).
        generator: seeded generator on the logits' device (None: global RNG).

    Returns:
        [..., V] probe, same dtype as ``logits``.
    """
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)
        z = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        root_p = p.sqrt()
        return root_p * z - p * (root_p * z).sum(dim=-1, keepdim=True)


def gaussian_losses(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None,
                    row_gens: list[torch.Generator] | None = None, lengths: list[int] | None = None) -> torch.Tensor:
    """[B] sum over label positions of u_t . logits_t (u from ``gaussian_probe``; 0 where label == -100).

    Args:
        logits: [B, T, V]; position t - 1 predicts the label at t.
        labels: [B, T] data labels (only their -100 pattern is kept).
        generator: one stream for the batch; or ``row_gens`` (one per sequence) with
            ``lengths`` [B]: each sequence's probes drawn over its real positions only.
    """
    shift = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    keep = (labels[:, 1:] != IGNORE_INDEX).to(shift.dtype)  # (B, T-1)
    if row_gens is None:
        u = gaussian_probe(shift, generator)  # (B, T-1, V)
    else:
        u = torch.zeros_like(shift)
        for b, (gen, n) in enumerate(zip(row_gens, lengths)):
            if n >= 2:
                u[b, :n - 1] = gaussian_probe(shift[b, :n - 1], gen)
    return ((u * shift).sum(dim=-1) * keep).sum(dim=1)  # (B,)


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


class Objective(Protocol):
    """What the engine needs to know about a model and its batches."""

    def sequence_losses(self, model: nn.Module, batch: Any, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        """[B] per-sequence summed loss (their sum is differentiated)."""

    def token_mask(self, batch: Any) -> torch.Tensor:
        """[B, T] bool, the positions whose activations count."""

    def batch_size(self, batch: Any) -> int:
        """B."""


class DrawObjective(Objective, Protocol):
    """An objective that also yields several label draws from one forward pass."""

    def draw_losses(self, model: nn.Module, batch: Any, fisher: Fisher, generator: torch.Generator | None,
                    samples: int) -> Iterator[torch.Tensor]:
        """Run the forward pass now; return an iterator of [B] summed losses, one per draw."""


def model_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of a Hugging Face causal LM or of a plain module.

    Hugging Face models (those with a ``config``) get ``attention_mask``; a plain
    module is called on ``input_ids`` alone and must return logits (or an object
    with ``.logits``).
    """
    if hasattr(model, "config"):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise TypeError(f"model output must be logits [B, T, V]; got {type(logits).__name__}")
    return logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] NLL of labels[:, 1:] under logits[:, :-1]; 0 where label == -100.

    Args:
        logits: [B, T, V].
        labels: [B, T], HF semantics.
    """
    shift_logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    shift_labels = labels[:, 1:]
    B, T1, V = shift_logits.shape
    nll = F.cross_entropy(shift_logits.reshape(B * T1, V), shift_labels.reshape(B * T1),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return nll.reshape(B, T1)  # (B, T-1)


def row_generators(batch: TokenBatch, device: torch.device) -> list[torch.Generator] | None:
    """One generator per sequence, seeded by ``batch.seeds`` (None when the batch has no seeds)."""
    if batch.seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in batch.seeds.tolist()]


def _row_lengths(batch: TokenBatch) -> list[int]:
    """Real length of every sequence (positions 0 .. n-2 predict a label)."""
    return batch.attention_mask.sum(dim=1).tolist()


def sample_labels_by_row(logits: torch.Tensor, labels: torch.Tensor, generators: list[torch.Generator],
                         lengths: list[int]) -> torch.Tensor:
    """``sample_labels`` with one generator per sequence, drawing only over its real positions.

    A sequence's labels then depend on its seed and its logits alone, not on the
    batch (its size, the padding, the other rows). Args as ``sample_labels``;
    ``lengths``: [B] real lengths.
    """
    with torch.no_grad():
        sampled = labels.clone()
        for b, (gen, n) in enumerate(zip(generators, lengths)):
            if n < 2:
                continue
            probs = torch.softmax(logits[b, :n - 1].float(), dim=-1)  # (n-1, V)
            drawn = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            keep = labels[b, 1:n] != IGNORE_INDEX
            sampled[b, 1:n] = torch.where(keep, drawn, labels[b, 1:n])
    return sampled


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution where labels != -100.

    Args:
        logits: [B, T, V]; position t - 1 predicts the label at t.
        labels: [B, T] data labels (only their -100 pattern is kept).
        generator: seeded generator on the logits' device (None: global RNG).

    Returns:
        [B, T] sampled labels, -100 where the data had -100.
    """
    with torch.no_grad():
        probs = torch.softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        B, T1, V = probs.shape
        drawn = torch.multinomial(probs.reshape(B * T1, V), 1, generator=generator).reshape(B, T1)
        sampled = labels.clone()
        keep = labels[:, 1:] != IGNORE_INDEX
        sampled[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
    return sampled


def expected_label_losses(logits: torch.Tensor, labels: torch.Tensor) -> Iterator[torch.Tensor]:
    """[B] losses sqrt(p_tv) * NLL_t(v), one per label position t and vocabulary entry v.

    Args:
        logits: [B, T, V]; position t - 1 predicts the label at t.
        labels: [B, T] data labels (only their -100 pattern is kept).

    Yields:
        (T - 1) * V tensors [B], 0 for sequences whose label at t is -100.
    """
    shift = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    with torch.no_grad():
        root_p = torch.softmax(shift, dim=-1).sqrt()  # (B, T-1, V)
    log_p = torch.log_softmax(shift, dim=-1)  # (B, T-1, V)
    for t in range(shift.shape[1]):
        if not bool(keep[:, t].any()):
            continue
        for v in range(shift.shape[2]):
            yield -(root_p[:, t, v] * log_p[:, t, v]) * keep[:, t].to(log_p.dtype)  # (B,)


class LanguageModelObjective:
    """Summed next-token NLL of a causal LM on ``TokenBatch`` batches."""

    def sequence_losses(self, model: nn.Module, batch: TokenBatch, fisher: Fisher,
                        generator: torch.Generator | None) -> torch.Tensor:
        if fisher == Fisher.EXPECTED:
            raise ValueError("the expected Fisher is a sum over many label draws: fit it through draw_passes "
                             "(fit_covariances / fit_lambda), not sequence_losses")
        logits = model_logits(model, batch.input_ids, batch.attention_mask)
        labels = batch.labels
        rows = row_generators(batch, logits.device) if is_random(fisher) else None
        if fisher == Fisher.GAUSSIAN:
            return gaussian_losses(logits, labels, generator, rows, _row_lengths(batch) if rows else None)
        if fisher in (Fisher.SAMPLED, Fisher.TOPM):  # one TOPM draw is one sampled draw
            labels = (sample_labels(logits, labels, generator) if rows is None
                      else sample_labels_by_row(logits, labels, rows, _row_lengths(batch)))
        return token_nll(logits, labels).sum(dim=1)  # (B,)

    def draw_losses(self, model: nn.Module, batch: TokenBatch, fisher: Fisher, generator: torch.Generator | None,
                    samples: int) -> Iterator[torch.Tensor]:
        logits = model_logits(model, batch.input_ids, batch.attention_mask)  # the one forward pass
        if fisher == Fisher.EXPECTED:
            return expected_label_losses(logits, batch.labels)
        if fisher == Fisher.EMPIRICAL:
            return iter([token_nll(logits, batch.labels).sum(dim=1)])
        rows = row_generators(batch, logits.device)
        lengths = _row_lengths(batch) if rows is not None else None
        if fisher == Fisher.GAUSSIAN:
            return (gaussian_losses(logits, batch.labels, generator, rows, lengths) for _ in range(samples))
        if fisher == Fisher.TOPM and samples > 1:
            return iter(topm_losses(logits, batch.labels, samples, generator, rows, lengths))

        def draws() -> Iterator[torch.Tensor]:
            for _ in range(samples):  # draw j uses the generator after j draws: k = 1 is today's single draw
                labels = (sample_labels(logits, batch.labels, generator) if rows is None
                          else sample_labels_by_row(logits, batch.labels, rows, lengths))
                yield token_nll(logits, labels).sum(dim=1)  # (B,)
        return draws()

    def token_mask(self, batch: TokenBatch) -> torch.Tensor:
        return batch.token_mask

    def batch_size(self, batch: TokenBatch) -> int:
        return len(batch)

    def loss_tokens(self, batch: TokenBatch) -> int:
        """Number of tokens in the loss (labels != -100 after the shift)."""
        return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
