"""Webhooks at a batch's end: OpenAI's event objects, signed as the Standard Webhooks spec says.

The server's owner names, per API key, the URL its events go to and the secret they are signed
with (``--webhooks-file``); a tenant cannot name a host, so no tenant can point ``serve`` at a
host of its choice. An event (``batch.completed``, ``batch.failed``, ``batch.expired``,
``batch.cancelled``) is ``{"id", "object": "event", "created_at", "type", "data": {"id"}}`` as
OpenAI sends it, with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret's bytes). A delivery that
does not get a 2xx is tried again after each of :data:`RETRY_DELAYS` with the same id (a
receiver can drop repeats), then given up with one log line. Deliveries live in the memory of
the replica that ended the batch: a restart of ``serve`` loses the ones still waiting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import heapq
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from jobs.errors import ConfigError

from .auth import ANONYMOUS, owner_of
from .records import ApiStatus

log = logging.getLogger("aivvm_batch.serve.webhooks")

EVENT_TYPES = {
    ApiStatus.COMPLETED: "batch.completed",
    ApiStatus.FAILED: "batch.failed",
    ApiStatus.EXPIRED: "batch.expired",
    ApiStatus.CANCELLED: "batch.cancelled",
}
# seconds before each further try, as Standard Webhooks' own schedule begins (5 s, 5 min, 30 min,
# 2 h, 5 h); the last try comes about 8 hours after the event
RETRY_DELAYS: tuple[float, ...] = (5, 300, 1800, 7200, 18000)
SECRET_PREFIX = "whsec_"
TIMEOUT = (5.0, 10.0)
# how long a stopping serve waits for a try under way (the thread is a daemon: it goes with serve)
STOP_SECONDS = 2.0


@dataclass(frozen=True)
class Hook:
    """Where one owner's events go, and the key they are signed with (the secret's bytes)."""

    url: str
    key: bytes


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    batch_id: str
    created_at: int

    def body(self) -> bytes:
        return json.dumps({"id": self.id, "object": "event", "created_at": self.created_at,
                           "type": self.type, "data": {"id": self.batch_id}},
                          separators=(",", ":")).encode()


def batch_event(batch_id: str, status: ApiStatus, now: float) -> Event | None:
    """The event for a batch that ended in ``status`` (None for a status that is not an end)."""
    kind = EVENT_TYPES.get(status)
    if kind is None:
        return None
    return Event(id="evt_" + secrets.token_hex(12), type=kind, batch_id=batch_id, created_at=int(now))


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_``-prefixed base64 secret (:class:`ConfigError` if it is not one)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("a webhook secret must be base64 (with or without the whsec_ prefix)") from exc
    if len(key) < 16:
        raise ConfigError("a webhook secret must hold at least 16 bytes")
    return key


def signed_headers(event: Event, body: bytes, key: bytes, now: float) -> dict[str, str]:
    """The Standard Webhooks headers of one try (the timestamp, and so the signature, is the try's)."""
    timestamp = str(int(now))
    digest = hmac.new(key, f"{event.id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {"content-type": "application/json", "webhook-id": event.id, "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


def parse_hooks(lines: Iterable[str], source: str) -> dict[str, Hook]:
    """Hooks by owner, from lines ``API_KEY URL SECRET`` (``-`` for the key of a server without keys).

    Blank lines and ``#`` comments are skipped; a malformed line is a :class:`ConfigError` naming
    its place (never its key).
    """
    hooks: dict[str, Hook] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source}, line {number}"
        if len(parts) != 3:
            raise ConfigError(f"{where}: expected 'API_KEY URL SECRET', three words")
        key, url, secret = parts
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise ConfigError(f"{where}: the URL must be http:// or https:// with a host")
        try:
            hook = Hook(url=url, key=secret_key(secret))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        hooks[ANONYMOUS if key == "-" else owner_of(key)] = hook
    return hooks


def load_hooks(file: Path | None) -> dict[str, Hook]:
    if file is None:
        return {}
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the webhooks file {file}: {exc}") from exc
    return parse_hooks(text.splitlines(), str(file))


Post = Callable[[str, bytes, Mapping[str, str]], int]


def post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    """One try: the status code (redirects are not followed: a 3xx is a failed try)."""
    with requests.post(url, data=body, headers=dict(headers), timeout=TIMEOUT, allow_redirects=False,
                       stream=True) as response:
        return response.status_code


@dataclass(order=True, frozen=True)
class _Due:
    at: float
    tries: int
    owner: str
    event: Event


class Webhooks:
    """Sends each owner's batch events to its hook, on a thread of its own, trying again on failure."""

    def __init__(self, hooks: Mapping[str, Hook], *, delays: Sequence[float] = RETRY_DELAYS,
                 send: Post = post, clock: Callable[[], float] = time.time) -> None:
        self.hooks = dict(hooks)
        self.delays = tuple(delays)
        self.send = send
        self.clock = clock
        self._due: list[_Due] = []
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def batch_ended(self, owner: str, batch_id: str, status: ApiStatus) -> None:
        """Queue the event of a batch that reached ``status``, if its owner has a hook."""
        if owner not in self.hooks:
            return
        event = batch_event(batch_id, status, self.clock())
        if event is None:
            return
        with self._changed:
            heapq.heappush(self._due, _Due(self.clock(), 0, owner, event))
            self._changed.notify()
        if self._thread is None:
            self.start()

    def start(self) -> None:
        with self._changed:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="serve-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout=STOP_SECONDS)

    def pending(self) -> int:
        with self._changed:
            return len(self._due)

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._stopping and (not self._due or self._due[0].at > self.clock()):
                    wait = self._due[0].at - self.clock() if self._due else None
                    self._changed.wait(wait)
                if self._stopping:
                    return
                due = heapq.heappop(self._due)
            self._try(due)

    def _try(self, due: _Due) -> None:
        hook = self.hooks[due.owner]
        body = due.event.body()
        headers = signed_headers(due.event, body, hook.key, self.clock())
        try:
            status = self.send(hook.url, body, headers)
            failure = None if 200 <= status < 300 else f"HTTP {status}"
        except Exception as exc:  # a receiver is foreign: whatever it does, the thread goes on
            failure = type(exc).__name__
        if failure is None:
            log.info("webhook %s (%s of %s) delivered", due.event.id, due.event.type, due.event.batch_id)
            return
        if due.tries >= len(self.delays):
            log.warning("webhook %s (%s of %s) given up after %d tries: %s", due.event.id, due.event.type,
                        due.event.batch_id, due.tries + 1, failure)
            return
        with self._changed:
            heapq.heappush(self._due, _Due(self.clock() + self.delays[due.tries], due.tries + 1, due.owner,
                                           due.event))
