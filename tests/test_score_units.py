"""Score units finer than a shard, and incremental jobs (new shards, new queries, performance settings).

One module fixture fits the factors once (``factors.refit = "on_growth"`` with a growth
limit above what the tests add, so adding shards keeps them); the tests then re-run the score and merge stages
on copies of its output. Batch size 1 and dense float64 queries make every
score independent of how rows are grouped, so tables compare exactly.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from influence_ops import load_queries
from pipelines import config_from_dict
from pipelines.cli import summarize
from pipelines.run import run_job
from pipelines.stages.score_plan import split_groups

ROWS_PER_GROUP = 4


def write_shard(path: Path, prefix: str, rows: int, vocab: int, seed: int, bad_row: int | None = None) -> None:
    rng = random.Random(seed)
    ids = [[rng.randrange(vocab) for _ in range(rng.randint(3, 12))] for _ in range(rows)]
    if bad_row is not None:
        ids[bad_row][0] = vocab + 5  # outside the vocabulary: the unit holding this row fails
    table = pa.table({"doc_id": pa.array([f"{prefix}-{i}" for i in range(rows)], pa.string()),
                      "input_ids": pa.array(ids, pa.list_(pa.int32()))})
    pq.write_table(table, path, row_group_size=ROWS_PER_GROUP)


def job(world: Path, corpus: Path, output: Path, queries: Path, actors: int = 2, **scoring) -> dict:
    return {
        "run_id": "units",
        "model": {"path": str(world / "model"), "dtype": "float64"},
        "data": {"corpus": str(corpus), "queries": str(queries), "output": str(output)},
        "factors": {"fisher": "empirical", "sample_sequences": 24, "seed": 7, "unit_sequences": 12,
                    "refit": "on_growth", "refit_growth": 1.0},
        "scoring": {"top_k": 3, "rank": 0, "per_token": False, "query_precision": "float64", "unit_rows": 1000,
                    "self_influence": True,
                    **scoring},
        "resources": {"actors": actors, "batch_size": 1, "cpus_per_actor": 0.25},
    }


def tables(output: Path) -> dict[str, list[dict]]:
    """topk/ and layer_scores/ rows, sorted (every column, exactly)."""
    out = {}
    for name in ("topk", "layer_scores"):
        rows = pads.dataset(str(output / name), partitioning="hive").to_table().to_pylist()
        out[name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))
    return out


def assert_same_tables(got: dict[str, list[dict]], want: dict[str, list[dict]], rtol: float = 1e-12) -> None:
    """The same rows (every column but the floats exactly), the floats to ``rtol``."""
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(sorted(got[name], key=row_id), sorted(want[name], key=row_id)):
            assert {k: v for k, v in g.items() if not isinstance(v, float)} == \
                {k: v for k, v in w.items() if not isinstance(v, float)}
            for k, v in w.items():
                if isinstance(v, float):
                    assert g[k] == pytest.approx(v, rel=rtol, abs=1e-300), (name, k, g, w)


def row_id(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if not isinstance(v, float)}, sort_keys=True, default=str)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


def fresh_output(src: Path, dst: Path, folders: tuple[str, ...] = ("factors",)) -> Path:
    for f in folders:
        shutil.copytree(src / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def fitted(ray_local, tiny_world, tmp_path_factory):
    """Two shards of 32 rows (8 row groups each) scored as whole shards; returns the folders and the record."""
    root = tmp_path_factory.mktemp("units")
    vocab = json.loads((tiny_world / "model" / "config.json").read_text())["vocab_size"]
    corpus = root / "shards"
    corpus.mkdir()
    for i, name in enumerate(("a", "b")):
        write_shard(corpus / f"{name}.parquet", name, 32, vocab, seed=i)
    queries = root / "queries.jsonl"
    shutil.copy(tiny_world / "queries.jsonl", queries)
    cfg = config_from_dict(job(tiny_world, corpus, root / "out", queries))
    record = run_job(cfg)
    return {"root": root, "world": tiny_world, "vocab": vocab, "corpus": corpus, "queries": queries,
            "out": root / "out", "record": record, "tables": tables(root / "out")}


def test_split_groups_closes_units_at_unit_rows():
    assert split_groups([4] * 8, 0, 8, 8) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split_groups([4] * 8, 2, 7, 10) == [(2, 5), (5, 7)]
    assert split_groups([4, 4], 0, 2, 1000) == [(0, 2)]
    assert split_groups([100, 1], 0, 2, 8) == [(0, 1), (1, 2)]


def test_units_spread_two_shards_over_four_actors(fitted):
    """Units of 2 row groups: 8 units over 4 actors, every actor busy, the tables those of whole-shard units.

    Ray Data hands units to actors as they come up; here a unit takes milliseconds and an actor
    seconds to start on 2 busy cores, so the pool is told to wait for its 4 actors first (as
    when units are long next to an actor's start, the case units finer than a shard are for).
    """
    from pipelines.runtime.ray_runtime import data_context

    whole = fitted["record"]["stages"]["score"]
    assert whole["units_total"] == 2 and whole["scored"] == 2 and whole["rows"]["scored"] == 64
    out = fresh_output(fitted["out"], fitted["root"] / "out-units", ("factors", "queries"))
    ctx = data_context()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 600
    try:
        spec = job(fitted["world"], fitted["corpus"], out, fitted["queries"], actors=4, unit_rows=2 * ROWS_PER_GROUP)
        spec["resources"]["pool"] = "actors"  # a task pool may run every unit in one reused process
        record = run_job(config_from_dict(spec))
    finally:
        ctx.wait_for_min_actors_s = saved
    stage = record["stages"]["score"]
    assert stage["units"]["pool"] == "actors"
    assert stage["units_total"] == 8 and stage["scored"] == 8 and stage["failed"] == 0
    assert stage["rows"] == {"rows": 64, "scored": 64, "skipped": 0, "unreadable_shards": 0}
    actors = stage["units"]["actors"]
    assert len(actors) == 4 and sum(a["units"] for a in actors.values()) == 8
    assert all(a["units"] >= 1 and a["busy_s"] > 0 for a in actors.values()), actors
    names = sorted(p.name for p in (out / "scores").glob("*.parquet"))
    assert names[:2] == ["a.rg00000-00001.parquet", "a.rg00002-00003.parquet"] and len(names) == 8
    assert tables(out) == fitted["tables"]
    for name in ("self_influence", "distribution"):  # every row once, whatever the units
        got, want = (pads.dataset(str(o / name)).to_table() for o in (out, fitted["out"]))
        if name == "self_influence":
            assert sorted(got.to_pylist(), key=str) == sorted(want.to_pylist(), key=str) and got.num_rows == 64
        else:
            assert pa.compute.sum(got.column("sequences")).as_py() == 64 * 3 == \
                pa.compute.sum(want.column("sequences")).as_py()


def test_performance_settings_keep_factors_and_scores(fitted):
    """Batch size, actors, threads, sort window and unit_rows change nothing that is finished."""
    out = fitted["out"]
    before = snapshot(out / "scores")
    for change in ({"resources": {"actors": 2, "batch_size": 3, "cpus_per_actor": 0.5, "threads_per_actor": 1}},
                   {"scoring": {"sort_window": 5, "unit_rows": 4}}):
        spec = job(fitted["world"], fitted["corpus"], out, fitted["queries"])
        for section, values in change.items():
            spec[section] = {**spec[section], **values}
        record = run_job(config_from_dict(spec))
        stages = record["stages"]
        assert stages["fit-factors"]["skipped"] and stages["build-queries"]["skipped"], change
        assert stages["score"]["scored"] == 0 and stages["score"]["skipped"] == 2, change
        assert stages["merge"]["skipped"], change
    assert snapshot(out / "scores") == before


def test_new_shard_scores_only_its_units(fitted):
    out = fresh_output(fitted["out"], fitted["root"] / "out-grow", ("factors", "queries"))
    corpus = fitted["root"] / "grow"
    shutil.copytree(fitted["corpus"], corpus)
    spec = job(fitted["world"], corpus, out, fitted["queries"], unit_rows=16)
    first = run_job(config_from_dict(spec))["stages"]["score"]
    assert first["scored"] == 4
    before = snapshot(out / "scores")
    write_shard(corpus / "c.parquet", "c", 24, fitted["vocab"], seed=5)
    record = run_job(config_from_dict(spec))
    stage = record["stages"]["score"]
    assert record["stages"]["fit-factors"]["skipped"] and record["stages"]["build-queries"]["skipped"]
    assert record["stages"]["fit-factors"]["refit"].startswith("kept: the corpus grew by")
    shown = [line for line in summarize(config_from_dict(spec), record) if line.lstrip().startswith("fit-factors")]
    assert len(shown) == 1 and "(kept: the corpus grew by" in shown[0], shown
    assert stage["scored"] == 2 and stage["skipped"] == 4 and stage["units"]["units"] == 2  # c: 16 + 8 rows
    assert stage["rows"] == {"rows": 88, "scored": 88, "skipped": 0, "unreadable_shards": 0}
    assert not record["stages"]["merge"]["skipped"]
    after = snapshot(out / "scores")
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 6
    scratch = fresh_output(fitted["out"], fitted["root"] / "out-grow-scratch", ("factors",))
    run_job(config_from_dict(job(fitted["world"], corpus, scratch, fitted["queries"])))
    assert tables(out) == tables(scratch)
    assert any(r["doc_id"].startswith("c-") for r in tables(out)["topk"])


def test_new_queries_score_only_the_new_queries(fitted):
    out = fresh_output(fitted["out"], fitted["root"] / "out-queries", ("factors", "queries", "scores",
                                                                        "distribution"))
    old = load_queries(out / "queries")
    queries = fitted["root"] / "queries-more.jsonl"
    text = fitted["queries"].read_text()
    queries.write_text(text + json.dumps({"query_id": "q-bird", "prompt": "a small bird",
                                          "completion": "flies near the tree"}) + "\n")
    before = snapshot(out / "scores")
    record = run_job(config_from_dict(job(fitted["world"], fitted["corpus"], out, queries)))
    stage = record["stages"]["score"]
    built = record["stages"]["build-queries"]
    assert not built["skipped"] and built["prepared"] == 1 and built["reused"] == 3
    assert record["stages"]["fit-factors"]["skipped"]
    assert stage["scored"] == 2 and stage["new_query_units"] == 2 and stage["skipped"] == 0
    after = snapshot(out / "scores")
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 4
    new = [pq.read_table(out / "scores" / n).column("query_id").to_pylist() for n in after if n not in before]
    assert all(set(ids) == {"q-bird"} for ids in new)
    scratch = fresh_output(fitted["out"], fitted["root"] / "out-queries-scratch", ("factors",))
    run_job(config_from_dict(job(fitted["world"], fitted["corpus"], scratch, queries)))
    assert_same_tables(tables(out), tables(scratch))  # scores to rounding: a matmul over 1 or 4 queries
    assert {r["query_id"] for r in tables(out)["topk"]} == {"q-cat", "q-fish", "q-dog", "q-bird"}
    grown = load_queries(out / "queries")  # the old queries' gradients were kept as they were
    assert grown.query_ids == old.query_ids + ["q-bird"]
    for name, q in old.layers.items():
        assert torch.equal(grown.layers[name].to_dense()[:3], q.to_dense())


def test_failed_unit_is_skipped_and_its_rows_counted(fitted):
    out = fresh_output(fitted["out"], fitted["root"] / "out-bad", ("factors", "queries"))
    corpus = fitted["root"] / "bad"
    corpus.mkdir()
    shutil.copy(fitted["corpus"] / "a.parquet", corpus / "a.parquet")
    write_shard(corpus / "d.parquet", "d", 32, fitted["vocab"], seed=9, bad_row=10)  # in rows 8-15
    spec = {**job(fitted["world"], corpus, out, fitted["queries"], unit_rows=8), "on_error": "skip"}
    record = run_job(config_from_dict(spec), stages=("score", "merge"))
    stage = record["stages"]["score"]
    assert stage["failed"] == 1 and stage["scored"] == 7
    assert stage["rows"] == {"rows": 64, "scored": 56, "skipped": 8, "unreadable_shards": 0}
    errors = pq.read_table(record["errors"]["table"]).to_pylist()
    assert [(e["rows"], e["stage"]) for e in errors] == [("8-15", "score")] and "d.parquet" in errors[0]["file"] and "row 10" in errors[0]["error"]
    assert record["stages"]["merge"]["units_without_scores"] == 0
    again = run_job(config_from_dict(spec), stages=("score", "merge"))["stages"]["score"]
    assert again["scored"] == 0 and again["failed"] == 1 and again["skipped"] == 7  # only the failed unit again


def test_plan_reuses_finished_ranges_and_removes_stale_files(tmp_path):
    """unit_rows is a performance setting: finished ranges stay; gaps get new units; foreign files go."""
    from pipelines.io import completion, storage
    from pipelines.stages.score_plan import GROUPS, KEY, QUERIES, SHARD, plan, unit_key

    corpus = tmp_path / "shards"
    corpus.mkdir()
    write_shard(corpus / "a.parquet", "a", 32, 50, seed=1)  # 8 row groups of 4 rows
    cfg = config_from_dict({"model": {"path": str(tmp_path)}, "data": {"corpus": str(corpus), "queries": "q.jsonl",
                                                                       "output": str(tmp_path / "out")},
                            "scoring": {"unit_rows": 8}})
    shard = str(corpus / "a.parquet")
    (fingerprint,) = completion.shard_fingerprints([shard])
    keys = {"q1": "k1", "q2": "k2"}

    def scores_file(name: str, groups: tuple[int, int], queries: dict[str, str]) -> None:
        meta = {KEY: unit_key(cfg, fingerprint, groups), SHARD: shard, GROUPS: json.dumps(list(groups)),
                QUERIES: json.dumps(list(queries.items()))}
        storage.write_parquet(str(tmp_path / "out" / "scores" / f"{name}.parquet"),
                              pa.table({"x": [1]}).replace_schema_metadata(meta))

    scores_file("a.rg00000-00003", (0, 4), keys)  # cut with unit_rows = 16 by an earlier run
    scores_file("a.rg00004-00004", (4, 5), {"q1": "k1"})  # only q1 there
    scores_file("a.rg00004-00005", (4, 6), keys)  # overlaps the range above: not kept
    scores_file("a.rg00006-00007", (6, 8), {"q1": "old"})  # a changed query: stale
    (tmp_path / "out" / "scores" / "old-shard.parquet").write_bytes(b"x")  # a removed shard's file
    p = plan(cfg, keys)
    got = [(u.groups, u.missing, len(u.files)) for u in p.units]
    assert got == [((0, 4), [], 1), ((4, 5), ["q2"], 1), ((5, 7), ["q1", "q2"], 0), ((7, 8), ["q1", "q2"], 0)]
    assert sorted(Path(u).name for u in p.removed) == ["a.rg00004-00005.parquet", "a.rg00006-00007.parquet",
                                                         "old-shard.parquet"]
    assert sorted(f.name for f in (tmp_path / "out" / "scores").iterdir()) == ["a.rg00000-00003.parquet",
                                                                                "a.rg00004-00004.parquet"]
    todo = p.units[1].task(p.scores_dir, p.queries, p.query_keys)
    assert todo["queries"] == [["q2", "k2"]] and not todo["all_queries"] and ".q" in todo["output"]
    assert [u.rows for u in p.units] == [16, 4, 8, 4] and [u.first_row for u in p.units] == [0, 16, 20, 28]
