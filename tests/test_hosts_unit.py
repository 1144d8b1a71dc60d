"""Many hosts, the pure parts: one clock (Redis's), the lease's view of Redis, the sweep's log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from aivvm_batch.serve import page
from jobs import clock, keys
from jobs.clock import SharedClock, offset_of
from jobs.config import Settings
from jobs.heartbeats import WorkerSeen
from jobs.reconcile import renew_messages, restore_stale_messages
from tests.private_server_helpers import private_redis
from worker.runtime import FENCE_SHARE, WARN_SHARE, Contact
from worker.sweeper import Outage, say_slots


def test_the_offset_is_redis_s_time_at_the_round_trip_s_midpoint() -> None:
    assert offset_of(1000, 500_000, 954.0, 956.0) == pytest.approx(45.5)
    assert offset_of(1000, 0, 1045.0, 1045.2) == pytest.approx(-45.1)


class SkewedRedis:
    """A client whose TIME is ``ahead`` seconds past this host's clock."""

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def time(self) -> tuple[int, int]:
        now = time.time() + self.ahead
        return int(now), int((now % 1) * 1_000_000)


def test_a_shared_clock_reads_redis_s_time_whatever_this_host_s_says(caplog: pytest.LogCaptureFixture) -> None:
    shared = SharedClock()
    shared.sync(SkewedRedis(45.0))
    assert shared.now() - time.time() == pytest.approx(45.0, abs=0.05)
    assert "45.0 s behind Redis's" in caplog.text
    shared.sync(SkewedRedis(-45.0))
    assert shared.now() - time.time() == pytest.approx(-45.0, abs=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with private_redis(tmp_path_factory.mktemp("clock-redis")) as embedded:
        yield redis.Redis.from_url(embedded.url)


@pytest.mark.integration
@pytest.mark.parametrize("skew", [-45.0, 45.0])
def test_a_live_worker_on_a_skewed_host_is_never_taken_for_dead(server: redis.Redis, skew: float,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's host ``skew`` seconds off renews its messages at Redis's time: the sweep (on
    a host with the right time, lease 30 s) leaves them alone; without the shared clock, a host
    45 s behind would have its live messages put back at every sweep."""
    server.flushall()
    server.hset(keys.UNACKED, "tag-1", '[{"headers": {}, "properties": {"delivery_info": {}}}, "", ""]')
    server.zadd(keys.UNACKED_INDEX, {"tag-1": 0})
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)  # this host's clock is off
    clock.sync(server)
    renew_messages(server, ["tag-1"])
    monkeypatch.setattr(time, "time", real_time)  # the sweeping host's is right
    clock.sync(server)
    assert restore_stale_messages(server, 30.0) == 0
    assert server.zscore(keys.UNACKED_INDEX, "tag-1") == pytest.approx(real_time(), abs=2)


def test_contact_fences_at_most_of_a_lease_and_says_so_once_each_way() -> None:
    contact = Contact(lease=30.0, now=100.0)
    assert not contact.fenced(100.0 + FENCE_SHARE * 30 - 0.1)
    assert contact.fenced(100.0 + FENCE_SHARE * 30 + 0.1)
    assert contact.failed(105.0, "one renewal lost on a lossy link") is None
    assert contact.reached(106.0, lapsed=0) is None  # nothing was said: nothing to take back
    first = contact.failed(106.0 + WARN_SHARE * 30 + 0.1, "Timeout reading from socket")
    assert first is not None and "out of reach" in first and "Timeout" in first
    assert contact.failed(130.0, "again") is None
    back = contact.reached(148.0, lapsed=3)
    assert back == "Redis is reachable again after 42 s (2 renewals failed meanwhile; 3 claims had lapsed)"
    assert not contact.fenced(148.0)
    assert contact.reached(150.0, lapsed=0) is None


def test_the_sweep_says_once_that_it_fails_and_once_that_it_works_again() -> None:
    outage = Outage()
    assert outage.passed() is None
    said: list[Any] = [outage.failed("Connection refused") for _ in range(25)]
    assert said[0] is not None and "Connection refused" in said[0] and said[1:] == [None] * 24
    assert outage.passed() == "sweep for lost messages works again (25 sweeps failed meanwhile)"


class SlotsStore:
    """What say_slots writes: the slots of the workers seen lately, and for how long."""

    def __init__(self) -> None:
        self.said: tuple[int, float] | None = None

    def set_slots(self, total: int, ttl: float) -> None:
        self.said = (total, ttl)


def test_a_peer_is_seen_lately_within_a_few_rounds_as_long_as_they_take() -> None:
    settings = Settings(sweep_interval=1.0)
    seen = [WorkerSeen("w1", 0.3, slots=64), WorkerSeen("w2", 4.1, slots=64)]
    store = SlotsStore()
    assert say_slots(store, seen, settings) == 1  # type: ignore[arg-type]
    assert store.said == (64, 3.0)
    # rounds of 4.2 s (a dozen round trips on a link of 200 ms each way): the peer is alive
    assert say_slots(store, seen, settings, period=4.2) == 2  # type: ignore[arg-type]
    assert store.said == (128, pytest.approx(12.6))


def test_the_windows_count_the_workers_reserve_beyond_their_slots() -> None:
    seen = [WorkerSeen("w1", 0.3, slots=64), WorkerSeen("w2", 0.5, slots=64)]
    store = SlotsStore()
    say_slots(store, seen, Settings(sweep_interval=1.0), reserve=62 / 64)  # type: ignore[arg-type]
    assert store.said is not None and store.said[0] == 252
    say_slots(store, seen, Settings(sweep_interval=1.0))  # type: ignore[arg-type]
    assert store.said is not None and store.said[0] == 128


def test_a_breaker_opens_after_failures_in_a_row_probes_and_closes_at_an_answer() -> None:
    from worker.breaker import OPEN_AFTER, PROBE_EVERY, Breaker

    breaker = Breaker()
    for n in range(OPEN_AFTER):
        assert not breaker.is_open("openai|http://p/v1", 100.0 + n)
        breaker.failed("openai|http://p/v1", 100.0 + n)
    assert breaker.is_open("openai|http://p/v1", 102.0)
    assert not breaker.is_open("aivvm|http://p", 102.0)  # per scope
    assert not breaker.is_open("openai|http://p/v1", 101.0 + PROBE_EVERY + 1)  # one call probes
    assert breaker.is_open("openai|http://p/v1", 101.0 + PROBE_EVERY + 2)
    assert breaker.note(160.0) == "provider unreachable for 60 s (openai|http://p/v1)"
    breaker.answered("openai|http://p/v1")
    assert not breaker.is_open("openai|http://p/v1", 170.0) and breaker.note(170.0) == ""


def test_an_item_goes_round_workers_that_cannot_reach_the_provider_until_every_one_has_tried() -> None:
    from worker.attempt import Attempt
    from worker.errors import ConnectTimeout, ProviderHTTPError
    from worker.decision import ItemState, hand_elsewhere

    down = Attempt("openai", "m", "", ConnectTimeout("connect timeout after 10s"), 10_000, None)
    state = ItemState(attempt=2)
    first = hand_elsewhere(down, state, "w1", peers=2, now=50.0)
    assert first is not None and first.elsewhere and first.state.down == ("w1",)
    assert first.state.attempt == 2 and first.state.not_before > 50.0  # not counted; not spun on
    assert hand_elsewhere(down, first.state, "w2", peers=2, now=51.0) is None  # both saw it: retry as usual
    assert hand_elsewhere(down, state, "w1", peers=1, now=50.0) is None  # alone: as before
    refused = Attempt("openai", "m", "", ProviderHTTPError(503, "busy"), 5, None)
    assert hand_elsewhere(refused, state, "w1", peers=2, now=50.0) is None  # it answered
    assert ItemState.from_kwargs(**first.state.to_kwargs()) == first.state


def test_the_page_counts_workers_without_naming_their_hosts() -> None:
    seen = [WorkerSeen("w1@host-a", 2.0, 16), WorkerSeen("w2@host-b", 5.0, 0, "provider unreachable for 60 s"),
            WorkerSeen("w3@host-c", 300.0)]
    said = page.workers(seen)
    assert said == {"live": 2, "holding": 16, "missing": 1, "notes": ["provider unreachable for 60 s"]}
    assert "host" not in str(said)


def test_the_sweeper_starts_after_the_runtime_whatever_the_hash_seed() -> None:
    """Its first heartbeat says the worker's slots only if the runtime is built by then. Celery
    orders the steps no step requires of another by a sort whose ties follow string hashes: with
    2 of 8 seeds the sweeper came first, said no slots, and the batches' windows stayed at their
    least (128 items) until the next sweep, 10 s later (`run --concurrency 1024`, 1 s replies)."""
    code = ("from worker import tasks\n"
            "w = tasks.app.WorkController(pool_cls='threads', concurrency=2, without_gossip=True,"
            " without_mingle=True, without_heartbeat=True, quiet=True)\n"
            "names = [s.name for s in w.blueprint.order]\n"
            "print(names.index('worker.tasks.RuntimeStep') < names.index('worker.sweeper.Sweeper'))")
    for seed in range(8):
        shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONHASHSEED": str(seed)})
        assert shown.stdout.strip() == "True", (seed, shown.stdout, shown.stderr[-500:])
