"""``aivvm-batch run``: submit, work and collect in one command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from jobs.formats import ResultFormat
from jobs.records import BatchOptions, RequestDefaults, Status

from . import early
from .batch_status import budget_text
from .deferred_imports import without_collector
from .options import (
    base_url_option,
    cache_option,
    counted,
    env,
    exit_for,
    format_option,
    handle_errors,
    interrupted,
    max_requests_option,
    max_tokens_total_option,
    provider_option,
    request_defaults_options,
    rpm_option,
    tpm_option,
)
from .plan import RunPlan
from .signals import Interrupts
from .streams import unbroken_stderr
from .workers import WorkerProcesses, default_workers, split_concurrency

if TYPE_CHECKING:
    from jobs.records import BatchInfo


@click.command()
@click.argument("file", type=click.Path(allow_dash=True, path_type=str))
@click.option("-o", "--output", envvar=env("OUTPUT"), show_envvar=True,
              type=click.Path(allow_dash=True, path_type=str), required=True,
              help="Results file; - writes them to standard output.")
@provider_option
@base_url_option
@click.option("--concurrency", "total_concurrency", envvar=env("CONCURRENCY"), show_envvar=True,
              type=click.IntRange(min=1), default=128, show_default=True,
              help="Requests in flight in all, shared by the worker processes.")
@click.option("--workers", "worker_count", envvar=env("WORKERS"), show_envvar=True,
              type=click.IntRange(min=1), default=None, show_default="one per core",
              help="Worker processes to start.")
@click.option("--fresh", is_flag=True, envvar=env("FRESH"), show_envvar=True,
              help="Keep nothing from the previous run of this input: send every line again.")
@click.option("--redis-url", envvar=env("REDIS_URL"), show_envvar=True, default=None,
              help="Use this Redis (and any workers on it) instead of a private one.")
@click.option("--state-dir", envvar=env("STATE_DIR"), show_envvar=True, default=".aivvm-batch",
              show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the private Redis keeps its data, so that an interrupted run continues.")
@click.option("--stub", is_flag=True, envvar=env("STUB"), show_envvar=True,
              help="Start the local stand-in provider (not a model) and use it.")
@rpm_option
@tpm_option
@cache_option
@max_tokens_total_option
@max_requests_option
@format_option
@request_defaults_options
@click.option("--dry-run", is_flag=True, envvar=env("DRY_RUN"), show_envvar=True,
              help="Check every line and report, as `validate` does: nothing runs, no Redis or worker starts.")
@handle_errors
def run(file: str, output: str, provider: str, base_url: str | None, total_concurrency: int,
        worker_count: int | None, fresh: bool, redis_url: str | None, state_dir: Path, stub: bool,
        rpm: int | None, tpm: int | None, cache: bool, max_tokens_total: int | None, max_requests: int | None,
        fmt: str, defaults: RequestDefaults, dry_run: bool) -> None:
    """Submit FILE (- for standard input), work it and collect OUTPUT in one command.

    With no --redis-url it needs no server: it starts a private Redis with its
    data in --state-dir. Run it again on the same input and it keeps every ok
    result whose line, provider and base URL are unchanged, and sends the rest.

    Ctrl-C once: no new item starts, and those in flight finish and are recorded;
    Ctrl-C twice: abandon them (they are sent again by the next run).
    """
    unbroken_stderr()
    if dry_run:
        from .cli_batch import dry_run as report_lines

        report_lines(Path(file), provider, defaults)
    worker_count = worker_count or default_workers()
    with Interrupts() as interrupts:
        # the workers import theirs while this process imports the rest of run and checks its input
        workers = _prestarted(split_concurrency(total_concurrency, worker_count), state_dir)
        try:
            with without_collector():
                from . import runner
                from .progress import Progress, summary

            options = BatchOptions(provider=provider, base_url=base_url, rpm=rpm, tpm=tpm, cache=cache,
                                   max_tokens_total=max_tokens_total, max_requests=max_requests)
            plan = RunPlan(file=file, output=output, options=options, defaults=defaults, redis_url=redis_url,
                           state_dir=state_dir, use_stub=stub, fmt=ResultFormat(fmt), fresh=fresh)
            try:
                result = runner.run(plan, Progress(), interrupts, workers)
            except runner.Interrupted as stop:
                interrupted(_interrupted_message(stop.info, stop.abandoned, output, state_dir))
        except KeyboardInterrupt:
            interrupted(_interrupted_message(None, 0, output, state_dir))
        finally:
            workers.kill()  # run stops them on every path it reaches; these are the others
    click.echo(f"results: {'standard output' if output == '-' else output}", err=True)
    click.echo(f"summary: {summary(result.info)}", err=True)
    budget = budget_text(result.info)
    if budget:
        click.echo(f"budget spent: {budget}", err=True)
    if result.stopped:
        click.echo(f"aivvm-batch: stopped early: {result.stopped}; fix the cause and run the same "
                   "command again (the failed and cancelled items are sent again)", err=True)
    exit_for(result.info)


def _interrupted_message(info: BatchInfo | None, abandoned: int, output: str, state_dir: Path) -> str:
    text = ""
    if info is not None:
        ok = info.counts.get(Status.OK.value, 0)
        text += (f"{ok} of {info.total if info.total is not None else '?'} items ok, kept in {state_dir} "
                 f"({'standard output' if output == '-' else output} is written whole, once every item has "
                 "ended); ")
    if abandoned:
        text += f"{counted(abandoned, 'item')} in flight abandoned, to be sent again; "
    return text + "run the same command again to continue"


def _prestarted(concurrencies: list[int], state_dir: Path) -> WorkerProcesses:
    """The worker processes, started before anything else (aivvm_batch.workers), or at the
    command's first line (aivvm_batch.early); if their log folder cannot be made, none yet:
    ``run`` starts them later as before, after its checks say why."""
    early_start = early.taken(state_dir / "logs")
    if early_start is not None:
        early_start.concurrencies = list(concurrencies)
        return early_start
    workers = WorkerProcesses(concurrencies=concurrencies, log_dir=state_dir / "logs")
    try:
        return workers.prestart()
    except OSError:
        return workers
