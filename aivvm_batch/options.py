"""What the commands share: options, their environment variables, and error handling."""

from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click

from jobs.config import DEFAULT_REDIS_URL, ENV_PREFIX, Settings
from jobs.errors import BatchError, ConfigError
from jobs.formats import ResultFormat
from jobs.records import MAX_PRIORITY, BatchInfo, RequestDefaults, Status

if TYPE_CHECKING:
    from jobs.store import BatchStore

# Redis (jobs.store) and the providers (worker.providers) are imported where they are used:
# a command that needs neither (validate, stub, --help of one command) starts without them.
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_PROVIDER = "aivvm"


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


def counted(n: int, noun: str) -> str:
    """``1 item``, ``0 items``, ``2 items``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def interrupted(message: str) -> NoReturn:
    """Ctrl-C: one line, exit 130 (128 + SIGINT), as shells report it; not click's ``Aborted!``."""
    click.echo(f"\naivvm-batch: interrupted; {message}", err=True)
    sys.exit(130)


class OptionError(click.ClickException):
    """An unusable option value found while parsing: one line, exit 2, like :func:`fail`."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"aivvm-batch: error: {self.format_message()}", err=True)


_REDIS_SCHEMES = "redis://[:password@]host[:port][/db], rediss://... or unix:///path"


def check_redis_url(url: str) -> str:
    """``url`` if redis-py can use it, else :class:`ConfigError` naming it (password hidden)."""
    from redis.connection import parse_url

    try:
        parse_url(url)
        path = urlsplit(url).path
    except ValueError as exc:
        raise ConfigError(f"the Redis URL {masked_url(url)} is not valid: {exc} "
                          f"(expected {_REDIS_SCHEMES})") from None
    if not url.startswith("unix:") and not re.fullmatch(r"/?(\d+)?", path):
        raise ConfigError(f"the Redis URL {masked_url(url)} is not valid: the database "
                          f"{path.lstrip('/')!r} is not a number (expected {_REDIS_SCHEMES})")
    return url


def masked_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for a message."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, host = rest.split("/", 1)[0].rsplit("@", 1)
    tail = rest[len(userinfo) + 1 + len(host):]
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}://{user}:***@{host}{tail}"


def _redis_url_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_redis_url(value)
    except ConfigError as exc:
        raise OptionError(str(exc)) from None


def parse_providers(value: str) -> str:
    from worker.providers import PROVIDERS

    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [n for n in names if n not in PROVIDERS]
    if not names or unknown:
        raise click.BadParameter(
            f"unknown provider {', '.join(unknown) or value!r}; choose from {', '.join(PROVIDERS)}"
            " (several, comma-separated, are tried in order)"
        )
    return ",".join(names)


def _providers_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # the default is a provider: it needs no look-up in the registry, whose import (the
    # workers' HTTP code) would cost every submit
    return value if value == DEFAULT_PROVIDER else parse_providers(value)


redis_url_option = click.option(
    "--redis-url", envvar=env("REDIS_URL"), show_envvar=True, default=DEFAULT_REDIS_URL,
    show_default=True, callback=_redis_url_callback,
    help="Redis holding the queue and the batches (redis://, rediss://, redis://:password@host).")
provider_option = click.option(
    "--provider", envvar=env("PROVIDER"), show_envvar=True, default=DEFAULT_PROVIDER, show_default=True,
    callback=_providers_callback,
    help="aivvm or openai; a comma-separated list falls back in order while nothing has streamed.")
base_url_option = click.option(
    "--base-url", envvar=env("BASE_URL"), show_envvar=True, default=None,
    help="Provider base URL, kept with the batch (default: AIVVM_BASE_URL or OPENAI_BASE_URL in the "
    "worker's environment, else the provider's own).")
rpm_option = click.option("--rpm", envvar=env("RPM"), show_envvar=True, type=click.IntRange(min=1),
                          default=None, help="Requests per minute for the batch, shared by all workers.")
priority_option = click.option(
    "--priority", envvar=env("PRIORITY"), show_envvar=True, type=click.IntRange(1, MAX_PRIORITY), default=1,
    show_default=True, help="The batch's share of the workers beside other batches on the same Redis: "
    "3 gives it three times the window of messages of a batch of priority 1.")
cache_option = click.option(
    "--cache", is_flag=True, envvar=env("CACHE"), show_envvar=True,
    help="Reuse the answer of any request asked and answered ok before on this Redis (same provider, "
    "base URL and request) instead of paying for it again; this batch's answers are kept for later "
    "ones (AIVVM_BATCH_CACHE_TTL seconds, 7 days by default).")
max_tokens_total_option = click.option(
    "--max-tokens-total", envvar=env("MAX_TOKENS_TOTAL"), show_envvar=True, type=click.IntRange(min=1),
    default=None, help="Budget: once the batch has paid this many tokens, no new item starts (those in "
    "flight finish); the rest end cancelled with budget_exhausted.")
max_requests_option = click.option(
    "--max-requests", envvar=env("MAX_REQUESTS"), show_envvar=True, type=click.IntRange(min=1), default=None,
    help="Budget: once the batch has made this many provider requests, no new item starts.")
tpm_option = click.option("--tpm", envvar=env("TPM"), show_envvar=True, type=click.IntRange(min=1),
                          default=None, help="Estimated tokens per minute for the batch, shared by all workers.")
format_option = click.option(
    "--format", "fmt", envvar=env("FORMAT"), show_envvar=True,
    type=click.Choice([f.value for f in ResultFormat]), default=ResultFormat.NATIVE.value,
    show_default=True, help="native result lines, or OpenAI's Batch output form.")
# one worker process's requests in flight (``worker``, ``serve``); run's --concurrency is a total
# shared by its processes (``total_concurrency``)
concurrency_option = click.option(
    "--concurrency", envvar=env("CONCURRENCY"), show_envvar=True, type=click.IntRange(min=1),
    default=128, show_default=True, help="Requests in flight per worker process.")


_DEFAULT_OPTIONS = (
    click.option("--model", envvar=env("MODEL"), show_envvar=True, default=None,
                 help="Model for lines that name none (a line's own model wins)."),
    click.option("--temperature", envvar=env("TEMPERATURE"), show_envvar=True,
                 type=click.FloatRange(0, 2), default=None,
                 help="Temperature for lines that give none."),
    click.option("--max-tokens", envvar=env("MAX_TOKENS"), show_envvar=True,
                 type=click.IntRange(min=1), default=None,
                 help="max_tokens for lines that give neither max_tokens nor max_completion_tokens."),
    click.option("--system", envvar=env("SYSTEM"), show_envvar=True, default=None,
                 help="System message for lines that have none of their own "
                 "(no system_message, no system or developer message)."),
)


def request_defaults_options(func: F) -> F:
    """Add ``--model``, ``--temperature``, ``--max-tokens`` and ``--system``.

    The command receives them as one keyword argument, ``defaults`` (a
    :class:`RequestDefaults`), applied to every line that lacks the value.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, model: str | None, temperature: float | None, max_tokens: int | None,
                system: str | None, **kwargs: Any) -> Any:
        defaults = RequestDefaults(model=model or None, temperature=temperature,
                                   max_tokens=max_tokens, system_message=system)
        return func(*args, defaults=defaults, **kwargs)

    decorated: Any = wrapper
    for option in reversed(_DEFAULT_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def open_store(redis_url: str) -> BatchStore:
    from jobs.connection import connect
    from jobs.store import BatchStore

    check_redis_url(redis_url)
    settings = Settings.from_env(redis_url=redis_url)
    return BatchStore(connect(redis_url, connect_timeout=5), settings.result_ttl)


def exit_for(info: BatchInfo) -> NoReturn:
    sys.exit(0 if info.counts.get(Status.OK.value, 0) == info.total else 1)


def stub_knobs() -> dict[str, Any]:
    """The stand-in's latency and chunks from the environment, as `aivvm-batch stub` reads them."""
    knobs: dict[str, Any] = {}
    for name, kind, key in (("LATENCY", float, "latency"), ("CHUNKS", int, "chunks")):
        raw = os.environ.get(f"AIVVM_BATCH_STUB_{name}", "").strip()
        if raw:
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"AIVVM_BATCH_STUB_{name}={raw!r} is not a number") from None
            if not (math.isfinite(value) and value >= (0 if key == "latency" else 1)):
                raise ConfigError(f"AIVVM_BATCH_STUB_{name}={raw!r} is out of range")
            knobs[key] = value
    return knobs
