"""The commands of the distributed mode's submitter and collector: ``submit`` and ``collect``."""

from __future__ import annotations

from pathlib import Path

import click

from jobs.collect import follow_results, wait_until_finished, write_results
from jobs.config import Settings
from jobs.formats import ResultFormat
from jobs.queue import Publisher
from jobs.queue import app as celery_app
from jobs.queue import configure
from jobs.records import BatchOptions
from jobs.submit import submit_file

from .options import (
    base_url_option,
    env,
    exit_for,
    format_option,
    handle_errors,
    open_store,
    provider_option,
    redis_url_option,
    rpm_option,
    tpm_option,
)
from .progress import Progress, summary


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@redis_url_option
@provider_option
@base_url_option
@rpm_option
@tpm_option
@handle_errors
def submit(file: Path, redis_url: str, provider: str, base_url: str | None,
           rpm: int | None, tpm: int | None) -> None:
    """Record FILE as a batch, enqueue its items, print the batch id."""
    settings = Settings.from_env(redis_url=redis_url)
    store = open_store(redis_url)
    configure(celery_app, settings)
    publisher = Publisher(store.redis, celery_app)
    options = BatchOptions(provider=provider, base_url=base_url, rpm=rpm, tpm=tpm)
    report = submit_file(store, publisher, file, options, settings)
    click.echo(report.batch_id)
    if report.invalid:
        click.echo(f"{report.invalid} of {report.total} lines are invalid (see their results)", err=True)


@click.command()
@click.argument("batch_id")
@click.option("-o", "--output", envvar=env("OUTPUT"), show_envvar=True,
              type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file (written aside, then renamed into place).")
@click.option("--wait", is_flag=True, envvar=env("WAIT"), show_envvar=True,
              help="Wait for the batch to finish, showing progress.")
@click.option("--follow", is_flag=True, envvar=env("FOLLOW"), show_envvar=True,
              help="Write results to OUTPUT as they finish (completion order) until the batch ends.")
@format_option
@redis_url_option
@handle_errors
def collect(batch_id: str, output: Path, wait: bool, follow: bool, fmt: str, redis_url: str) -> None:
    """Write every item's result, in input order, to OUTPUT."""
    store = open_store(redis_url)
    if follow:
        progress = Progress()
        try:
            with open(output, "wb") as out:
                info = follow_results(store, batch_id, out, ResultFormat(fmt), progress.update)
        finally:
            progress.close()
        click.echo(f"{output}: {summary(info)} (completion order)", err=True)
        exit_for(info)
    if wait:
        progress = Progress()
        try:
            wait_until_finished(store, batch_id, progress.update)
        finally:
            progress.close()
    info = write_results(store, batch_id, output, ResultFormat(fmt))
    click.echo(f"{output}: {summary(info)}", err=True)
    exit_for(info)
