"""The worker's API keys: the one place that reads them, and where each may go.

A key is bound to the base URLs configured beside it in the worker's environment: the
provider's own default URL (``Aivvm.url``, ``OpenAI.url``), its base-URL variable
(``AIVVM_BASE_URL``, ``OPENAI_BASE_URL``) and the entries of
``AIVVM_BATCH_ALLOWED_BASE_URLS``. A batch's ``--base-url`` is chosen by whoever submits;
when it is none of those, the call carries no key (and the worker says so once per URL
in its log, never the key).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MalformedReply
from .checks import normal_form

if TYPE_CHECKING:
    from .base import AbstractProvider

ALLOWED_VARIABLE = "AIVVM_BATCH_ALLOWED_BASE_URLS"
REDACTED = "[redacted]"
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")
logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class KeyChoice:
    """The key a call carries, or why it carries none."""

    key: str | None
    # the variable whose key exists but was not sent, because the base URL is not allowed
    withheld: str | None = None

    @property
    def hint(self) -> str | None:
        return withheld_hint(self.withheld)


def withheld_hint(variable: str | None) -> str | None:
    """What a 401/403 answer should say when the key in ``variable`` was withheld."""
    if variable is None:
        return None
    return (f"the worker's {variable} was not sent: this base URL is not one its owner "
            f"allowed; to send it, add the URL to {ALLOWED_VARIABLE} in the worker's environment")


def api_key(provider: type[AbstractProvider], environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return env.get(provider.api_key_variable) or None


def worker_keys(providers: Iterable[type[AbstractProvider]],
                environ: Mapping[str, str] | None = None) -> list[str]:
    """Every key this worker holds (to redact them from anything a server says)."""
    return [k for k in (api_key(p, environ) for p in providers) if k]


@dataclass(frozen=True)
class WorkerKeys:
    """The keys a worker holds: all of them, redacted from what a server says (error texts), and
    those long enough to be real secrets, cleared from answers (:func:`answer_secrets`)."""

    held: tuple[str, ...]
    cleared: tuple[str, ...]

    @classmethod
    def from_env(cls, providers: Iterable[type[AbstractProvider]],
                 environ: Mapping[str, str] | None = None) -> WorkerKeys:
        held = tuple(worker_keys(providers, environ))
        return cls(held, tuple(answer_secrets(held)))


def allowed_base_urls(provider: type[AbstractProvider], extra: str,
                      environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    configured = env.get(provider.base_url_variable) or ""
    return [provider.url, configured, *extra.split(",")]


def is_allowed(provider: type[AbstractProvider], base_url: str, extra: str,
               environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``base_url`` equals (in normal form) one the worker's owner configured."""
    wanted = normal_form(base_url)
    if wanted is None:
        return False
    return any(normal_form(url) == wanted for url in allowed_base_urls(provider, extra, environ) if url.strip())


def choose_key(provider: type[AbstractProvider], base_url: str, extra_allowed: str,
               environ: Mapping[str, str] | None = None) -> KeyChoice:
    """The worker's key for ``provider`` if ``base_url`` (the one the call goes to) may have it."""
    key = api_key(provider, environ)
    if key is None:
        return KeyChoice(None)
    if is_allowed(provider, base_url, extra_allowed, environ):
        return KeyChoice(key)
    _warn_once(provider, base_url)
    return KeyChoice(None, provider.api_key_variable)


class KeyChooser:
    """:func:`choose_key` for a process whose environment stays as it started (a worker):
    each provider and base URL is decided once, not read from the environment for every call."""

    LIMIT = 1024  # base URLs remembered (each batch may name its own)

    def __init__(self, extra_allowed: str) -> None:
        self.extra_allowed = extra_allowed
        self._chosen: dict[tuple[str, str], KeyChoice] = {}

    def __call__(self, provider: type[AbstractProvider], base_url: str) -> KeyChoice:
        where = (provider.name, base_url)
        choice = self._chosen.get(where)
        if choice is None:
            if len(self._chosen) >= self.LIMIT:
                self._chosen.clear()
            choice = self._chosen[where] = choose_key(provider, base_url, self.extra_allowed)
        return choice


def _warn_once(provider: type[AbstractProvider], base_url: str) -> None:
    with _warned_lock:
        if (provider.name, base_url) in _warned:
            return
        _warned.add((provider.name, base_url))
    logger.warning("%s is not an allowed base URL for the %s provider: the worker's %s is not sent "
                   "there. If it should be, add it to %s (or set %s) in the worker's environment.",
                   base_url, provider.name, provider.api_key_variable, ALLOWED_VARIABLE,
                   provider.base_url_variable)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every given secret and any ``Bearer`` token replaced by ``[redacted]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


MAX_ANSWER_DEPTH = 64  # objects and lists within each other in an answer we keep
# shorter keys are placeholders (vLLM's "EMPTY", "x") that answers may rightly contain
MIN_CLEARED_KEY = 12


def answer_secrets(keys: Iterable[str]) -> list[str]:
    """The keys to clear from answers: those long enough to be real secrets."""
    return [key for key in keys if len(key) >= MIN_CLEARED_KEY]


def clear_keys(value: Any, secrets: Sequence[str], depth: int = 0) -> Any:
    """A server's answer (parsed JSON) with every secret in its strings (keys too) replaced by
    ``[redacted]``: a server that echoes the key it was sent does not put it in a result.

    Only the secrets are replaced (an answer may rightly say "Bearer"). An answer nested
    deeper than :data:`MAX_ANSWER_DEPTH` is malformed: no result could carry it.
    """
    kind = type(value)
    if kind is str:
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if depth >= MAX_ANSWER_DEPTH and (kind is dict or kind is list):
        raise MalformedReply("the answer is nested too deeply")
    if kind is dict:
        return {clear_keys(k, secrets, depth): clear_keys(v, secrets, depth + 1) for k, v in value.items()}
    if kind is list:
        if value and not any(type(v) in _CONTAINERS_OR_TEXT for v in value):
            return value  # numbers (an embedding): nothing to clear
        return [clear_keys(v, secrets, depth + 1) for v in value]
    return value


_CONTAINERS_OR_TEXT = (str, dict, list)
