"""`influence submit | status | logs | stop`: a job on a Ray cluster through the Ray Jobs API.

``submit`` validates the job file here, then packages this project's code
(``influence_ops/``, ``pipelines/``) and the resolved job file as the job's
``runtime_env`` ``working_dir`` and submits the entrypoint
``python -m pipelines.cli run job.toml -q`` to the cluster's dashboard address
(``http://HEAD:8265``); it prints the job id. The job's driver runs on the head
and joins that cluster (``RAY_ADDRESS`` is set there by Ray). The cluster's
image must hold the dependencies (torch, ray, ...): the package's code comes
with the submission, so the running code is the submitter's.

``status``, ``logs [--follow]`` and ``stop`` take the job id. The address comes
from ``--address`` or ``RAY_API_SERVER_ADDRESS`` (Ray's own job CLI reads the same).
These commands need the Ray dashboard client: ``pip install 'corpus-influence[cluster]'``.
A cluster with Ray's token authentication needs ``RAY_AUTH_MODE=token`` and its token
(``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) here, as Ray's own job CLI does.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from ..config import ConfigError, JobConfig, load_config
from .jobfile import local_paths, to_toml

ENTRYPOINT = "python -m pipelines.cli run job.toml -q"
AGENT_WAIT_S = 120  # how long a submission waits for a just-started head's job agent
ADDRESS = click.option("--address", envvar="RAY_API_SERVER_ADDRESS", required=True,
                       help="Ray dashboard address of the cluster, e.g. http://HEAD:8265 (or RAY_API_SERVER_ADDRESS).")


def _errors() -> tuple[type[BaseException], ...]:
    """What the Jobs API client raises for an unreachable, refusing or unknown target."""
    from ray.exceptions import AuthenticationError

    return ConnectionError, RuntimeError, ValueError, AuthenticationError


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (ClickException when Ray's job client is missing or unreachable)."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:
        raise click.ClickException(
            f"the Ray job client is not installed ({err}): pip install 'corpus-influence[cluster]'") from err
    try:
        return JobSubmissionClient(address)
    except _errors() as err:
        raise click.ClickException(f"cannot reach the Ray dashboard at {address}: {err}") from err


def stage_working_dir(job_toml: str, folder: Path) -> Path:
    """``folder`` with this project's packages and ``job.toml``: what the job's working_dir uploads."""
    import influence_ops

    import pipelines

    for package in (influence_ops, pipelines):
        src = Path(package.__file__).resolve().parent
        shutil.copytree(src, folder / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "job.toml").write_text(job_toml)
    return folder


def load_job(job_file: str) -> JobConfig:
    try:
        return load_config(job_file)
    except (ConfigError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err


def submit_job(cfg: JobConfig, job_file: str, address: str) -> str:
    """Submit the validated job ``cfg`` (read from ``job_file``) to the cluster at ``address``; returns the job id."""
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="influence-submit-") as tmp:
        staged = stage_working_dir(to_toml(cfg), Path(tmp))
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(entrypoint=ENTRYPOINT, runtime_env={"working_dir": str(staged)},
                                       metadata={"job_file": Path(job_file).name, "run_id": cfg.run_id or ""})
            except _errors() as err:
                if "No available agent" in str(err) and time.monotonic() < deadline:
                    time.sleep(2)  # a head that just started: its job agent is not up yet
                    continue
                raise click.ClickException(f"submitting {job_file} to {address} failed: {err}") from err


def _call(address: str, method: str, job_id: str) -> Any:
    jobs = client(address)
    try:
        return getattr(jobs, method)(job_id)
    except _errors() as err:
        raise click.ClickException(f"{method.replace('_', ' ')} {job_id} at {address}: {err}") from err


async def _tail(jobs: Any, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        click.echo(lines, nl=False)


def follow(address: str, job_id: str) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    jobs = client(address)
    try:
        asyncio.run(_tail(jobs, job_id))
    except _errors() as err:
        raise click.ClickException(f"following the logs of {job_id} at {address}: {err}") from err
    return str(_call(address, "get_job_status", job_id).value)


def _exit_for(status: str) -> None:
    if status != "SUCCEEDED":
        raise click.ClickException(f"job finished with status {status}")


@click.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@ADDRESS
@click.option("--follow", "follow_logs", is_flag=True, help="Print the job's logs until it ends; exit 1 unless it succeeded.")
def submit(config: str, address: str, follow_logs: bool) -> None:
    """Submit the job file to a Ray cluster (Ray Jobs API); prints the job id."""
    cfg = load_job(config)
    for path in local_paths(cfg):
        click.echo(f"note: {path} is a local path: every node of the cluster must see it", err=True)
    job_id = submit_job(cfg, config, address)
    click.echo(job_id)
    if follow_logs:
        _exit_for(follow(address, job_id))


@click.command()
@click.argument("job_id")
@ADDRESS
def status(job_id: str, address: str) -> None:
    """Status of a submitted job (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and its message."""
    info = _call(address, "get_job_info", job_id)
    line = f"{job_id}: {info.status.value}"
    if info.message:
        line += f" ({info.message})"
    click.echo(line)


@click.command()
@click.argument("job_id")
@ADDRESS
@click.option("--follow", "follow_logs", is_flag=True, help="Keep printing until the job ends; exit 1 unless it succeeded.")
def logs(job_id: str, address: str, follow_logs: bool) -> None:
    """The driver logs of a submitted job."""
    if follow_logs:
        _exit_for(follow(address, job_id))
    else:
        click.echo(_call(address, "get_job_logs", job_id), nl=False)


@click.command()
@click.argument("job_id")
@ADDRESS
def stop(job_id: str, address: str) -> None:
    """Stop a submitted job (its driver is terminated; finished outputs stay, a re-submit resumes)."""
    stopped = _call(address, "stop_job", job_id)
    click.echo(f"{job_id}: stop requested" if stopped else f"{job_id}: already finished")


def add_cluster_commands(group: click.Group) -> None:
    for command in (submit, status, logs, stop):
        group.add_command(command)
