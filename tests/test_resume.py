"""Submitting again with ``reuse_from``: only what changed is paid for; deleting a batch.

The store-level tests run on a private Redis with no worker, so that the queue can be
read; the end-to-end test runs on the session Redis and worker and counts the stand-in's
calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from jobs import keys
from jobs.config import Settings
from jobs.queue import Publisher, configure
from jobs.queue import app as celery_app
from jobs.records import BatchOptions, ItemError, ItemRequest, ItemResult, RequestDefaults, Status
from jobs.store import BatchStore
from jobs.submit import submit_file
from tests.conftest import Batches
from jobs.queue import message_items
from worker.chunk import run_chunk
from worker.decision import Done, ItemState
from worker.runtime import Runtime
from worker.sweeper import sweep_once

pytestmark = pytest.mark.integration
BASE = "http://127.0.0.1:9/base"


class Lonely:
    """A private Redis with no worker: submit files and read the queue."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.client = redis.Redis.from_url(url)
        self.settings = Settings.from_env({}, redis_url=url)
        configure(celery_app, self.settings)
        self.store = BatchStore(self.client, self.settings.result_ttl)
        self.publisher = Publisher(self.client, celery_app)
        self.tmp_path = tmp_path
        self.files = 0

    def write(self, lines: list[Any]) -> Path:
        self.files += 1
        path = self.tmp_path / f"in-{self.files}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    def submit(self, lines: list[Any], options: BatchOptions = BatchOptions(base_url=BASE), **kw: Any):
        self.client.delete(keys.QUEUE)
        return submit_file(self.store, self.publisher, self.write(lines), options, self.settings, **kw)

    def queued(self) -> list[int]:
        return sorted(seq for m in self.client.lrange(keys.QUEUE, 0, -1)
                      for seq in (message_items(m) or ("", []))[1])

    def finish(self, batch_id: str, statuses: list[Status]) -> None:
        """Record a result per item as a worker would, ``ok`` with the output ``done <id>``."""
        for seq, status in enumerate(statuses):
            raw = self.client.hget(keys.requests(batch_id), seq)
            assert raw is not None
            request = ItemRequest.from_json(raw)
            error = None if status is Status.OK else ItemError("server_error", "HTTP 500")
            self.store.record(batch_id, seq, ItemResult(request.id, request.line, status,
                                                        output=f"done {request.id}", error=error,
                                                        attempts=1))

    def results(self, batch_id: str) -> dict[int, dict[str, Any]]:
        return {seq: json.loads(raw) for seq, raw in self.client.hgetall(keys.results(batch_id)).items()
                for seq in [int(seq)]}


@pytest.fixture
def lonely(tmp_path: Path) -> Iterator[Lonely]:
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        yield Lonely(server.url, tmp_path)


LINES = [{"id": f"q{i}", "prompt": f"question {i}"} for i in range(4)]


def test_unchanged_ok_items_are_kept_and_the_rest_enqueued(lonely: Lonely) -> None:
    earlier = lonely.submit(LINES).batch_id
    lonely.finish(earlier, [Status.OK, Status.OK, Status.OK, Status.FAILED])
    edited = [LINES[0], {"id": "q1", "prompt": "question 1, edited"}, LINES[2], LINES[3],
              {"id": "q4", "prompt": "a new line"}]
    report = lonely.submit(edited, reuse_from=earlier)
    assert (report.total, report.kept, report.changed, report.enqueued) == (5, 2, 2, 3)
    assert lonely.queued() == [1, 3, 4]
    results = lonely.results(report.batch_id)
    assert sorted(results) == [0, 2]
    assert results[0] == {**lonely.results(earlier)[0]}
    assert (results[2]["id"], results[2]["line"], results[2]["output"]) == ("q2", 3, "done q2")
    assert lonely.store.info(report.batch_id).counts == {"ok": 2}


def test_another_base_url_or_provider_keeps_nothing(lonely: Lonely) -> None:
    earlier = lonely.submit(LINES).batch_id
    lonely.finish(earlier, [Status.OK] * 4)
    for options in (BatchOptions(base_url="http://127.0.0.1:9/other"),
                    BatchOptions(provider="openai", base_url=BASE)):
        report = lonely.submit(LINES, options, reuse_from=earlier)
        assert (report.kept, report.changed, report.enqueued) == (0, 4, 4)
        assert lonely.queued() == [0, 1, 2, 3]
    same = lonely.submit(LINES, reuse_from=earlier)
    assert (same.kept, same.changed, same.enqueued) == (4, 0, 0)
    assert lonely.store.info(same.batch_id).finished


def test_a_line_moved_to_another_place_is_run_again(lonely: Lonely) -> None:
    earlier = lonely.submit(LINES).batch_id
    lonely.finish(earlier, [Status.OK] * 4)
    report = lonely.submit([LINES[1], LINES[0], LINES[2], LINES[3]], reuse_from=earlier)
    assert (report.kept, report.changed, report.enqueued) == (2, 2, 2)
    assert lonely.queued() == [0, 1]


def test_a_missing_earlier_batch_reuses_nothing(lonely: Lonely) -> None:
    report = lonely.submit(LINES, reuse_from="bnotthere")
    assert (report.kept, report.changed, report.enqueued) == (0, 0, 4)


def test_other_defaults_make_another_request(lonely: Lonely) -> None:
    earlier = lonely.submit(LINES, defaults=RequestDefaults(model="gpt-4")).batch_id
    lonely.finish(earlier, [Status.OK] * 4)
    changed = lonely.submit(LINES, defaults=RequestDefaults(model="gpt-3.5-turbo"), reuse_from=earlier)
    assert (changed.kept, changed.changed) == (0, 4)
    same = lonely.submit(LINES, defaults=RequestDefaults(model="gpt-4"), reuse_from=earlier)
    assert (same.kept, same.changed) == (4, 0)


def test_run_batch_remembers_a_batch_until_it_is_deleted(lonely: Lonely) -> None:
    store = lonely.store
    assert store.run_batch("source-a") is None
    batch_id = lonely.submit(LINES).batch_id
    store.set_run_batch("source-a", batch_id)
    assert store.run_batch("source-a") == batch_id
    assert store.run_batch("source-b") is None
    store.delete(batch_id)
    assert store.run_batch("source-a") is None


def test_a_deleted_batch_is_gone_for_its_messages_the_sweep_and_late_results(lonely: Lonely) -> None:
    store, settings = lonely.store, lonely.settings
    batch_id = lonely.submit(LINES).batch_id
    token_claim = store.claim(batch_id, 1, "in-flight", 60)
    assert token_claim.request is not None
    store.note_attempt_error(batch_id, "server_error: HTTP 500")
    store.delete(batch_id)
    assert lonely.queued() == [0, 1, 2, 3]  # still queued: each finds the batch gone
    runtime = Runtime.start(settings, celery_app, concurrency=2)
    try:
        assert runtime.run(run_chunk(runtime, batch_id, [0, 2], ItemState())) == [Done("gone")] * 2
    finally:
        runtime.close()
    # the item in flight when it was deleted records nothing, and recreates no key
    late = ItemResult(token_claim.request.id, token_claim.request.line, Status.OK, output="late")
    assert store.record(batch_id, 1, late) is False
    store.pause(batch_id, 5)
    assert [k for k in lonely.client.scan_iter(match=f"*{batch_id}*")] == []
    assert lonely.client.zscore(keys.BATCH_INDEX, batch_id) is None
    lonely.client.delete(keys.QUEUE)
    for _ in range(2):
        lonely.client.delete(keys.SWEEP_LOCK)
        assert sweep_once(store, lonely.publisher, 10.0) == {}
    assert lonely.queued() == []


@pytest.mark.usefixtures("workers")
def test_editing_one_line_of_ten_pays_for_one_call(batches: Batches, stub: StubServer) -> None:
    lines = [{"id": f"e{i}", "prompt": f"resume edit {i}"} for i in range(10)]
    first = batches.submit(lines, base_url=stub.base_url)
    batches.wait(first)
    stub.reset()
    lines[6] = {"id": "e6", "prompt": "resume edit 6, reworded"}
    report = submit_file(batches.store, batches.publisher, batches.write(lines),
                         BatchOptions(base_url=stub.base_url), batches.settings, reuse_from=first)
    assert (report.kept, report.changed, report.enqueued) == (9, 1, 1)
    batches.wait(report.batch_id)
    assert stub.stats()["by_prompt"] == {"resume edit 6, reworded": 1}
    results = batches.results(report.batch_id)
    assert [r["status"] for r in results] == ["ok"] * 10
    assert results[6]["output"] == "Stand-in reply to: resume edit 6, reworded"
    assert results[3]["output"] == "Stand-in reply to: resume edit 3"


@pytest.mark.usefixtures("workers")
def test_a_wrong_base_url_then_the_right_one_runs_every_item_against_the_right_one(
        batches: Batches, stub: StubServer) -> None:
    lines = [{"id": f"w{i}", "prompt": f"which server {i}"} for i in range(3)]
    other = StubServer().start()
    try:
        first = batches.submit(lines, base_url=other.base_url)
        batches.wait(first)
    finally:
        other.stop()
    stub.reset()
    report = submit_file(batches.store, batches.publisher, batches.write(lines),
                         BatchOptions(base_url=stub.base_url), batches.settings, reuse_from=first)
    assert (report.kept, report.changed) == (0, 3)
    batches.wait(report.batch_id)
    assert stub.stats()["requests"] == 3
