"""One item's run on the event loop: claimed, attempted, recorded or handed on.

:func:`run_item` runs the item until it ends for this message: each run claims it, takes a
slot for its provider call (:mod:`worker.attempt`), and carries out what
:mod:`worker.decision` decides: record the result, run again here, or hand it on to a retry
message. An item whose run fails in any unexpected way (a bug, a Redis error that is not a
wait) releases its claim and is handed on a few seconds later; it is never left claimed
with nothing to finish it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from jobs import clock
from jobs.claims import Claim, ClaimOutcome
from jobs.errors import StoreUnavailable
from jobs.recording import Recorded
from jobs.records import BatchOptions, ItemRequest, Status, Usage, budget_result, cancelled_result

from .attempt import Attempt
from .credit import Pace
from .decision import Done, ItemState, RunAgain, Spent, decide, given_up, hand_elsewhere
from .errors import Abandoned, ClaimLost, RateLimited
from .providers import PROVIDERS, AbstractProvider, CompletionCall
from .ratelimit import FULL_RETRY_SECONDS
from .runtime import Runtime
from .slots import Slots
from .storeio import best_effort, wait_for_store
from .tokens import request_tokens, usage

logger = logging.getLogger(__name__)
# the end of an item paid here but recorded by another worker (its claim had passed on)
LATE = "late"
# the end of an item whose stream this worker gave up, and that another worker has
ABANDONED = "abandoned"
# the end of an item whose claim lapsed while it waited, and that another worker has
LOST = "lost"
FENCED_RECHECK_SECONDS = 0.5
BUSY_RECHECK_SECONDS = 5.0
# an item whose run failed in an unexpected way is put back this long after
PUT_BACK_SECONDS = 2.0


@dataclass(frozen=True)
class Handoff:
    """The item's next run went out as a message of its own, held until ``countdown`` has passed."""

    countdown: float
    state: ItemState


async def run_item(rt: Runtime, batch_id: str, seq: int, state: ItemState,
                   freed: Callable[[], None] = lambda: None) -> Done | Handoff:
    where = f"batch {batch_id} item {seq}"
    while True:
        wait = state.not_before - clock.now()
        if wait > rt.settings.inline_wait:
            return await hand_on(rt, batch_id, seq, RunAgain(state))
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            step = await attempt_item(rt, batch_id, seq, state, freed)
        except Exception:
            logger.exception("%s: its run failed; it is put back in %.0f s", where, PUT_BACK_SECONDS)
            step = RunAgain(later(replace(state, attempt=state.attempt + 1), PUT_BACK_SECONDS))
            return await hand_on(rt, batch_id, seq, step)
        if isinstance(step, Done):
            return step
        if step.reason:
            logger.warning("%s: %s", where, step.reason)
        if step.elsewhere:
            return await hand_on(rt, batch_id, seq, step)
        state = step.state


async def hand_on(rt: Runtime, batch_id: str, seq: int, again: RunAgain) -> Handoff:
    """Publish the item's next run (a full or lost Redis is waited out: the message is kept)."""
    countdown = min(max(0.0, again.state.not_before - clock.now()), rt.settings.backoff_cap)
    await wait_for_store(f"batch {batch_id} item {seq}: publish its retry",
                         lambda: rt.io.publish_retry((batch_id, seq, again.state.to_kwargs(), countdown)))
    return Handoff(countdown, again.state)


class _Slot:
    """One of the process's slots (requests in flight), taken; given back as soon as the call has
    ended (how long it was held goes to ``pace``; ``freed`` is told)."""

    def __init__(self, slots: Slots, pace: Pace, freed: Callable[[], None]) -> None:
        self.slots = slots
        self.pace = pace
        self.freed = freed
        self.since = time.monotonic()
        self.held = True

    def free(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()
            self.pace.held(time.monotonic() - self.since)
            self.freed()


async def attempt_item(rt: Runtime, batch_id: str, seq: int, state: ItemState,
                       freed: Callable[[], None] = lambda: None) -> Done | RunAgain:
    """Claim the item, call its provider, and record the result (or say when to run it again)."""
    where = f"batch {batch_id} item {seq}"
    token = rt.claim_token()
    # claimed before a slot is free (the lease renewal keeps the claim meanwhile): a freed slot
    # starts its next call without a round trip to Redis first
    claim = await wait_for_store(f"{where}: claim", lambda: rt.io.claim((batch_id, seq, token)))
    if claim.outcome is not ClaimOutcome.CLAIMED or claim.request is None or claim.options is None:
        return await _not_claimed(rt, batch_id, seq, claim, state)
    rt.leases.hold(batch_id, seq, token)
    try:
        await rt.slots.acquire()
        slot = _Slot(rt.slots, rt.pace, freed)
        try:
            return await _claimed(rt, batch_id, seq, token, claim.request, claim.options, state, slot)
        finally:
            slot.free()
    except BaseException:
        # whatever went wrong, the claim must not keep others from the item
        await _release(rt, batch_id, seq, token)
        raise


async def _not_claimed(rt: Runtime, batch_id: str, seq: int, claim: Claim, state: ItemState) -> Done | RunAgain:
    if claim.outcome is ClaimOutcome.BUSY:
        return RunAgain(later(state, BUSY_RECHECK_SECONDS))
    if claim.outcome is ClaimOutcome.PAUSED:
        return RunAgain(later(state, claim.paused_seconds))
    if claim.outcome in (ClaimOutcome.CANCELLED, ClaimOutcome.BUDGET) and claim.request is not None:
        cancelled = (cancelled_result if claim.outcome is ClaimOutcome.CANCELLED else budget_result)(
            claim.request, state.attempt - 1 + state.waits)
        await wait_for_store(f"batch {batch_id} item {seq}: record",
                             lambda: rt.io.record((batch_id, seq, cancelled, "")))
    return Done(claim.outcome.value)


async def _claimed(rt: Runtime, batch_id: str, seq: int, token: str, request: ItemRequest,
                   options: BatchOptions, state: ItemState, slot: _Slot) -> Done | RunAgain:
    """Holding the claim and a slot: the call; the slot is given back before the result is written."""
    where = f"batch {batch_id} item {seq}"
    settings = rt.settings
    if state.attempt > settings.max_retries + 1:
        slot.free()
        result = given_up(request, state)
    else:
        held = (batch_id, seq, token)
        scope = _first_scope(options)
        elsewhere = _left_to_others(rt, scope, state, None)
        if elsewhere is not None:  # not said per item: the heartbeat says the provider is out of reach
            slot.free()
            await _release(rt, batch_id, seq, token)
            return replace(elsewhere, reason="")
        try:
            if rt.fenced():  # Redis out of reach for most of the lease: the item may not be ours
                await _until_reached(rt)
                await still_ours(rt, held)
            gate = _rate_gate(rt, request, options, held, scope)
            outcome = await rt.calls.attempt(request, options, gate, rt.guard(held))
        except RateLimited as refused:
            slot.free()
            await _release(rt, batch_id, seq, token)
            return RunAgain(later(state, refused.delay))
        except ClaimLost:
            slot.free()
            rt.leases.drop(batch_id, seq, token)
            logger.warning("%s: its claim lapsed while it waited for the rate limit (another worker may "
                           "hold it): not called here", where)
            if state.attempt > 1:  # its earlier attempts were paid all the same
                await _count_late(rt, held, state.spent, state.attempt - 1)
            return Done(LOST)
        slot.free()
        if isinstance(outcome.error, Abandoned):
            return await _abandoned(rt, held, request, state, outcome)
        elsewhere = _left_to_others(rt, outcome.scope or scope, state, outcome)
        if elsewhere is not None:
            await _release(rt, batch_id, seq, token)
            return elsewhere
        decision = decide(request, outcome, state, settings, clock.now())
        if decision.error is not None:
            text = decision.error
            await best_effort(f"{where}: error count", lambda: rt.io.note_error((batch_id, text)))
        if decision.pause:
            await _pause(rt, batch_id, outcome.scope, decision.pause)
        if decision.again is not None:
            if _may_have_lapsed(rt, outcome) and await _passed_on(rt, held):
                # an attempt long enough for its claim to lapse (this worker was frozen or cut off)
                # whose claim passed to another worker: that worker has the item; this run's calls
                # are counted on it
                await _count_late(rt, held, decision.again.state.spent, state.attempt)
                return Done(LATE)
            await _release(rt, batch_id, seq, token)
            return decision.again
        assert decision.result is not None
        result = decision.result
    final = result
    recorded = await wait_for_store(f"{where}: record the reply", lambda: rt.io.record((batch_id, seq, final, token)))
    rt.leases.drop(batch_id, seq, token)
    if recorded is Recorded.LATE:
        return Done(LATE)
    if options.cache and recorded is Recorded.RECORDED and final.status is Status.OK:
        await best_effort(f"{where}: keep the answer", lambda: rt.io.keep_answer((options, request, final)))
    return Done(final.status.value)


async def _release(rt: Runtime, batch_id: str, seq: int, token: str) -> None:
    rt.leases.drop(batch_id, seq, token)
    await best_effort(f"batch {batch_id} item {seq}: release", lambda: rt.io.release((batch_id, seq, token)))


async def _pause(rt: Runtime, batch_id: str, scope: str, seconds: float) -> None:
    """A 429 with Retry-After: no item of the batch, and no call on the scope, starts meanwhile."""
    where = f"batch {batch_id}: pause"
    await best_effort(where, lambda: rt.io.run(rt.store.pause, batch_id, seconds))
    try:
        await rt.io.run(rt.limiter.pause, scope, seconds)
    except (StoreUnavailable, OSError, ValueError) as exc:
        logger.info("%s of %s skipped: %s", where, scope, exc)


def _rate_gate(rt: Runtime, request: ItemRequest, options: BatchOptions,  # type: ignore[no-untyped-def]
               held: tuple[str, int, str], scope: str):
    """Before each provider call of this item: keep to the provider's pace (learned from its
    answers: :mod:`worker.provider_pace`) and the batch's ``--rpm``/``--tpm``, through the
    limiter every worker shares; then make sure the item's claim (``held``) is still this
    worker's: the wait may have outlasted it (a frozen or cut-off process), and another worker
    may have the item by now. None (no cost an item) when there is nothing to keep to: no budget,
    no ``--rpm``/``--tpm``, and the first provider (``scope``) answered without stating limits."""
    rpm = options.rpm or rt.settings.rpm
    tpm = options.tpm or rt.settings.tpm
    pace = rt.provider_pace
    budgeted = options.max_tokens_total is not None or options.max_requests is not None
    if not (budgeted or rpm or tpm or pace.watching(scope)):
        return None

    async def before_call(provider: type[AbstractProvider], call: CompletionCall) -> None:
        if budgeted and not await _may_spend(rt, held[0]):
            raise RateLimited(0.0)  # spent: its next claim records it cancelled (budget_exhausted)
        scope = provider.scope(call.base_url)
        await pace.first(scope)
        limits = pace.limits(scope, rpm, tpm)
        if not limits.any:
            return
        await rt.limiter.acquire_async(scope, rt.io.run, rpm=limits.rpm, tpm=limits.tpm,
                                       tokens=request_tokens(request) if limits.tpm else 0, burst=limits.burst)
        await still_ours(rt, held)

    return before_call


async def _may_spend(rt: Runtime, batch_id: str) -> bool:
    """Whether a call of a batch with a budget may start (a Redis away: not now)."""
    try:
        return await rt.io.run(rt.store.spend, batch_id)
    except StoreUnavailable as exc:
        raise RateLimited(FULL_RETRY_SECONDS) from exc


async def _until_reached(rt: Runtime) -> None:
    """Wait until the lease renewal reaches Redis again."""
    while rt.fenced():
        await asyncio.sleep(FENCED_RECHECK_SECONDS)


async def _abandoned(rt: Runtime, held: tuple[str, int, str], request: ItemRequest, state: ItemState,
                     outcome: Attempt) -> Done | RunAgain:
    """A stream given up while the item may have become another worker's: what it streamed was
    paid. Once Redis is in reach, an item still (or again) ours runs again with that counted in
    its usage; else the call is counted as late on the item (whoever records it) and it ends here."""
    batch_id, seq, token = held
    spent = state.spent.add(usage(request, outcome))
    await _until_reached(rt)
    if await _passed_on(rt, held):
        await _count_late(rt, held, spent, state.attempt)
        logger.warning("batch %s item %s: its stream was abandoned (%s) and the item passed to another worker; "
                       "the call is counted in its usage", batch_id, seq, outcome.error)
        return Done(ABANDONED)
    await _release(rt, batch_id, seq, token)
    return RunAgain(replace(state, attempt=state.attempt + 1, not_before=clock.now(), spent=spent),
                    f"its stream was abandoned ({outcome.error}); it runs again")


def _may_have_lapsed(rt: Runtime, outcome: Attempt) -> bool:
    """An attempt that reached the provider and lasted past a renewal: its claim may have lapsed
    meanwhile (a claim lapses only when its worker misses renewals, every third of the lease)."""
    reached = outcome.error is None or not outcome.error.unreachable
    return reached and outcome.latency_ms >= rt.settings.lease * 1000 / 3


async def _passed_on(rt: Runtime, held: tuple[str, int, str]) -> bool:
    """Whether the item's claim passed to another worker (or the item was recorded)."""
    try:
        await still_ours(rt, held)
    except ClaimLost:
        rt.leases.drop(*held)
        return True
    except RateLimited:  # paused or cancelled: still this run's to end
        pass
    return False


async def _count_late(rt: Runtime, held: tuple[str, int, str], spent: Spent, calls: int) -> None:
    """Count calls a run paid for an item another run records (once per claim token)."""
    batch_id, seq, token = held
    paid = Usage(spent.prompt_tokens, spent.completion_tokens, spent.estimated)
    await wait_for_store(f"batch {batch_id} item {seq}: count its paid calls",
                         lambda: rt.io.run(rt.store.count_late, batch_id, [(seq, paid, calls, token)]))


async def still_ours(rt: Runtime, held: tuple[str, int, str]) -> None:
    """Raise :class:`ClaimLost` unless the claim ``held`` is this worker's, extended; a claim that
    lapsed and that no one took is taken again (one round trip, coalesced with the others'). A
    batch paused or cancelled meanwhile raises :class:`RateLimited`: the item runs again later,
    and its next claim says what to do (wait, or record it cancelled)."""
    where = f"batch {held[0]} item {held[1]}"
    if await wait_for_store(f"{where}: check its claim", lambda: rt.io.keep(held)):
        return
    claim = await wait_for_store(f"{where}: claim it again", lambda: rt.io.claim(held))
    if claim.outcome is ClaimOutcome.CLAIMED:
        return
    if claim.outcome is ClaimOutcome.PAUSED:
        raise RateLimited(claim.paused_seconds)
    if claim.outcome in (ClaimOutcome.CANCELLED, ClaimOutcome.BUDGET):
        raise RateLimited(0.0)
    raise ClaimLost()


def _left_to_others(rt: Runtime, scope: str, state: ItemState, outcome: Attempt | None) -> RunAgain | None:
    """Before a call (``outcome`` None) or after it: whether this worker leaves the item to one that
    can reach the provider, keeping its breaker of ``scope`` up to date with what the call said."""
    now = time.monotonic()
    if outcome is None:
        if rt.peers < 2 or not rt.breaker.is_open(scope, now):
            return None
    elif outcome.error is not None and outcome.error.unreachable:
        rt.breaker.failed(scope, now)
    else:
        if outcome.scope:
            rt.breaker.answered(scope)
        return None
    return hand_elsewhere(outcome, state, rt.node, rt.peers, clock.now())


def _first_scope(options: BatchOptions) -> str:
    """The scope (provider at base URL) of a batch's first provider."""
    return PROVIDERS[options.providers()[0]].scope(options.base_url)


def later(state: ItemState, seconds: float) -> ItemState:
    """``state``, not to run again before ``seconds`` from now."""
    return replace(state, not_before=clock.now() + seconds)
