"""``influence validate job.toml``: every check of the job's inputs, a summary, exit status 1 on an error."""

from __future__ import annotations

import click

from .job import read_job
from .report import USER_ERRORS, Report


@click.command(name="validate")
@click.argument("config", type=click.Path(dir_okay=False))
def validate_command(config: str) -> None:
    """Check the job file, the model, every shard, the doc_ids and the queries; run nothing.

    Prints a summary (files, rows, tokens, queries), each warning and each error
    (one line, naming the key, file, row or field); exits 1 when there is an error.
    """
    from .preflight import validate

    try:
        cfg = read_job(config)
    except USER_ERRORS as err:
        report = Report(job=config, errors=[str(err).splitlines()[0]])
    else:
        report = validate(cfg, job=config)
    for line in report.lines():
        click.echo(line, err=line.startswith(("warning:", "error:")))
    if not report.ok:
        raise SystemExit(1)


def register(group: click.Group) -> None:
    group.add_command(validate_command)
