"""One attempt at an item: its request streamed from the batch's providers, in order.

No Celery and no Redis here. Fallback follows gpt4free's RetryProvider: the next
provider is tried only if the previous one failed before its first chunk. Every attempt
of a process goes through its :class:`ProviderCalls`: one :class:`~.providers.aio.AsyncHTTP`
pool on the event loop, and the worker's key choices. What is decided after an attempt is
:mod:`worker.decision`'s; what it cost in tokens, :mod:`worker.tokens`'.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from jobs.config import Settings
from jobs.endpoints import Endpoint, cannot_carry
from jobs.records import BatchOptions, ItemRequest

from .errors import Abandoned, CallNotStarted, ProviderError, ProviderHTTPError, SchemaMismatch, UnsupportedRequest
from .providers import PROVIDERS, AbstractProvider, CompletionCall, StreamEnd
from .providers.aio import AsyncHTTP
from .providers.call import Item
from .providers.credentials import REDACTED, KeyChooser, WorkerKeys, choose_key, clear_keys, redact
from .providers.exchange import OnHead
from .response_format import response_schema

logger = logging.getLogger(__name__)
# called at each piece of a stream: raises Abandoned to give the stream up (see worker.runtime)
Guard = Callable[[], None]
# awaited before each provider call (a rate limit, a budget): may raise RateLimited or ClaimLost
BeforeCall = Callable[[type[AbstractProvider], CompletionCall], Awaitable[None]]


@dataclass(frozen=True)
class Attempt:
    """What one attempt at an item produced."""

    provider: str
    model: str
    text: str
    error: ProviderError | None
    latency_ms: int
    first_chunk_ms: int | None
    end: StreamEnd | None = None
    scope: str = ""

    @property
    def transient(self) -> bool:
        return self.error is not None and self.error.transient


class ProviderCalls:
    """Attempts at items, at most ``concurrency`` at once (the runtime's slots bound them), through
    one HTTP pool made at the first attempt (on the event loop) and the worker's key choices."""

    def __init__(self, settings: Settings, concurrency: int, on_head: OnHead | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.on_head = on_head
        self._http: AsyncHTTP | None = None
        self._keys = KeyChooser(settings.allowed_base_urls)
        # read at the first attempt: a worker's environment stays as it started (as for the key choices)
        self._held: WorkerKeys | None = None

    def attempt(self, request: ItemRequest, options: BatchOptions,
                before_call: BeforeCall | None, guard: Guard | None = None) -> Awaitable[Attempt]:
        """The attempt to await (the coroutine of the call itself, not one wrapping it: one
        frame less at each of its wake-ups); ``guard`` may give its stream up (:class:`Abandoned`)."""
        if self._http is None:
            self._http = AsyncHTTP(max_connections=self.concurrency, on_head=self.on_head)
            self._held = WorkerKeys.from_env(PROVIDERS.values())
        return attempt(request, options.providers(), options.base_url, self.settings, self._http, before_call,
                       self._keys, guard, self._held)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


async def attempt(request: ItemRequest, provider_names: tuple[str, ...], base_url: str | None,
                  settings: Settings, http: AsyncHTTP, before_call: BeforeCall | None = None,
                  keys: KeyChooser | None = None, guard: Guard | None = None,
                  held: WorkerKeys | None = None) -> Attempt:
    """Run one attempt through ``http``, falling back along ``provider_names`` while nothing has
    streamed (``keys``: the worker's key choices, kept for the life of its process; ``held``: the
    keys it holds, to clear from what servers say; read from the environment if not given).

    ``base_url`` is the first provider's; the others take theirs from the environment.
    """
    started = time.monotonic()
    fallback = _Fallback(request)
    for position, name in enumerate(provider_names):
        provider = PROVIDERS[name]
        if fallback.skips(name):
            continue
        streamed = _Streamed(provider, request, started, guard=guard, held=held)
        try:
            call = streamed.prepare(base_url if position == 0 else None, settings, keys)
            if before_call is not None:
                await before_call(provider, call)
            await provider.acomplete(call, http, streamed.add)
        except CallNotStarted:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted in fail(); a bug must not lose the item
            streamed.fail(exc)
        if fallback.done(streamed.result()):
            break
    outcome = fallback.outcome()
    if outcome.error is None and request.endpoint is Endpoint.CHAT and request.params \
            and response_schema(dict(request.params)) is not None:
        # off the loop: a reply of megabytes takes its time to validate, and other items stream on
        return await asyncio.to_thread(checked, request, outcome)
    return outcome


def checked(request: ItemRequest, outcome: Attempt) -> Attempt:
    """An answer that should follow a JSON schema and does not is a ``schema_mismatch``."""
    if outcome.error is not None or request.endpoint is not Endpoint.CHAT or not request.params:
        return outcome
    schema = response_schema(dict(request.params))
    if schema is None:
        return outcome
    body = outcome.end.body if outcome.end is not None else None
    choices = (body or {}).get("choices")
    texts: list[str | None] = [outcome.text]
    if isinstance(choices, list) and len(choices) > 1:
        texts = [(c.get("message") or {}).get("content") for c in choices if isinstance(c, dict)]
    from .schema import violation  # jsonschema: for the requests that name a schema only

    problem = violation(texts, schema)
    if problem is None:
        return outcome
    return replace(outcome, error=SchemaMismatch(problem))


@dataclass
class _Streamed:
    """What one provider's stream produced so far: pure bookkeeping."""

    provider: type[AbstractProvider]
    request: ItemRequest
    started: float
    model: str = ""
    chunks: list[str] = field(default_factory=list)
    first_chunk_ms: int | None = None
    end: StreamEnd | None = None
    scope: str = ""
    error: ProviderError | None = None
    guard: Guard | None = None
    held: WorkerKeys | None = None

    @property
    def secrets(self) -> WorkerKeys:
        """The worker's keys: those given, else read from the environment once."""
        if self.held is None:
            self.held = WorkerKeys.from_env(PROVIDERS.values())
        return self.held

    def prepare(self, base_url: str | None, settings: Settings, keys: KeyChooser | None = None) -> CompletionCall:
        provider, request = self.provider, self.request
        self.model = request.model or ""
        self.scope = provider.name
        if request.endpoint is Endpoint.CHAT:  # a chat model by default; other endpoints name their own
            self.model = provider.check_model(self.model)
        target = provider.base_url(base_url)
        key = keys(provider, target) if keys is not None else choose_key(provider, target,
                                                                         settings.allowed_base_urls)
        call = CompletionCall(
            model=self.model,
            messages=tuple(m.to_dict() for m in request.messages),
            system_message=request.system_message,
            temperature=request.temperature,
            params=dict(request.params),
            endpoint=request.endpoint,
            base_url=base_url,
            api_key=key.key,
            key_withheld=key.withheld,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            deadline=self.started + settings.item_deadline,
            max_reply_bytes=settings.max_reply_bytes,
            max_decompression_ratio=settings.max_decompression_ratio,
        )
        self.scope = provider.scope(call.base_url)
        return call

    def add(self, item: Item) -> None:
        if isinstance(item, StreamEnd):
            secrets = self.secrets.cleared
            if item.body is not None or item.request_id:  # the last guard before Redis: no key, nothing too deep
                item = replace(item, body=clear_keys(item.body, secrets),
                               request_id=clear_keys(item.request_id, secrets))
            self.end = item
            return
        if self.guard is not None:  # a whole reply is kept: where it goes is the record's to decide
            self.guard()
        if self.first_chunk_ms is None:
            self.first_chunk_ms = _ms_since(self.started)
        self.chunks.append(item)

    def fail(self, exc: Exception) -> None:
        if isinstance(exc, ProviderError):
            self.error = _without_keys(exc, self.secrets.held)
            return
        logger.error("internal error while streaming from %s", self.provider.name, exc_info=exc)
        self.error = ProviderError(f"internal error: {type(exc).__name__}: {exc}")
        self.error.kind = "internal_error"

    def result(self) -> Attempt:
        text = "".join(self.chunks)
        for secret in self.secrets.cleared:
            text = text.replace(secret, REDACTED)
        return Attempt(self.provider.name, self.model or self.request.model or "", text,
                       self.error, _ms_since(self.started), self.first_chunk_ms, self.end, self.scope)


class _Fallback:
    """gpt4free's RetryProvider: the next provider only while nothing has streamed; a provider
    that cannot send the request as asked is passed over."""

    def __init__(self, request: ItemRequest) -> None:
        self.request = request
        self.errors: list[tuple[str, ProviderError]] = []
        self.last: Attempt | None = None
        self.skipped: str | None = None  # why the last provider passed over was

    def skips(self, provider: str) -> bool:
        request = self.request
        reason = cannot_carry(provider, request.endpoint, (m.to_dict() for m in request.messages),
                              request.params)
        if reason is not None:
            self.skipped = reason.reason
        return reason is not None

    def done(self, result: Attempt) -> bool:
        """Whether ``result`` is the attempt's (else the next provider is tried)."""
        self.last = result
        if result.error is None or result.text or isinstance(result.error, Abandoned):
            self.errors = []
            return True
        self.errors.append((result.provider, result.error))
        return False

    def outcome(self) -> Attempt:
        if self.last is None and self.skipped is not None:
            return Attempt("", self.request.model or "", "", UnsupportedRequest(self.skipped), 0, None)
        assert self.last is not None, "no provider named"
        if len(self.errors) > 1:  # every provider failed before its first chunk
            return _combined(self.last, self.errors)
        return self.last


def _without_keys(error: ProviderError, keys: tuple[str, ...]) -> ProviderError:
    """The error, its message cleared of any key of this worker (the last guard before Redis)."""
    message = str(error)
    cleaned = redact(message, keys)
    if cleaned != message:
        error.args = (cleaned,)
    error.kind = redact(str(error.kind), keys)[:100]  # a server names the kind (type, code) too
    if isinstance(error, ProviderHTTPError) and error.request_id:
        error.request_id = redact(error.request_id, keys)
    return error


def _combined(last: Attempt, errors: list[tuple[str, ProviderError]]) -> Attempt:
    message = "; ".join(f"{name}: {exc}" for name, exc in errors)
    combined = ProviderError(f"every provider failed: {message}")
    combined.kind = errors[0][1].kind
    combined.transient = any(exc.transient for _, exc in errors)
    combined.retry_after = max((exc.retry_after or 0 for _, exc in errors), default=0) or None
    return Attempt(last.provider, last.model, "", combined, last.latency_ms, None, None, last.scope)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
