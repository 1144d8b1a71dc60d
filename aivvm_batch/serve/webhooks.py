"""Webhooks at a batch's end: OpenAI's event objects, signed as the Standard Webhooks spec says.

The server's owner names, per API key, the URL its events go to and the secret they are signed
with (``--webhooks-file``); a tenant cannot name a host, so no tenant can point ``serve`` at a
host of its choice. An event (``batch.completed``, ``batch.failed``, ``batch.expired``,
``batch.cancelled``) is ``{"id", "object": "event", "created_at", "type", "data": {"id"}}`` as
OpenAI sends it, with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
(``v1,`` base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret's bytes). A delivery that
does not get a 2xx is tried again after each of :data:`RETRY_DELAYS` with the same id (a
receiver can drop repeats), then given up with one log line. Deliveries live in the memory of
the replica that ended the batch: a restart of ``serve`` loses the ones still waiting. Each try has
:data:`TRY_SECONDS` in all, and many run at once: a receiver that hangs delays only its own events.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

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
TRY_SECONDS = 15.0  # a try in all, from the connection to the answer's status
AT_ONCE = 16  # tries under way together
# how long a stopping serve waits for its webhooks' loop (a daemon thread: it goes with serve)
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
        try:
            split = urlsplit(url)
            usable = split.scheme in ("http", "https") and bool(split.hostname) and split.port != 0
        except ValueError:  # a bracket left open, a port that is no port
            usable = False
        if not usable:
            raise ConfigError(f"{where}: the URL must be http:// or https:// with a host (and a port from 1 "
                              "to 65535, if any)")
        try:
            hook = Hook(url=url, key=secret_key(secret))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        owner = ANONYMOUS if key == "-" else owner_of(key)
        if owner in hooks:
            raise ConfigError(f"{where}: a second line for the same key (one URL a key)")
        hooks[owner] = hook
    return hooks


def load_hooks(file: Path | None) -> dict[str, Hook]:
    if file is None:
        return {}
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the webhooks file {file}: {exc}") from exc
    return parse_hooks(text.splitlines(), str(file))


class Webhooks:
    """Sends each owner's batch events to its hook, trying again on failure.

    The tries run on an event loop of their own thread, at most :data:`AT_ONCE` together, each
    given :data:`TRY_SECONDS` in all: a receiver that answers a byte at a time holds one try for
    that long, never another owner's event.
    """

    def __init__(self, hooks: Mapping[str, Hook], *, delays: Sequence[float] = RETRY_DELAYS,
                 try_seconds: float = TRY_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.hooks = dict(hooks)
        self.delays = tuple(delays)
        self.try_seconds = try_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tries: set[asyncio.Future[None]] = set()
        self._thread: threading.Thread | None = None

    def batch_ended(self, owner: str, batch_id: str, status: ApiStatus) -> None:
        """Send the event of a batch that reached ``status``, if its owner has a hook."""
        event = batch_event(batch_id, status, self.clock()) if owner in self.hooks else None
        if event is None:
            return
        loop = self._running_loop()
        with self._lock:
            self._pending += 1
        loop.call_soon_threadsafe(self._start_try, owner, event, 0)

    def pending(self) -> int:
        """Events not yet delivered nor given up."""
        with self._lock:
            return self._pending

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STOP_SECONDS)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="serve-webhooks", daemon=True)
                self._thread.start()
            return self._loop

    def _start_try(self, owner: str, event: Event, tries: int) -> None:
        task = asyncio.ensure_future(self._try(owner, event, tries))
        self._tries.add(task)  # a task nothing refers to may be collected before it ends
        task.add_done_callback(self._tries.discard)

    async def _try(self, owner: str, event: Event, tries: int) -> None:
        hook = self.hooks[owner]
        body = event.body()
        if self._slots is None:  # made on the loop's own thread, which it belongs to
            self._slots = asyncio.Semaphore(AT_ONCE)
        try:
            async with self._slots:
                status = await asyncio.wait_for(_post(hook.url, body, signed_headers(event, body, hook.key,
                                                                                     self.clock())),
                                                self.try_seconds)
            failure = None if 200 <= status < 300 else f"HTTP {status}"
        except asyncio.TimeoutError:
            failure = f"no answer within {self.try_seconds:g} s"
        except Exception as exc:  # a receiver is foreign: whatever it does, the deliveries go on
            failure = type(exc).__name__
        if failure is None:
            log.info("webhook %s (%s of %s) delivered", event.id, event.type, event.batch_id)
        elif tries >= len(self.delays):
            log.warning("webhook %s (%s of %s) given up after %d tries: %s", event.id, event.type,
                        event.batch_id, tries + 1, failure)
        else:
            asyncio.get_running_loop().call_later(self.delays[tries], self._start_try, owner, event, tries + 1)
            return
        with self._lock:
            self._pending -= 1


async def _post(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    """One try: the status code (redirects are not followed: a 3xx is a failed try)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=dict(headers), allow_redirects=False) as response:
            return response.status
