"""Cost model that picks how a layer's scores are computed (docs/design.md section 2).

Symbols: B sequences of T tokens, Q queries, r rank (None = dense), layer
[d_out, d_in']. Counts are multiply-adds.

MATERIALIZE: form G_m = sum_t g_t a_t^T, then contract with every query.
    time   B T d_out d_in'                       (what a weight gradient costs)
         + Q B d_out d_in'                       (one [Q, D] x [D, B] product)
         + Q r d_out d_in'   if low-rank         (rebuild dense P once per batch)
    memory (B + Q) d_out d_in'
PER_TOKEN: never form G_m; c_t = (g_t^T U)(V^T a_t) per query and token.
    time   low-rank: B T Q r (d_out + d_in' + 1)
           dense:    B T Q d_out (d_in' + 1)     (P a_t for every token)
    memory B T Q r (low-rank) or B T Q d_out (dense)
    and it yields per-token contributions for free.

The rule: per-token outputs force PER_TOKEN; otherwise the cheaper in time.
"""

from __future__ import annotations

import enum


class Strategy(str, enum.Enum):
    AUTO = "auto"
    MATERIALIZE = "materialize"
    PER_TOKEN = "per_token"


def materialize_cost(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None) -> int:
    """Multiply-adds of the MATERIALIZE strategy for one layer (d_in means d_in')."""
    cost = B * T * d_out * d_in + Q * B * d_out * d_in
    if rank is not None:
        cost += Q * rank * d_out * d_in
    return cost


def per_token_cost(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None) -> int:
    """Multiply-adds of the PER_TOKEN strategy for one layer (d_in means d_in')."""
    if rank is None:
        return B * T * Q * d_out * (d_in + 1)
    return B * T * Q * rank * (d_out + d_in + 1)


def choose_strategy(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None,
                    per_token: bool = False) -> Strategy:
    """The strategy for one layer: PER_TOKEN if per-token scores are asked for, else the cheaper."""
    if per_token:
        return Strategy.PER_TOKEN
    if per_token_cost(B, T, Q, d_out, d_in, rank) < materialize_cost(B, T, Q, d_out, d_in, rank):
        return Strategy.PER_TOKEN
    return Strategy.MATERIALIZE
