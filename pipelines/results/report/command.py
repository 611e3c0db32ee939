"""``influence report OUTPUT [--out FILE]``: the run's static HTML report (``<output>/report.html`` by default)."""

from __future__ import annotations

import click

from ...io import storage
from ..load import open_run


@click.command(name="report")
@click.argument("output")
@click.option("--out", "target", default=None,
              help="Where to write the HTML file (default: <output>/report.html, local or s3://).")
@click.option("--k", "k", default=None, type=int, help="Rows per side and query (default: all of topk/).")
def report_command(output: str, target: str | None, k: int | None) -> None:
    """One static HTML file (everything inlined, opens offline) with each query's most influential sequences,
    token heatmaps, per-layer bars, the distribution of influence and the run's settings.
    OUTPUT is the job's output folder (local or s3://) or its job file."""
    from .page import render_report

    try:
        run = open_run(output)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    html = render_report(run, k=k)
    target = target or storage.join(run.out.url, "report.html")
    storage.write_bytes(target, html.encode("utf-8"))
    click.echo(f"report: {target} ({len(html) / 1024:,.0f} KiB; open it in a browser, it needs no server)")
