"""Label draws for fitting: the [B] losses whose gradients are one draw of each Fisher mode.

Symbols: B sequences, T tokens, V vocabulary. Position t - 1 predicts the label
at t; labels of -100 (``IGNORE_INDEX``) stay out of every loss.

- SAMPLED (``sample_labels``, ``sample_labels_by_row``): labels drawn from the
  model's softmax; the loss is their summed NLL.
- TOPM (``topm_terms``, ``topm_losses``): per position the m = k - 1 most
  probable labels with coefficients s sqrt(p_y) and one tail draw with s sqrt(P_tail)
  (s = +-1 random signs); k = 1 is exactly SAMPLED with one draw.
- GAUSSIAN (``gaussian_probe``, ``gaussian_losses``): a logit-gradient probe u with
  E[u u^T] = diag(p) - p p^T; the loss is sum_t u_t . logits_t.
- EXPECTED (``expected_label_losses``): for every label position t and vocabulary
  entry v, the loss sqrt(p_tv) * NLL_t(v) (sqrt(p_tv) held constant), weight 1. Its
  logit gradient is r_tv = sqrt(p_tv) (p_t - e_v), and sum_v r_tv r_tv^T =
  diag(p_t) - p_t p_t^T, the Hessian of the NLL in the logits; with independent
  labels across positions, the cross terms of the expectation vanish, so the sums
  over (t, v) of the draws' statistics equal the expectations of the sampled
  statistics exactly.

With per-sequence generators (``row_generators``, from ``TokenBatch.seeds``) a
sequence's draws depend on its seed and its logits alone, not on the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .batch import IGNORE_INDEX, TokenBatch


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


def row_generators(batch: TokenBatch, device: torch.device) -> list[torch.Generator] | None:
    """One generator per sequence, seeded by ``batch.seeds`` (None when the batch has no seeds)."""
    if batch.seeds is None:
        return None
    return [torch.Generator(device=device).manual_seed(int(s)) for s in batch.seeds.tolist()]


def row_lengths(batch: TokenBatch) -> list[int]:
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
