"""The ``aivvm-batch`` command: one thin command per verb over the library functions."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Iterator, MutableMapping

import click

from jobs.config import Settings
from jobs.errors import StoreUnavailable
from jobs.records import Status

from .deferred_imports import imported
from .options import (concurrency_option, counted, env, fail, handle_errors, interrupted, masked_url, open_store,
                      redis_url_option)


class Commands(MutableMapping[str, click.Command]):
    """The group's commands, those of other modules imported when first looked up.

    Each command imports what it needs and no more: ``submit`` never imports the worker, ``run``
    or ``serve`` (nor aiohttp, starlette, requests, tqdm), which would cost it start-up time and
    memory. ``--help`` and iterating over the items import them all.
    """

    def __init__(self, elsewhere: dict[str, str]) -> None:
        self._loaded: dict[str, click.Command] = {}
        self._elsewhere = dict(elsewhere)  # name -> "module:attribute"

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded and name in self._elsewhere:
            module, _, attribute = self._elsewhere[name].partition(":")
            command = getattr(imported(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}:{attribute} is not a click command")
            self._loaded[name] = command
            del self._elsewhere[name]
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._elsewhere.pop(name, None)
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        if self._elsewhere.pop(name, None) is None:
            del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._loaded, *self._elsewhere])

    def __len__(self) -> int:
        return len(self._loaded) + len(self._elsewhere)


COMMANDS_ELSEWHERE = {
    "submit": "aivvm_batch.cli_batch:submit",
    "collect": "aivvm_batch.cli_batch:collect",
    "validate": "aivvm_batch.cli_batch:validate",
    "run": "aivvm_batch.cli_run:run",
    "serve": "aivvm_batch.serve.cli:serve",
}


@click.group(commands=Commands(COMMANDS_ELSEWHERE),
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="aivvm-batch")
def main() -> None:
    """Batch chat completions over a Celery queue on Redis.

    Submit a JSONL file of prompts, run workers, collect a JSONL file with a
    result and a status for every input line. `run` does all three at once
    on a private Redis, with nothing to install.
    """


@main.command()
@redis_url_option
@concurrency_option
@click.option("--pool", envvar=env("POOL"), show_envvar=True, type=click.Choice(["threads", "gevent"]),
              default="threads", show_default=True,
              help="Celery pool: threads, or gevent (pip install 'aivvm-batch[gevent]').")
@click.option("--loglevel", envvar=env("LOGLEVEL"), show_envvar=True, default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
              help="Worker log level: INFO logs each task; WARNING keeps retries (and why), "
              "a full Redis and errors.")
@click.option("--name", envvar=env("WORKER_NAME"), show_envvar=True, default=None,
              help="Celery node name (default: celery@hostname).")
@handle_errors
def worker(redis_url: str, concurrency: int, pool: str, loglevel: str, name: str | None) -> None:
    """Run a Celery worker that completes queued items, CONCURRENCY requests in flight.

    It becomes `celery -A worker.tasks worker` with these options (Celery's own entry
    point, which patches the process for gevent before anything else is imported);
    the Redis URL is passed in the environment, never on the command line. The requests
    run on the worker's event loop; Celery gets as many threads as it needs to hand
    over enough chunks of items.
    """
    from .workers import celery_worker_argv

    settings = Settings.from_env(redis_url=redis_url)
    if pool == "gevent" and importlib.util.find_spec("gevent") is None:
        fail("the gevent pool needs gevent: pip install 'aivvm-batch[gevent]'")
    try:
        open_store(settings.redis_url).check_server()
    except StoreUnavailable:
        pass  # Celery waits for the broker; the worker checks again when it starts
    os.environ[env("REDIS_URL")] = settings.redis_url
    os.environ[env("CONCURRENCY")] = str(concurrency)
    argv = celery_worker_argv(concurrency, pool=pool, loglevel=loglevel, name=name)
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
    from .batch_status import WORKERS_SHOWN, info_dict, info_table, worker_dict, worker_lines

    store = open_store(redis_url)
    info = store.info(batch_id)
    memory = store.memory()
    seen = store.workers()
    top = info.top_error
    if as_json:
        click.echo(json.dumps({
            **info_dict(info),
            "top_error": {"error": top[0], "count": top[1]} if top else None,
            "redis_memory": {"used_memory": memory.used, "maxmemory": memory.maxmemory,
                             "maxmemory_policy": memory.policy, "full": memory.full},
            "workers": [worker_dict(w) for w in seen[:WORKERS_SHOWN]],
        }))
        return
    click.echo(info_table(info))
    if top:
        click.echo(f"most frequent error ({top[1]} attempts): {top[0]}")
    for line in worker_lines(seen):
        click.echo(line)
    if memory.full:
        click.echo(f"Redis is full: {memory.describe()}; workers hold their replies and wait "
                   "until memory frees (free memory or raise maxmemory)")


@main.command()
@click.argument("batch_id")
@redis_url_option
@handle_errors
def cancel(batch_id: str, redis_url: str) -> None:
    """Cancel a batch: items not yet started end `cancelled`; in-flight ones finish."""
    store = open_store(redis_url)
    cancelled = store.cancel(batch_id)
    info = store.info(batch_id)
    message = f"{batch_id}: {counted(cancelled, 'item')} cancelled"
    if info.total is None:
        message += "; the lines still being submitted will end cancelled too"
    elif not info.finished:
        message += (f"; {info.total - info.done} in flight will finish "
                    "(those that would be retried end cancelled instead)")
    click.echo(message, err=True)


@main.command()
@click.argument("batch_id")
@click.option("--status", "status_", envvar=env("RETRY_STATUS"), show_envvar=True,
              type=click.Choice([Status.FAILED.value, Status.CANCELLED.value]),
              default=Status.FAILED.value, show_default=True, help="Which items to run again.")
@redis_url_option
@handle_errors
def retry(batch_id: str, status_: str, redis_url: str) -> None:
    """Enqueue again the items of a batch that ended with STATUS."""
    from jobs.queue import Publisher, configure
    from jobs.queue import app as celery_app

    settings = Settings.from_env(redis_url=redis_url)
    store = open_store(redis_url)
    configure(celery_app, settings)
    seqs = store.reset(batch_id, Status(status_))
    Publisher(store.redis, celery_app).publish(batch_id, seqs)
    click.echo(f"{batch_id}: {counted(len(seqs), 'item')} enqueued again", err=True)


@main.command()
@redis_url_option
@click.option("--json", "as_json", is_flag=True, envvar=env("JSON"), show_envvar=True,
              help="Print JSON lines for scripts.")
@handle_errors
def batches(redis_url: str, as_json: bool) -> None:
    """List the batches on this Redis, newest first."""
    from .batch_status import info_dict
    from .progress import summary

    for info in open_store(redis_url).list_batches():
        if as_json:
            click.echo(json.dumps(info_dict(info)))
        else:
            click.echo(f"{info.id}  {info.state.value:<10}  {summary(info)}  {info.source}")


@main.command()
@redis_url_option
@click.option("--host", envvar=env("METRICS_HOST"), show_envvar=True, default="127.0.0.1", show_default=True,
              help="Address to listen on (the metrics name batches and workers, not keys or prompts).")
@click.option("--port", envvar=env("METRICS_PORT"), show_envvar=True, type=click.IntRange(1, 65535),
              default=9464, show_default=True, help="Port to listen on.")
@handle_errors
def metrics(redis_url: str, host: str, port: int) -> None:
    """Export Prometheus metrics of this Redis's batches and workers at /metrics.

    They are read from Redis at each scrape, so one exporter covers the workers
    of every host (serve has the same at its own /metrics).
    """
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    from .metrics import StoreCollector

    store = open_store(redis_url)
    store.memory()  # an unreachable Redis is said now, in one line
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    try:
        start_http_server(port, host, registry)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    click.echo(f"metrics of {masked_url(redis_url)} on http://{host}:{port}/metrics", err=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        interrupted("metrics stopped")


@main.command()
@click.option("--host", envvar=env("STUB_HOST"), show_envvar=True, default="127.0.0.1", show_default=True)
@click.option("--port", envvar=env("STUB_PORT"), show_envvar=True, type=click.IntRange(0, 65535),
              default=8787, show_default=True)
@click.option("--latency", envvar=env("STUB_LATENCY"), show_envvar=True, type=click.FloatRange(min=0),
              default=0.0, show_default=True, help="Seconds each reply takes in all.")
@click.option("--chunks", envvar=env("STUB_CHUNKS"), show_envvar=True, type=click.IntRange(min=1),
              default=4, show_default=True, help="Chunks each reply is streamed in.")
@click.option("--api-key", envvar=env("STUB_API_KEY"), show_envvar=True, default=None,
              help="Require this bearer key on the OpenAI endpoints.")
@click.option("--reply-bytes", envvar=env("STUB_REPLY_BYTES"), show_envvar=True, type=click.IntRange(min=0),
              default=None, help="Pad every reply to this many bytes (long replies).")
@click.option("--backlog", envvar=env("STUB_BACKLOG"), show_envvar=True, type=click.IntRange(min=1),
              default=4096, show_default=True, help="Listen queue, for thousands of connections at once.")
@click.option("--rpm", envvar=env("STUB_RPM"), show_envvar=True, type=click.IntRange(min=1), default=None,
              help="Admit this many OpenAI requests a minute (a token bucket, stated in x-ratelimit-* "
                   "headers; beyond it a 429 with retry-after).")
@click.option("--burst", envvar=env("STUB_BURST"), show_envvar=True, type=click.IntRange(min=1), default=None,
              help="With --rpm: requests admitted at once at most [default: a second's worth].")
@click.option("--tpm", envvar=env("STUB_TPM"), show_envvar=True, type=click.IntRange(min=1), default=None,
              help="With --rpm: tokens a minute (a prompt's length / 4, plus one).")
def stub(host: str, port: int, latency: float, chunks: int, api_key: str | None,
         reply_bytes: int | None, backlog: int, rpm: int | None, burst: int | None, tpm: int | None) -> None:
    """Serve a local STAND-IN provider (not a model) for trying the tool and testing.

    It answers the Aivvm protocol at /api/chat and the OpenAI protocol at
    /v1/chat/completions, /v1/embeddings, /v1/responses and /v1/completions with
    deterministic answers ("Stand-in reply to: ...", tool calls built from the
    tools' schemas, logprobs, unit vectors). A directive such as
    [[stub fault=status code=503 times=2]] in a message injects faults: status,
    429, cut, stall, badbytes, split, empty, reset, badjson, notjson, refusal,
    failed, bytes=N.
    """
    from .stub import RateLimit
    from .stub import serve as serve_stand_in

    if (burst or tpm) and not rpm:
        raise click.UsageError("--burst and --tpm need --rpm")
    serve_stand_in(host, port, latency=latency, chunks=chunks, api_key=api_key,
                   reply_bytes=reply_bytes, backlog=backlog, rate_limit=RateLimit(rpm, burst, tpm) if rpm else None,
                   ready=lambda url: click.echo(f"stand-in provider (not a model) on {url}", err=True))


if __name__ == "__main__":
    main()
