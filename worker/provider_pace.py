"""The pace a provider allows, learned from its answers, per base URL.

Every answer's rate-limit headers (:mod:`worker.providers.ratelimits`) say how many requests
and tokens a minute the provider admits; the worker then paces its calls through the shared
limiter (:mod:`worker.ratelimit`, one schedule in Redis for every worker), so that together
they send what the provider admits and no more. Every worker learns the same limits from its
own answers; the schedule they share is what divides them.

- Before the first answer of a base URL only a few calls go out (the others wait for it, at
  most a few seconds): a limit cannot be learned before anything was asked.
- A 429 all the same (the limit is shared with other clients, or counted otherwise) cuts the
  pace by 15%, at most once a second; each answer admitted brings it back up by 0.3% of the
  stated limit (additive increase, multiplicative decrease), never past what the headers state.
- What ``remaining`` says lets a burst of up to a second's worth of requests go at once.
- A user's ``--rpm``/``--tpm`` stay ceilings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .providers.exchange import Head
from .providers.ratelimits import RateHeaders

# calls let out on a base URL before its first answer
FIRST_CALLS = 4
# seconds the others wait for that answer at most
FIRST_ANSWER_WAIT = 3.0
CUT_FACTOR = 0.85
CUT_INTERVAL = 1.0
# each admitted answer raises the pace by this share of the stated limit: a cut is made good over
# some 50 answers, however slow the pace (a step by the second drew a 429 a second at 30/min)
STEP_SHARE = 0.003
# a 429 for tokens (our estimate of a request's tokens, length / 4, is the provider's count only
# roughly): the estimate is scaled up by this, at most once a second, up to MAX_TOKEN_SCALE; each
# admitted answer brings it back down by TOKEN_SCALE_EASE
TOKEN_SCALE_STEP = 1.1
MAX_TOKEN_SCALE = 4.0
TOKEN_SCALE_EASE = 0.0005
# a stated limit below this many a minute is not believed (1e-320 would make a call wait forever)
LOWEST_STATED = 1.0
LOWEST_SHARE = 0.05


@dataclass(frozen=True)
class PaceLimits:
    """What a call on a base URL must keep to: requests and tokens a minute (0: none), and the
    burst of requests that may go at once."""

    rpm: float = 0.0
    tpm: float = 0.0
    burst: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm)


@dataclass
class _Learned:
    stated_rpm: float = 0.0
    stated_tpm: float = 0.0
    share: float = 1.0  # of the stated limits, after 429s
    token_scale: float = 1.0  # how much more a request costs than its estimate, after 429s for tokens
    remaining: float | None = None
    cut_at: float = 0.0
    started: int = 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)


class ProviderPace:
    """Learned limits per base URL, for one worker process (its event loop's thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_url: dict[str, _Learned] = {}

    def _of(self, scope: str) -> _Learned:
        learned = self._by_url.get(scope)
        if learned is None:
            learned = self._by_url[scope] = _Learned()
        return learned

    def watching(self, scope: str) -> bool:
        """Whether calls on ``scope`` must go through :meth:`first` and :meth:`limits`: its first
        answer is still awaited, or it stated limits."""
        learned = self._by_url.get(scope)
        return learned is None or not learned.answered.is_set() or bool(learned.stated_rpm or learned.stated_tpm)

    async def first(self, scope: str) -> None:
        """Before a call: wait for the base URL's first answer if a few calls are out already."""
        learned = self._of(scope)
        if learned.answered.is_set():
            return
        if learned.started < FIRST_CALLS:
            learned.started += 1
            return
        try:
            await asyncio.wait_for(learned.answered.wait(), FIRST_ANSWER_WAIT)
        except asyncio.TimeoutError:
            learned.answered.set()  # no answer yet (a slow or unreachable server): go on without

    def heard(self, scope: str, head: Head) -> None:
        """An answer's head arrived (told by the HTTP pool)."""
        self.learn(scope, head.status, head.limits)

    def learn(self, scope: str, status: int, limits: RateHeaders | None) -> None:
        """Learn what an answer says: its limits, and whether it was refused."""
        learned = self._of(scope)
        learned.answered.set()
        if limits is not None:
            if (limits.requests.per_minute or 0) >= LOWEST_STATED:
                learned.stated_rpm = limits.requests.per_minute or 0.0
            if (limits.tokens.per_minute or 0) >= LOWEST_STATED:
                learned.stated_tpm = limits.tokens.per_minute or 0.0
            learned.remaining = limits.requests.remaining
        if status == 429:
            now = self.clock()
            if now - learned.cut_at >= CUT_INTERVAL:
                if _tokens_spent(limits) and learned.stated_tpm:
                    learned.token_scale = min(MAX_TOKEN_SCALE, learned.token_scale * TOKEN_SCALE_STEP)
                else:
                    learned.share = max(LOWEST_SHARE, learned.share * CUT_FACTOR)
                learned.cut_at = now
        elif 200 <= status < 300:
            learned.share = min(1.0, learned.share + STEP_SHARE)
            learned.token_scale = max(1.0, learned.token_scale - TOKEN_SCALE_EASE)

    def limits(self, scope: str, rpm: int = 0, tpm: int = 0) -> PaceLimits:
        """The limits a call must keep to: what was learned, under the user's ``rpm``/``tpm``."""
        learned = self._by_url.get(scope)
        if learned is None or not (learned.stated_rpm or learned.stated_tpm):
            return PaceLimits(rpm, tpm)
        paced_rpm = _lower(rpm, learned.stated_rpm * learned.share)
        paced_tpm = _lower(tpm, learned.stated_tpm * learned.share / learned.token_scale)
        burst = 0
        if learned.remaining and learned.share >= 1.0 and paced_rpm:
            burst = int(min(learned.remaining - 1, paced_rpm / 60))
        return PaceLimits(paced_rpm, paced_tpm, burst)

    def describe(self, scope: str) -> str | None:
        """``"pace 19.8/s, limited by the provider"`` once limits were learned, else ``None``."""
        limits = self.limits(scope)
        if not limits.rpm:
            return None
        return f"pace {limits.rpm / 60:.1f}/s, limited by the provider"

    def note(self) -> str:
        """What a heartbeat says (from another thread): the paces learned."""
        said = (self.describe(scope) for scope in list(self._by_url))
        return "; ".join(sorted({text for text in said if text}))


def _tokens_spent(limits: RateHeaders | None) -> bool:
    """A refusal for tokens: the tokens' limit is spent, the requests' is not."""
    if limits is None or limits.tokens.remaining is None or limits.tokens.remaining >= 1:
        return False
    return limits.requests.remaining is None or limits.requests.remaining >= 1


def _lower(ceiling: float, learned: float) -> float:
    if not learned:
        return ceiling
    return min(ceiling, learned) if ceiling else learned
