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

Self-influence (``self_influence.py``; needed by ``normalize = cosine`` and the
self_influence table) adds the rotated gradient R = Q_S^T G Q_A per sequence:
    ROTATE_GRADIENT  B d_out d_in' (d_out + d_in')   if MATERIALIZE formed G
                     + B T d_out d_in'               otherwise (form G for this)
    ROTATE_TOKENS    B T (d_out^2 + d_in'^2 + d_out d_in')
    (plus B d_out d_in' for the sum of R^2 / (Lambda + lambda), either way)
``plan`` minimizes scoring + rotation over the four pairs, so self-influence
can flip a layer from PER_TOKEN to MATERIALIZE. Example (GPT-2-small MLP,
d_out 3072, d_in' 769, T 512): ROTATE_TOKENS 6.3e9 and ROTATE_GRADIENT 9.1e9
(+1.2e9 without G) per sequence and layer, against 1.2e9 for the weight
gradient: self-influence costs several times the scoring itself at that
width; ROTATE_TOKENS wins while T < d_out d_in' (d_out + d_in') /
(d_out^2 + d_in'^2 + d_out d_in'), about 730 here.
Queries kept in the eigenbasis (``query_basis.py``, ``rotated``) score the rotated training
side, g~_t = Q_S^T g_t and a~_t = Q_A^T a_t, with the same two strategies:
    PER_TOKEN    + B T (d_out^2 + d_in'^2)             (rotate the tokens)
                 + B T d_out d_in' with self-influence (R = sum_t g~_t a~_t^T)
    MATERIALIZE  + the cheaper ``rotation_costs`` entry: G~ = R, so self-influence is free.
The Euclidean norm ``normalize = train_norm`` needs is ||R||_F when R exists,
else ||G||_F (B d_out d_in' once G exists) or, without G, the cheaper of forming
G and the Gram form sum_{t,u} (g_t . g_u)(a_t . a_u) (B T^2 (d_out + d_in')).
"""

from __future__ import annotations

import enum
from typing import NamedTuple


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


def rotation_costs(B: int, T: int, d_out: int, d_in: int, materialized: bool) -> dict[str, int]:
    """Multiply-adds of each exact way to the rotated gradients R, [B, d_out, d_in'] (d_in means d_in').

    ``materialized``: G is already formed by the scoring strategy.
    """
    form = 0 if materialized else B * T * d_out * d_in
    return {"rotate_gradient": form + B * d_out * d_in * (d_out + d_in),
            "rotate_tokens": B * T * (d_out * d_out + d_in * d_in + d_out * d_in)}


def norm_costs(B: int, T: int, d_out: int, d_in: int) -> dict[str, int]:
    """Multiply-adds of ||G||_F^2 without G: forming G, or the Gram form over token pairs."""
    return {"materialize": B * T * d_out * d_in + B * d_out * d_in, "gram": B * T * T * (d_out + d_in)}


class Plan(NamedTuple):
    """How one layer is computed: the scoring strategy and, when needed, how R is formed."""

    strategy: Strategy
    rotation: str | None  # "rotate_gradient" | "rotate_tokens" | None (no self-influence)
    cost: int


def plan(B: int, T: int, Q: int, d_out: int, d_in: int, rank: int | None, per_token: bool = False,
         self_influence: bool = False, strategy: Strategy = Strategy.AUTO, rotated: bool = False) -> Plan:
    """The cheapest (strategy, rotation) for one layer; ``strategy`` other than AUTO is kept as given.

    ``rotated``: the queries are in the eigenbasis; the rotation (of tokens or of G) is then always
    part of the plan, self-influence or not.
    """
    if strategy == Strategy.AUTO:
        options = [Strategy.PER_TOKEN] if per_token else [Strategy.PER_TOKEN, Strategy.MATERIALIZE]
    else:
        options = [strategy]
    best: Plan | None = None
    for s in options:
        base = (per_token_cost if s == Strategy.PER_TOKEN else materialize_cost)(B, T, Q, d_out, d_in, rank)
        if rotated and s == Strategy.PER_TOKEN:
            rotations = {"rotate_tokens": B * T * (d_out * d_out + d_in * d_in)
                         + (B * T * d_out * d_in if self_influence else 0)}
        elif rotated:  # G~ = R: the rotation, not its product with G, is the extra (G's forming is in base)
            costs = rotation_costs(B, T, d_out, d_in, True)
            rotations = {"rotate_gradient": costs["rotate_gradient"],
                         "rotate_tokens": costs["rotate_tokens"] - B * T * d_out * d_in}
        else:
            rotations = rotation_costs(B, T, d_out, d_in, s == Strategy.MATERIALIZE) if self_influence else {None: 0}
        for rotation, extra in rotations.items():
            if best is None or base + extra < best.cost:
                best = Plan(s, rotation, base + extra)
    assert best is not None
    return best
