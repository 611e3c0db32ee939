"""The ``influence`` command: one subcommand per stage, ``run`` for the whole job, ``demo``, ``init``.

Every stage subcommand takes the job's TOML file; each skips outputs that are
already complete, so any of them can be re-run safely. A short summary ends
every command: where the tables are, counts, time and tokens/s.

A failure prints one line, ``error: <what to fix>`` (the root cause, unwrapped
from Ray's wrappers: ``errors.py``), and the path of a log file with the full
traceback (``<output>/logs/``, or the temp folder); ``--debug`` prints the
traceback instead. Exit status 1 for a failed command, 2 for a usage error.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from . import errors
from .cluster.submit import add_cluster_commands
from .config import VERBOSE_ENV, ConfigError, JobConfig, load_config
from .job_template import TEMPLATE
from .results.commands import register as register_readers
from .run import STAGES, run_job
from .validate.command import register as register_validate


def _state() -> dict[str, Any]:
    """The command's shared state (``debug``, ``output`` once the job file is read, ``started``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    return root.obj


def _load(path: str) -> JobConfig:
    cfg = load_config(path)
    _state()["output"] = cfg.data.output
    return cfg


class InfluenceGroup(click.Group):
    """The ``influence`` group: every failure below it ends as one line and a log file (``--debug``: a traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.UsageError):
            raise
        except click.ClickException as err:  # a message by design: no log needed
            click.echo(f"error: {err.format_message()}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:  # Ctrl-C: what is finished stays, a rerun resumes
            click.echo("error: interrupted; run the same command again to resume (finished work is kept)", err=True)
            ctx.exit(130)
        except Exception as err:  # noqa: BLE001 -- the top of the program: nothing may escape as a traceback
            report_failure(err, _state())
            ctx.exit(1)


def report_failure(err: BaseException, state: dict[str, Any]) -> None:
    """Print ``error: <root cause>`` and where the traceback went (or the traceback, with ``--debug``)."""
    line = errors.one_line(err, state.get("output"))
    elapsed = time.perf_counter() - state["started"] if state.get("started") is not None else 0.0
    if elapsed >= 1.0:  # not for a failure of the checks that come first
        line += f" (after {elapsed:.1f} s)"
    if state.get("debug"):
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        sys.stderr.flush()  # before click's own stream writes the closing line
        click.echo(f"error: {line}", err=True)
        return
    if isinstance(errors.root_cause(err), ConfigError):  # the job file's own message, by design: no log
        click.echo(f"error: {line}", err=True)
        return
    try:
        log = errors.write_log(err, state.get("output"), sys.argv)
    except OSError:
        log = None
    click.echo(f"error: {line}", err=True)
    if log is not None:
        click.echo(f"  full traceback: {log} (or run with --debug)", err=True)


def summarize(cfg: JobConfig, record: dict[str, Any]) -> list[str]:
    """The closing lines of a command."""
    out = cfg.data.output.rstrip("/")
    lines = [f"run {record['run_id']}: {record.get('status')} in {record['seconds']:.1f} s"]
    stages = record["stages"]
    for name, info in stages.items():
        skipped = " (already complete, skipped)" if info.get("skipped") is True else ""
        if info.get("refit"):  # fit-factors kept for a grown corpus: say why
            skipped = f" ({info['refit']})"
        lines.append(f"  {name:<14}{_stage_line(name, info)}{skipped}")
    score = stages.get("score")
    units = (score or {}).get("units")
    who = "worker process" if (units or {}).get("pool") == "tasks" else "actor"  # what ran the score units
    if score and score.get("tokens") and score.get("actor_seconds"):
        lines.append(f"  scoring throughput: {score['tokens'] / score['seconds']:,.0f} tokens/s "
                     f"(wall), {score['tokens'] / score['actor_seconds']:,.0f} tokens/s per {who}")
    rows = (score or {}).get("rows")
    if rows:
        unreadable = (f" ({_count(rows['unreadable_shards'], 'unreadable shard')}, rows unknown)"
                      if rows["unreadable_shards"] else "")
        lines.append(f"  corpus rows: {rows['rows']} = {rows['scored']} scored + {rows['skipped']} skipped{unreadable}")
    errors = record.get("errors") or {}
    if errors.get("units"):
        by_stage = ", ".join(f"{n} in {s}" for s, n in errors["by_stage"].items())
        lines.append(f"  skipped after errors (on_error = 'skip'): {_count(errors['units'], 'unit')} ({by_stage}); "
                     f"reasons: {errors['table']}")
    health = (stages.get("merge") or {}).get("index_health")
    if health:
        from .stages.index_health import describe

        lines.append(f"  index health: {describe(health)}" + (" (loose: see the warning)" if health.get("loose")
                                                               else ""))
    if units:
        lines.append(f"  score units ran on {_count(len(units['nodes']), 'node')}, "
                     f"{_count(len(units['actors']), who)}; {units['retries']} retried after a lost {who}")
    lines += _outputs_line(cfg, stages)
    lines.append(f"  record: {out}/runs/{record['run_id']}.json")
    return lines


def _outputs_line(cfg: JobConfig, stages: dict[str, Any]) -> list[str]:
    """Where the command's output lies: the tables once made (`merge`; `score` in index or tfidf mode), else
    the last stage's own folder."""
    from .config.corpus_paths import corpus_root

    out = cfg.data.output.rstrip("/")
    mode = cfg.scoring.mode.value
    if "merge" in stages or ("score" in stages and mode != "scan"):  # index / tfidf: score writes topk/
        rest = f"{out}/scores/, {out}/distribution/" if mode == "scan" else f"{out}/candidates/" + \
            (f", {out}/index/" if mode == "index" else "")
        return [f"  tables: {out}/topk/ (hive-partitioned by query_id), {out}/token_scores/, {out}/layer_scores/, "
                f"{rest}"]
    made = {"tokenize": ("shards", corpus_root(cfg.data.corpus) + "/"), "fit-factors": ("factors", f"{out}/factors/"),
            "build-queries": ("queries", f"{out}/queries/"), "index": ("index", f"{out}/index/"),
            "score": ("per-unit scores", f"{out}/scores/ (`influence merge` makes the tables)")}
    last = [name for name in stages if name in made]
    if not last:
        return []
    what, where = made[last[-1]]
    return [f"  {what}: {where}"]


def _bytes(n: float | None) -> str:
    return "? bytes" if n is None else f"{n:,.0f} bytes"


def _index_size(ix: dict[str, Any]) -> str:
    """'4,096 numbers a sequence (float16: 8,192 bytes raw, 1,024 bytes in Parquet)': the row and its compressed size."""
    width, dtype, raw_bytes = ix.get("width"), ix.get("dtype"), ix.get("vector_bytes_per_sequence")
    raw = f"{_bytes(raw_bytes)} raw, " if raw_bytes is not None else ""
    numbers = f"{width:,}" if isinstance(width, int) else str(width)
    return (f"{numbers} numbers a sequence ({dtype}: {raw}{_bytes(ix.get('stored_bytes_per_sequence'))} "
            "in Parquet)")


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _stage_line(name: str, info: dict[str, Any]) -> str:
    if name == "tokenize":
        failed = f", {info['failed']} failed" if info.get("failed") else ""
        unchanged = f" ({info['skipped']} unchanged, skipped)" if info.get("skipped") else ""
        return (f"{_count(info.get('files', 0), 'file')}{unchanged}{failed}, {info.get('sequences', 0)} new sequences, "
                f"{info.get('tokens', 0)} tokens")
    if name == "fit-factors":
        skipped = (info.get("rows") or {}).get("skipped")
        return (f"{info.get('sequences')} sequences{f' (+{skipped} skipped)' if skipped else ''}, "
                f"{info.get('tokens')} tokens, {info.get('layers')} layers")
    if name == "build-queries":
        return f"{_count(info.get('queries') or 0, 'query', 'queries')}, rank {info.get('rank') or 'dense'}"
    if name == "score":
        units = info.get("units_total", info["shards"])
        return (f"{_count(info['shards'], 'shard')}, {_count(units, 'unit')}: {info['scored']} scored, {info['skipped']} skipped, "
                f"{info['failed']} failed; {info['sequences']} sequences, {info['tokens']} tokens")
    if name == "index":
        ix = info.get("index") or {}
        return (f"{_count(info['shards'], 'shard')}: {info['scored']} built, {info['skipped']} skipped, {info['failed']} "
                f"failed; {_index_size(ix)}")
    if name == "candidates":
        extra = (f" + TF-IDF's best {info['tfidf_candidates']} a query, {info.get('tfidf_only')} of them not "
                 "found by the index" if info.get("tfidf_candidates") else "")
        return f"{info.get('pairs')} candidates ({info.get('mode')}{extra})"
    if name == "merge":
        return f"{_count(info.get('queries') or 0, 'query', 'queries')}, {info.get('rows')} top-k rows"
    return ""


def _execute(config: str, stages: tuple[str, ...], quiet: bool) -> None:
    cfg = _load(config)
    _state()["started"] = time.perf_counter()
    record = run_job(cfg, show_progress=not quiet, stages=stages)
    _state().pop("started", None)
    for line in summarize(cfg, record):
        click.echo(line)


def _version() -> str:
    try:
        return metadata.version("corpus-influence")
    except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH: the version in pyproject.toml
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        for line in pyproject.read_text().splitlines() if pyproject.exists() else []:
            if line.startswith("version = "):
                return line.split("=", 1)[1].strip().strip('"')
        return "unknown"


class _LevelFormatter(logging.Formatter):
    """``warning: <message>``: the level in lower case, no logger name (that is for --verbose)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@click.group(cls=InfluenceGroup, epilog=(
    "\b\nStart here:\n  influence demo                   a whole example: corpus, tiny model, run, report\n"
    "  influence init job.toml          a commented job file: set model.path and the [data] paths\n"
    "  influence validate job.toml      check every input at once\n"
    "  influence run job.toml           every stage, then the first results\n"
    "  influence show OUTPUT            read the results (also: sql, report, ddl)"))
@click.version_option(_version(), "--version", prog_name="influence", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level; show third-party progress bars and warnings.")
@click.option("--debug", is_flag=True, help="On a failure, print the full traceback instead of one line.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """EK-FAC influence functions over a corpus, as Ray Data jobs."""
    ctx.ensure_object(dict)["debug"] = debug
    handler = logging.StreamHandler(sys.stderr)  # "warning: ...", as `error: ...`; --verbose: and the logger
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _LevelFormatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by model loading, here and in Ray workers started from here
    else:  # transformers' warnings and progress bars, in this process and the Ray workers it starts
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command()
@click.argument("path", default="job.toml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: str, force: bool) -> None:
    """Write a commented job file (every key, with its default) to PATH (default: job.toml)."""
    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite it")
    target.write_text(TEMPLATE)
    click.echo(f"wrote {target}: set model.path and the [data] paths, then `influence run {target}`")


def _stage_command(stage: str, help_text: str) -> None:
    @main.command(name=stage, help=help_text)
    @click.argument("config", type=click.Path(exists=True, dir_okay=False))
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    def command(config: str, quiet: bool) -> None:
        _execute(config, (stage,), quiet)


for _stage, _help in (
    ("tokenize", "Raw text (data.raw) -> training shards (data.corpus)."),
    ("fit-factors", "Corpus sample -> EK-FAC factors (<output>/factors)."),
    ("build-queries", "Queries file -> preconditioned queries (<output>/queries)."),
    ("index", "One pass over the corpus -> compressed gradients of every sequence (<output>/index)."),
    ("score", "Every unit (row groups of a shard) -> its top-k and bottom-k (<output>/scores); index/tfidf modes: "
              "candidates."),
    ("merge", "scores/ -> global top-k (<output>/topk) and per-token scores (<output>/token_scores)."),
):
    _stage_command(_stage, _help)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def run(config: str, quiet: bool) -> None:
    """Every stage of the job, skipping complete outputs; ends with the first queries' results."""
    _execute(config, STAGES, quiet)
    from .results.show import closing_view

    for line in [""] + closing_view(_load(config).data.output):
        click.echo(line)


@main.command()
@click.option("--output", default="demo_output", show_default=True, help="Folder for everything the demo makes.")
@click.option("--epochs", default=150, show_default=True, help="Training epochs of the tiny model.")
@click.option("--max-train-seconds", default=120.0, show_default=True, help="Stop training early after this long.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(output: str, epochs: int, max_train_seconds: float, quiet: bool) -> None:
    """Generate a corpus with planted facts, train a tiny model, run the whole job, show the top sequences."""
    from .demo.job import run_demo

    result = run_demo(output, epochs=epochs, max_seconds=max_train_seconds, show_progress=not quiet,
                      echo=click.echo)
    click.echo("")
    for line in summarize(result["config"], result["record"]):
        click.echo(line)
    click.echo(f"demo finished in {result['seconds']:.1f} s; re-run the job with: influence run {output}/job.toml")
    for line in result["next_steps"]:
        click.echo(line)


@main.command(name="eval")
@click.argument("suite", type=click.Choice(["exact", "stability", "lds", "facts"]))
@click.option("--out", default="benchmarks/eval", show_default=True, help="Folder for <suite>.parquet and <suite>.md.")
@click.option("--quick", is_flag=True, help="Very small settings (seconds; for tests), not the reported sizes.")
@click.option("--model-seeds", default=None, metavar="0,1,...",
              help="exact and facts: comma-separated seeds, one trained model each (exact: default 0,1,...,19, "
                   "--quick 0,1; facts: default 0).")
def eval_command(suite: str, out: str, quick: bool, model_seeds: str | None) -> None:
    """Accuracy suites: `exact` (against exact influence on tiny models), `stability` (seed to seed), `lds`
    (linear datamodeling score against retraining on subsets), `facts` (planted sources found, against BM25
    and the gradient dot product; starts a local Ray)."""
    from .eval import SUITES

    extra = {}
    if model_seeds is not None:
        if suite not in ("exact", "facts"):
            raise click.BadParameter(f"applies to the exact and facts suites only, not {suite}",
                                     param_hint="--model-seeds")
        try:
            seeds = tuple(int(x) for x in model_seeds.split(","))
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {model_seeds!r}",
                                     param_hint="--model-seeds") from None
        if len(set(seeds)) != len(seeds):
            raise click.BadParameter(f"repeated seed in {model_seeds!r}", param_hint="--model-seeds")
        extra["model_seeds"] = seeds
    command = "influence eval " + suite + (f" --out {out}" if out != "benchmarks/eval" else "") + \
        (" --quick" if quick else "") + (f" --model-seeds {model_seeds}" if model_seeds is not None else "")
    SUITES[suite](out=out, quick=quick, command=command, echo=click.echo, **extra)


register_readers(main)  # influence show / sql / report / ddl (pipelines/results/)
register_validate(main)  # influence validate (pipelines/validate/)
add_cluster_commands(main)  # submit, status, logs, stop (Ray Jobs API)

if __name__ == "__main__":
    main()
