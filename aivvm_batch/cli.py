"""The ``aivvm-batch`` command: one thin command per verb over the library functions."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import redis

from jobs.collect import follow_results, wait_until_finished, write_results
from jobs import keys
from jobs.config import DEFAULT_REDIS_URL, ENV_PREFIX, Settings
from jobs.errors import BatchError
from jobs.formats import ResultFormat
from jobs.queue import Publisher
from jobs.queue import app as celery_app
from jobs.queue import configure
from jobs.records import BatchInfo, BatchOptions, Status
from jobs.store import BatchStore
from jobs.submit import submit_file

from . import runner
from .progress import Progress, summary

F = TypeVar("F", bound=Callable[..., Any])
PROVIDER_NAMES = ("aivvm", "openai")


def env(name: str) -> str:
    return ENV_PREFIX + name


def handle_errors(func: F) -> F:
    """A user's mistake or an unreachable server: one line on stderr, exit 2, no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BatchError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def fail(message: str) -> NoReturn:
    click.echo(f"aivvm-batch: error: {message}", err=True)
    sys.exit(2)


def parse_providers(value: str) -> str:
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [n for n in names if n not in PROVIDER_NAMES]
    if not names or unknown:
        raise click.BadParameter(
            f"unknown provider {', '.join(unknown) or value!r}; choose from {', '.join(PROVIDER_NAMES)}"
            " (several, comma-separated, are tried in order)"
        )
    return ",".join(names)


redis_url_option = click.option(
    "--redis-url", envvar=env("REDIS_URL"), show_envvar=True, default=DEFAULT_REDIS_URL,
    show_default=True, help="Redis holding the queue and the batches (redis://, rediss://, "
    "redis://:password@host).")
provider_option = click.option(
    "--provider", envvar=env("PROVIDER"), show_envvar=True, default="aivvm", show_default=True,
    callback=lambda ctx, param, value: parse_providers(value),
    help="aivvm or openai; a comma-separated list falls back in order while nothing has streamed.")
base_url_option = click.option(
    "--base-url", envvar=env("BASE_URL"), show_envvar=True, default=None,
    help="Provider base URL, kept with the batch (default: AIVVM_BASE_URL or OPENAI_BASE_URL in the "
    "worker's environment, else the provider's own).")
rpm_option = click.option("--rpm", envvar=env("RPM"), show_envvar=True, type=click.IntRange(min=1),
                          default=None, help="Requests per minute for the batch, shared by all workers.")
tpm_option = click.option("--tpm", envvar=env("TPM"), show_envvar=True, type=click.IntRange(min=1),
                          default=None, help="Estimated tokens per minute for the batch, shared by all workers.")
format_option = click.option(
    "--format", "fmt", envvar=env("FORMAT"), show_envvar=True,
    type=click.Choice([f.value for f in ResultFormat]), default=ResultFormat.NATIVE.value,
    show_default=True, help="native result lines, or OpenAI's Batch output form.")
concurrency_option = click.option(
    "--concurrency", envvar=env("CONCURRENCY"), show_envvar=True, type=click.IntRange(min=1),
    default=128, show_default=True, help="Concurrent items per worker process.")


def open_store(redis_url: str) -> BatchStore:
    settings = Settings.from_env(redis_url=redis_url)
    return BatchStore(redis.Redis.from_url(redis_url, socket_connect_timeout=5), settings.result_ttl)


def interrupt(signum: int, frame: object) -> NoReturn:
    """SIGTERM stops `run` the way Ctrl-C does: cleanly, resumable."""
    raise KeyboardInterrupt


def exit_for(info: BatchInfo) -> NoReturn:
    sys.exit(0 if info.counts.get(Status.OK.value, 0) == info.total else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="aivvm-batch")
def main() -> None:
    """Batch chat completions over a Celery queue on Redis.

    Submit a JSONL file of prompts, run workers, collect a JSONL file with a
    result and a status for every input line. `run` does all three at once
    on a private Redis, with nothing to install.
    """


@main.command()
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


@main.command()
@redis_url_option
@concurrency_option
@click.option("--pool", envvar=env("POOL"), show_envvar=True, type=click.Choice(["threads", "gevent"]),
              default="threads", show_default=True,
              help="Celery pool: threads, or gevent (pip install 'aivvm-batch[gevent]').")
@click.option("--loglevel", envvar=env("LOGLEVEL"), show_envvar=True, default="INFO", show_default=True)
@click.option("--name", envvar=env("WORKER_NAME"), show_envvar=True, default=None,
              help="Celery node name (default: celery@hostname).")
@handle_errors
def worker(redis_url: str, concurrency: int, pool: str, loglevel: str, name: str | None) -> None:
    """Run a Celery worker that completes queued items.

    It becomes `celery -A worker.tasks worker` with these options (Celery's own entry
    point, which patches the process for gevent before anything else is imported);
    the Redis URL is passed in the environment, never on the command line.
    """
    settings = Settings.from_env(redis_url=redis_url)
    if pool == "gevent" and importlib.util.find_spec("gevent") is None:
        fail("the gevent pool needs gevent: pip install 'aivvm-batch[gevent]'")
    os.environ[env("REDIS_URL")] = settings.redis_url
    argv = [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", f"--pool={pool}",
            f"--concurrency={concurrency}", f"--loglevel={loglevel}", f"--queues={keys.QUEUE}",
            "--without-gossip", "--without-mingle"]
    if name:
        argv.append(f"--hostname={name}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@main.command()
@click.argument("batch_id")
@redis_url_option
@click.option("--json", "as_json", is_flag=True, envvar=env("JSON"), show_envvar=True,
              help="Print a JSON object for scripts.")
@handle_errors
def status(batch_id: str, redis_url: str, as_json: bool) -> None:
    """Print a batch's counts by status and its progress."""
    info = open_store(redis_url).info(batch_id)
    if as_json:
        click.echo(json.dumps(runner.info_dict(info)))
        return
    click.echo(runner.info_table(info))


@main.command()
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


@main.command()
@click.argument("batch_id")
@redis_url_option
@handle_errors
def cancel(batch_id: str, redis_url: str) -> None:
    """Cancel a batch: items not yet started end `cancelled`; in-flight ones finish."""
    cancelled = open_store(redis_url).cancel(batch_id)
    click.echo(f"{batch_id}: {cancelled} items cancelled", err=True)


@main.command()
@click.argument("batch_id")
@click.option("--status", "status_", envvar=env("RETRY_STATUS"), show_envvar=True,
              type=click.Choice([Status.FAILED.value, Status.CANCELLED.value]),
              default=Status.FAILED.value, show_default=True, help="Which items to run again.")
@redis_url_option
@handle_errors
def retry(batch_id: str, status_: str, redis_url: str) -> None:
    """Enqueue again the items of a batch that ended with STATUS."""
    settings = Settings.from_env(redis_url=redis_url)
    store = open_store(redis_url)
    configure(celery_app, settings)
    seqs = store.reset(batch_id, Status(status_))
    Publisher(store.redis, celery_app).publish(batch_id, seqs)
    click.echo(f"{batch_id}: {len(seqs)} items enqueued again", err=True)


@main.command()
@redis_url_option
@click.option("--json", "as_json", is_flag=True, envvar=env("JSON"), show_envvar=True,
              help="Print JSON lines for scripts.")
@handle_errors
def batches(redis_url: str, as_json: bool) -> None:
    """List the batches on this Redis, newest first."""
    for info in open_store(redis_url).list_batches():
        if as_json:
            click.echo(json.dumps(runner.info_dict(info)))
        else:
            click.echo(f"{info.id}  {info.state.value:<10}  {summary(info)}  {info.source}")


@main.command()
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


@main.command()
@click.option("--host", envvar=env("STUB_HOST"), show_envvar=True, default="127.0.0.1", show_default=True)
@click.option("--port", envvar=env("STUB_PORT"), show_envvar=True, type=click.IntRange(0, 65535),
              default=8787, show_default=True)
@click.option("--latency", envvar=env("STUB_LATENCY"), show_envvar=True, type=click.FloatRange(min=0),
              default=0.0, show_default=True, help="Seconds each reply takes in all.")
@click.option("--chunks", envvar=env("STUB_CHUNKS"), show_envvar=True, type=click.IntRange(min=1),
              default=4, show_default=True, help="Chunks each reply is streamed in.")
@click.option("--api-key", envvar=env("STUB_API_KEY"), show_envvar=True, default=None,
              help="Require this bearer key on the OpenAI endpoint.")
def stub(host: str, port: int, latency: float, chunks: int, api_key: str | None) -> None:
    """Serve a local STAND-IN provider (not a model) for trying the tool and testing.

    It answers the Aivvm protocol at /api/chat and the OpenAI protocol at
    /v1/chat/completions with deterministic text ("Stand-in reply to: ...").
    A directive such as [[stub fault=status code=503 times=2]] in a message
    injects faults: status, 429, cut, stall, badbytes, split, empty, reset.
    """
    from .stub import serve

    serve(host, port, latency=latency, chunks=chunks, api_key=api_key,
          ready=lambda url: click.echo(f"stand-in provider (not a model) on {url}", err=True))


if __name__ == "__main__":
    main()
