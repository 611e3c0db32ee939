"""`influence eval SUITE`: accuracy suites that measure how far the engine's numbers can be trusted.

Each suite writes ``<out>/<suite>.parquet`` and ``<out>/<suite>.md`` (the table,
the machine, the versions and the command that produced it) and prints progress.

- ``exact``: EK-FAC variants, K-FAC and the plain gradient dot product against
  exact influence (the exact damped Gauss-Newton matrix, inverted, and its
  layer-block-diagonal part) on tiny models, 20 trained models per kind
  (``--model-seeds``), with paired bootstrap intervals; and the curvature blocks
  (and their damped inverses) against the exact ones.
- ``stability``: seed-to-seed agreement of the scores for k = 1, 2, 4, 8 sampled
  label draws (``factors.fisher_samples``), and the fitting cost of each k.
- ``lds``: the linear datamodeling score against models retrained on random
  halves of the training set (digits MLP, tiny GPT-2), kronfluence alongside.
- ``facts``: recall@10 and MRR of planted sources on a planted-fact corpus
  through the real pipeline, per scoring variant, against BM25 and the plain
  gradient dot product; seed-to-seed agreement at the default Fisher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _exact(**kwargs: Any) -> Any:
    from .exact import run_exact

    return run_exact(**kwargs)


def _stability(**kwargs: Any) -> Any:
    from .stability import run_stability

    return run_stability(**kwargs)


def _lds(**kwargs: Any) -> Any:
    from .lds import run_lds

    return run_lds(**kwargs)


def _facts(**kwargs: Any) -> Any:
    from .facts import run_facts

    return run_facts(**kwargs)


# suite name -> runner(out, quick, command, echo) -> the result table (a list of rows)
SUITES: dict[str, Callable[..., Any]] = {"exact": _exact, "stability": _stability, "lds": _lds, "facts": _facts}
