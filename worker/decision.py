"""What happens to one item after an attempt: pure decisions, no I/O.

:func:`decide` turns an attempt's outcome into a final result to record (:func:`to_result`)
or a run again (with the reason to log, the error to count and the batch pause a 429 asks
for); :class:`ItemState` is what a retry message carries between runs. :mod:`worker.item`
carries the decisions out on the event loop.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, replace
from typing import Any

from celery.utils.time import get_exponential_backoff_interval

from jobs.answers import answer_of
from jobs.config import Settings
from jobs.endpoints import Endpoint
from jobs.records import ItemError, ItemRequest, ItemResult, Status, Usage

from .attempt import Attempt
from .errors import IncompleteReply, ProviderHTTPError, SchemaMismatch
from .tokens import usage

ERROR_TEXT_LIMIT = 160
# workers that must have seen the provider down for an item before its retries count as usual
MAX_DOWN_SEEN = 3
# 429s an item waits out before they count as attempts (a provider that keeps refusing ends it
# all the same)
MAX_RATE_WAITS = 200
# such a wait is stretched by up to this share, so that the refused do not come back at once
RATE_WAIT_JITTER = 0.2
# an item handed on waits this long on the queue (its worker, taking it back, does not spin on it)
ELSEWHERE_SECONDS = 1.0
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Done:
    """The item's end for this message: recorded (its status), or found done, cancelled or gone."""

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
class ItemState:
    """Where an item stands between runs: what a retry message carries for it."""

    attempt: int = 1
    # epoch seconds before which no request for it may start (a backoff, a Retry-After)
    not_before: float = 0.0
    spent: Spent = Spent()
    # attempts so far whose reply was cut mid-stream (their own, smaller retry budget)
    cuts: int = 0
    # attempts so far whose reply did not follow the request's JSON schema (their own budget)
    mismatches: int = 0
    # the workers that could not reach the provider for it (each hands it to another once)
    down: tuple[str, ...] = ()
    # 429s waited out (not attempts: see MAX_RATE_WAITS)
    waits: int = 0

    def to_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"attempt": self.attempt, "not_before": self.not_before,
                                  "spent": self.spent.to_list(), "cuts": self.cuts}
        if self.mismatches:
            kwargs["mismatches"] = self.mismatches
        if self.down:
            kwargs["down"] = list(self.down)
        if self.waits:
            kwargs["waits"] = self.waits
        return kwargs

    @classmethod
    def from_kwargs(cls, attempt: int = 1, not_before: float = 0.0, spent: list[int] | None = None,
                    cuts: int = 0, mismatches: int = 0, down: list[str] | None = None, waits: int = 0) -> ItemState:
        return cls(int(attempt), float(not_before), Spent.from_list(spent), int(cuts), int(mismatches),
                   tuple(str(node) for node in down or ()), int(waits))


@dataclass(frozen=True)
class RunAgain:
    """Run the item again in ``state`` (not before ``state.not_before``); ``elsewhere``: as a
    message on the queue, for any worker (this one cannot reach the provider)."""

    state: ItemState
    reason: str = ""
    elsewhere: bool = False


@dataclass(frozen=True)
class Decision:
    """What to do after an attempt: record ``result``, or run ``again``; count ``error``;
    pause the batch and the scope for ``pause`` seconds (a 429's Retry-After)."""

    result: ItemResult | None = None
    again: RunAgain | None = None
    error: str | None = None
    pause: float | None = None


def backoff(attempt_number: int, settings: Settings, retry_after: float | None) -> float:
    """Exponential backoff with jitter, never shorter than the server's Retry-After."""
    # Celery annotates factor and maximum as int; without jitter it computes with any number
    ceiling = get_exponential_backoff_interval(
        factor=settings.backoff_base, retries=attempt_number - 1,  # type: ignore[arg-type]
        maximum=settings.backoff_cap, full_jitter=False,  # type: ignore[arg-type]
    )
    return max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)


def decide(request: ItemRequest, outcome: Attempt, state: ItemState, settings: Settings,
           now: float) -> Decision:
    """Retry a transient failure within its budget (cuts have their own), else record the result."""
    error = outcome.error
    text = error_text(error.kind, str(error)) if error is not None else None
    pause = None
    if isinstance(error, ProviderHTTPError) and error.status == 429 and error.retry_after:
        pause = error.retry_after
    cut = error is not None and error.kind == IncompleteReply.kind  # also a fallback's combined error
    refused = isinstance(error, ProviderHTTPError) and error.status == 429 and outcome.transient
    wait = (pause if pause is not None else backoff(state.waits + 1, settings, None)) if refused else 0.0
    if refused and wait <= settings.backoff_cap and state.waits < MAX_RATE_WAITS:
        # rate limited: a wait (the provider's, else a backoff of its own), not a failed attempt; a
        # wait longer than the backoff's cap (a quota spent for the day) counts as one
        delay = wait * random.uniform(1.0, 1.0 + RATE_WAIT_JITTER)
        again = replace(state, not_before=now + delay, waits=state.waits + 1)
        return Decision(again=RunAgain(again, f"rate limited: again in {delay:.1f} s"), error=text, pause=pause)
    if isinstance(error, SchemaMismatch) and state.mismatches < settings.schema_retries:
        again = replace(state, attempt=state.attempt + 1, not_before=now,
                        spent=_spent_after(state.spent, request, outcome), mismatches=state.mismatches + 1)
        return Decision(again=RunAgain(again, f"asked again: {text}"), error=text)
    if outcome.transient and state.attempt <= settings.max_retries \
            and not (cut and state.cuts + 1 > settings.max_cut_retries):
        assert error is not None
        delay = backoff(state.attempt, settings, error.retry_after)
        again = ItemState(state.attempt + 1, now + delay, _spent_after(state.spent, request, outcome),
                          state.cuts + cut, state.mismatches, state.down, state.waits)
        return Decision(again=RunAgain(again, f"retry in {delay:.1f} s: {text}"), error=text, pause=pause)
    # attempts as the provider saw them: the 429s waited out too
    result = _with_spent(to_result(request, outcome, state.attempt + state.waits), state.spent)
    return Decision(result=result, error=text, pause=pause)


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


def given_up(request: ItemRequest, state: ItemState) -> ItemResult:
    """The result of an item whose runs kept failing in an unexpected way (a bug, not the provider)."""
    return ItemResult(id=request.id, line=request.line, status=Status.FAILED, model=request.model,
                      output="", attempts=state.attempt - 1, metadata=request.metadata,
                      error=ItemError("internal_error", f"the item's run failed {state.attempt - 1} times "
                                                        "in the worker (see its log)"))


def error_text(kind: str, message: str) -> str:
    """``"<kind>: <message>"`` without per-item noise (byte counts, quoted data), so equal causes group;
    a lone surrogate (no UTF-8 carries it: not to Redis, not to a log) becomes U+FFFD."""
    message = _LONE_SURROGATE.sub("\ufffd", message)
    kind = _LONE_SURROGATE.sub("\ufffd", kind)
    message = re.sub(r"\b\d+ (bytes? read|more expected)", r"N \1", message)
    message = re.sub(r": b?(['\"]).*$", "", message)
    return shortened(f"{kind}: {message}", ERROR_TEXT_LIMIT)


def shortened(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters at a word's end, with an ellipsis (never mid-word)."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


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


def hand_elsewhere(outcome: Attempt | None, state: ItemState, node: str, peers: int, now: float) -> RunAgain | None:
    """An item worker ``node`` cannot reach the provider for (its call failed before any answer,
    or, ``outcome`` None, its breaker is open), while ``peers`` workers live: hand it to the queue,
    for a worker that has not seen the provider down (this attempt not counted). Once every live
    worker (at most :data:`MAX_DOWN_SEEN`) saw it down, None: its retries run, and count, as usual."""
    if outcome is not None and (outcome.error is None or not outcome.error.unreachable):
        return None
    seen = {*state.down, node}
    if peers < 2 or len(seen) >= min(peers, MAX_DOWN_SEEN):
        return None
    again = replace(state, down=tuple(sorted(seen)), not_before=now + ELSEWHERE_SECONDS)
    why = f" ({outcome.error})" if outcome is not None else ""
    return RunAgain(again, f"handed to another worker: this one cannot reach the provider{why}", elsewhere=True)
