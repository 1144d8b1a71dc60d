"""What the commands share: options, their environment variables, and error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import redis

from jobs.config import DEFAULT_REDIS_URL, ENV_PREFIX, Settings
from jobs.errors import BatchError
from jobs.formats import ResultFormat
from jobs.records import BatchInfo, Status
from jobs.store import BatchStore

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
