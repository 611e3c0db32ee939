"""``on_error = "fail" | "skip"`` through the CLI: one bad shard or file per case, each policy.

fail: exit status 1, one line naming the file (no traceback), nothing else tried.
skip: exit 0, the bad file in ``<output>/errors/<run_id>.parquet`` with its reason,
the run record counts it, and every row of the corpus is accounted for
(scored + skipped == rows, printed in the summary).

The CLI runs in this process on the session's Ray (``ray_local``); the factors and
queries of the good shards are built once and copied into each case's output.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines import config_from_dict

GOOD = ("part0.parquet", "part1.parquet")


def write_job(folder: Path, world: Path, corpus: Path, on_error: str, raw: Path | None = None) -> Path:
    lines = ['run_id = "case"', f'on_error = "{on_error}"', "[model]", f'path = "{world / "model"}"', "[data]",
             f'corpus = "{corpus}"', f'queries = "{world / "queries.jsonl"}"', f'output = "{folder / "out"}"']
    if raw is not None:
        lines.append(f'raw = "{raw}"')
    lines += ["[factors]", 'fisher = "empirical"', "unit_sequences = 8", "[scoring]", "top_k = 2", "rank = 4",
              "per_token = false", "[resources]", "actors = 1", "batch_size = 4"]
    path = folder / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str):
    from pipelines.cli import main

    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result, *words: str) -> None:
    """Exit 1 through click (not an escaped exception), a line holding every word, no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, result.stderr


def corpus_rows(result) -> tuple[int, int, int]:
    match = re.search(r"corpus rows: (\d+) = (\d+) scored \+ (\d+) skipped", result.stdout)
    assert match, result.stdout
    rows, scored, skipped = map(int, match.groups())
    assert scored + skipped == rows
    return rows, scored, skipped


def errors(folder: Path) -> list[dict]:
    return pq.read_table(folder / "out" / "errors" / "case.parquet").to_pylist()


@pytest.fixture(scope="module")
def world(ray_local, tiny_world, tmp_path_factory):
    """Good shards (the shared world's raw files tokenized), and factors + queries of two of them.

    Built in this process without Ray (``fit_ekfac`` on every good row, then the
    ``build-queries`` stage, which runs on the driver): the CLI runs of the cases are
    the only Ray work here.
    """
    from pipelines.config import ModelConfig
    from pipelines.stages.tokenize import Tokenizer
    from prepared import prepare_output

    root = tmp_path_factory.mktemp("on_error")
    shards, good = root / "shards", root / "good"
    shards.mkdir()
    good.mkdir()
    tok = Tokenizer(ModelConfig(path=str(tiny_world / "model")), max_length=16, text_column="text", id_column="id")
    for f in range(3):
        pq.write_table(tok.tokenize_file(str(tiny_world / "raw" / f"part{f}.jsonl")), shards / f"part{f}.parquet")
    for name in GOOD:
        shutil.copy(shards / name, good / name)
    cfg = config_from_dict({
        "model": {"path": str(tiny_world / "model")},
        "data": {"corpus": str(good), "queries": str(tiny_world / "queries.jsonl"), "output": str(root / "base")},
        "factors": {"fisher": "empirical"}, "scoring": {"top_k": 2, "rank": 4}, "resources": {"batch_size": 4}})
    prepare_output(cfg)
    return {"tiny": tiny_world, "root": root, "shards": shards, "good": good, "base_out": root / "base"}


def bad_shard(kind: str, folder: Path, shards: Path) -> tuple[Path, int | None]:
    """Write one bad shard into ``folder``; returns it and its rows (None when its footer cannot be read)."""
    path = folder / f"bad-{kind}.parquet"
    if kind == "corrupt":
        path.write_bytes(b"this is not a parquet file at all" * 10)
        return path, None
    if kind == "truncated":
        data = (shards / "part2.parquet").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, None
    if kind == "too-long":  # the tiny model's context is 16 tokens
        ids = [[1, 2, 3], [4, 5, 6, 7], list(range(1, 21)), [3, 4]]
    elif kind == "vocab":
        ids = [[1, 2, 3], [4, 5, 10_000], [3, 4]]
    else:
        raise ValueError(kind)
    pq.write_table(pa.table({"doc_id": [f"{kind}-{i}" for i in range(len(ids))],
                             "input_ids": pa.array(ids, pa.list_(pa.int32()))}), path)
    return path, len(ids)


def case_folder(world, name: str, kinds: tuple[str, ...], with_queries: bool) -> tuple[Path, Path, dict]:
    folder = world["root"] / name
    corpus = folder / "corpus"
    corpus.mkdir(parents=True)
    for good in GOOD:
        shutil.copy(world["good"] / good, corpus / good)
    bad = {kind: bad_shard(kind, corpus, world["shards"]) for kind in kinds}
    if with_queries:
        for sub in ("factors", "queries"):
            shutil.copytree(world["base_out"] / sub, folder / "out" / sub)
    return folder, corpus, bad


def good_rows(world) -> int:
    return sum(pq.ParquetFile(world["good"] / g).metadata.num_rows for g in GOOD)


SCORE_PROBLEMS = {"corrupt": "magic bytes", "truncated": "", "too-long": "the model's context of 16"}


@pytest.mark.parametrize("kind", sorted(SCORE_PROBLEMS))
def test_score_fail_stops_with_one_line_naming_the_shard(world, kind):
    folder, corpus, bad = case_folder(world, f"score-fail-{kind}", (kind,), with_queries=True)
    result = cli("score", str(write_job(folder, world["tiny"], corpus, "fail")), "-q")
    words = [str(bad[kind][0]), SCORE_PROBLEMS[kind]] + (["row 2", "field 'input_ids'"] if kind == "too-long" else [])
    assert_one_line_error(result, *[w for w in words if w])
    record = json.loads((folder / "out" / "runs" / "case.json").read_text())
    assert record["status"].startswith("failed: ") and str(bad[kind][0]) in record["status"]
    assert not (folder / "out" / "scores" / f"bad-{kind}.parquet").exists()


def test_score_skip_goes_on_and_accounts_for_every_row(world):
    """Corrupt, truncated and too-long shards in one corpus: all three skipped, named, the rest scored."""
    folder, corpus, bad = case_folder(world, "score-skip", tuple(SCORE_PROBLEMS), with_queries=True)
    result = cli("score", str(write_job(folder, world["tiny"], corpus, "skip")), "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    rows, scored, skipped = corpus_rows(result)
    assert (rows, scored, skipped) == (good_rows(world) + 4, good_rows(world), 4)
    assert "2 unreadable shards, rows unknown" in result.stdout
    assert "skipped after errors (on_error = 'skip'): 3 units (3 in score)" in result.stdout
    table = {Path(r["file"]).name: r for r in errors(folder)}
    assert sorted(table) == sorted(p.name for p, _ in bad.values())
    for kind, (path, _) in bad.items():
        row = table[path.name]
        assert row["stage"] == "score" and row["run_id"] == "case" and row["rows"] == "all"
        assert str(path) in row["error"] and SCORE_PROBLEMS[kind] in row["error"]
    assert table["bad-too-long.parquet"]["doc_id"] == "too-long-2"
    assert sorted(p.name for p in (folder / "out" / "scores").glob("*.parquet")) == sorted(GOOD)
    record = json.loads((folder / "out" / "runs" / "case.json").read_text())
    assert record["status"] == "ok" and record["counts"]["failed"] == 3 and record["errors"]["units"] == 3
    assert record["counts"]["rows"] == {"rows": rows, "scored": scored, "skipped": skipped, "unreadable_shards": 2}
    merged = cli("merge", str(folder / "job.toml"), "-q")  # merge takes the shards that were scored
    assert merged.exit_code == 0, (merged.output, merged.exception)
    topk = pq.read_table(folder / "out" / "topk" / "query_id=q-cat" / "part-0.parquet")
    assert topk.num_rows == 4 and not any(d.startswith(("too-long", "bad")) for d in topk.column("doc_id").to_pylist())


def test_fit_factors_fail_on_unreadable_shard_before_ray_work(world):
    folder, corpus, bad = case_folder(world, "fit-fail-corrupt", ("corrupt",), with_queries=False)
    result = cli("fit-factors", str(write_job(folder, world["tiny"], corpus, "fail")), "-q")
    assert_one_line_error(result, str(bad["corrupt"][0]), "magic bytes")
    assert not (folder / "out" / "factors" / "manifest.json").exists()


def test_fit_factors_fail_on_contract_violation_in_a_worker(world):
    folder, corpus, bad = case_folder(world, "fit-fail-vocab", ("vocab",), with_queries=False)
    result = cli("fit-factors", str(write_job(folder, world["tiny"], corpus, "fail")), "-q")
    assert_one_line_error(result, str(bad["vocab"][0]), "row 1", "field 'input_ids'", "token id 10000")
    assert not (folder / "out" / "factors" / "manifest.json").exists()


def test_fit_factors_skip_fits_the_rest_and_accounts_for_the_sample(world, assert_factors_match_fit):
    """An unreadable shard (driver) and a contract violation (worker) in one corpus, both skipped."""
    folder, corpus, bad = case_folder(world, "fit-skip", ("corrupt", "vocab"), with_queries=False)
    result = cli("fit-factors", str(write_job(folder, world["tiny"], corpus, "skip")), "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"{good_rows(world)} sequences" in result.stdout and "3 skipped" in result.stdout
    table = {Path(r["file"]).name: r for r in errors(folder)}
    assert sorted(table) == ["bad-corrupt.parquet", "bad-vocab.parquet"]
    assert table["bad-vocab.parquet"]["rows"] == "0-2" and "token id 10000" in table["bad-vocab.parquet"]["error"]
    assert "magic bytes" in table["bad-corrupt.parquet"]["error"]
    sample = pq.read_table(folder / "out" / "factors" / "sample.parquet")
    assert sample.num_rows == good_rows(world) and "bad-vocab" not in " ".join(sample.column("shard").to_pylist())
    info = json.loads((folder / "out" / "factors" / "_pipeline.json").read_text())
    assert info["rows"]["fitted"] + info["rows"]["skipped"] == info["rows"]["sampled"] == good_rows(world) + 3
    assert info["rows"]["unreadable_shards"] == 1
    sample_cfg = config_from_dict({"model": {"path": str(world["tiny"] / "model")},
                                   "data": {"corpus": str(corpus), "queries": "unused", "output": str(folder / "out")}})
    assert assert_factors_match_fit(sample_cfg) == good_rows(world)  # the factors of the good shards alone


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_tokenize_file_without_text_column(world, on_error):
    folder = world["root"] / f"tokenize-{on_error}"
    raw = folder / "raw"
    raw.mkdir(parents=True)
    shutil.copy(world["tiny"] / "raw" / "part0.jsonl", raw / "part0.jsonl")
    (raw / "notext.jsonl").write_text(json.dumps({"id": "x", "body": "the cat"}) + "\n")
    job = write_job(folder, world["tiny"], folder / "corpus", on_error, raw=raw)
    result = cli("tokenize", str(job), "-q")
    if on_error == "fail":
        assert_one_line_error(result, str(raw / "notext.jsonl"), "no column 'text' (data.text_column)")
        return
    assert result.exit_code == 0, (result.output, result.exception)
    want = pq.ParquetFile(world["shards"] / "part0.parquet").metadata.num_rows
    assert f"2 files, 1 failed, {want} new sequences" in result.stdout
    (row,) = errors(folder)
    assert row["stage"] == "tokenize" and row["file"] == str(raw / "notext.jsonl") and "'text'" in row["error"]
    assert sorted(p.name for p in (folder / "corpus").glob("*.parquet")) == ["part0.parquet"]
