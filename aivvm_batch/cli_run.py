"""``aivvm-batch run``: submit, work and collect in one command."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from jobs.formats import ResultFormat
from jobs.records import BatchOptions

from . import runner
from .options import (
    base_url_option,
    concurrency_option,
    env,
    exit_for,
    format_option,
    handle_errors,
    interrupt,
    provider_option,
    rpm_option,
    tpm_option,
)
from .progress import Progress, summary


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", envvar=env("OUTPUT"), show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file.")
@provider_option
@base_url_option
@concurrency_option
@click.option("--workers", "worker_count", envvar=env("WORKERS"), show_envvar=True,
              type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes to start.")
@click.option("--redis-url", envvar=env("REDIS_URL"), show_envvar=True, default=None,
              help="Use this Redis (and any workers on it) instead of a private one.")
@click.option("--state-dir", envvar=env("STATE_DIR"), show_envvar=True, default=".aivvm-batch",
              show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the private Redis keeps its data, so an interrupted run continues.")
@click.option("--stub", is_flag=True, envvar=env("STUB"), show_envvar=True,
              help="Start the local stand-in provider (not a model) and use it.")
@rpm_option
@tpm_option
@format_option
@handle_errors
def run(file: Path, output: Path, provider: str, base_url: str | None, concurrency: int,
        worker_count: int, redis_url: str | None, state_dir: Path, stub: bool,
        rpm: int | None, tpm: int | None, fmt: str) -> None:
    """Submit FILE, work it and collect OUTPUT in one command.

    With no --redis-url it needs no server: it starts a private Redis with its
    data in --state-dir. Run again on the same file, it continues where it stopped.
    """
    signal.signal(signal.SIGTERM, interrupt)
    options = BatchOptions(provider=provider, base_url=base_url, rpm=rpm, tpm=tpm)
    plan = runner.RunPlan(file=file, output=output, options=options, concurrency=concurrency,
                          worker_count=worker_count, redis_url=redis_url, state_dir=state_dir,
                          use_stub=stub, fmt=ResultFormat(fmt))
    try:
        info = runner.run(plan, Progress())
    except KeyboardInterrupt:
        click.echo("\naivvm-batch: interrupted; run the same command again to continue", err=True)
        sys.exit(130)
    click.echo(f"results: {output}", err=True)
    click.echo(f"summary: {summary(info)}", err=True)
    exit_for(info)
