"""Which score units exist, which are finished, and which queries each still needs.

A unit is a range of Parquet row groups [lo, hi) of one shard (the whole shard
when it is small, or when its footer does not read). ``scoring.unit_rows``
sets the rows per unit (whole row groups, so a unit holds at least one group);
0 picks it: ``auto_unit_rows``.

A finished unit leaves one or more score files in ``<output>/scores/``, each
holding the top-k and bottom-k of some queries over the unit's rows. A file's
footer says what it holds:

- ``influence.key``: the unit's inputs (shard URL and size, row-group range,
  top_k, too_long, normalize, self_influence: ``unit_key``);
- ``influence.shard``: the shard's URL; ``influence.groups``: ``[lo, hi]`` (JSON);
- ``influence.queries``: ``[[query_id, query key], ...]`` (JSON), where a query's
  key covers the query's tokens and everything its preconditioned gradient
  depends on (``build_queries.query_keys``), not the other queries.

Planning (``plan``) reads the footers of the existing files and keeps a file
when its unit key is current and every query it holds is a current query with
the same key. Kept ranges of a shard are reused as they are (even when
``unit_rows`` changed since: it is a performance setting); row groups no kept
file covers get new units. A unit whose kept files miss some current queries
(queries added to the queries file) is run again for those queries only,
into a file of its own. Every other file in scores/ (and its distribution/
and self_influence/ siblings) is stale and removed, so scores/ holds exactly
the current candidates. Nothing in a key depends on batch size, actors,
threads or sort_window.

File names: ``<shard name>`` for a unit that covers the whole shard, else
``<shard name>.rg<lo>-<hi - 1>`` (5 digits each); a file that holds only some
of the unit's queries adds ``.q<hash of its query keys>``.

The influence index (``index_build.py``) is cut into the same units by
``plan_ranges`` (one part per unit in ``index/parts/``, named like the unit; its
footers carry no queries: a unit is done when its part carries the current key).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from ..config import JobConfig
from ..io import completion, storage
from ..io.shards import list_shards, row_group_rows, shard_name

KEY, SHARD, GROUPS, QUERIES = "influence.key", "influence.shard", "influence.groups", "influence.queries"
ROWS, SEQUENCES = "influence.rows", "influence.sequences"
AUTO_MIN_ROWS = 4096  # auto: no unit smaller than this (a whole shard below it)
AUTO_UNITS_PER_ACTOR = 4
log = logging.getLogger(__name__)


@dataclass
class Unit:
    """One range of row groups of a shard; ``groups`` None: the whole shard (its footer did not read)."""

    shard: str
    name: str
    key: str
    groups: tuple[int, int] | None
    first_row: int = 0
    rows: int = -1  # file rows in the range (-1: unknown)
    files: list[str] = field(default_factory=list)  # current score files of the unit
    missing: list[str] = field(default_factory=list)  # current query ids no file holds
    done_rows: int = 0  # from the kept files' footers: rows of the unit, and sequences scored
    done_sequences: int = 0
    whole: bool = True  # the unit is the whole shard

    def output(self, scores_dir: str, all_queries: list[str], query_keys: dict[str, str]) -> str:
        """The score file for the unit's missing queries."""
        name = self.name
        if self.files or self.missing != all_queries:
            name += ".q" + completion.inputs_key([[q, query_keys[q]] for q in self.missing])[:10]
        return storage.join(scores_dir, f"{name}.parquet")

    def task(self, scores_dir: str, all_queries: list[str], query_keys: dict[str, str]) -> dict[str, Any]:
        """The JSON unit an actor gets."""
        return {**self.range_task(self.output(scores_dir, all_queries, query_keys)),
                "queries": [[q, query_keys[q]] for q in self.missing], "all_queries": self.missing == all_queries}

    def range_task(self, output: str) -> dict[str, Any]:
        """The JSON unit of any stage that writes one file per unit (``output``): shard, rows, key."""
        return {"shard": self.shard, "name": self.name, "groups": None if self.groups is None else list(self.groups),
                "first_row": self.first_row, "rows": self.rows, "key": self.key, "output": output,
                "whole": self.whole}


def unit_key(cfg: JobConfig, shard: tuple[str, int], groups: tuple[int, int] | None) -> str:
    s = cfg.scoring
    return completion.inputs_key("scores-unit", shard, groups, s.top_k, cfg.data.too_long.value, s.normalize.value,
                                 s.writes_self_influence)


def auto_unit_rows(total_rows: int, actors: int) -> int:
    """About ``AUTO_UNITS_PER_ACTOR`` units per actor over the corpus, none below ``AUTO_MIN_ROWS`` rows."""
    return max(AUTO_MIN_ROWS, math.ceil(total_rows / max(1, actors * AUTO_UNITS_PER_ACTOR)))


def split_groups(sizes: list[int], lo: int, hi: int, unit_rows: int) -> list[tuple[int, int]]:
    """Consecutive ranges of the groups [lo, hi), each closed once it holds ``unit_rows`` rows (the last: the rest)."""
    out, start, rows = [], lo, 0
    for g in range(lo, hi):
        rows += sizes[g]
        if rows >= unit_rows:
            out.append((start, g + 1))
            start, rows = g + 1, 0
    if start < hi:
        out.append((start, hi))
    return out


def unit_name(base: str, groups: tuple[int, int] | None, num_groups: int) -> str:
    if groups is None or groups == (0, num_groups):
        return base
    return f"{base}.rg{groups[0]:05d}-{groups[1] - 1:05d}"


@dataclass
class Plan:
    """The units of the corpus (shard order, then range order) and the removed stale files."""

    units: list[Unit]
    queries: list[str]
    query_keys: dict[str, str]
    scores_dir: str
    unit_rows: int
    removed: list[str]
    unreadable: list[str] = field(default_factory=list)  # score files whose footer did not read (truncated)

    @property
    def todo(self) -> list[Unit]:
        return [u for u in self.units if u.missing]

    def files(self) -> list[str]:
        return [f for u in self.units for f in u.files]


def _existing(folder: str, unreadable: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Readable footers of the files already written in ``folder``, by shard: {url, key, groups, queries, rows,
    sequences} (queries None when the footer names none: index parts, or an older version's score files).

    Files whose footer does not read are appended to ``unreadable``.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for url in storage.list_files(folder, suffix=".parquet"):
        meta = storage.footer_metadata(url)
        if meta is None:
            unreadable.append(url)
        if meta is None or not {SHARD, GROUPS} <= set(meta):
            continue  # truncated, or written by an older version: stale
        groups = json.loads(meta[GROUPS])
        found.setdefault(meta[SHARD], []).append({
            "url": url, "key": meta.get(KEY), "groups": None if groups is None else tuple(groups),
            "queries": {tuple(p) for p in json.loads(meta[QUERIES])} if QUERIES in meta else None,
            "rows": int(meta.get(ROWS, -1)), "sequences": int(meta.get(SEQUENCES, -1))})
    return found


def kept_ranges(files: list[dict[str, Any]], num_groups: int, key_of: Callable[[tuple[int, int]], str],
                keep: Callable[[dict[str, Any]], bool]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """A shard's files still current (``key_of(range)`` in the footer, and ``keep(file)``), by row-group range
    (ranges never overlap: the first in range order wins)."""
    ranges: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for f in sorted(files, key=lambda f: (f["groups"] or (-1, -1), f["url"])):
        g = f["groups"]
        if g is None or not 0 <= g[0] < g[1] <= num_groups or f["key"] != key_of(g) or not keep(f):
            continue
        if g in ranges or not any(a < g[1] and g[0] < b for a, b in ranges):
            ranges.setdefault(g, []).append(f)
    return ranges


@dataclass
class Ranges:
    """The units of the corpus (shard order, then range order), each with its kept files (``Unit.files``)."""

    units: list[Unit]
    unit_rows: int
    footers: dict[str, dict[str, Any]]  # kept file URL -> what its footer says (``_existing``)
    unreadable: list[str]  # files whose footer did not read (truncated)


def plan_ranges(cfg: JobConfig, folder: str, key_of: Callable[[tuple[str, int], tuple[int, int] | None], str],
                keep: Callable[[dict[str, Any]], bool] = lambda f: True) -> Ranges:
    """The units of the corpus for a stage that writes files named by unit into ``folder`` (``score``: scores/,
    the index: index/parts/): kept ranges as they are, new units (``scoring.unit_rows``) over the rest.

    ``key_of(shard fingerprint, row-group range)`` is the key a current file's footer carries; ``keep(file)``
    any further test of a file (the score stage: its queries are current). ``Unit.missing`` is left empty.
    """
    shards = list_shards(cfg.data.corpus)
    names = [shard_name(s, cfg.data.corpus) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"corpus {cfg.data.corpus!r}: two shards map to the same output name")
    sizes: dict[str, list[int] | None] = {}
    for shard in shards:
        try:
            sizes[shard] = row_group_rows(shard)
        except (OSError, ValueError):  # the unit fails when it runs, and is counted there
            sizes[shard] = None
    total = sum(sum(s) for s in sizes.values() if s is not None)
    unit_rows = cfg.scoring.unit_rows or auto_unit_rows(total, cfg.resources.actors)
    unreadable: list[str] = []
    existing = _existing(folder, unreadable)
    units: list[Unit] = []
    footers: dict[str, dict[str, Any]] = {}
    for (shard, size), base in zip(completion.shard_fingerprints(shards), names):
        groups = sizes[shard]
        if groups is None:
            units.append(Unit(shard, base, key_of((shard, size), None), None))
            continue
        starts = [sum(groups[:i]) for i in range(len(groups) + 1)]
        ranges = kept_ranges(existing.get(shard, []), len(groups), lambda g, fp=(shard, size): key_of(fp, g), keep)
        gaps, at = [], 0
        for a, b in sorted(ranges) + [(len(groups), len(groups))]:
            if at < a:
                gaps += split_groups(groups, at, a, unit_rows)
            at = max(at, b)
        for g in sorted(list(ranges) + gaps):
            files = ranges.get(g, [])
            footers.update({f["url"]: f for f in files})
            unit = Unit(shard, unit_name(base, g, len(groups)), key_of((shard, size), g), g, starts[g[0]],
                        starts[g[1]] - starts[g[0]], [f["url"] for f in files])
            unit.whole = g == (0, len(groups))
            if files:
                unit.done_rows, unit.done_sequences = files[0]["rows"], files[0]["sequences"]
            units.append(unit)
    return Ranges(units, unit_rows, footers, unreadable)


def stale_files(folder: str, units: list[Unit]) -> list[str]:
    """The files in ``folder`` that no unit keeps."""
    kept = {f for u in units for f in u.files}
    return [u for u in storage.list_files(folder, suffix=".parquet") if u not in kept]


def plan(cfg: JobConfig, query_keys: dict[str, str], clean: bool = True) -> Plan:
    """The units of the corpus with what each still needs (``clean``: remove the stale files)."""
    scores_dir = storage.join(cfg.data.output, "scores")
    queries = list(query_keys)
    current = set(query_keys.items())
    r = plan_ranges(cfg, scores_dir, lambda shard, groups: unit_key(cfg, shard, groups),
                    lambda f: f["queries"] is not None and f["queries"] <= current)
    for unit in r.units:
        have = {q for f in unit.files for q, _ in r.footers[f]["queries"]}
        unit.missing = [q for q in queries if q not in have]
    p = Plan(r.units, queries, query_keys, scores_dir, r.unit_rows, [], r.unreadable)
    if clean:
        p.removed = stale_files(scores_dir, p.units)
        _remove_stale(p, cfg.data.output)
    return p


def _remove_stale(p: Plan, output: str) -> None:
    """Remove stale score files and the distribution/ and self_influence/ files of no current unit or file."""
    for url in p.removed:
        log.info("removing stale score file %s", url)
        storage.remove(url)
    scored = {f.rsplit("/", 1)[-1] for f in p.files()}
    scored |= {u.output(p.scores_dir, p.queries, p.query_keys).rsplit("/", 1)[-1] for u in p.todo}
    for folder, keep in (("distribution", scored), ("self_influence", {f"{u.name}.parquet" for u in p.units})):
        for url in storage.list_files(storage.join(output, folder), suffix=".parquet"):
            if url.rsplit("/", 1)[-1] not in keep:
                storage.remove(url)
