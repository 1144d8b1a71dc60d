"""Working on one queued item: claim it, attempt it, and record its result or retry.

This is what a Celery task runs; it knows nothing of Celery. It returns what
should happen next, and the task translates that into Celery's terms.

A full Redis (maxmemory, noeviction) or one that is away is waited out in place
(:func:`wait_for_store`): the claim is retried before any provider call, and a paid
reply is kept in memory, with its claim kept alive, until it can be recorded.
"""

from __future__ import annotations

import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from celery.utils.time import get_exponential_backoff_interval

from jobs.config import Settings
from jobs.errors import StoreFull, StoreUnavailable
from jobs.records import BatchOptions, ItemRequest, ItemResult, Usage, cancelled_result
from jobs.store import BatchStore, Claim, ClaimOutcome

from .completion import Attempt, BeforeCall, attempt, request_tokens, to_result, usage
from .errors import IncompleteReply, ProviderHTTPError, RateLimited
from .providers import AbstractProvider, CompletionCall
from .ratelimit import RateLimiter

CLAIM_SLACK_SECONDS = 5.0
BUSY_RECHECK_SECONDS = 5.0
STORE_WAIT_FIRST = 0.2
STORE_WAIT_CAP = 5.0
STORE_LOG_EVERY = 30.0
ERROR_TEXT_LIMIT = 160
logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Done:
    status: str


@dataclass(frozen=True)
class Spent:
    """Tokens of the earlier, failed attempts of an item that produced text (each was paid)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    def add(self, more: Usage) -> Spent:
        return Spent(self.prompt_tokens + more.prompt_tokens,
                     self.completion_tokens + more.completion_tokens,
                     self.estimated or more.estimated)

    def to_list(self) -> list[int]:
        return [self.prompt_tokens, self.completion_tokens, int(self.estimated)]

    @classmethod
    def from_list(cls, value: list[int] | None) -> Spent:
        if not value:
            return cls()
        return cls(int(value[0]), int(value[1]), bool(value[2]))


@dataclass(frozen=True)
class RunAgain:
    """Run the item again after ``countdown`` seconds, not before ``not_before`` (epoch)."""

    countdown: float
    attempt: int
    not_before: float
    spent: Spent = Spent()
    # attempts so far whose reply was cut mid-stream (their own, smaller retry budget)
    cuts: int = 0


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


def wait_for_store(what: str, call: Callable[[], T], *, keepalive: Callable[[], object] | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()`` until Redis takes it: a full Redis or one that is away is waited out.

    Backoff doubles from 0.2 s to 5 s; a warning says why every 30 s. ``keepalive``
    runs between tries (to keep the item's claim while its reply waits).
    """
    delay, waited, logged = STORE_WAIT_FIRST, 0.0, -STORE_LOG_EVERY
    while True:
        try:
            return call()
        except StoreUnavailable as exc:
            if waited - logged >= STORE_LOG_EVERY:
                reason = "Redis is full (maxmemory)" if isinstance(exc, StoreFull) else str(exc)
                logger.warning("%s: %s; waiting for it (%.0f s so far)", what, reason, waited)
                logged = waited
        sleep(delay)
        waited += delay
        delay = min(delay * 2, STORE_WAIT_CAP)
        if keepalive is not None:
            try:
                keepalive()
            except StoreUnavailable:
                pass


def best_effort(what: str, call: Callable[[], object]) -> None:
    """A write that may be skipped in a full or lost Redis (counters, pauses)."""
    try:
        call()
    except StoreUnavailable as exc:
        logger.info("%s skipped: %s", what, exc)


def error_text(kind: str, message: str) -> str:
    """``"<kind>: <message>"`` without per-item noise (byte counts, quoted data), so equal causes group."""
    message = re.sub(r"\b\d+ (bytes? read|more expected)", r"N \1", message)
    message = re.sub(r": b?(['\"]).*$", "", message)
    return f"{kind}: {message}"[:ERROR_TEXT_LIMIT]


def process(store: BatchStore, settings: Settings, batch_id: str, seq: int, attempt_number: int,
            not_before: float = 0.0, limiter: RateLimiter | None = None, spent: Spent = Spent(),
            cuts: int = 0) -> Done | RunAgain:
    wait = not_before - time.time()
    if wait > 0:
        return RunAgain(min(wait, settings.backoff_cap), attempt_number, not_before, spent, cuts)
    token = uuid.uuid4().hex
    ttl = settings.item_deadline + CLAIM_SLACK_SECONDS
    where = f"batch {batch_id} item {seq}"
    claim = wait_for_store(f"{where}: claim", lambda: store.claim(batch_id, seq, token, ttl))
    if claim.outcome is ClaimOutcome.BUSY:
        return RunAgain(BUSY_RECHECK_SECONDS, attempt_number, 0.0, spent, cuts)
    if claim.outcome is ClaimOutcome.PAUSED:
        return RunAgain(min(claim.paused_seconds, settings.backoff_cap), attempt_number,
                        time.time() + claim.paused_seconds, spent, cuts)
    request, options = claim.request, claim.options
    if claim.outcome is not ClaimOutcome.CLAIMED or request is None or options is None:
        if claim.outcome is ClaimOutcome.CANCELLED and request is not None:
            cancelled = cancelled_result(request, attempt_number - 1)
            wait_for_store(f"{where}: record", lambda: store.record(batch_id, seq, cancelled))
        return Done(claim.outcome.value)
    try:
        return _attempt_claimed(store, settings, batch_id, seq, token, claim, attempt_number,
                                limiter, spent, cuts)
    except BaseException:
        # whatever went wrong, the claim must not keep others from the item for its whole TTL
        best_effort(f"{where}: release", lambda: store.release(batch_id, seq, token))
        raise


def _attempt_claimed(store: BatchStore, settings: Settings, batch_id: str, seq: int, token: str,
                     claim: Claim, attempt_number: int, limiter: RateLimiter | None, spent: Spent,
                     cuts: int) -> Done | RunAgain:
    request, options = claim.request, claim.options
    assert request is not None and options is not None
    where = f"batch {batch_id} item {seq}"
    limited = bool(options.rpm or options.tpm or settings.rpm or settings.tpm)
    before_call = rate_gate(limiter, request, options, settings) if limiter and limited else None
    try:
        outcome = attempt(request, options.providers(), options.base_url, settings, before_call)
    except RateLimited as refused:
        best_effort(f"{where}: release", lambda: store.release(batch_id, seq, token))
        return RunAgain(min(refused.delay, settings.backoff_cap), attempt_number,
                        time.time() + refused.delay, spent, cuts)
    error = outcome.error
    if error is not None:
        text = error_text(error.kind, str(error))
        best_effort(f"{where}: error count", lambda: store.note_attempt_error(batch_id, text))
    if isinstance(error, ProviderHTTPError) and error.status == 429 and error.retry_after:
        retry_after = error.retry_after
        best_effort(f"{where}: pause", lambda: store.pause(batch_id, retry_after))
        if limiter is not None:
            best_effort(f"{where}: pause", lambda: limiter.pause(outcome.scope, retry_after))
    cut = error is not None and error.kind == IncompleteReply.kind  # also a fallback's combined error
    if outcome.transient and attempt_number <= settings.max_retries \
            and not (cut and cuts + 1 > settings.max_cut_retries):
        assert error is not None
        best_effort(f"{where}: release", lambda: store.release(batch_id, seq, token))
        delay = backoff(attempt_number, settings, error.retry_after)
        logger.warning("%s: retry in %.1f s: %s", where, delay, error_text(error.kind, str(error)))
        return RunAgain(min(delay, settings.backoff_cap), attempt_number + 1, time.time() + delay,
                        _spent_after(spent, request, outcome), cuts + cut)
    result = _with_spent(to_result(request, outcome, attempt_number), spent)

    def keepalive() -> None:
        store.keep_claim(batch_id, seq, token, settings.item_deadline + CLAIM_SLACK_SECONDS)

    wait_for_store(f"{where}: record the reply", lambda: store.record(batch_id, seq, result),
                   keepalive=keepalive)
    return Done(result.status.value)


def _spent_after(spent: Spent, request: ItemRequest, outcome: Attempt) -> Spent:
    """Add a failed attempt's tokens if it was paid: it streamed text, or the server counted it."""
    end = outcome.end
    reported = end is not None and end.completion_tokens is not None
    if not outcome.text and not reported:
        return spent
    return spent.add(usage(request, outcome))


def _with_spent(result: ItemResult, spent: Spent) -> ItemResult:
    if spent == Spent():
        return result
    last = result.usage or Usage(0, 0, estimated=False)
    return replace(result, usage=Usage(last.prompt_tokens + spent.prompt_tokens,
                                       last.completion_tokens + spent.completion_tokens,
                                       last.estimated or spent.estimated))
