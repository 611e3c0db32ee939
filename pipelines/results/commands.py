"""The readers' subcommands, registered on the ``influence`` group by ``pipelines.cli``."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    from .ddl import ddl_command
    from .report.command import report_command
    from .show import show_command
    from .sql import sql_command

    for command in (show_command, sql_command, report_command, ddl_command):
        group.add_command(command)
