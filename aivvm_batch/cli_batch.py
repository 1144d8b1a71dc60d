"""The commands of the distributed mode's submitter and collector: ``submit``, ``collect``, ``validate``."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import NoReturn

import click

from jobs.collect import DEFAULT_IDLE_WARNING_SECONDS
from jobs.config import Settings
from jobs.errors import WaitTimeout
from jobs.inputs import check_input, is_stdin, spooled
from jobs.lines import Validation, open_input, validate_lines
from jobs.records import BatchOptions, RequestDefaults
from .options import (
    base_url_option,
    cache_option,
    env,
    exit_for,
    format_option,
    handle_errors,
    interrupted,
    max_requests_option,
    max_tokens_total_option,
    open_store,
    provider_option,
    redis_url_option,
    request_defaults_options,
    priority_option,
    rpm_option,
    tpm_option,
)

# The rest is imported by the command that uses it (Celery by submit, tqdm by collect).

# `collect --timeout` passed before the batch finished (as timeout(1) exits)
EXIT_TIMEOUT = 124
SHOWN_PROBLEMS = 10

input_argument = click.argument(
    "file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))


@click.command()
@input_argument
@redis_url_option
@provider_option
@base_url_option
@rpm_option
@tpm_option
@priority_option
@cache_option
@max_tokens_total_option
@max_requests_option
@request_defaults_options
@click.option("--dry-run", is_flag=True, envvar=env("DRY_RUN"), show_envvar=True,
              help="Check every line and report, as `validate` does: nothing is submitted, "
              "no Redis is needed.")
@handle_errors
def submit(file: Path, redis_url: str, provider: str, base_url: str | None, rpm: int | None,
           tpm: int | None, priority: int, cache: bool, max_tokens_total: int | None, max_requests: int | None,
           defaults: RequestDefaults, dry_run: bool) -> None:
    """Record FILE as a batch, enqueue its items, print the batch id.

    FILE is JSON Lines; - reads standard input.
    """
    settings = Settings.from_env(redis_url=redis_url)
    with spooled(file) as path:
        check_input(path, shown=_input_name(file))
        if dry_run:
            _report_and_exit(path, file, settings, defaults, provider)
        from jobs.queue import Publisher, configure
        from jobs.queue import app as celery_app
        from jobs.submit import submit_file

        # What is alive now (the modules) lives as long as the process: the collector need not
        # look at it again while a large file goes by (a tenth of a submit's time otherwise).
        gc.freeze()
        store = open_store(redis_url)
        configure(celery_app, settings)
        publisher = Publisher(store.redis, celery_app)
        options = BatchOptions(provider=provider, base_url=base_url, rpm=rpm, tpm=tpm, priority=priority,
                               cache=cache, max_tokens_total=max_tokens_total, max_requests=max_requests)
        try:
            report = submit_file(store, publisher, path, options, settings, defaults=defaults)
        except KeyboardInterrupt:
            interrupted("the batch was removed: none of its items runs")
    click.echo(report.batch_id)
    for note in (report.invalid_note(), report.cache_note()):
        if note:
            click.echo(note, err=True)


@click.command()
@input_argument
@provider_option
@request_defaults_options
@handle_errors
def validate(file: Path, provider: str, defaults: RequestDefaults) -> None:
    """Check every line of FILE as submit would for --provider, and report; needs no Redis.

    Prints the counts and the first problems (line, field, message). Exit 0 when
    every line is valid, 1 otherwise, 2 when FILE is not JSON Lines at all.
    """
    settings = Settings.from_env()
    with spooled(file) as path:
        check_input(path, shown=_input_name(file))
        _report_and_exit(path, file, settings, defaults, provider)


def dry_run(file: Path, provider: str, defaults: RequestDefaults) -> NoReturn:
    """``--dry-run`` of submit and run: every line checked and reported, as ``validate`` does."""
    with spooled(file) as path:
        check_input(path, shown=_input_name(file))
        _report_and_exit(path, file, Settings.from_env(), defaults, provider)


def _report_and_exit(path: Path, shown: Path, settings: Settings, defaults: RequestDefaults,
                     provider: str) -> NoReturn:
    with open_input(path) as stream:
        validation = validate_lines(stream, settings.max_line_bytes, settings.max_items, defaults,
                                    keep=SHOWN_PROBLEMS, providers=BatchOptions(provider).providers())
    click.echo(_validation_text(_input_name(shown), validation))
    sys.exit(0 if validation.invalid == 0 else 1)


def _validation_text(name: str, validation: Validation) -> str:
    lines = [f"{name}: {validation.total} lines, {validation.valid} valid, "
             f"{validation.invalid} invalid"]
    lines += [str(problem) for problem in validation.problems]
    more = validation.invalid - len(validation.problems)
    if more > 0:
        lines.append(f"... and {more} more invalid lines")
    return "\n".join(lines)


def _input_name(file: Path) -> str:
    return "standard input" if is_stdin(file) else str(file)


@click.command()
@click.argument("batch_id")
@click.option("-o", "--output", envvar=env("OUTPUT"), show_envvar=True,
              type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), required=True,
              help="Results file (written aside, then renamed into place; a symlink's target is "
              "written); - is standard output.")
@click.option("--wait", is_flag=True, envvar=env("WAIT"), show_envvar=True,
              help="Wait for the batch to finish, showing progress.")
@click.option("--follow", is_flag=True, envvar=env("FOLLOW"), show_envvar=True,
              help="Write results to OUTPUT as they finish (completion order) until the batch ends.")
@click.option("--timeout", "timeout", envvar=env("WAIT_TIMEOUT"), show_envvar=True,
              type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Stop waiting (--wait, --follow) after SECONDS: exit {EXIT_TIMEOUT}, "
              "nothing written by --wait.")
@click.option("--idle-warning", envvar=env("IDLE_WARNING"), show_envvar=True,
              type=click.FloatRange(min=0), default=DEFAULT_IDLE_WARNING_SECONDS, show_default=True,
              help="Say so on stderr when no item finished and no worker was seen for SECONDS "
              "(0: never).")
@format_option
@redis_url_option
@handle_errors
def collect(batch_id: str, output: Path, wait: bool, follow: bool, timeout: float | None,
            idle_warning: float, fmt: str, redis_url: str) -> None:
    """Write every item's result, in input order, to OUTPUT.

    Nothing is written or truncated until the batch is found and OUTPUT is known
    to be writable. Progress and the summary go to stderr.
    """
    from jobs.collect import WaitGuard, follow_results, wait_until_finished, write_results
    from jobs.formats import ResultFormat
    from jobs.output import check_output, is_stdio, open_output

    from .progress import Progress, summary

    name = "standard output" if is_stdio(output) else str(output)
    try:
        store = open_store(redis_url)
        store.info(batch_id)
        check_output(output)
        progress = Progress()  # the idle warning goes through it: never into the middle of its bar
        guard = WaitGuard(store, timeout=timeout, idle_warning=idle_warning or None,
                      on_idle=lambda message: progress.note(f"aivvm-batch: {message}"))
        if follow:
            try:
                with open_output(output) as out:
                    info = follow_results(store, batch_id, out, ResultFormat(fmt), progress.update,
                                          guard=guard)
            finally:
                progress.close()
            click.echo(f"{name}: {summary(info)} (completion order)", err=True)
            exit_for(info)
        if wait:
            try:
                wait_until_finished(store, batch_id, progress.update, guard=guard)
            finally:
                progress.close()
        info = write_results(store, batch_id, output, ResultFormat(fmt))
    except KeyboardInterrupt:
        if follow:
            interrupted(f"the results so far are in {name}; the batch goes on: collect again")
        interrupted("nothing was written; the batch goes on: collect again")
    except WaitTimeout as exc:
        click.echo(f"aivvm-batch: {exc}", err=True)
        sys.exit(EXIT_TIMEOUT)
    click.echo(f"{name}: {summary(info)}", err=True)
    exit_for(info)
