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
from jobs.records import BatchOptions, ItemRequest, cancelled_result
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
        limiter.acquire(provider.scope(call.base_url), rpm=rpm, tpm=tpm, tokens=tokens)

    return before_call


def process(store: BatchStore, settings: Settings, batch_id: str, seq: int, attempt_number: int,
            not_before: float = 0.0, limiter: RateLimiter | None = None) -> Done | RunAgain:
    wait = not_before - time.time()
    if wait > 0:
        return RunAgain(min(wait, settings.backoff_cap), attempt_number, not_before)
    token = uuid.uuid4().hex
    claim = store.claim(batch_id, seq, token, settings.item_deadline + CLAIM_SLACK_SECONDS)
    if claim.outcome is ClaimOutcome.BUSY:
        return RunAgain(BUSY_RECHECK_SECONDS, attempt_number, 0.0)
    if claim.outcome is ClaimOutcome.PAUSED:
        return RunAgain(min(claim.paused_seconds, settings.backoff_cap), attempt_number,
                        time.time() + claim.paused_seconds)
    request, options = claim.request, claim.options
    if claim.outcome is not ClaimOutcome.CLAIMED or request is None or options is None:
        if claim.outcome is ClaimOutcome.CANCELLED and request is not None:
            store.record(batch_id, seq, cancelled_result(request, attempt_number - 1))
        return Done(claim.outcome.value)
    limited = bool(options.rpm or options.tpm or settings.rpm or settings.tpm)
    before_call = rate_gate(limiter, request, options, settings) if limiter and limited else None
    try:
        outcome = attempt(request, options.providers(), options.base_url, settings, before_call)
    except RateLimited as refused:
        store.release(batch_id, seq, token)
        return RunAgain(min(refused.delay, settings.backoff_cap), attempt_number,
                        time.time() + refused.delay)
    except BaseException:
        store.release(batch_id, seq, token)
        raise
    error = outcome.error
    if isinstance(error, ProviderHTTPError) and error.status == 429 and error.retry_after:
        store.pause(batch_id, error.retry_after)
        if limiter is not None:
            limiter.pause(outcome.scope, error.retry_after)
    if outcome.transient and attempt_number <= settings.max_retries:
        store.release(batch_id, seq, token)
        assert error is not None
        delay = backoff(attempt_number, settings, error.retry_after)
        return RunAgain(min(delay, settings.backoff_cap), attempt_number + 1, time.time() + delay)
    result = to_result(request, outcome, attempt_number)
    store.record(batch_id, seq, result)
    return Done(result.status.value)
