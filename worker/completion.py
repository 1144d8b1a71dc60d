"""Completing one request: stream from the batch's providers and join the chunks.

No Celery and no Redis here. Fallback follows gpt4free's RetryProvider: the next
provider is tried only if the previous one failed before its first chunk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs.config import Settings
from jobs.records import ItemError, ItemRequest, ItemResult, Status, Usage

from .errors import ProviderError, ProviderHTTPError, RateLimited
from .providers import PROVIDERS, AbstractProvider, CompletionCall, StreamEnd
from .providers.credentials import choose_key, redact, worker_keys

logger = logging.getLogger(__name__)
BeforeCall = Callable[[type[AbstractProvider], CompletionCall], None]


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
            settings: Settings, before_call: BeforeCall | None = None) -> Attempt:
    """Run one attempt, falling back along ``provider_names`` while nothing has streamed.

    ``base_url`` is the first provider's; the others take theirs from the environment.
    """
    started = time.monotonic()
    errors: list[tuple[str, ProviderError]] = []
    result: Attempt | None = None
    for position, name in enumerate(provider_names):
        provider = PROVIDERS[name]
        result = _attempt_one(provider, request, base_url if position == 0 else None,
                              settings, started, before_call)
        if result.error is None or result.text:
            return result
        errors.append((name, result.error))
    assert result is not None
    if len(errors) > 1:
        return _combined(result, errors)
    return result


def _attempt_one(provider: type[AbstractProvider], request: ItemRequest, base_url: str | None,
                 settings: Settings, started: float, before_call: BeforeCall | None) -> Attempt:
    model = request.model or ""
    chunks: list[str] = []
    first_chunk_ms = None
    end = None
    scope = provider.name
    error: ProviderError | None = None
    try:
        model = provider.check_model(model)
        key = choose_key(provider, provider.base_url(base_url), settings.allowed_base_urls)
        call = CompletionCall(
            model=model,
            messages=tuple(m.to_dict() for m in request.messages),
            system_message=request.system_message,
            temperature=request.temperature,
            params=dict(request.params),
            base_url=base_url,
            api_key=key.key,
            key_withheld=key.withheld,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            deadline=started + settings.item_deadline,
            max_reply_bytes=settings.max_reply_bytes,
            max_decompression_ratio=settings.max_decompression_ratio,
        )
        scope = provider.scope(call.base_url)
        if before_call is not None:
            before_call(provider, call)
        for chunk in provider.stream(call):
            if isinstance(chunk, StreamEnd):
                end = chunk
                continue
            if first_chunk_ms is None:
                first_chunk_ms = _ms_since(started)
            chunks.append(chunk)
    except ProviderError as exc:
        error = _without_keys(exc)
    except RateLimited:
        raise
    except Exception as exc:  # a bug must end the item as failed, not lose it
        logger.exception("internal error while streaming from %s", provider.name)
        error = ProviderError(f"internal error: {type(exc).__name__}: {exc}")
        error.kind = "internal_error"
    return Attempt(provider.name, model or request.model or "", "".join(chunks), error,
                   _ms_since(started), first_chunk_ms, end, scope)


def _without_keys(error: ProviderError) -> ProviderError:
    """The error, its message cleared of any key of this worker (the last guard before Redis)."""
    message = str(error)
    cleaned = redact(message, worker_keys(PROVIDERS.values()))
    if cleaned != message:
        error.args = (cleaned,)
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
    if outcome.error is not None:
        status = outcome.error.status if isinstance(outcome.error, ProviderHTTPError) else None
        error = ItemError(outcome.error.kind, str(outcome.error), http_status=status)
    return ItemResult(
        id=request.id,
        line=request.line,
        status=Status.OK if error is None else Status.FAILED,
        model=outcome.model or request.model,
        output=outcome.text,
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
    )


def usage(request: ItemRequest, outcome: Attempt) -> Usage:
    """Token counts as the server reported them, else an estimate (about 4 characters a token)."""
    end = outcome.end
    if end is not None and end.prompt_tokens is not None and end.completion_tokens is not None:
        return Usage(end.prompt_tokens, end.completion_tokens, estimated=False)
    return Usage(estimate_tokens(prompt_text(request)), estimate_tokens(outcome.text), estimated=True)


def prompt_text(request: ItemRequest) -> str:
    return (request.system_message or "") + "".join(m.content for m in request.messages)


def request_tokens(request: ItemRequest) -> int:
    """What a request may cost in tokens, for a tokens-per-minute limit: prompt plus max_tokens."""
    max_tokens = dict(request.params).get("max_tokens")
    return estimate_tokens(prompt_text(request)) + (max_tokens if isinstance(max_tokens, int) else 0)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
