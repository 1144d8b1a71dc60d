"""``aivvm-batch serve``: OpenAI-compatible /v1/files and /v1/batches over the store and queue."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import redis

from jobs.config import Settings
from jobs.connection import connect
from jobs.errors import ConfigError, StoreUnavailable
from jobs.files import FileStore
from jobs.queue import Publisher, configure
from jobs.queue import app as celery_app
from jobs.records import BatchOptions
from jobs.store import BatchStore

from ..options import (base_url_option, concurrency_option, env, handle_errors, interrupted, provider_option,
                       stub_knobs)
from .auth import KeyRing, is_loopback, load_keys
from .context import (DEFAULT_CLIENT_IDLE_SECONDS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_UPLOAD_BYTES,
                      DEFAULT_WINDOW_SECONDS, ServeContext, ServeLimits)
from .quotas import (DEFAULT_ACTIVE_BATCHES, DEFAULT_QUEUED_ITEMS, DEFAULT_STORED_BYTES, DEFAULT_UPLOADS, Quota,
                     Quotas, with_words)
from .driver import Driver, DriverConfig
from .records import BatchRecords
from .webhooks import Webhooks, load_hooks

KEYS_VARIABLE = env("API_KEYS")
METRICS_TOKEN_VARIABLE = env("METRICS_TOKEN")


@click.command()
@click.option("--host", envvar=env("SERVE_HOST"), show_envvar=True, default="127.0.0.1", show_default=True,
              help="Address to listen on; other than loopback only with API keys configured.")
@click.option("--port", envvar=env("SERVE_PORT"), show_envvar=True, type=click.IntRange(1, 65535),
              default=8080, show_default=True, help="Port to listen on.")
@provider_option
@base_url_option
@click.option("--redis-url", envvar=env("REDIS_URL"), show_envvar=True, default=None,
              help="Join this Redis (and any workers and serve replicas on it) instead of starting a "
              "private Redis and workers.")
@concurrency_option
@click.option("--workers", "worker_count", envvar=env("WORKERS"), show_envvar=True,
              type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker processes to start with the private Redis.")
@click.option("--state-dir", envvar=env("STATE_DIR"), show_envvar=True, default=".aivvm-batch",
              show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the private Redis keeps its data.")
@click.option("--api-keys-file", envvar=env("API_KEYS_FILE"), show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help=f"API keys, one a line (besides the comma-separated {KEYS_VARIABLE}).")
@click.option("--max-upload-bytes", envvar=env("MAX_UPLOAD_BYTES"), show_envvar=True,
              type=click.IntRange(min=1), default=DEFAULT_MAX_UPLOAD_BYTES, show_default=True,
              help="Largest file accepted by POST /v1/files.")
@click.option("--completion-window-seconds", envvar=env("COMPLETION_WINDOW_SECONDS"), show_envvar=True,
              type=click.IntRange(min=1), default=DEFAULT_WINDOW_SECONDS, show_default=True,
              help="How long the completion window '24h' lasts before unfinished items expire.")
@click.option("--client-idle-seconds", envvar=env("CLIENT_IDLE_SECONDS"), show_envvar=True,
              type=click.FloatRange(min=0.1), default=DEFAULT_CLIENT_IDLE_SECONDS, show_default=True,
              help="A request whose body sends nothing this long is closed (408), and a connection whose "
              "request head has not come whole in this time.")
@click.option("--uploads-per-key", envvar=env("UPLOADS_PER_KEY"), show_envvar=True, type=click.IntRange(min=1),
              default=DEFAULT_UPLOADS, show_default=True,
              help="Uploads under way at once per API key (beyond: 429).")
@click.option("--batches-per-key", envvar=env("BATCHES_PER_KEY"), show_envvar=True, type=click.IntRange(min=1),
              default=DEFAULT_ACTIVE_BATCHES, show_default=True,
              help="Batches not ended yet per API key (beyond: 429).")
@click.option("--queued-items-per-key", envvar=env("QUEUED_ITEMS_PER_KEY"), show_envvar=True,
              type=click.IntRange(min=1), default=DEFAULT_QUEUED_ITEMS, show_default=True,
              help="Items not ended yet per API key, a new batch's lines included (beyond: 429).")
@click.option("--stored-bytes-per-key", envvar=env("STORED_BYTES_PER_KEY"), show_envvar=True,
              type=click.IntRange(min=1), default=DEFAULT_STORED_BYTES, show_default=True,
              help="Bytes of files stored per API key, uploads and results (beyond: 429 on upload).")
@click.option("--max-connections", envvar=env("MAX_CONNECTIONS"), show_envvar=True, type=click.IntRange(min=1),
              default=DEFAULT_MAX_CONNECTIONS, show_default=True, help="Connections at once (beyond: 503).")
@click.option("--webhooks-file", envvar=env("WEBHOOKS_FILE"), show_envvar=True, default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Webhooks at a batch's end, one 'API_KEY URL SECRET' a line ('-' for the key of a "
              "server without keys): OpenAI's batch events, signed as Standard Webhooks says.")
@click.option("--stub", is_flag=True, envvar=env("STUB"), show_envvar=True,
              help="Start the local stand-in provider (not a model) and use it.")
@click.option("--cache", is_flag=True, envvar=env("CACHE"), show_envvar=True,
              help="Reuse the answer of a request a tenant's earlier batch asked and got ok (never "
              "another tenant's) instead of paying for it again.")
@handle_errors
def serve(host: str, port: int, provider: str, base_url: str | None, redis_url: str | None,
          concurrency: int, worker_count: int, state_dir: Path, api_keys_file: Path | None,
          max_upload_bytes: int, completion_window_seconds: int, client_idle_seconds: float,
          uploads_per_key: int, batches_per_key: int, queued_items_per_key: int, stored_bytes_per_key: int,
          max_connections: int, webhooks_file: Path | None, stub: bool, cache: bool) -> None:
    """Serve OpenAI's files and batches API (and a page at /) over the queue.

    Each API key (AIVVM_BATCH_API_KEYS, comma-separated, or --api-keys-file) sees
    only its own files and batches. With no key, it listens on loopback only.
    With no --redis-url it starts a private Redis and workers, as `run` does.
    Prometheus metrics are at /metrics, with the bearer AIVVM_BATCH_METRICS_TOKEN
    (without API keys, for any loopback client).
    """
    keys = load_keys(os.environ.get(KEYS_VARIABLE), api_keys_file)
    hooks = load_hooks(webhooks_file)
    if keys.open and not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address: set {KEYS_VARIABLE} (or --api-keys-file) "
                          "so that clients must present a key")
    _check_port(host, port)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # uvicorn raises the signal that stopped it again once it has shut down: SIGTERM must then end
    # this process through its cleanup (the private Redis and workers), Ctrl-C as `run` ends (130)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        quota = Quota(active_batches=batches_per_key, queued_items=queued_items_per_key,
                      stored_bytes=stored_bytes_per_key, uploads=uploads_per_key)
        limits = ServeLimits(max_upload_bytes=max_upload_bytes, window_seconds=completion_window_seconds,
                             client_idle_seconds=client_idle_seconds, max_connections=max_connections, quota=quota)
        _serve(host, port, provider, base_url, redis_url, concurrency, worker_count, state_dir, stub, cache,
               Access(keys, os.environ.get(METRICS_TOKEN_VARIABLE) or None, Webhooks(hooks)), limits)
    except KeyboardInterrupt:
        interrupted("serve stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Access:
    """Who may call (the keys), who may scrape /metrics beside loopback, whom a batch's end is told."""

    keys: KeyRing
    metrics_token: str | None
    webhooks: Webhooks


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _serve(host: str, port: int, provider: str, base_url: str | None, redis_url: str | None, concurrency: int,
           worker_count: int, state_dir: Path, stub: bool, cache: bool, access: Access, limits: ServeLimits) -> None:
    with ExitStack() as stack:
        options = BatchOptions(provider=provider, base_url=base_url, cache=cache)
        if stub:
            from ..stub import StubServer

            stand_in = stack.enter_context(StubServer(**stub_knobs()))
            options = replace(options, base_url=stand_in.base_url + ("/v1" if provider.startswith("openai") else ""))
        if redis_url is None:
            redis_url = _private(stack, state_dir, worker_count, concurrency, options.base_url)
        _run(_context(redis_url, options, access, limits), host, port)


def _context(redis_url: str, options: BatchOptions, access: Access, limits: ServeLimits) -> ServeContext:
    settings = Settings.from_env(redis_url=redis_url)
    configure(celery_app, settings)
    client = connect(redis_url, connect_timeout=5)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConfigError(f"Redis refused the credentials in the Redis URL: {exc}") from exc
    except redis.RedisError as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc
    store = BatchStore(client, settings.result_ttl)
    store.check_server()
    files = FileStore(client)
    records = BatchRecords(client)
    driver = Driver(store, files, records, Publisher(client, celery_app), DriverConfig(options, settings),
                    access.webhooks)
    own = {owner: with_words(limits.quota, words, where) for owner, words, where in access.keys.quota_words}
    quotas = Quotas(limits.quota, own, files, records, store)
    return ServeContext(store=store, files=files, records=records, driver=driver, keys=access.keys,
                        quotas=quotas, limits=limits, metrics_token=access.metrics_token)


def _private(stack: ExitStack, state_dir: Path, worker_count: int, concurrency: int,
             base_url: str | None) -> str:
    from ..private_redis import EmbeddedRedis
    from ..workers import WorkerProcesses, trusting

    state_dir.mkdir(parents=True, exist_ok=True)
    lock = stack.enter_context(open(state_dir / "serve.lock", "a+"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another `aivvm-batch serve` is using {state_dir}; pass another --state-dir "
                          "or share a Redis with --redis-url") from None
    embedded = stack.enter_context(EmbeddedRedis(state_dir / "serve-redis"))
    if worker_count:
        workers = WorkerProcesses(embedded.url, count=worker_count, concurrency=concurrency,
                                  log_dir=state_dir / "serve-logs", env=trusting(base_url)).start()
        stack.callback(workers.stop)
    return embedded.url


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _run(ctx: ServeContext, host: str, port: int) -> None:
    import uvicorn

    from .app import build_app
    from .head_deadline import head_limited_protocol

    shown = f"[{host}]" if ":" in host else host
    click.echo(f"aivvm-batch serve: OpenAI API at http://{shown}:{port}/v1, page at http://{shown}:{port}/",
               err=True)
    config = uvicorn.Config(build_app(ctx), host=host.strip("[]"), port=port, log_level="warning",
                            access_log=False, server_header=False, lifespan="on",
                            limit_concurrency=ctx.limits.max_connections,
                            http=head_limited_protocol(ctx.limits.client_idle_seconds))
    uvicorn.Server(config).run()
