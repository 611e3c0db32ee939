"""In which basis preconditioned queries are kept for scoring (docs/design.md section 2, "Query basis").

Symbols: Q queries, r rank (None = dense), layer [d_out, d_in'], N training
tokens and S training sequences that will be scored with these queries.
Counts are multiply-adds per layer.

Query preparation ends in the EK-FAC eigenbasis with M = (Q_S^T G_q Q_A) / (Lambda + lambda)
(``query_prep.py``). Since Q_S and Q_A are orthogonal,

    <P, G_n>_F = <Q_S M Q_A^T, G_n>_F = <M, Q_S^T G_n Q_A>_F = sum_t (Q_S^T g_t)^T M (Q_A^T a_t),

so the rotation can be paid on either side:

WEIGHT: rotate each query back, P = Q_S M Q_A^T, once at preparation:
    dense   Q (d_out^2 d_in' + d_out d_in'^2)
    rank r  Q r (d_out^2 + d_in'^2)                 (left = Q_S U_r diag(sv_r), right = Q_A V_r)
EIGEN: keep M (or U_r diag(sv_r), V_r) and rotate every training sequence while scoring,
    per token g~_t = Q_S^T g_t, a~_t = Q_A^T a_t:  N (d_out^2 + d_in'^2)
    or its materialized gradient Q_S^T G_n Q_A:    S d_out d_in' (d_out + d_in')
    (``strategy.plan`` takes the cheaper per batch; counted here when S is given).

The rule (``choose_basis``): EIGEN when its training-side cost is below WEIGHT's query-side
cost. WEIGHT is paid once per query set, EIGEN once per scored token, so EIGEN is for small
in-process jobs (few training tokens per query): dense queries of a GPT-2-small MLP layer
([3072, 769]) break even at N = 905 Q tokens, rank-r ones at N = Q r. Saved queries and the
pipelines' scoring stage always use WEIGHT (the corpus is unbounded; scoring actors hold no
factors). When scores also compute self-influence (``score_batch(factors=...)``), the
training side is rotated either way, and EIGEN costs nothing more: pick it explicitly.
"""

from __future__ import annotations

import enum


class Basis(str, enum.Enum):
    AUTO = "auto"
    WEIGHT = "weight"
    EIGEN = "eigen"


def weight_basis_cost(Q: int, d_out: int, d_in: int, rank: int | None) -> int:
    """Multiply-adds of rotating Q prepared queries back to the weight basis (d_in means d_in')."""
    if rank is None:
        return Q * d_out * d_in * (d_out + d_in)
    return Q * rank * (d_out * d_out + d_in * d_in)


def eigen_basis_cost(tokens: int, d_out: int, d_in: int, sequences: int | None = None) -> int:
    """Multiply-adds of rotating the training side into the eigenbasis while scoring (d_in means d_in')."""
    cost = tokens * (d_out * d_out + d_in * d_in)
    if sequences is not None:
        cost = min(cost, sequences * d_out * d_in * (d_out + d_in))
    return cost


def choose_basis(Q: int, d_out: int, d_in: int, rank: int | None, train_tokens: int,
                 train_sequences: int | None = None) -> Basis:
    """WEIGHT or EIGEN for one layer: the one with the smaller rotation cost (ties: WEIGHT)."""
    if train_tokens < 0 or (train_sequences is not None and train_sequences < 0):
        raise ValueError(f"train_tokens and train_sequences must be >= 0, got {train_tokens}, {train_sequences}")
    if eigen_basis_cost(train_tokens, d_out, d_in, train_sequences) < weight_basis_cost(Q, d_out, d_in, rank):
        return Basis.EIGEN
    return Basis.WEIGHT
