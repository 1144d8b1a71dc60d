"""Working on one queued item: claim it, attempt it, and record its result or retry.

This is what a Celery task runs; it knows nothing of Celery. It returns what
should happen next, and the task translates that into Celery's terms.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

from celery.utils.time import get_exponential_backoff_interval

from jobs.config import Settings
from jobs.records import BatchOptions, ItemError, ItemRequest, ItemResult, Status
from jobs.store import BatchStore, ClaimOutcome

from .completion import BeforeCall, attempt, request_tokens, to_result
from .errors import ProviderHTTPError, RateLimited
from .providers import AbstractProvider, CompletionCall
from .ratelimit import RateLimiter

CLAIM_SLACK_SECONDS = 5.0
BUSY_RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Done:
    status: str


@dataclass(frozen=True)
class RunAgain:
    """Run the item again after ``countdown`` seconds, not before ``not_before`` (epoch)."""

    countdown: float
    attempt: int
    not_before: float


def backoff(attempt_number: int, settings: Settings, retry_after: float | None) -> float:
    """Exponential backoff with jitter, never shorter than the server's Retry-After."""
    ceiling = get_exponential_backoff_interval(
        factor=settings.backoff_base, retries=attempt_number - 1,
        maximum=settings.backoff_cap, full_jitter=False,
    )
    return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


def rate_gate(limiter: RateLimiter, request: ItemRequest, options: BatchOptions,
              settings: Settings) -> BeforeCall:
    """Wait for the shared rate limit before each provider call of this item."""
    rpm = options.rpm or settings.rpm
    tpm = options.tpm or settings.tpm
    tokens = request_tokens(request)

    def before_call(provider: type[AbstractProvider], call: CompletionCall) -> None:
        limiter.acquire(provider.scope(call), rpm=rpm, tpm=tpm, tokens=tokens)

    return before_call


def process(store: BatchStore, settings: Settings, batch_id: str, seq: int, attempt_number: int,
            not_before: float = 0.0, limiter: RateLimiter | None = None) -> Done | RunAgain:
    wait = not_before - time.time()
    if wait > 0:
        return RunAgain(min(wait, settings.backoff_cap), attempt_number, not_before)
    request, options = store.request(batch_id, seq)
    if options is None:
        return Done("gone")
    token = uuid.uuid4().hex
    claim = store.claim(batch_id, seq, token, settings.item_deadline + CLAIM_SLACK_SECONDS)
    if claim is ClaimOutcome.BUSY:
        return RunAgain(BUSY_RECHECK_SECONDS, attempt_number, 0.0)
    if claim is not ClaimOutcome.CLAIMED or request is None:
        if claim is ClaimOutcome.CANCELLED and request is not None:
            store.record(batch_id, seq, ItemResult(
                id=request.id, line=request.line, status=Status.CANCELLED, model=request.model,
                attempts=attempt_number - 1,
                error=ItemError("cancelled", "the batch was cancelled before this item started"),
            ))
        return Done(claim.value)
    before_call = rate_gate(limiter, request, options, settings) if limiter is not None else None
    try:
        outcome = attempt(request, options.providers(), options.base_url, settings, before_call)
    except RateLimited as limited:
        store.release(batch_id, seq, token)
        return RunAgain(min(limited.delay, settings.backoff_cap), attempt_number,
                        time.time() + limited.delay)
    except BaseException:
        store.release(batch_id, seq, token)
        raise
    error = outcome.error
    if limiter is not None and isinstance(error, ProviderHTTPError) and error.status == 429 \
            and error.retry_after:
        limiter.pause(outcome.scope, error.retry_after)
    if outcome.transient and attempt_number <= settings.max_retries:
        store.release(batch_id, seq, token)
        assert outcome.error is not None
        delay = backoff(attempt_number, settings, outcome.error.retry_after)
        return RunAgain(min(delay, settings.backoff_cap), attempt_number + 1, time.time() + delay)
    result = to_result(request, outcome, attempt_number)
    store.record(batch_id, seq, result)
    return Done(result.status.value)
