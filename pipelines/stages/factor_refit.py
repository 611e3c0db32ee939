"""When fitted factors stay current: the key they depend on and the ``factors.refit`` policy.

``factors_key`` names what a fit depends on (the model, the ``[factors]`` keys, ``data.too_long``
when not "error", and with ``refit = "on_corpus_change"`` the shards); ``keeps_factors`` decides,
for ``refit = "on_growth"`` (the default), whether factors fitted on some shards still serve a
corpus that has grown since (growth in sequences, from the Parquet footers), and says why either way
(the run summary prints it).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import JobConfig
from ..io import completion
from ..io.model_loading import model_identity
from ..io.shards import shard_name

PASSES = ("fisher_passes", "lambda_passes")


def factors_key(cfg: JobConfig, fingerprints: list[tuple[str, int]]) -> str:
    """What the factors depend on. Not the batch size (label draws are seeded per sequence:
    ``sequence_seed``) nor any other performance setting (actors, threads, sort window). With
    ``factors.refit = "on_settings_change"`` or ``"on_growth"`` not the shards either (for
    ``on_growth``, ``keeps_factors`` then decides whether the corpus moved too far)."""
    too_long = () if cfg.data.too_long.value == "error" else (cfg.data.too_long.value,)
    settings = {k: v for k, v in cfg.factors.__dict__.items() if k not in ("refit", "refit_growth")
                and not (k in PASSES and v is None)}  # unset passes: the key factors had before they existed
    if cfg.factors.refit in ("on_settings_change", "on_growth"):
        return completion.inputs_key("factors-pinned", cfg.model.__dict__, model_identity(cfg.model), settings,
                                     *too_long)
    return completion.inputs_key("factors-v2", cfg.model.__dict__, model_identity(cfg.model), settings,
                                 fingerprints, *too_long)


def named_fingerprints(fingerprints: list[tuple[str, int]], corpus: str) -> list[tuple[str, int]]:
    """(name below the corpus root, size) per shard: a corpus copied or moved elsewhere keeps its names."""
    return [(shard_name(url, corpus), size) for url, size in fingerprints]


def keeps_factors(fitted_on: list[tuple] | None, now: list[tuple[str, int]], growth: float,
                  rows_of: Callable[[str], int] | None = None) -> tuple[bool, str]:
    """Whether factors fitted on the shards ``fitted_on`` stay current for the corpus ``now``, and why.

    ``factors.refit = "on_growth"``: they stay while every shard they were fitted on is still there with its
    size, and the corpus grew by at most ``growth`` (0.25: a quarter) of the sequences it had. ``fitted_on``
    holds (name, size, rows) per shard; the rows of a shard added since come from ``rows_of(name)`` (its
    footer; 0 when it does not read: it adds nothing to fit on). Factors whose marker holds (name, size) only
    (fitted before rows were recorded) count growth in bytes. ``fitted_on`` None (factors from a version that
    did not record their shards): refit.
    """
    if fitted_on is None:
        return False, "refit: the factors did not record the shards they were fitted on"
    current = dict(now)
    for name, size, *_ in fitted_on:
        if current.get(name) != size:
            change = "was removed" if name not in current else "changed"
            return False, f"refit: shard {name!r} {change} since the fit"
    added_names = sorted(set(current) - {entry[0] for entry in fitted_on})
    if rows_of is not None and all(len(entry) > 2 for entry in fitted_on):
        before, added, unit = sum(entry[2] for entry in fitted_on), sum(map(rows_of, added_names)), "sequences"
    else:
        before, added, unit = sum(entry[1] for entry in fitted_on), sum(current[n] for n in added_names), "bytes"
    grew = f"{added:,} {unit} ({added / before:.1%})" if before > 0 else f"{added:,} {unit} (from nothing)"
    if before <= 0 or added > growth * before:
        return False, f"refit: the corpus grew by {grew} since the fit (factors.refit_growth = {growth:.0%})"
    return True, f"kept: the corpus grew by {grew} since the fit (refit above {growth:.0%})"
