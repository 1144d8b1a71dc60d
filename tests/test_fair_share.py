"""Fair share: every batch on a shared queue has its turn (real Redis, a real worker, the stand-in).

Each batch keeps a window of its messages on the queue (three times the workers' slots, at least 64
items) and the rest held; each message's end releases the next behind the other batches'
messages, so a small batch waits for a window of a big one, never for the whole of it.
"""

from __future__ import annotations

import base64
import json
import time

import fakeredis
import pytest

from aivvm_batch.serve.driver import priority_of
from jobs import keys
from jobs.config import Settings
from jobs.heartbeats import WorkerSeen
from jobs.records import BatchOptions
from jobs.store import BatchStore
from jobs.queue import WINDOWED, Publisher, message_items
from jobs.queue import app as celery_app
from tests.test_reliability import Cluster, cluster  # noqa: F401 - the fixture
from worker.sweeper import say_slots

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_a_small_batch_is_not_queued_behind_the_whole_of_a_big_one(cluster: Cluster) -> None:
    stub = cluster.stub(latency=0.5, chunks=2)
    workers = cluster.start_workers(count=1, concurrency=8)
    deadline = time.monotonic() + 30
    while cluster.store.redis.get(keys.SLOTS) is None:  # the worker says its slots as it starts
        assert time.monotonic() < deadline
        time.sleep(0.1)
    big_total = 400  # 25 s at 8 in flight
    big = cluster.submit([{"id": f"a{i}", "prompt": f"big {i}"} for i in range(big_total)], base_url=stub.base_url)
    cluster.wait_done(big, 8, timeout=30)
    assert cluster.store.redis.llen(keys.held(big)) > 0, "the big batch keeps most of its messages held"
    started = time.monotonic()
    small = cluster.submit([{"id": "b0", "prompt": "small one"}], base_url=stub.base_url)
    cluster.wait_finished(small, timeout=60, workers=workers, alive=1)
    waited = time.monotonic() - started
    done_of_big = cluster.store.info(big).done
    print(f"\nfigure: a 1-item batch behind {big_total} items of 0.5 s at 8 in flight: done in {waited:.1f} s "
          f"({done_of_big} of the big batch done by then)")
    assert waited < 10, waited  # alone: about 0.6 s; before, it waited for the whole big batch (25 s)
    assert done_of_big < big_total / 2
    cluster.wait_finished(big, timeout=90, workers=workers, alive=1)
    assert cluster.store.info(big).counts == {"ok": big_total}
    assert stub.stats()["requests"] == big_total + 1
    assert cluster.store.redis.llen(keys.held(big)) == 0


def test_a_window_is_three_times_the_workers_slots_times_the_priority_and_each_end_releases_one() -> None:
    client = fakeredis.FakeRedis()
    publisher = Publisher(client, celery_app)
    client.set(keys.SLOTS, 64)  # two workers of 32: a window of 192 items
    client.hset(keys.meta("b1"), "priority", 1)
    client.hset(keys.meta("b3"), "priority", 3)
    publisher.publish("b1", list(range(1000)), chunk=16)
    publisher.publish("b3", list(range(1000)), chunk=16)
    assert int(client.get(keys.out("b1"))) == 12 and client.llen(keys.held("b1")) == 63 - 12
    assert int(client.get(keys.out("b3"))) == 36  # three times the share
    queued = [message_items(raw) for raw in reversed(client.lrange(keys.QUEUE, 0, -1))]  # the order taken
    assert [q[0] for q in queued if q] == ["b1"] * 12 + ["b3"] * 36
    assert queued[0] == ("b1", list(range(16)))  # the batch's own order
    assert publisher.release("b1", 1, 16) == 1  # one ended: the next goes behind the others
    assert message_items(client.lrange(keys.QUEUE, 0, 0)[0]) == ("b1", list(range(192, 208)))
    client.delete(keys.SLOTS)  # no worker seen lately: a window as for 64 slots (192 items)
    assert publisher.release("b1", 0, 16, reset=True) == 12


def test_a_message_put_back_after_its_place_was_freed_counts_out_again() -> None:
    """worker.window frees a message's place when its calls end; should the message go back to
    the queue after that, it counts out again (ended -1), and its own end releases as any other."""
    client = fakeredis.FakeRedis()
    publisher = Publisher(client, celery_app)
    client.set(keys.SLOTS, 64)
    client.hset(keys.meta("b1"), "priority", 1)
    publisher.publish("b1", list(range(1000)), chunk=16)  # a window of 12 messages
    assert publisher.release("b1", 1, 16) == 1  # freed early: the next one goes out
    assert publisher.release("b1", -1, 16) == 0 and int(client.get(keys.out("b1"))) == 13
    assert publisher.release("b1", 1, 16) == 0  # the put-back message ends: back to the window
    assert int(client.get(keys.out("b1"))) == 12


def test_every_release_counts_in_the_messages_the_publisher_cut() -> None:
    """The window is counted in messages of the batch's chunk, kept by the publisher: a last,
    smaller message's end (or the sweep's guess from the batch's size) does not widen it."""
    client = fakeredis.FakeRedis()
    publisher = Publisher(client, celery_app)
    client.set(keys.SLOTS, 64)
    client.hset(keys.meta("b1"), "priority", 1)
    publisher.publish("b1", list(range(1000)), chunk=32)  # a window of 192 items: 6 messages
    assert client.hget(keys.meta("b1"), "chunk") == b"32" and int(client.get(keys.out("b1"))) == 6
    assert publisher.release("b1", 1, 1) == 1  # counted as 32 items a message, not 1
    assert int(client.get(keys.out("b1"))) == 6
    assert publisher.release("b1", 0, 8, reset=True) == 6  # the sweep's reset: 6 such messages, not 24 of 8


def test_a_windowed_message_carries_its_mark_and_a_retry_does_not() -> None:
    publisher = Publisher(fakeredis.FakeRedis(), celery_app)
    assert b'{"window":1}' in base64.b64decode(json.loads(publisher.message("b", [1, 2], WINDOWED))["body"])
    assert b"window" not in base64.b64decode(json.loads(publisher.message("b", [1], {"attempt": 2}))["body"])


def test_a_batch_s_priority_is_kept_where_its_window_reads_it() -> None:
    store = BatchStore(fakeredis.FakeRedis())
    store.create("bp", "prompts.jsonl", BatchOptions(priority=3))
    assert store.redis.hget(keys.meta("bp"), "priority") == b"3"
    assert priority_of({"priority": "3"}) == 3  # serve: metadata {"priority": "3"}
    assert priority_of(None) == 1 and priority_of({"priority": "11"}) == 1


def test_slots_said_after_a_batch_was_submitted_widen_its_window_at_once() -> None:
    """`run` submits as its workers start: a batch out before any worker said its slots has a window
    as for 64 slots; the first heartbeat with slots widens it, not the batch's next messages' ends
    (10 s away with 10 s replies)."""
    store = BatchStore(fakeredis.FakeRedis())
    publisher = Publisher(store.redis, celery_app)
    store.create("bw", "prompts.jsonl", BatchOptions())
    publisher.publish("bw", list(range(1000)), chunk=16)
    store.finalize("bw", 1000)
    assert int(store.redis.get(keys.out("bw"))) == 12  # 192 items
    seen = [WorkerSeen("w1", 0.1, slots=512), WorkerSeen("w2", 0.2, slots=512)]
    assert say_slots(store, seen, Settings(), publisher=publisher) == 2
    assert int(store.redis.get(keys.out("bw"))) == 63 and store.redis.llen(keys.held("bw")) == 0
