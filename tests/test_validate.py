"""`influence validate` and the stages' preflight: one kind of bad input per test, one line each, no traceback.

Every CLI case asserts the exit status, the one-line message (naming the file,
row, field or job key) and the absence of a traceback. The good job passes in
seconds. Also here: the merge keys rows by (doc_id, shard), and the
``data.too_long`` policy in the read path.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.io.shards import ShardError, read_rows

CONTEXT = 16  # the tiny_world model's context


@pytest.fixture(scope="module")
def good_shards(tiny_world, tmp_path_factory):
    """The tiny world's raw files tokenized into three shards (no Ray: the tokenize callable directly)."""
    from pipelines.config import ModelConfig
    from pipelines.stages.tokenize import Tokenizer

    out = tmp_path_factory.mktemp("shards")
    tok = Tokenizer(ModelConfig(path=str(tiny_world / "model")), max_length=CONTEXT, text_column="text",
                    id_column="id")
    for raw in sorted((tiny_world / "raw").glob("*.jsonl")):
        pq.write_table(tok.tokenize_file(str(raw)), out / f"{raw.stem}.parquet")
    return out


class World:
    """A job in ``tmp_path`` over copies of the good inputs, each of which a test may break."""

    def __init__(self, tiny_world: Path, good_shards: Path, tmp_path: Path) -> None:
        self.root = tmp_path
        self.model = tmp_path / "model"
        self.shards = tmp_path / "shards"
        self.queries = tmp_path / "queries.jsonl"
        shutil.copytree(tiny_world / "model", self.model)
        shutil.copytree(good_shards, self.shards)
        shutil.copy(tiny_world / "queries.jsonl", self.queries)
        self.job = self.write_job()

    def write_job(self, data: str = "", model: str = "", corpus: str | None = None) -> Path:
        corpus = corpus if corpus is not None else str(self.shards)
        text = (f'[model]\npath = "{self.model}"\n{model}\n[data]\ncorpus = "{corpus}"\n'
                f'queries = "{self.queries}"\noutput = "{self.root / "out"}"\n{data}\n')
        job = self.root / "job.toml"
        job.write_text(text)
        return job

    def shard(self, name: str = "part1") -> Path:
        return self.shards / f"{name}.parquet"

    def rewrite(self, name: str, change) -> Path:
        """Apply ``change(rows) -> rows`` to a shard's rows (list of dicts) and write it back."""
        path = self.shard(name)
        table = pq.read_table(path)
        pq.write_table(pa.Table.from_pylist(change(table.to_pylist()), schema=table.schema), path)
        return path


@pytest.fixture
def world(tiny_world, good_shards, tmp_path):
    return World(tiny_world, good_shards, tmp_path)


def validate(job: Path):
    return CliRunner().invoke(main, ["validate", str(job)])


def first_error(result) -> str:
    """The first error line, after checking the exit status and that no exception escaped."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.output
    return errors[0]


def passed(result) -> str:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


# --- the good job ------------------------------------------------------------------------------------------


def test_good_job_passes_quickly_with_a_summary(world):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "validate", str(world.job)], capture_output=True,
                          text=True, env=env, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # wall time depends on the load
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in world.shards.glob("*.parquet"))
    tokens = sum(len(x) for p in world.shards.glob("*.parquet") for x in pq.read_table(p).column("input_ids").to_pylist())
    assert ": ok, 0 warnings" in proc.stdout
    assert f"3 shards, 3 row groups, {rows} rows, {tokens} tokens; doc_ids unique" in proc.stdout
    assert "queries  3" in proc.stdout and "4 tracked layers" in proc.stdout
    assert cpu < 30, f"validate took {cpu:.1f} s of CPU"  # about 7 s here, 6 of them importing torch and transformers


# --- shards ------------------------------------------------------------------------------------------------


def test_corrupt_shard_is_named(world):
    world.shard("part1").write_bytes(b"this is not parquet at all" * 10)
    line = first_error(validate(world.job))
    assert str(world.shard("part1")) in line and "not a readable Parquet file" in line


def test_truncated_shard_is_named(world):
    path = world.shard("part2")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = first_error(validate(world.job))
    assert str(path) in line and "truncated" in line


def test_missing_column_is_named(world):
    path = world.shard("part0")
    pq.write_table(pq.read_table(path).drop_columns(["input_ids"]), path)
    line = first_error(validate(world.job))
    assert str(path) in line and "field 'input_ids'" in line and "missing" in line


def test_wrong_column_type_is_named(world):
    path = world.shard("part0")
    t = pq.read_table(path)
    pq.write_table(t.set_column(0, "doc_id", pa.array(range(t.num_rows), pa.int64())), path)
    line = first_error(validate(world.job))
    assert str(path) in line and "field 'doc_id'" in line and "expected string" in line


def test_token_id_outside_vocabulary_names_file_and_row(world):
    def change(rows):
        rows[3]["input_ids"] = rows[3]["input_ids"][:-1] + [10_000]
        return rows

    path = world.rewrite("part1", change)
    line = first_error(validate(world.job))
    assert str(path) in line and "row 3, field 'input_ids'" in line and "token id 10000" in line


def _make_long(world) -> Path:
    def change(rows):
        rows[2]["input_ids"] = [5] * (CONTEXT + 7)
        return rows

    return world.rewrite("part2", change)


def test_too_long_is_an_error_by_default_naming_file_and_row(world):
    path = _make_long(world)
    line = first_error(validate(world.job))
    assert str(path) in line and "row 2, field 'input_ids'" in line and f"context of {CONTEXT}" in line
    assert 'data.too_long = "truncate"' in line


@pytest.mark.parametrize("policy", ["truncate", "chunk"])
def test_too_long_with_truncate_or_chunk_passes_with_a_warning(world, policy):
    _make_long(world)
    out = passed(validate(world.write_job(data=f'too_long = "{policy}"')))
    assert f"1 longer than the context (data.too_long = '{policy}')" in out
    assert f"data.too_long = '{policy}' applies to them" in out


@pytest.mark.parametrize("field", ["input_ids", "loss_mask"])
def test_sequence_with_nothing_in_the_loss_names_file_row_and_field(world, field):
    """One token, or a loss_mask with no 1 after the first position: no gradient, refused like other bad rows."""
    path = world.shard("part1")
    table = pq.read_table(path)
    if field == "input_ids":
        rows = table.to_pylist()
        rows[4]["input_ids"] = rows[4]["input_ids"][:1]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    else:
        masks = [[1] * len(x) for x in table.column("input_ids").to_pylist()]
        masks[4] = [1] + [0] * (len(masks[4]) - 1)  # the first token is never predicted
        pq.write_table(table.append_column("loss_mask", pa.array(masks, pa.list_(pa.int8()))), path)
    line = first_error(validate(world.job))
    assert str(path) in line and f"row 4, field '{field}'" in line and "nothing" in line and "in the loss" in line
    with pytest.raises(ShardError) as raised:  # every reader of the shards says the same
        read_rows(str(path), None, None)
    assert str(raised.value) in line and raised.value.row == 4 and raised.value.doc_id is not None


def test_chunk_leaves_out_a_piece_masked_out_of_the_loss(tmp_path):
    """too_long = "chunk": a piece with nothing in the loss (here its loss_mask is all 0; a last piece of one
    token in ``test_read_path_applies_too_long``) is left out, as `tokenize` leaves out such chunks."""
    path = tmp_path / "p.parquet"
    ids = [[3, 4, 5], list(range(1, 10)), list(range(1, 9))]  # context 4: pieces of 4, 4, 1 and of 4, 4
    masks = [[1] * 3, [1] * 9, [1, 1, 1, 1, 0, 0, 0, 0]]  # c#1: masked out entirely
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "loss_mask": pa.array(masks, pa.list_(pa.int8()))}), path)
    seqs = read_rows(str(path), None, None, context=4, too_long="chunk")
    assert seqs.doc_ids == ["a", "b#0", "b#1", "c#0"] and seqs.rows.tolist() == [0, 1, 1, 2]
    masks[2] = [0, 0, 0, 0, 0, 1, 1, 1]  # in the loss only after the context: truncating leaves nothing
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "loss_mask": pa.array(masks, pa.list_(pa.int8()))}), path)
    with pytest.raises(ShardError, match=r"row 2, field 'loss_mask': its 1s are all beyond the first 4 tokens"):
        read_rows(str(path), None, None, context=4, too_long="truncate")
    assert read_rows(str(path), None, None, context=4, too_long="chunk").doc_ids == ["a", "b#0", "b#1", "c#1"]


def test_bad_too_long_value_names_the_key(world):
    line = first_error(validate(world.write_job(data='too_long = "drop"')))
    assert "data.too_long = 'drop'" in line and "truncate" in line


def test_duplicate_doc_id_across_files_names_both(world):
    other = pq.read_table(world.shard("part0")).column("doc_id")[4].as_py()

    def change(rows):
        rows[6]["doc_id"] = other
        return rows

    path = world.rewrite("part2", change)
    line = first_error(validate(world.job))
    assert f"{world.shard('part0')}: row 4, field 'doc_id'" in line
    assert f"{other!r} is also in {path} row 6" in line and "unique across the corpus" in line


def test_duplicate_doc_id_within_a_shard_is_one_error_and_the_rows_are_still_checked(world):
    """A repeat inside one shard is reported once (by the corpus-wide check), and the row scan goes on past it."""
    def change(rows):
        rows[5]["doc_id"] = rows[1]["doc_id"]
        rows[7]["input_ids"] = [1, 10_000]
        return rows

    path = world.rewrite("part1", change)
    result = validate(world.job)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, errors
    assert f"{path}: row 1, field 'doc_id'" in errors[0] and "also in row 5 of the same shard" in errors[0]
    assert f"{path}: row 7, field 'input_ids': token id 10000 is outside the vocabulary" in errors[1]


def test_duplicate_doc_ids_found_through_spilled_buckets(world):
    from pipelines.validate.doc_ids import check_unique_doc_ids

    shards = sorted(str(p) for p in world.shards.glob("*.parquet"))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    check_unique_doc_ids(shards, total, bucket_rows=3)  # many buckets, on disk: no false alarm
    first = pq.read_table(shards[0]).column("doc_id")[0].as_py()
    world.rewrite("part1", lambda rows: rows[:5] + [{**rows[5], "doc_id": first}] + rows[6:])
    with pytest.raises(ShardError, match=r"part0.parquet: row 0, field 'doc_id'.*part1.parquet row 5"):
        check_unique_doc_ids(shards, total, bucket_rows=3)


@pytest.mark.parametrize("bucket_rows", [1_000_000, 2])  # one bucket in memory; buckets spilled to disk
def test_raw_ids_shared_by_two_files_are_found(bucket_rows):
    from pipelines.validate.doc_ids import RawIds

    urls = ["raw/a.jsonl", "raw/b.jsonl", "raw/c.jsonl"]
    fine = RawIds(urls, "id")
    for url, ids in zip(urls, (["1", "2"], ["3", "4", "5"], ["6"])):
        fine.add(url, ids)
    fine.check(bucket_rows)  # no false alarm
    assert fine.rows == 6
    shared = RawIds(urls, "id")
    for url, ids in zip(urls, (["1", "2"], ["3", "4", "5"], ["6", "2", "4"])):
        shared.add(url, ids)
    with pytest.raises(ShardError) as err:
        shared.check(bucket_rows)
    assert str(err.value).startswith("raw/a.jsonl: row 1, field 'id': id '2' is also in raw/c.jsonl row 1 "
                                     "(document ids must be unique across data.raw"), str(err.value)
    assert "2 ids occur in more than one file" in str(err.value)


def test_run_names_the_raw_files_behind_a_doc_id_repeated_in_two_tokenized_shards(world):
    """`run` finds a repeat after tokenize, in the shards: its error also names the raw files they came from."""
    from pipelines.config import load_config
    from pipelines.validate.preflight import preflight_corpus

    raw = world.root / "raw"
    raw.mkdir()
    for name in ("part0", "part1"):
        (raw / f"{name}.jsonl").write_text('{"id": "x", "text": "t"}\n')  # only the names matter here
    first = pq.read_table(world.shard("part0")).column("doc_id")[0].as_py()
    world.rewrite("part1", lambda rows: rows[:5] + [{**rows[5], "doc_id": first}] + rows[6:])
    cfg = load_config(world.write_job(data=f'raw = "{raw}"'))
    with pytest.raises(ShardError) as err:
        preflight_corpus(cfg)
    assert str(err.value).startswith(f"{world.shard('part0')}: row 0, field 'doc_id'"), str(err.value)
    assert f"tokenized from data.raw: the id {first.rsplit(':', 1)[0]!r} is in {raw / 'part0.jsonl'} and " \
           f"{raw / 'part1.jsonl'}" in str(err.value), str(err.value)
    cfg = load_config(world.write_job())  # no data.raw: the shards alone
    with pytest.raises(ShardError) as err:
        preflight_corpus(cfg)
    assert "data.raw" not in str(err.value) and f"{world.shard('part1')} row 5" in str(err.value)


@pytest.mark.parametrize("corpus", ["{root}/shards/*.jsonl", "{root}/nothing-here/"])
def test_empty_shard_set_names_data_corpus(world, corpus):
    corpus = corpus.format(root=world.root)
    line = first_error(validate(world.write_job(corpus=corpus)))
    assert f"data.corpus = {corpus!r}" in line and ("matches no file" in line or "does not exist" in line)


# --- queries -----------------------------------------------------------------------------------------------


def test_bad_json_line_names_the_line(world):
    lines = world.queries.read_text().splitlines()
    lines[1] = lines[1][:-3]
    world.queries.write_text("\n".join(lines) + "\n")
    line = first_error(validate(world.job))
    assert f"{world.queries}: line 2: not JSON" in line


def test_non_utf8_queries_file_names_the_line(world):
    world.queries.write_bytes(world.queries.read_bytes() + '{"query_id": "q-x", "prompt": "caf\u00e9"'.encode("latin-1"))
    line = first_error(validate(world.job))
    assert f"{world.queries}: line 4: not UTF-8" in line


def test_missing_query_field_is_named(world):
    rows = [json.loads(x) for x in world.queries.read_text().splitlines()]
    del rows[2]["completion"]
    world.queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = first_error(validate(world.job))
    assert f"{world.queries}: line 3, field 'completion': missing" in line


def test_duplicate_query_id_names_both_lines(world):
    rows = [json.loads(x) for x in world.queries.read_text().splitlines()]
    rows[2]["query_id"] = rows[0]["query_id"]
    world.queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = first_error(validate(world.job))
    assert f"line 3, field 'query_id': duplicate {rows[0]['query_id']!r} (first at line 1)" in line


def test_prompt_longer_than_the_context_is_a_warning_with_what_is_left_out(world, tmp_path):
    """validate warns (and build-queries logs, and show notes) that a prompt loses its first tokens."""
    from pipelines.stages.build_queries import tokenize_queries, warn_cut_prompts
    from pipelines.validate.queries import check_queries

    rows = [{"query_id": "short", "prompt_ids": [1, 2], "completion_ids": [3]},
            {"query_id": "long", "prompt_ids": list(range(1, CONTEXT + 4)), "completion_ids": [3, 4]}]
    world.queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = validate(world.job)
    passed(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {world.queries}: line 2 (query 'long'), field 'prompt': prompt + completion are "
                        f"{CONTEXT + 5} tokens, more than the model's context of {CONTEXT}: the prompt's first 5 tokens "
                        "will be left out"]
    assert check_queries(str(world.queries), None, 64, CONTEXT + 5).warnings == []  # fits exactly: nothing
    got = tokenize_queries(str(world.queries), None, 64, CONTEXT)
    assert got.dropped == [0, 5] and got.prompt_ids[1] == list(range(6, CONTEXT + 4))
    import logging

    with pytest.MonkeyPatch.context() as mp:
        seen: list[str] = []
        mp.setattr(logging.getLogger("pipelines.stages.build_queries"), "warning",
                   lambda msg, *args: seen.append(msg % args))
        warn_cut_prompts(got, CONTEXT, "q.jsonl")
    assert seen == [f"q.jsonl: 1 query is longer than the model's context of {CONTEXT} tokens: the prompt's first "
                    f"tokens are left out (left out of the prompt's tokens): long (5 of {CONTEXT + 3})"]


@pytest.mark.parametrize("change", ["missing completion", "duplicate id", "bad id", "ids out of vocabulary",
                                    "empty prompt"])
def test_build_queries_reads_the_file_as_validate_does(tmp_path, change):
    """One reader (``io.queries_file``): `build-queries` fails on the same line with the same words."""
    from pipelines.stages.build_queries import tokenize_queries
    from pipelines.validate.queries import check_queries

    rows = [{"query_id": f"q{i}", "prompt_ids": [1, 2], "completion_ids": [3]} for i in range(3)]
    if change == "missing completion":
        rows[1] = {"query_id": "q1", "prompt": "a b"}
    elif change == "duplicate id":
        rows[2]["query_id"] = "q0"
    elif change == "bad id":
        rows[1]["query_id"] = "q/1"
    elif change == "empty prompt":
        rows[0].update(prompt_ids=[], completion_ids=[3, 4])  # no prompt, two tokens: the second is measured
        rows[1]["prompt_ids"] = []  # one token and nothing before it: refused
    else:
        rows[2]["completion_ids"] = [99]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as checked:
        check_queries(str(path), None, 10, 8)
    with pytest.raises(ValueError) as built:
        tokenize_queries(str(path), None, 10, 8)
    assert str(checked.value) == str(built.value) and f"{path}: line " in str(built.value)
    if change == "empty prompt":
        assert str(built.value).startswith(f"{path}: line 2, field 'prompt_ids': no tokens, and a completion of one")
    if change == "ids out of vocabulary":
        assert (f"{path}: line 3, field 'completion_ids': token id 99 (position 0) is outside the vocabulary "
                "[0, 10)") == str(built.value)


def test_leading_space_warning_shows_both_tokenizations(tmp_path):
    """A byte-level BPE tokenizer (GPT-2 style): 'Chardet.' after 'is' is not ' Chardet.'."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from pipelines.demo.model import save_model, tiny_gpt2

    texts = ["The capital of Velmora is Chardet.", "Chardet is a city. The river is long."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>")
    model = tmp_path / "model"
    tok.save_pretrained(str(model))
    save_model(tiny_gpt2(len(tok), context=32, width=8, layers=1, heads=1), model)
    pq.write_table(pa.table({"doc_id": ["a", "b"], "input_ids": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32()))}),
                   tmp_path / "s.parquet")
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "glued", "prompt": "The capital of Velmora is",
                                   "completion": "Chardet."}) + "\n"
                       + json.dumps({"query_id": "spaced", "prompt": "The capital of Velmora is",
                                     "completion": " Chardet."}) + "\n")
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{model}"\n[data]\ncorpus = "{tmp_path}/s.parquet"\nqueries = "{queries}"\n'
                   f'output = "{tmp_path}/out"\n')
    result = validate(job)
    assert passed(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "query 'glued'" in warnings[0], result.stderr
    glued = tok("Chardet.", add_special_tokens=False)["input_ids"]
    spaced = tok(" Chardet.", add_special_tokens=False)["input_ids"]
    assert glued != spaced
    assert str(tok.convert_ids_to_tokens(glued)) in warnings[0] and str(tok.convert_ids_to_tokens(spaced)) in warnings[0]
    assert "' Chardet.'" in warnings[0]


# --- model -------------------------------------------------------------------------------------------------


def test_missing_weights_name_model_path(world):
    (world.model / "model.safetensors").rename(world.model / "model.ckpt")
    line = first_error(validate(world.job))
    assert f"model.path '{world.model}': no weights" in line and "model.ckpt" in line and "safetensors" in line


def test_tracked_layers_not_found_names_layer_pattern(world):
    line = first_error(validate(world.write_job(model='layer_pattern = "no_such_layer"')))
    assert "model.layer_pattern = 'no_such_layer': tracked layers not found" in line


def test_two_raw_files_that_would_write_one_shard_are_refused_naming_both(world, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.jsonl", "b.jsonl", "a.parquet"):
        (raw / name).write_text("")
    line = first_error(validate(world.write_job(data=f'raw = "{raw}"')))
    assert line == (f"error: data.raw = '{raw}': {raw}/a.jsonl and {raw}/a.parquet share the name 'a', and each would "
                    "be tokenized to the shard a.parquet: rename or move one of them")


def test_raw_file_inside_the_corpus_is_refused_before_tokenize_overwrites_it(world, tmp_path):
    """A raw Parquet file in the corpus folder would be overwritten by its own shard (same name) or read as
    a shard: validate and tokenize refuse it, and the file is left as it was."""
    from pipelines.config import load_config
    from pipelines.stages.tokenize import tokenize

    corpus = tmp_path / "work"
    corpus.mkdir()
    raw = corpus / "docs.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["the cat", "the dog"]}), raw)
    before = raw.read_bytes()
    job = world.write_job(data=f'raw = "{raw}"', corpus=str(corpus))
    result = validate(job)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    message = (f"data.raw = '{raw}': the raw file {raw} lies in data.corpus = '{corpus}', where `tokenize` writes its "
               "shards (it would be overwritten by, or read as, a shard): keep raw files and shards in separate folders")
    assert errors[0] == f"error: {message}", errors
    with pytest.raises(ValueError) as err:
        tokenize(load_config(job))
    assert str(err.value) == message and raw.read_bytes() == before
    glob = world.write_job(data=f'raw = "{raw}"', corpus=str(corpus / "shard-*.parquet"))  # not listed, same name
    with pytest.raises(ValueError, match="lies in data.corpus"):
        tokenize(load_config(glob))
    assert raw.read_bytes() == before


def test_tokenize_refuses_to_replace_a_shard_it_did_not_write(world, tmp_path):
    """A pre-tokenized shard of the user's with the name of a raw file's shard is not overwritten."""
    from pipelines.config import load_config
    from pipelines.stages.tokenize import tokenize

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part1.jsonl").write_text(json.dumps({"id": "x", "text": "the cat"}) + "\n")
    before = world.shard("part1").read_bytes()
    job = world.write_job(data=f'raw = "{tmp_path / "raw"}"')
    with pytest.raises(ValueError) as err:
        tokenize(load_config(job))
    assert str(err.value) == (f"data.corpus: {world.shard('part1')} was not written by `tokenize`, which would "
                              f"replace it with the shard of {tmp_path / 'raw' / 'part1.jsonl'}: move or rename one "
                              "of them")
    assert world.shard("part1").read_bytes() == before


def test_tracked_layers_follow_model_track(world):
    """validate counts the layers the job will track: with mlp+attention the attention projections too."""
    mlp = passed(validate(world.job))
    both = passed(validate(world.write_job(model='track = "mlp+attention"')))
    assert "4 tracked layers" in mlp and "8 tracked layers" in both, (mlp, both)


def test_factory_model_without_known_layers_lists_its_linear_modules(world, tmp_path, monkeypatch):
    """A plain torch model needs model.layer_pattern: the error names the key and the Linear modules to pick from;
    a factory module that does not import says where Python looks."""
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lm.py").write_text(
        "import torch\n"
        "class LM(torch.nn.Module):\n"
        "    context = 16\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(64, 8)\n"
        "        self.up = torch.nn.Linear(8, 16)\n"
        "        self.out = torch.nn.Linear(16, 64)\n"
        "    def forward(self, ids):\n"
        "        return self.out(torch.relu(self.up(self.emb(ids))))\n"
        "def make():\n"
        "    return LM()\n")
    job = world.root / "factory.toml"
    job.write_text(f'[model]\nfactory = "userpkg.lm:make"\n[data]\ncorpus = "{world.shards}"\n'
                   f'queries = "{world.queries}"\noutput = "{world.root / "out"}"\n')
    line = first_error(validate(job))
    assert "model.factory = 'userpkg.lm:make': cannot import 'userpkg.lm'" in line and "PYTHONPATH" in line
    monkeypatch.syspath_prepend(str(tmp_path))
    line = first_error(validate(job))
    assert line == ("error: model.factory = 'userpkg.lm:make': no tracked layers are known for LM (model type None): "
                    "set model.layer_pattern to a regular expression over its module names; its Linear modules: up, "
                    "out")


def test_model_without_tokenizer_names_the_key(world):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (world.model / name).unlink(missing_ok=True)
    line = first_error(validate(world.job))
    assert f"no tokenizer in model.path '{world.model}'" in line and "set model.tokenizer" in line


def test_missing_model_folder_is_named(world):
    shutil.rmtree(world.model)
    line = first_error(validate(world.job))
    assert f"model.path '{world.model}' does not exist" in line


def test_bad_job_key_is_named(world):
    world.job.write_text(world.job.read_text() + "[scoring]\ntopk = 3\n")
    line = first_error(validate(world.job))
    assert "scoring.topk = 3: unknown key" in line


# --- the stages' preflight ---------------------------------------------------------------------------------


def test_score_stage_refuses_duplicate_doc_ids_before_ray_starts(world):
    """The stage command stops at its preflight, naming both files; Ray is never started."""
    first = pq.read_table(world.shard("part0")).column("doc_id")[1].as_py()
    path = world.rewrite("part1", lambda rows: [{**rows[0], "doc_id": first}] + rows[1:])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "score", "-q", str(world.job)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(world.shard("part0")) in proc.stderr and f"{path} row 0" in proc.stderr
    assert not (world.root / "out" / "scores").exists()


def test_preflight_corpus_is_remembered_for_the_same_files(world):
    from pipelines import load_config
    from pipelines.validate import preflight_corpus

    cfg = load_config(world.job)
    first = preflight_corpus(cfg)
    assert first["skipped"] is False and first["doc_ids_unique"] and first["shards"] == 3
    assert preflight_corpus(cfg)["skipped"] is True
    world.rewrite("part1", lambda rows: rows[:-1])  # a changed shard is checked again
    assert preflight_corpus(cfg)["skipped"] is False


# --- data.too_long in the read path ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["error", "truncate", "chunk"])
def test_read_path_applies_too_long(tmp_path, policy):
    ids = [list(range(1, 4)), list(range(1, 12)), list(range(1, 6))]
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "input_ids": pa.array(ids, pa.list_(pa.int32())),
                             "loss_mask": pa.array([[1] * len(x) for x in ids], pa.list_(pa.int8()))}), path)
    if policy == "error":
        with pytest.raises(ShardError, match=r"row 1, field 'input_ids': 11 tokens, more than the model's context of 4"):
            read_rows(str(path), None, 20, context=4, too_long=policy)
        return
    seqs = read_rows(str(path), None, 20, context=4, too_long=policy)
    got = [(d, x.tolist(), int(r)) for d, x, r in zip(seqs.doc_ids, seqs.input_ids, seqs.rows)]
    if policy == "truncate":
        assert got == [("a", [1, 2, 3], 0), ("b", [1, 2, 3, 4], 1), ("c", [1, 2, 3, 4], 2)]
    else:
        assert got == [("a", [1, 2, 3], 0), ("b#0", [1, 2, 3, 4], 1), ("b#1", [5, 6, 7, 8], 1),
                       ("b#2", [9, 10, 11], 1), ("c#0", [1, 2, 3, 4], 2)]  # c#1 = [5]: nothing in the loss
    assert [len(m) for m in seqs.loss_masks] == [len(x) for _, x, _ in got]
    picked = read_rows(str(path), None, 20, doc_ids={"b#1"}, context=4, too_long=policy)
    assert picked.doc_ids == (["b#1"] if policy == "chunk" else [])


def test_shard_scorer_follows_too_long(tmp_path):
    """Scoring (called directly, no Ray): a long row fails the shard under "error" and is truncated under "truncate"."""
    from influence_ops import Fisher, collate, fit_ekfac, precondition_queries, query_batch, save_queries
    from pipelines.config import ModelConfig
    from pipelines.io.model_loading import load_model
    from pipelines.stages.score import ShardScorer

    model_cfg = ModelConfig(factory=f"{__name__}:make_short_lm", layer_pattern=r"^mlp\.")
    m = load_model(model_cfg)
    assert m.context == 4
    factors = fit_ekfac(m.model, m.layers, [collate([[1, 2, 3], [4, 5]])], fisher=Fisher.EMPIRICAL)
    queries = precondition_queries(m.model, factors, [query_batch([[1, 2]], [[3]])], rank=2, query_ids=["q1"])
    save_queries(queries, tmp_path / "queries")
    shard = tmp_path / "s.parquet"
    pq.write_table(pa.table({"doc_id": ["a", "b"], "input_ids": pa.array([[1, 2], [1, 2, 3, 4, 5, 6]],
                                                                          pa.list_(pa.int32()))}), shard)
    unit = {"unit": np.array([json.dumps({"shard": str(shard), "output": str(tmp_path / "o.parquet"), "key": "k"})],
                             dtype=object)}
    strict = ShardScorer(model_cfg, str(tmp_path / "queries"), top_k=2, batch_size=2, sort_window=8)
    out = strict(unit)
    assert list(out["status"]) == ["failed"] and "row 1, field 'input_ids': 6 tokens" in out["error"][0]
    lenient = ShardScorer(model_cfg, str(tmp_path / "queries"), top_k=2, batch_size=2, sort_window=8,
                          too_long="truncate")
    out = lenient(unit)
    assert list(out["status"]) == ["scored"] and int(out["tokens"][0]) == 2 + 4


def make_short_lm():
    """The contracts' tiny LM with a context of 4 tokens."""
    from test_pipeline_contracts import TinyLM

    model = TinyLM()
    model.context = 4
    return model


# --- the merge keys rows by (doc_id, shard) ----------------------------------------------------------------


def test_merge_keys_rows_by_doc_id_and_shard():
    """The same doc_id in two shards: two rows, each with its own score, normalized score and shard."""
    from pipelines.stages.merge import QueryMerge

    merge = QueryMerge(k=3)
    for shard, score in (("A.parquet", 5.0), ("B.parquet", -3.0)):
        merge.add(np.array(["x", "y"], dtype=object), np.array([score, score / 10]), np.array([score / 100, 0.0]),
                  np.array([shard, shard], dtype=object))
    rows = merge.table().to_pylist()
    top = [(r["doc_id"], r["shard"], r["score"], r["score_normalized"]) for r in rows if r["sign"] == "top"]
    assert top == [("x", "A.parquet", 5.0, 0.05), ("y", "A.parquet", 0.5, 0.0), ("y", "B.parquet", -0.3, 0.0)]
    bottom = [(r["doc_id"], r["shard"], r["score"]) for r in rows if r["sign"] == "bottom"]
    assert bottom == [("x", "B.parquet", -3.0), ("y", "B.parquet", -0.3), ("y", "A.parquet", 0.5)]


def test_merge_details_match_rows_by_doc_id_and_shard():
    from pipelines.stages.merge import MERGED_SCHEMA
    from pipelines.stages.token_scores import DOC_SCHEMA, _layer_table, attach_details

    table = pa.table({"doc_id": ["x", "x"], "score": [5.0, -3.0], "score_normalized": [0.5, -0.3],
                      "rank": [1, 1], "sign": ["top", "bottom"], "shard": ["A", "B"]}, schema=MERGED_SCHEMA)
    docs = pa.table({"query_id": ["q", "q"], "doc_id": ["x", "x"], "shard": ["B", "A"], "tokens": [7, 3],
                     "text": ["from B", "from A"], "layer_scores": [[-1.0, -2.0], [2.0, 3.0]]}, schema=DOC_SCHEMA)
    got = attach_details(table, docs).to_pylist()
    assert [(r["shard"], r["tokens"], r["text"]) for r in got] == [("A", 3, "from A"), ("B", 7, "from B")]
    layers = _layer_table(docs, ["l0", "l1"], factor_tokens=10).to_pylist()
    by_shard = {s: sum(r["score"] for r in layers if r["shard"] == s) for s in ("A", "B")}
    assert by_shard == {"A": 5.0, "B": -3.0}
    # the units' rows arrive in the order actors finish them: the table is the same in any order
    assert [(r["shard"], r["layer_index"]) for r in layers] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]
    assert _layer_table(docs.take([1, 0]), ["l0", "l1"], factor_tokens=10).equals(
        _layer_table(docs, ["l0", "l1"], factor_tokens=10))
