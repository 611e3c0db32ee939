"""Bad inputs against the real ``influence`` command: one line that names what to fix, no traceback.

Each case asserts the exit status, the ``error:`` line (it names the job key,
the file, the row or the field), that no traceback reaches the terminal, and
that the full traceback went to a log file whose path is printed. Most cases
fail before Ray starts (``ensure_ray`` is patched to fail the test if it is
reached); the few that need Ray share one finished job.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.config import load_config
from pipelines.job_template import TEMPLATE

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json")


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def stderr_of(result) -> str:
    return getattr(result, "stderr", None) or result.output


def assert_one_line(result, *words: str, code: int = 1, log: bool = True) -> str:
    """The command failed with ``code``, one ``error:`` line holding ``words``, no traceback; returns the line.
    ``log``: the next line names a log file holding the traceback; a job file's own errors (``ConfigError``,
    ``log=False``) are the one line alone."""
    err = stderr_of(result)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    found = re.search(r"full traceback: (\S+)", err)
    if log:
        assert found and Path(found.group(1)).is_file() and "Traceback" in Path(found.group(1)).read_text(), err
    else:
        assert found is None and err.strip() == lines[0], err
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a stage reaches Ray (the error must come before)."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started before the error was found")

    for mod in ("tokenize", "fit_factors", "score", "token_scores"):
        monkeypatch.setattr(f"pipelines.stages.{mod}.ensure_ray", refuse, raising=False)


def write_job(folder: Path, world: Path, model: dict | None = None, data: dict | None = None,
              extra: str = "") -> Path:
    model = model if model is not None else {"path": str(world / "model")}
    data = {"raw": str(world / "raw"), "corpus": str(folder / "shards"), "queries": str(world / "queries.jsonl"),
            "output": str(folder / "out"), **(data or {})}
    lines = ['run_id = "t"', "[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    lines += ["[data]"] + [f"{k} = {json.dumps(v)}" for k, v in data.items() if v is not None]
    lines += ["[factors]", "sample_sequences = 12", "unit_sequences = 6", "[scoring]", "top_k = 2", "rank = 2",
              "[resources]", "actors = 1", "batch_size = 4", "cpus_per_actor = 0.5", "object_store_mb = 256", extra]
    path = folder / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def copy_model(world: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True)
    for f in (world / "model").iterdir():
        if f.name not in skip:
            shutil.copy(f, dest / f.name)
    return dest


# --- job files ---------------------------------------------------------------------------------------------

def test_missing_data_key_names_the_key(tmp_path, tiny_world, no_ray):
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\npath = "{tiny_world / "model"}"\n[data]\ncorpus = "c"\noutput = "o"\n')
    line = assert_one_line(cli("run", str(job)), "data.queries is missing", log=False)
    assert "__init__" not in line and "positional" not in line


def test_bad_toml_and_unknown_key(tmp_path, no_ray):
    job = tmp_path / "job.toml"
    job.write_text('[model\npath = "m"\n')
    assert_one_line(cli("fit-factors", str(job)), str(job), "not valid TOML", log=False)
    job.write_text('[model]\npath = "m"\nlayer = "x"\n[data]\ncorpus = "c"\nqueries = "q"\noutput = "o"\n')
    assert_one_line(cli("score", str(job)), "model.layer", "unknown key", log=False)


def test_job_file_not_utf8(tmp_path, no_ray):
    job = tmp_path / "job.toml"
    job.write_bytes(b'[model]\npath = "m\xff"\n')
    assert_one_line(cli("run", str(job)), str(job), "not UTF-8", log=False)


def test_usage_error_exits_2(tmp_path):
    result = cli("run", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2 and "Traceback" not in result.output


# --- models ------------------------------------------------------------------------------------------------

def test_mistyped_model_path(tmp_path, tiny_world, no_ray):
    job = write_job(tmp_path, tiny_world, model={"path": str(tmp_path / "modl")})
    line = assert_one_line(cli("run", str(job)), f"model.path '{tmp_path / 'modl'}' does not exist")
    assert not (tmp_path / "out").exists()  # found before anything was written: no output folder, not even logs/
    assert "(after " not in line  # no elapsed time for a failure of the first checks


def test_relative_mistyped_model_path_is_not_a_repo_id_riddle(tmp_path, tiny_world, no_ray, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    job = write_job(tmp_path, tiny_world, model={"path": "modl"})
    line = assert_one_line(cli("fit-factors", str(job)), f"model.path '{tmp_path / 'modl'}' does not exist")
    assert "Repo id" not in line
    job = write_job(tmp_path, tiny_world, model={"path": "org/modl"})  # could be either: both are said
    line = assert_one_line(cli("fit-factors", str(job)), "model.path 'org/modl' is not a folder",
                           "not in the Hugging Face cache", "jobs never download models")


def test_hub_name_not_cached_offline(tmp_path, tiny_world, no_ray, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    job = write_job(tmp_path, tiny_world, model={"path": "someorg/some-model"})
    assert_one_line(cli("run", str(job)), "model.path 'someorg/some-model'", "not in the Hugging Face cache",
                    "offline", "set model.path to a model folder")


def test_model_folder_without_tokenizer_fails_before_fitting(tmp_path, tiny_world, no_ray):
    model = copy_model(tiny_world, tmp_path / "bare", skip=("tokenizer.json", "tokenizer_config.json",
                                                             "special_tokens_map.json"))
    job = write_job(tmp_path, tiny_world, model={"path": str(model)}, data={"raw": None})
    assert_one_line(cli("run", str(job)), f"no tokenizer in model.path '{model}'", "set model.tokenizer")
    assert not (tmp_path / "out" / "factors").exists()


def test_model_folder_without_config_or_weights(tmp_path, tiny_world, no_ray):
    no_config = copy_model(tiny_world, tmp_path / "a", skip=("config.json",))
    job = write_job(tmp_path, tiny_world, model={"path": str(no_config)})
    assert_one_line(cli("run", str(job)), f"model.path '{no_config}'", "no config.json")
    no_weights = copy_model(tiny_world, tmp_path / "b", skip=("model.safetensors",))
    job = write_job(tmp_path, tiny_world, model={"path": str(no_weights)})
    assert_one_line(cli("run", str(job)), f"model.path '{no_weights}'", "no weights")


def test_factory_that_does_not_import(tmp_path, tiny_world, no_ray):
    job = write_job(tmp_path, tiny_world, model={"factory": "no_such_module_xyz:make", "tokenizer": "t"})
    assert_one_line(cli("fit-factors", str(job)), "model.factory = 'no_such_module_xyz:make'", "cannot import", log=False)


# --- data --------------------------------------------------------------------------------------------------

def test_raw_file_without_text_column(tmp_path, tiny_world, no_ray):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"id": "x", "body": "the cat"}) + "\n")
    job = write_job(tmp_path, tiny_world, data={"raw": str(raw)})
    assert_one_line(cli("tokenize", str(job)), str(raw / "a.jsonl"), "no column 'text'", "data.text_column")


def test_queries_file_not_utf8_names_file_and_line(tmp_path, tiny_world, no_ray):
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(b'{"query_id": "a", "prompt": "the", "completion": "cat"}\n'
                        b'{"query_id": "b", "prompt": "the \xe9", "completion": "dog"}\n')
    job = write_job(tmp_path, tiny_world, data={"queries": str(queries)})
    assert_one_line(cli("run", str(job)), str(queries), "line 2", "not UTF-8")


def test_jsonl_files_saved_with_a_byte_order_mark_and_crlf_read_as_without(tmp_path):
    """Windows editors save UTF-8 with a byte order mark and CRLF line ends: the queries file and raw files read
    the same as without them (JSON itself does not allow the mark)."""
    from pipelines.io.queries_file import query_rows
    from pipelines.io.raw_files import raw_columns
    from pipelines.io.raw_files import read_raw as read_table

    rows = [{"query_id": "a", "prompt": "the é", "completion": "cat"}, {"query_id": "b", "prompt": "a", "completion": "dog"}]
    plain, marked = tmp_path / "plain.jsonl", tmp_path / "marked.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marked.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n\r\n" for r in rows).encode())
    assert query_rows(str(marked)) == [("line 1", rows[0]), ("line 3", rows[1])]
    assert [r for _, r in query_rows(str(plain))] == rows
    assert read_table(str(marked)).to_pylist() == read_table(str(plain)).to_pylist() == rows
    assert raw_columns(str(marked)) == ["query_id", "prompt", "completion"]
    array = tmp_path / "queries.json"  # one JSON array (json.dump of a list), with the mark too
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode())
    assert query_rows(str(array)) == [("item 0", rows[0]), ("item 1", rows[1])]


def test_raw_json_array_file_reads_as_its_objects_and_bad_items_are_named(tmp_path):
    """A .json raw file may be one JSON array of objects (json.dump of a list) as well as JSON Lines."""
    from pipelines.io.raw_files import check_raw_columns, raw_columns, read_raw

    docs = [{"id": f"d{i}", "text": f"doc {i}", "url": None if i else "http://x"} for i in range(3)]
    array, lines = tmp_path / "a.json", tmp_path / "b.jsonl"
    array.write_text("\n" + json.dumps(docs, indent=2))
    lines.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert read_raw(str(array)).to_pylist() == read_raw(str(lines)).to_pylist() == docs
    assert raw_columns(str(array)) == raw_columns(str(lines)) == ["id", "text", "url"]
    check_raw_columns([str(array)], "text", "id")
    with pytest.raises(ValueError, match=r"a\.json: no column 'body' \(data\.text_column\)"):
        check_raw_columns([str(array)], "body", "id")
    array.write_text(json.dumps(docs[:1] + [["not", "an", "object"]]))
    with pytest.raises(ValueError, match=r"a\.json: item 1 of the JSON array is not a JSON object \(list\)"):
        read_raw(str(array))
    lines.write_text(json.dumps(docs[0]) + "\n" + json.dumps([1, 2]) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl: line 2 is not a JSON object \(list\)"):
        read_raw(str(lines))
    array.write_text(json.dumps(docs)[:-5])
    with pytest.raises(ValueError, match=r"a\.json: a JSON array that does not parse"):
        raw_columns(str(array))


def test_validate_names_a_raw_file_without_the_text_column(tmp_path, tiny_world, no_ray):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"id": "x", "body": "the cat"}) + "\n")
    job = write_job(tmp_path, tiny_world, data={"raw": str(raw)})
    result = cli("validate", str(job))
    assert result.exit_code == 1 and f"error: {raw / 'a.jsonl'}: no column 'text' (data.text_column)" in result.output


def test_validate_reads_every_raw_row_as_tokenize_does(tmp_path, tiny_world, no_ray):
    """validate finds what tokenize would refuse in a raw file (a repeated id, a text that is not a string),
    naming the file, row and field, and counts the documents when all is well."""
    raw = tmp_path / "raw"
    raw.mkdir()
    good = [{"id": "a", "text": "the cat"}, {"id": "b", "text": "a dog"}]
    (raw / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in good))
    job = write_job(tmp_path, tiny_world, data={"raw": str(raw)})
    result = cli("validate", str(job))
    assert "raw      1 file, 2 documents; ids unique" in result.output, result.output
    (raw / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in good + [{"id": "a", "text": "again"}]))
    result = cli("validate", str(job))
    assert result.exit_code == 1
    assert f"error: {raw / 'a.jsonl'}: row 2, field 'id': id 'a' is also in row 0" in result.output, result.output
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["fine", None]}), raw / "a.parquet")
    (raw / "a.jsonl").unlink()
    result = cli("validate", str(job))
    assert f"error: {raw / 'a.parquet'}: row 1, field 'text': not a string (None)" in result.output, result.output
    (raw / "a.parquet").unlink()  # two files, each fine on its own, sharing an id
    (raw / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in good))
    (raw / "b.jsonl").write_text(json.dumps({"id": "c", "text": "a bird"}) + "\n" + json.dumps(good[1]) + "\n")
    result = cli("validate", str(job))
    assert result.exit_code == 1
    assert f"error: {raw / 'a.jsonl'}: row 1, field 'id': id 'b' is also in {raw / 'b.jsonl'} row 1 (document ids " \
           "must be unique across data.raw" in result.output, result.output
    assert "raw      2 files, 4 documents\n" in result.output, result.output


def test_queries_file_missing(tmp_path, tiny_world, no_ray):
    job = write_job(tmp_path, tiny_world, data={"queries": str(tmp_path / "nope.jsonl")})
    assert_one_line(cli("build-queries", str(job)), f"data.queries '{tmp_path / 'nope.jsonl'}' does not exist", log=False)


def test_factors_of_another_model_name_the_factors_folder(tmp_path, tiny_world, no_ray):
    """build-queries on the driver: factors fitted on model A, the job's model is B (same layers, new weights)."""
    from influence_ops import Fisher, collate, fit_ekfac, save_factors
    from pipelines.config import ModelConfig
    from pipelines.demo.model import save_model, tiny_gpt2
    from pipelines.io.model_loading import load_model

    m = load_model(ModelConfig(path=str(tiny_world / "model")))
    factors = fit_ekfac(m.model, m.layers, [collate([[1, 2, 3, 4], [3, 4, 5]])], fisher=Fisher.EMPIRICAL)
    folder = tmp_path / "out" / "factors"
    save_factors(factors, folder)
    (folder / "_pipeline.json").write_text(json.dumps({"key": "k", "digest": "d"}))
    other = copy_model(tiny_world, tmp_path / "other")
    save_model(tiny_gpt2(m.vocab_size, context=16, width=16, layers=2, heads=2, seed=99), other)
    job = write_job(tmp_path, tiny_world, model={"path": str(other)}, data={"raw": None})
    assert_one_line(cli("build-queries", str(job)), f"{folder}: factors were fitted on a different model",
                    "influence fit-factors")


# --- outputs -----------------------------------------------------------------------------------------------

def test_output_not_writable(tmp_path, tiny_world, no_ray, monkeypatch):
    """As root no folder is unwritable: a write that the OS refuses is simulated at the storage layer."""
    from pipelines.io import conditional_write, storage

    real = storage.write_bytes

    def refuse(url: str, data: bytes) -> None:
        if url.startswith(str(tmp_path / "out")):
            raise PermissionError(13, "Permission denied", url)
        real(url, data)

    def refuse_create(url: str, data: bytes) -> bool:
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(storage, "write_bytes", refuse)
    monkeypatch.setattr(conditional_write, "create_new", refuse_create)  # the lock is created with O_EXCL
    job = write_job(tmp_path, tiny_world, data={"raw": None})
    assert_one_line(cli("run", str(job)), f"data.output '{tmp_path / 'out'}' is not writable",
                    "run.lock")  # the run's first write: its lock on the output folder


def test_output_under_a_file(tmp_path, tiny_world, no_ray):
    (tmp_path / "file").write_text("x")
    job = write_job(tmp_path, tiny_world, data={"raw": None, "output": str(tmp_path / "file" / "out")})
    line = assert_one_line(cli("run", str(job)), str(tmp_path / "file"))
    assert "data.output" in line or "Not a directory" in line


def test_truncated_scores_file_is_named(tmp_path, tiny_world, no_ray):
    shards = tmp_path / "shards"
    shards.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": ["a"], "input_ids": [[1, 2]]}), shards / "s0.parquet")
    for stage in ("factors", "queries"):  # complete (as far as `merge` looks)
        (tmp_path / "out" / stage).mkdir(parents=True)
        (tmp_path / "out" / stage / "_pipeline.json").write_text(json.dumps({"key": "k", "digest": "d"}))
    pq.write_table(pa.table({"query_id": ["q"]}), tmp_path / "out" / "queries" / "queries.parquet")
    scores = tmp_path / "out" / "scores"
    scores.mkdir(parents=True)
    (scores / "s0.parquet").write_bytes(b"PAR1 truncated")
    job = write_job(tmp_path, tiny_world, data={"raw": None})
    assert_one_line(cli("merge", str(job)), str(scores / "s0.parquet"), "not a readable Parquet file")


# --- the command itself ------------------------------------------------------------------------------------

def test_debug_prints_the_traceback(tmp_path, tiny_world, no_ray):
    job = write_job(tmp_path, tiny_world, model={"path": str(tmp_path / "modl")})
    result = CliRunner().invoke(main, ["--debug", "run", str(job)])
    assert result.exit_code == 1 and "Traceback" in stderr_of(result)
    assert "error: model.path" in stderr_of(result) and "full traceback:" not in stderr_of(result)


def test_log_goes_to_the_output_folder(tmp_path, tiny_world, no_ray):
    (tmp_path / "out").mkdir()
    job = write_job(tmp_path, tiny_world, model={"path": str(tmp_path / "modl")})
    result = cli("run", str(job))
    logs = list((tmp_path / "out" / "logs").glob("*.log"))
    assert len(logs) == 1 and str(logs[0]) in stderr_of(result)
    assert "model.path" in logs[0].read_text() and "UserError" in logs[0].read_text()


def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and re.match(r"influence \d+\.\d+", result.output)


def test_init_writes_a_template_load_config_accepts(tmp_path):
    import dataclasses

    from pipelines import config

    result = cli("init", str(tmp_path / "job.toml"))
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / "job.toml")
    assert cfg.model.path == str(tmp_path / "model") and cfg.data.output == str(tmp_path / "output")
    text = (tmp_path / "job.toml").read_text()
    assert text == TEMPLATE
    head = text.split("\n[")[0]
    for f in dataclasses.fields(config.JobConfig):  # top-level keys
        if f.name not in config.SECTIONS:
            assert re.search(rf"^#? ?{f.name} = ", head, re.M), f"{f.name} is not in the template"
    placeholders = {"path", "corpus", "queries", "output"}
    for section, cls in config.SECTIONS.items():  # every key of config.py is in the template, with its default
        body = text.split(f"[{section}]")[1].split("\n[")[0]
        for f in dataclasses.fields(cls):
            assert re.search(rf"^#? ?{f.name} = ", body, re.M), f"{section}.{f.name} is not in the template"
            if re.search(rf"^{f.name} = ", body, re.M) and f.name not in placeholders:
                assert getattr(getattr(cfg, section), f.name) == f.default, f"{section}.{f.name} is not the default"
    again = cli("init", str(tmp_path / "job.toml"))
    assert again.exit_code == 1 and "exists" in stderr_of(again)


# --- Ray's wrappers ----------------------------------------------------------------------------------------

def test_ray_wrappers_are_unwrapped_to_the_cause():
    from ray.exceptions import ActorDiedError, RayTaskError

    from pipelines.errors import UserError, one_line, root_cause

    cause = UserError("/out/queries: queries were built on a different model")
    wrapped = RayTaskError("ShardScorer.__call__", "Traceback (most recent call last):\n  ...", cause)
    assert root_cause(wrapped) is cause and one_line(wrapped) == str(cause)
    # an actor whose constructor raised: only the text of its error reaches the driver
    text = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in __init__\n"
            "pipelines.errors.UserError: model.path '/m' does not exist\n")
    died = ActorDiedError(RayTaskError("MapWorker.__init__", text, RuntimeError("lost")))
    assert one_line(died) == "model.path '/m' does not exist"
    boom = RayTaskError("f", "Traceback ...\nKeyError: 'x'\n", KeyError("x"))
    assert one_line(boom) == "KeyError: 'x'"


def test_a_failed_stage_is_its_message_without_a_type_name():
    """StageFailed already names the file, row and field: the line is that message, not "StageFailed: ..."."""
    from pipelines.errors import one_line
    from pipelines.runtime.failures import StageFailed

    message = "/d/p.parquet: row 1, field 'input_ids': has 1 token: a sequence needs 2 or more"
    assert one_line(StageFailed(message)) == message
    assert one_line(RuntimeError("x")) == "RuntimeError: x"  # an unexpected error keeps its type


def test_permission_error_under_the_output_names_the_output():
    from pipelines.errors import one_line

    err = PermissionError(13, "Permission denied", "/data/out/runs/r.json")
    assert one_line(err, "/data/out") == ("data.output '/data/out' is not writable "
                                          "(Permission denied: /data/out/runs/r.json)")
    assert one_line(err, "/elsewhere").startswith("Permission denied")


def test_log_of_a_remote_unwritable_or_missing_output_goes_to_the_temp_folder(tmp_path):
    from pipelines.errors import log_folder, write_log

    temp = Path(tempfile.gettempdir()) / "influence-logs"
    assert log_folder("s3://bucket/out") == temp and log_folder(None) == temp
    (tmp_path / "file").write_text("x")
    assert log_folder(str(tmp_path / "file" / "out")) == temp  # cannot hold a logs/ folder
    assert log_folder(str(tmp_path / "out")) == temp  # not there yet: a failed first check creates no folder
    (tmp_path / "out").mkdir()
    try:
        raise ValueError("boom")
    except ValueError as err:
        log = write_log(err, str(tmp_path / "out"), ["influence", "run", "job.toml"])
    assert log.parent == tmp_path / "out" / "logs"
    text = log.read_text()
    assert "influence run job.toml" in text and "ValueError: boom" in text and "Traceback" in text


# --- whole runs, as a user starts them (a subprocess with its own Ray) -------------------------------------

def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "INFLUENCE_"))}
    env.update({"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
                "INFLUENCE_CACHE_DIR": str(cwd / "cache")})
    try:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


NOISE = re.compile(r"error|warn|traceback|\] E |core_worker|deprecat|Loading weights|Writing model|\dit/s\]", re.I)


@pytest.fixture(scope="module")
def finished_job(tiny_world, tmp_path_factory):
    """`influence run` of a tiny job in a subprocess; (job file, completed process)."""
    root = tmp_path_factory.mktemp("quiet")
    job = write_job(root, tiny_world)
    return job, run_cli("run", str(job), cwd=root)


def test_successful_run_is_quiet(finished_job):
    job, done = finished_job
    assert done.returncode == 0, done.stderr[-3000:]
    assert "run t: ok" in done.stdout
    noisy = [line for line in done.stderr.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])


def test_queries_built_on_another_model(finished_job, tmp_path, tiny_world):
    """The scoring actors' constructor refuses the queries: one line naming the queries folder."""
    from pipelines.demo.model import save_model, tiny_gpt2

    job, done = finished_job
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(job.parent / "out", tmp_path / "out")
    shutil.copytree(job.parent / "shards", tmp_path / "shards")
    shutil.rmtree(tmp_path / "out" / "scores")
    other = copy_model(tiny_world, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    save_model(tiny_gpt2(config["vocab_size"], context=16, width=16, layers=2, heads=2, seed=99), other)
    job2 = write_job(tmp_path, tiny_world, model={"path": str(other)})
    failed = run_cli("score", str(job2), cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr and "Traceback" not in failed.stdout, failed.stderr[-3000:]
    lines = [l for l in failed.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and str(tmp_path / "out" / "queries") in lines[0], failed.stderr[-3000:]
    assert "different model" in lines[0] and "influence build-queries" in lines[0]
    assert not [l for l in failed.stderr.splitlines() if re.search(r"\] E |core_worker|ERROR", l)], failed.stderr
    assert list((tmp_path / "out" / "logs").glob("*.log"))


def test_corpus_without_shards(tmp_path, tiny_world, no_ray):
    (tmp_path / "shards").mkdir()
    job = write_job(tmp_path, tiny_world, data={"raw": None})
    assert_one_line(cli("fit-factors", str(job)), f"data.corpus = '{tmp_path / 'shards'}'", "no Parquet shards", log=False)


def test_closing_lines_point_at_what_the_command_made():
    """A stage run alone names its own output, not tables that do not exist yet; the tables are named once made."""
    from pipelines.cli import _outputs_line
    from pipelines.config import config_from_dict

    def lines(stages: dict, mode: str = "scan") -> list[str]:
        cfg = config_from_dict({"model": {"path": "/m"}, "scoring": {"mode": mode},
                                "data": {"corpus": "/c/shards/*.parquet", "queries": "/q.jsonl", "output": "/o"}})
        return [line.strip() for line in _outputs_line(cfg, stages)]

    assert lines({"tokenize": {"files": 1}}) == ["shards: /c/shards/"]
    assert lines({"fit-factors": {}}) == ["factors: /o/factors/"]
    assert lines({"fit-factors": {}, "build-queries": {}}) == ["queries: /o/queries/"]
    assert lines({"score": {}}) == ["per-unit scores: /o/scores/ (`influence merge` makes the tables)"]
    made = lines({"score": {}, "merge": {}})
    assert len(made) == 1 and made[0].startswith("tables: /o/topk/") and "/o/scores/" in made[0]
    made = lines({"score": {}}, mode="tfidf")
    assert len(made) == 1 and made[0].startswith("tables: /o/topk/") and "/o/candidates/" in made[0]


def test_warnings_print_as_one_lower_case_line():
    """Without --verbose a logged warning prints as `warning: <message>`, like `error: ...` (no logger name)."""
    import logging

    from pipelines.cli import _LevelFormatter

    record = logging.LogRecord("pipelines.stages.rescore", logging.WARNING, __file__, 1, "index %s loosely", ("ranks",),
                               None)
    assert _LevelFormatter().format(record) == "warning: index ranks loosely"


def test_output_inside_a_corpus_folder_is_refused_up_front():
    """A corpus given as a folder is listed recursively: an output inside it would be read as shards."""
    from pipelines.config import ConfigError, config_from_dict

    def data(corpus: str, output: str) -> dict:
        return {"model": {"path": "/m"}, "data": {"corpus": corpus, "queries": "/q.jsonl", "output": output}}

    for corpus, output in (("/w", "/w/out"), ("/w/", "/w"), ("s3://b/c", "s3://b/c/run1/")):
        with pytest.raises(ConfigError, match="lies inside data.corpus"):
            config_from_dict(data(corpus, output))
    for corpus, output in (("/w/*.parquet", "/w/out"), ("/w/shards", "/w/shards-out"), ("/w/a.parquet", "/w/out")):
        config_from_dict(data(corpus, output))  # a glob, a sibling folder, one file: accepted


def test_tokenize_line_says_how_many_files_were_unchanged():
    from pipelines.cli import _stage_line

    assert _stage_line("tokenize", {"files": 3, "skipped": 3, "failed": 0, "sequences": 0, "tokens": 0}) == \
        "3 files (3 unchanged, skipped), 0 new sequences, 0 tokens"
    assert _stage_line("tokenize", {"files": 2, "skipped": 0, "failed": 1, "sequences": 5, "tokens": 9}) == \
        "2 files, 1 failed, 5 new sequences, 9 tokens"


def test_index_line_gives_the_row_raw_and_as_stored():
    """The index's size: numbers a sequence, their raw bytes by dtype, and the Parquet bytes (compressed)."""
    from pipelines.cli import _stage_line

    info = {"shards": 1, "scored": 1, "skipped": 0, "failed": 0,
            "index": {"width": 4096, "dtype": "float16", "vector_bytes_per_sequence": 8192,
                      "stored_bytes_per_sequence": 1024.0}}
    assert _stage_line("index", info) == ("1 shard: 1 built, 0 skipped, 0 failed; 4,096 numbers a sequence (float16: "
                                          "8,192 bytes raw, 1,024 bytes in Parquet)")
    info["index"] = {"width": 1024, "dtype": "float32", "vector_bytes_per_sequence": 4096,
                     "stored_bytes_per_sequence": None}
    assert _stage_line("index", info).endswith("1,024 numbers a sequence (float32: 4,096 bytes raw, ? bytes in Parquet)")


def test_ctrl_c_is_one_line_saying_how_to_resume(tmp_path, tiny_world, monkeypatch):
    """A KeyboardInterrupt in a command: one error line (not click's "Aborted!"), exit 130 like a shell."""
    import pipelines.cli as cli_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "run_job", interrupted)
    job = write_job(tmp_path, tiny_world)
    result = cli("run", str(job))
    assert result.exit_code == 130, result.output
    assert stderr_of(result).strip() == ("error: interrupted; run the same command again to resume "
                                         "(finished work is kept)"), result.output
