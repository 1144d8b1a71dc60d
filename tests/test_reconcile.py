"""The sweep that enqueues again items whose message was lost (real Redis, no worker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from jobs import keys
from jobs.config import Settings
from jobs.queue import Publisher, configure, message_items
from jobs.queue import app as celery_app
from jobs.records import BatchOptions
from jobs.store import BatchStore
from jobs.submit import submit_file
from worker.sweeper import SWEEP_LOCK, sweep_once

pytestmark = pytest.mark.integration


@pytest.fixture
def lonely(tmp_path: Path) -> Iterator[tuple[BatchStore, Publisher, str]]:
    """A private Redis with a 4-item batch and no worker."""
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings.from_env({}, redis_url=server.url)
        configure(celery_app, settings)
        store, publisher = BatchStore(client), Publisher(client, celery_app)
        source = tmp_path / "in.jsonl"
        source.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4)))
        batch_id = submit_file(store, publisher, source, BatchOptions(), settings).batch_id
        yield store, publisher, batch_id


def sweep(store: BatchStore, publisher: Publisher) -> dict[str, list[int]]:
    store.redis.delete(SWEEP_LOCK)
    return sweep_once(store, publisher, 10.0)


def queued_seqs(store: BatchStore) -> list[int]:
    return sorted(seq for m in store.redis.lrange(keys.QUEUE, 0, -1) for seq in (message_items(m) or ("", []))[1])


def test_nothing_is_requeued_while_messages_wait(lonely: tuple[BatchStore, Publisher, str]) -> None:
    store, publisher, _ = lonely
    assert sweep(store, publisher) == {}
    assert sweep(store, publisher) == {}
    assert queued_seqs(store) == [0, 1, 2, 3]


def test_lost_messages_are_requeued_after_a_sweep_without_progress(lonely: tuple[BatchStore, Publisher, str]) -> None:
    store, publisher, batch_id = lonely
    store.redis.delete(keys.QUEUE)  # the messages vanish, as in kombu's BRPOP-then-HSET window
    store.redis.set(keys.claim(batch_id, 1), "live-execution")  # item 1 is being worked on
    unacked = json.loads(publisher.message(batch_id, [2]))
    store.redis.hset(keys.UNACKED, "tag", json.dumps([unacked, keys.QUEUE, keys.QUEUE]))  # item 2 is held
    assert sweep(store, publisher) == {}  # first look: remember the progress
    assert sweep(store, publisher) == {batch_id: [0, 3]}
    assert queued_seqs(store) == [0, 3]


def test_only_one_worker_sweeps_per_interval(lonely: tuple[BatchStore, Publisher, str]) -> None:
    store, publisher, batch_id = lonely
    store.redis.delete(keys.QUEUE)
    assert sweep(store, publisher) == {}
    assert sweep_once(store, publisher, 10.0) == {}  # the lock of the previous sweep still holds
    assert sweep(store, publisher) == {batch_id: [0, 1, 2, 3]}
