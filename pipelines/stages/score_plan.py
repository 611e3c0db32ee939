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
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
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
        return {"shard": self.shard, "name": self.name, "groups": None if self.groups is None else list(self.groups),
                "first_row": self.first_row, "rows": self.rows, "key": self.key,
                "output": self.output(scores_dir, all_queries, query_keys),
                "queries": [[q, query_keys[q]] for q in self.missing],
                "all_queries": self.missing == all_queries, "whole": self.whole}


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


def _existing(scores_dir: str, unreadable: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Readable footers of the score files already written, by shard: {url, key, groups, queries, rows, sequences}.

    Files whose footer does not read are appended to ``unreadable``.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    for url in storage.list_files(scores_dir, suffix=".parquet"):
        meta = storage.footer_metadata(url)
        if meta is None:
            unreadable.append(url)
        if meta is None or not {SHARD, GROUPS, QUERIES} <= set(meta):
            continue  # truncated, or written by an older version: stale
        groups = json.loads(meta[GROUPS])
        found.setdefault(meta[SHARD], []).append({
            "url": url, "key": meta.get(KEY), "groups": None if groups is None else tuple(groups),
            "queries": {tuple(p) for p in json.loads(meta[QUERIES])},
            "rows": int(meta.get(ROWS, -1)), "sequences": int(meta.get(SEQUENCES, -1))})
    return found


def kept_ranges(cfg: JobConfig, shard: tuple[str, int], files: list[dict[str, Any]], num_groups: int,
                current: set[tuple[str, str]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """The shard's files still current, by row-group range (ranges never overlap: the first in range order wins)."""
    ranges: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for f in sorted(files, key=lambda f: (f["groups"] or (-1, -1), f["url"])):
        g = f["groups"]
        if g is None or not 0 <= g[0] < g[1] <= num_groups or f["key"] != unit_key(cfg, shard, g) \
                or not f["queries"] <= current:
            continue
        if g in ranges or not any(a < g[1] and g[0] < b for a, b in ranges):
            ranges.setdefault(g, []).append(f)
    return ranges


def plan(cfg: JobConfig, query_keys: dict[str, str], clean: bool = True) -> Plan:
    """The units of the corpus with what each still needs (``clean``: remove the stale files)."""
    scores_dir = storage.join(cfg.data.output, "scores")
    shards = list_shards(cfg.data.corpus)
    names = [shard_name(s, cfg.data.corpus) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"corpus {cfg.data.corpus!r}: two shards map to the same output name")
    queries = list(query_keys)
    sizes: dict[str, list[int] | None] = {}
    for shard in shards:
        try:
            sizes[shard] = row_group_rows(shard)
        except (OSError, ValueError):  # the unit fails when it runs, and is counted there
            sizes[shard] = None
    total = sum(sum(s) for s in sizes.values() if s is not None)
    unit_rows = cfg.scoring.unit_rows or auto_unit_rows(total, cfg.resources.actors)
    unreadable: list[str] = []
    existing = _existing(scores_dir, unreadable)
    units: list[Unit] = []
    current = set(query_keys.items())
    for (shard, size), base in zip(completion.shard_fingerprints(shards), names):
        groups = sizes[shard]
        if groups is None:
            units.append(Unit(shard, base, unit_key(cfg, (shard, size), None), None, missing=list(queries)))
            continue
        starts = [sum(groups[:i]) for i in range(len(groups) + 1)]
        ranges = kept_ranges(cfg, (shard, size), existing.get(shard, []), len(groups), current)
        gaps, at = [], 0
        for a, b in sorted(ranges) + [(len(groups), len(groups))]:
            if at < a:
                gaps += split_groups(groups, at, a, unit_rows)
            at = max(at, b)
        for g in sorted(list(ranges) + gaps):
            files = ranges.get(g, [])
            have = {q for f in files for q, _ in f["queries"]}
            unit = Unit(shard, unit_name(base, g, len(groups)), unit_key(cfg, (shard, size), g), g, starts[g[0]],
                        starts[g[1]] - starts[g[0]], [f["url"] for f in files], [q for q in queries if q not in have])
            unit.whole = g == (0, len(groups))
            if files:
                unit.done_rows, unit.done_sequences = files[0]["rows"], files[0]["sequences"]
            units.append(unit)
    p = Plan(units, queries, query_keys, scores_dir, unit_rows, [], unreadable)
    if clean:
        kept = set(p.files())
        p.removed = [u for u in storage.list_files(scores_dir, suffix=".parquet") if u not in kept]
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
