"""How a worker takes and acknowledges messages on a slow link: the reserve beyond its slots,
the take of several messages in one round trip, acknowledgements sent together (real Redis)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from jobs import scripts
from worker.acks import Acknowledger
from worker.credit import Credit, Pace, reserve


def test_no_reserve_on_a_local_network_and_what_ends_during_a_take_on_a_slow_one() -> None:
    assert reserve(64, 0.0003, 3.0) == 0
    # a take and its claim are five round trips of 0.4 s: 2 s, while 64 slots of 3 s end 42.7 items
    assert reserve(64, 0.4, 3.0) == 43
    assert reserve(64, 0.4, 0.1) == 64  # never more than the slots
    assert reserve(0, 0.4, 3.0) == 0 and reserve(64, 0.4, 0.0) == 0


def test_the_reserve_lets_a_process_hold_more_than_its_slots() -> None:
    credit = Credit(slots=16)
    credit.took("a", "task-a", 8)
    credit.took("b", "task-b", 8)
    assert not credit.can_take(["a", "b"]) and credit.room(["a", "b"]) == 0
    credit.ahead = 8
    assert credit.can_take(["a", "b"]) and credit.room(["a", "b"]) == 1
    credit.ended("task-a")  # an item's call ended: its slot is free for the next message
    assert credit.held(["a", "b"]) == 15


def test_a_reserve_smaller_than_a_message_still_takes_one() -> None:
    """64 slots running two chunks of 32 items take the third before any of theirs ends with a
    reserve of 30 (else the slots idle for the take every wave)."""
    credit = Credit(slots=64)
    credit.took("a", "task-a", 32)
    credit.took("b", "task-b", 32)
    assert not credit.can_take(["a", "b"]) and credit.room(["a", "b"]) == 0
    credit.ahead = 30
    assert credit.can_take(["a", "b"]) and credit.room(["a", "b"]) == 1
    credit.ahead = 33  # a message and one item of the next
    assert credit.room(["a", "b"]) == 2


def test_the_pace_is_a_smoothed_mean_of_slot_times() -> None:
    pace = Pace()
    pace.held(3.0)
    assert pace.slot_seconds == 3.0
    pace.held(1.0)
    assert pace.slot_seconds == pytest.approx(2.8)


def kombu_message(tag: str, queue: str) -> dict[str, Any]:
    return {"body": "W10=", "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {"id": tag}, "properties": {"delivery_tag": tag, "body_encoding": "base64",
                                                   "delivery_info": {"exchange": "", "routing_key": queue},
                                                   "priority": 0, "delivery_mode": 2}}


@pytest.fixture
def names(redis_client: redis.Redis) -> Iterator[dict[str, str]]:
    """Keys of this test's own (the workers of the session use the real ones)."""
    prefix = f"test-transport-{uuid.uuid4().hex[:8]}"
    made = {"queue": f"{prefix}-queue", "unacked": f"{prefix}-unacked", "index": f"{prefix}-index"}
    yield made
    redis_client.delete(*made.values())


def test_a_take_pops_what_brpop_would_and_records_it_as_kombu_does(redis_client: redis.Redis,
                                                                    names: dict[str, str]) -> None:
    messages = [kombu_message(f"tag-{i}", "aivvm-batch") for i in range(3)]
    redis_client.lpush(names["queue"], *(json.dumps(m) for m in messages))  # as kombu publishes
    before = float(redis_client.time()[0])
    taken = redis_client.eval(scripts.TAKE_MESSAGES, 3, names["unacked"], names["index"], names["queue"], 2)
    assert [int(n) for n in taken[::2]] == [1, 1]
    assert [json.loads(raw) for raw in taken[1::2]] == messages[:2]  # the oldest first, as BRPOP
    assert redis_client.llen(names["queue"]) == 1
    for message in messages[:2]:
        tag = message["properties"]["delivery_tag"]
        assert json.loads(redis_client.hget(names["unacked"], tag)) == [message, "", "aivvm-batch"]
        assert redis_client.zscore(names["index"], tag) == pytest.approx(before, abs=5)
    assert redis_client.hget(names["unacked"], "tag-2") is None


def test_a_take_from_an_empty_queue_takes_nothing(redis_client: redis.Redis, names: dict[str, str]) -> None:
    assert redis_client.eval(scripts.TAKE_MESSAGES, 3, names["unacked"], names["index"], names["queue"], 8) == []
    assert redis_client.exists(names["unacked"], names["index"]) == 0


def test_acknowledgements_queued_meanwhile_go_together(redis_client: redis.Redis, names: dict[str, str]) -> None:
    for tag in ("t1", "t2", "t3"):
        redis_client.zadd(names["index"], {tag: time.time()})
        redis_client.hset(names["unacked"], tag, "[]")
    pipelines: list[int] = []

    @contextmanager
    def client() -> Iterator[Any]:
        pipelines.append(1)
        yield redis_client

    acks = Acknowledger(client, names["unacked"], names["index"])
    acks.ack("t1")
    acks.ack("t2")
    acks.close(timeout=5)
    assert redis_client.zrange(names["index"], 0, -1) == [b"t3"]
    assert redis_client.hkeys(names["unacked"]) == [b"t3"]
    assert 1 <= len(pipelines) <= 2


def test_an_acknowledgement_redis_refuses_is_one_warning_and_the_sweep_s(caplog: pytest.LogCaptureFixture) -> None:
    @contextmanager
    def gone() -> Iterator[Any]:
        raise redis.exceptions.ConnectionError("Connection refused")
        yield  # pragma: no cover

    acks = Acknowledger(gone, "unacked", "unacked_index")
    with caplog.at_level(logging.WARNING):
        acks.ack("t1")
        acks.close(timeout=5)
    assert "could not acknowledge 1 messages (Connection refused): the sweep puts them back" in caplog.text
