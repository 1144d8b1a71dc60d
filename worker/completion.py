"""Completing one request: stream from the batch's providers and join the chunks.

No Celery and no Redis here. Fallback follows gpt4free's RetryProvider: the next
provider is tried only if the previous one failed before its first chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from dataclasses import replace
from typing import Any

from jobs.answers import answer_of
from jobs.config import Settings
from jobs.endpoints import Endpoint, cannot_carry, text_of
from jobs.records import ItemError, ItemRequest, ItemResult, Status, Usage

from .errors import Abandoned, CallNotStarted, ProviderError, ProviderHTTPError, SchemaMismatch, UnsupportedRequest
from .providers import PROVIDERS, AbstractProvider, CompletionCall, StreamEnd
from .providers.aio import AsyncHTTP
from .providers.call import Item
from .providers.credentials import REDACTED, KeyChooser, answer_secrets, choose_key, clear_keys, redact, worker_keys
from .schema import response_schema, violation

logger = logging.getLogger(__name__)
BeforeCall = Callable[[type[AbstractProvider], CompletionCall], None]
# called at each piece of a stream: raises Abandoned to give the stream up (see worker.runtime)
Guard = Callable[[], None]
AsyncBeforeCall = Callable[[type[AbstractProvider], CompletionCall], Awaitable[None]]


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


def attempt(request: ItemRequest, provider_names: tuple[str, ...], base_url: str | None,
            settings: Settings, before_call: BeforeCall | None = None, guard: Guard | None = None) -> Attempt:
    """Run one attempt, falling back along ``provider_names`` while nothing has streamed.

    ``base_url`` is the first provider's; the others take theirs from the environment.
    """
    started = time.monotonic()
    fallback = _Fallback(request)
    for position, name in enumerate(provider_names):
        provider = PROVIDERS[name]
        if fallback.skips(name):
            continue
        streamed = _Streamed(provider, request, started, guard=guard)
        try:
            call = streamed.prepare(base_url if position == 0 else None, settings)
            if before_call is not None:
                before_call(provider, call)
            for item in provider.stream(call):
                streamed.add(item)
        except CallNotStarted:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted in fail(); a bug must not lose the item
            streamed.fail(exc)
        if fallback.done(streamed.result()):
            break
    return checked(request, fallback.outcome())


async def attempt_async(request: ItemRequest, provider_names: tuple[str, ...], base_url: str | None,
                        settings: Settings, http: AsyncHTTP, before_call: AsyncBeforeCall | None = None,
                        keys: KeyChooser | None = None, guard: Guard | None = None) -> Attempt:
    """:func:`attempt` on the event loop: the same fallback, errors and results, through ``http``
    (``keys``: the worker's key choices, kept for the life of its process)."""
    started = time.monotonic()
    fallback = _Fallback(request)
    for position, name in enumerate(provider_names):
        provider = PROVIDERS[name]
        if fallback.skips(name):
            continue
        streamed = _Streamed(provider, request, started, guard=guard)
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
    problem = violation(texts, schema)
    if problem is None:
        return outcome
    return replace(outcome, error=SchemaMismatch(problem))


@dataclass
class _Streamed:
    """What one provider's stream produced so far: pure bookkeeping, shared by both paths."""

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
            secrets = answer_secrets(worker_keys(PROVIDERS.values()))
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
            self.error = _without_keys(exc)
            return
        logger.error("internal error while streaming from %s", self.provider.name, exc_info=exc)
        self.error = ProviderError(f"internal error: {type(exc).__name__}: {exc}")
        self.error.kind = "internal_error"

    def result(self) -> Attempt:
        text = "".join(self.chunks)
        for secret in answer_secrets(worker_keys(PROVIDERS.values())):
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


def _without_keys(error: ProviderError) -> ProviderError:
    """The error, its message cleared of any key of this worker (the last guard before Redis)."""
    keys = worker_keys(PROVIDERS.values())
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


def to_result(request: ItemRequest, outcome: Attempt, attempts: int) -> ItemResult:
    """The final result of an item from its last attempt."""
    error = None
    if isinstance(outcome.error, ProviderHTTPError):
        failure = outcome.error
        error = ItemError(failure.kind, str(failure), http_status=failure.status, body=failure.body,
                          request_id=failure.request_id)
    elif outcome.error is not None:
        error = ItemError(outcome.error.kind, str(outcome.error))
    end = outcome.end
    answer = answer_of(request.endpoint, end.body, end.request_id) if end is not None else None
    return ItemResult(
        id=request.id,
        line=request.line,
        status=Status.OK if error is None else Status.FAILED,
        model=outcome.model or request.model,
        output=None if request.endpoint is Endpoint.EMBEDDINGS and error is None else outcome.text,
        error=error,
        attempts=attempts,
        latency_ms=outcome.latency_ms,
        first_chunk_ms=outcome.first_chunk_ms,
        usage=usage(request, outcome) if error is None or outcome.text else None,
        finish_reason=(outcome.end.finish_reason if outcome.end else None)
        or ("stop" if error is None else None),
        provider=outcome.provider,
        created=int(time.time()),
        metadata=request.metadata,
        answer=answer,
    )


def usage(request: ItemRequest, outcome: Attempt) -> Usage:
    """Token counts as the server reported them, else an estimate (about 4 characters a token)."""
    end = outcome.end
    if end is not None and end.prompt_tokens is not None and end.completion_tokens is not None:
        return Usage(end.prompt_tokens, end.completion_tokens, estimated=False)
    return Usage(estimate_tokens(prompt_text(request)), estimate_tokens(outcome.text), estimated=True)


def prompt_text(request: ItemRequest) -> str:
    """The text a request sends (for token estimates): its messages' text, or its input."""
    if request.endpoint is not Endpoint.CHAT:
        params = dict(request.params)
        return _texts(params.get("input", params.get("prompt")))
    return (request.system_message or "") + "".join(
        m.content if type(m.content) is str else text_of(m.content) for m in request.messages)


def _texts(value: Any) -> str:
    """The strings inside an ``input`` or ``prompt`` (a string, strings, messages, parts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_texts(v) for v in value)
    if isinstance(value, dict):
        return _texts(value.get("content", value.get("text")))
    return ""


def request_tokens(request: ItemRequest) -> int:
    """What a request may cost in tokens, for a tokens-per-minute limit: prompt plus max_tokens."""
    params = dict(request.params)
    max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
    return estimate_tokens(prompt_text(request)) + (max_tokens if isinstance(max_tokens, int) else 0)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
