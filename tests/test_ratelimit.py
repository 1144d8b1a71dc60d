"""The shared rate limiter against a real Redis (the rate it keeps is measured by `make bench`)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
import redis

from jobs import keys
from worker.errors import RateLimited
from worker.ratelimit import RateLimiter

pytestmark = pytest.mark.integration


def scope() -> str:
    return f"test|{uuid.uuid4().hex}"


async def inline(call: Callable[[], float]) -> float:
    """Each Redis call of the limiter made where it is asked (the runtime makes it off the loop)."""
    return call()


def acquire(limiter: RateLimiter, name: str, *, rpm: float = 0, tpm: float = 0, tokens: int = 0) -> float:
    """Wait for a slot of ``name`` (the seconds waited), or raise RateLimited."""
    return asyncio.run(limiter.acquire_async(name, inline, rpm=rpm, tpm=tpm, tokens=tokens))


def test_calls_are_given_successive_slots(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, max_wait=10.0)
    name = scope()
    script = limiter._acquire
    waits = [int(script(keys=keys.rate_keys(name), args=[200.0, 0.0, 0, 10000])) for _ in range(5)]
    # each reservation is one interval (200 ms) after the previous one
    assert waits[0] == 0
    for before, after in zip(waits, waits[1:]):
        assert 150 <= after - before <= 200


def test_a_slot_too_far_away_is_refused_without_being_reserved(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, max_wait=0.5)
    name = scope()
    assert acquire(limiter, name, rpm=60) == 0
    with pytest.raises(RateLimited) as refused:
        acquire(limiter, name, rpm=60)
    assert 0.5 < refused.value.delay <= 1.0
    with pytest.raises(RateLimited) as again:
        acquire(limiter, name, rpm=60)
    assert again.value.delay <= refused.value.delay


def test_tokens_per_minute_charge_the_estimated_cost(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, max_wait=0.5)
    name = scope()
    assert acquire(limiter, name, tpm=6000, tokens=100) == 0  # 100 tokens = 1 s at 6000/min
    with pytest.raises(RateLimited) as refused:
        acquire(limiter, name, tpm=6000, tokens=1)
    assert 0.5 < refused.value.delay <= 1.0


def test_a_pause_holds_every_caller_even_without_limits(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, max_wait=0.1)
    other = RateLimiter(redis.Redis(connection_pool=redis_client.connection_pool), max_wait=0.1)
    name = scope()
    assert acquire(limiter, name) == 0
    limiter.pause(name, 3.0)
    with pytest.raises(RateLimited) as refused:
        acquire(other, name)
    assert 2.5 < refused.value.delay <= 3.0
    assert acquire(other, scope()) == 0


def test_a_pause_that_begins_while_waiting_for_a_slot_is_waited_out(redis_client: redis.Redis) -> None:
    import threading
    import time

    limiter = RateLimiter(redis_client, max_wait=5.0)
    name = scope()
    acquire(limiter, name, rpm=60)  # the next slot is one second away
    waited: list[float] = []
    waiter = threading.Thread(target=lambda: waited.append(acquire(limiter, name, rpm=60)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.3)
    limiter.pause(name, 2.0)  # a 429 elsewhere, while the waiter sleeps towards its slot
    waiter.join(10)
    assert time.monotonic() - started >= 2.2
    assert waited and waited[0] >= 1.9
