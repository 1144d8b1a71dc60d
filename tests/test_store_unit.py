"""The store's Lua scripts on fakeredis (with Lua): a fast tier, no server, no worker.

Each test also runs on a private redis-server, so that fakeredis cannot drift from
Redis unnoticed. The fakeredis half is skipped where fakeredis[lua] is not installed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from jobs import keys
from jobs.claims import Claim, ClaimOutcome
from jobs.heartbeats import worker_seen
from jobs.intake import ChunkEntry, Reuse
from jobs.recording import Recorded
from jobs.records import (
    BatchInfo,
    BatchOptions,
    BatchState,
    ChatMessage,
    ItemRequest,
    ItemResult,
    Status,
    Usage,
    invalid_result,
)
from jobs.store import BatchStore
from tests.private_server_helpers import private_redis



@pytest.fixture(scope="module")
def real_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with private_redis(tmp_path_factory.mktemp("unit-redis")) as server:
        yield redis.Redis.from_url(server.url)


@pytest.fixture(params=["fakeredis", pytest.param("redis-server", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest) -> BatchStore:
    """The fast tier on fakeredis[lua]; the same tests on a real redis-server keep it honest."""
    if request.param == "fakeredis":
        fakeredis = pytest.importorskip("fakeredis")
        pytest.importorskip("lupa")
        return BatchStore(fakeredis.FakeRedis(), result_ttl=3600)
    client = request.getfixturevalue("real_redis")
    client.flushall()
    return BatchStore(client, result_ttl=3600)


def request(seq: int, item_id: str | None = None, prompt: str = "hi") -> ItemRequest:
    return ItemRequest(item_id or f"q{seq}", seq + 1, (ChatMessage("user", prompt),))


def ok(req: ItemRequest, output: str = "out", tokens: int = 0) -> ItemResult:
    return ItemResult(req.id, req.line, Status.OK, output=output, attempts=1,
                      usage=Usage(tokens, tokens, estimated=True) if tokens else None)


def add(store: BatchStore, batch_id: str, entries: list[Any], *, resume: bool = False,
        reuse: Reuse | None = None) -> tuple[list[int], int, int]:
    enqueued: list[int] = []
    outcome = store.add_chunk(batch_id, [ChunkEntry(i, e) for i, e in enumerate(entries)], resume=resume,
                              reuse=reuse, enqueue=lambda pipe, seqs: enqueued.extend(seqs))
    assert outcome.enqueued == enqueued
    return enqueued, outcome.kept, outcome.changed


def new_batch(store: BatchStore, batch_id: str, n: int) -> list[ItemRequest]:
    assert store.create(batch_id, "test", BatchOptions(base_url="http://x"))
    reqs = [request(i) for i in range(n)]
    add(store, batch_id, list(reqs))
    store.finalize(batch_id, n)
    return reqs


def test_a_result_is_recorded_once_counted_once_and_finishes_the_batch(store: BatchStore) -> None:
    reqs = new_batch(store, "b1", 2)
    assert store.record("b1", 0, ok(reqs[0], tokens=3))
    assert not store.record("b1", 0, ok(reqs[0], "second", tokens=3))
    info = store.info("b1")
    assert (info.counts, info.usage["prompt_tokens"], info.finished) == ({"ok": 1}, 3, False)
    store.record("b1", 1, ok(reqs[1]))
    info = store.info("b1")
    assert info.finished and info.state is BatchState.FINISHED
    assert 0 < store.redis.ttl(keys.results("b1")) <= 3600
    assert [int(s) for s in store.redis.lrange(keys.finished_log("b1"), 0, -1)] == [0, 1]


def test_claim_outcomes(store: BatchStore) -> None:
    reqs = new_batch(store, "b2", 3)
    claim = store.claim("b2", 0, "t1", 10)
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.request == reqs[0]
    assert store.claim("b2", 0, "t1", 10).outcome is ClaimOutcome.CLAIMED  # the same execution again
    assert store.claim("b2", 0, "t2", 10).outcome is ClaimOutcome.BUSY
    store.release("b2", 0, "t2")  # not its claim: nothing happens
    assert store.claim("b2", 0, "t2", 10).outcome is ClaimOutcome.BUSY
    assert store.keep_claim("b2", 0, "t1", 10) and not store.keep_claim("b2", 0, "t2", 10)
    store.record("b2", 0, ok(reqs[0]))
    assert store.claim("b2", 0, "t3", 10).outcome is ClaimOutcome.DONE
    assert not store.redis.exists(keys.claim("b2", 0))  # recording dropped the claim
    store.pause("b2", 30)
    paused = store.claim("b2", 1, "t4", 10)
    assert paused.outcome is ClaimOutcome.PAUSED and 29 < paused.paused_seconds <= 30
    assert store.claim("bnone", 0, "t5", 10).outcome is ClaimOutcome.GONE


def test_cancel_spares_claimed_items_and_reset_runs_them_again(store: BatchStore) -> None:
    reqs = new_batch(store, "b3", 4)
    store.record("b3", 0, ok(reqs[0]))
    store.claim("b3", 1, "busy", 10)
    assert store.cancel("b3") == 2
    assert store.claim("b3", 1, "other", 10).outcome is ClaimOutcome.BUSY
    assert store.claim("b3", 2, "late", 10).outcome is ClaimOutcome.DONE
    store.record("b3", 1, ok(reqs[1]))
    info = store.info("b3")
    assert info.counts == {"ok": 2, "cancelled": 2} and info.state is BatchState.CANCELLED
    assert store.reset("b3", Status.CANCELLED) == [2, 3]
    info = store.info("b3")
    assert info.counts == {"ok": 2} and info.state is BatchState.RUNNING and not info.finished
    assert store.redis.ttl(keys.results("b3")) == -1


def test_duplicate_ids_become_invalid_and_resume_skips_finished_items(store: BatchStore) -> None:
    store.create("b4", "test", BatchOptions())
    entries: list[Any] = [request(0, "same"), request(1, "same"), invalid_result(3, "line 3: bad"),
                          request(3, "other")]
    enqueued, _, _ = add(store, "b4", entries)
    assert enqueued == [0, 3]
    duplicate = json.loads(store.results_of("b4", [1])[0])
    assert duplicate["status"] == "invalid" and "duplicate id 'same'" in duplicate["error"]["message"]
    store.record("b4", 0, ok(request(0, "same")))
    again, _, _ = add(store, "b4", entries, resume=True)
    assert again == [3]


def test_reuse_keeps_equal_ok_requests_only(store: BatchStore) -> None:
    old = new_batch(store, "b5", 3)
    store.record("b5", 0, ok(old[0], "kept output"))
    store.record("b5", 1, ItemResult(old[1].id, old[1].line, Status.FAILED, output=""))
    store.create("b6", "test", BatchOptions(base_url="http://x"))
    edited = [request(0), request(1), request(2, prompt="edited"), request(3)]
    enqueued, kept, changed = add(store, "b6", list(edited), reuse=Reuse("b5", same_options=True))
    assert (enqueued, kept, changed) == ([1, 2, 3], 1, 2)
    assert json.loads(store.results_of("b6", [0])[0])["output"] == "kept output"
    store.create("b7", "test", BatchOptions(base_url="http://y"))
    enqueued, kept, changed = add(store, "b7", list(edited), reuse=Reuse("b5", same_options=False))
    assert (enqueued, kept, changed) == ([0, 1, 2, 3], 0, 3)


def test_delete_removes_everything_and_nothing_comes_back(store: BatchStore) -> None:
    reqs = new_batch(store, "b8", 2)
    store.claim("b8", 0, "t", 10)
    store.note_attempt_error("b8", "server_error: HTTP 503")
    store.set_run_batch("source", "b8")
    store.delete("b8")
    assert not store.record("b8", 0, ok(reqs[0]))
    store.pause("b8", 10)
    assert store.redis.keys("*b8*") == []
    assert store.run_batch("source") is None
    assert store.list_batches() == []


def test_list_batches_reads_usage_and_errors(store: BatchStore) -> None:
    reqs = new_batch(store, "b9", 1)
    store.note_attempt_error("b9", "timeout: no reply within 5s")
    store.note_attempt_error("b9", "timeout: no reply within 5s")
    store.record("b9", 0, ok(reqs[0], tokens=7))
    [info] = store.list_batches()
    assert info.usage["completion_tokens"] == 7
    assert info.top_error == ("timeout: no reply within 5s", 2)


def test_a_chunk_is_claimed_in_one_script_item_by_item(store: BatchStore) -> None:
    reqs = new_batch(store, "b7", 5)
    store.record("b7", 0, ok(reqs[0]))
    store.claim("b7", 1, "someone", 10)
    claims = store.claim_many("b7", [(0, "a"), (1, "b"), (2, "c"), (3, "d")], 10)
    assert [c.outcome for c in claims] == [ClaimOutcome.DONE, ClaimOutcome.BUSY,
                                           ClaimOutcome.CLAIMED, ClaimOutcome.CLAIMED]
    assert [c.request for c in claims] == [None, None, reqs[2], reqs[3]]
    assert claims[2].options == BatchOptions(base_url="http://x")
    assert [store.redis.get(keys.claim("b7", s)) for s in (2, 3)] == [b"c", b"d"]
    assert 9000 < store.redis.pttl(keys.claim("b7", 2)) <= 10000
    assert store.claim_many("gone", [(0, "a"), (1, "b")], 10) == [Claim(ClaimOutcome.GONE)] * 2
    store.cancel("b7")
    cancelled = store.claim_many("b7", [(1, "b"), (2, "c"), (4, "e")], 10)
    # a claim held by another execution, or by this one, is spared; a free one ends cancelled
    assert [c.outcome for c in cancelled] == [ClaimOutcome.BUSY, ClaimOutcome.CANCELLED, ClaimOutcome.DONE]


def test_many_results_are_recorded_in_one_script_first_wins(store: BatchStore) -> None:
    reqs = new_batch(store, "b8", 3)
    store.claim_many("b8", [(0, "a"), (1, "b")], 10)
    assert store.record_many("b8", [(0, ok(reqs[0], tokens=2)), (1, ok(reqs[1], tokens=2))]) == [True, True]
    assert not store.redis.exists(keys.claim("b8", 0)) and not store.redis.exists(keys.claim("b8", 1))
    assert store.record_many("b8", [(1, ok(reqs[1], "again")), (2, ok(reqs[2]))]) == [False, True]
    info = store.info("b8")
    assert info.counts == {"ok": 3} and info.finished and info.usage["prompt_tokens"] == 4
    assert json.loads(store.results_of("b8", [1])[0] or b"{}")["output"] == "out"
    assert store.record_many("gone", [(0, ok(reqs[0]))]) == [False]
    assert not store.redis.exists(keys.results("gone"))


def test_a_flush_of_many_results_counts_each_once_and_logs_them_in_order(store: BatchStore) -> None:
    """The script adds a flush's counts, usage and log entries once, after its loop (past the
    1,000 values it pushes at a time); the results of another status and with no usage count apart."""
    reqs = new_batch(store, "b9", 1500)
    failed = ItemResult("x", 1, Status.FAILED, attempts=2)
    flush = [(i, ok(reqs[i], tokens=1 + i % 2) if i % 3 else dataclasses.replace(failed, id=reqs[i].id, line=i + 1))
             for i in range(1500)]
    assert all(store.record_many("b9", flush))
    info = store.info("b9")
    assert info.counts == {"ok": 1000, "failed": 500} and info.finished
    paid = sum(1 + i % 2 for i in range(1500) if i % 3)
    assert (info.usage["prompt_tokens"], info.usage["estimated"]) == (paid, 1000)
    assert store.finished_since("b9", 0, 2000) == list(range(1500))


def test_a_redis_that_lost_its_scripts_still_records_each_result_once(store: BatchStore) -> None:
    reqs = new_batch(store, "b8s", 2)
    store.redis.script_flush()  # as after a restart: the record's EVALSHA meets NOSCRIPT
    before = int(store.redis.hget(keys.OBSERVED_LATENCY, "count") or 0)
    timed = dataclasses.replace(ok(reqs[0]), latency_ms=1200)
    assert store.record_many("b8s", [(0, timed), (1, ok(reqs[1]))]) == [Recorded.RECORDED, Recorded.RECORDED]
    assert store.info("b8s").counts == {"ok": 2}
    assert int(store.redis.hget(keys.OBSERVED_LATENCY, "count") or 0) - before == 1  # not counted twice
    assert store.record_many("b8s", [(1, ok(reqs[1]))]) == [Recorded.NOT]


def test_leases_are_renewed_and_released_only_by_their_holder(store: BatchStore) -> None:
    new_batch(store, "b9", 3)
    new_batch(store, "b10", 1)
    store.claim_many("b9", [(0, "a"), (1, "b")], 5)
    store.claim("b10", 0, "c", 5)
    held = [("b9", 0, "a"), ("b9", 1, "wrong"), ("b10", 0, "c"), ("b9", 2, "none")]
    assert store.keep_claims(held, 60) == [True, False, True, False]
    assert store.redis.pttl(keys.claim("b9", 0)) > 50_000 and store.redis.pttl(keys.claim("b9", 1)) <= 5000
    assert store.release_many([("b9", 0, "a"), ("b9", 1, "wrong"), ("b10", 0, "c")]) == 2
    assert [bool(store.redis.exists(keys.claim(b, s))) for b, s in (("b9", 0), ("b9", 1), ("b10", 0))] == \
        [False, True, False]


def test_a_message_not_renewed_for_a_lease_is_put_back_on_the_queue(store: BatchStore) -> None:
    import time

    from jobs.reconcile import renew_messages, restore_stale_messages

    client = store.redis
    held = {"headers": {"id": "x"}, "properties": {"delivery_info": {}}, "body": "e30="}
    for tag, age in (("dead", 100.0), ("alive", 100.0), ("acked", 100.0), ("fresh", 1.0)):
        client.zadd(keys.UNACKED_INDEX, {tag: time.time() - age})
        if tag != "acked":
            client.hset(keys.UNACKED, tag, json.dumps([dict(held, tag=tag), keys.QUEUE, keys.QUEUE]))
    renew_messages(client, ["alive", "never-delivered"])
    assert client.zscore(keys.UNACKED_INDEX, "never-delivered") is None  # XX: nothing is added
    assert restore_stale_messages(client, older_than=30) == 1
    queued = [json.loads(m) for m in client.lrange(keys.QUEUE, 0, -1)]
    assert [m["tag"] for m in queued] == ["dead"] and queued[0]["headers"]["redelivered"] is True
    assert sorted(k.decode() for k in client.hkeys(keys.UNACKED)) == ["alive", "fresh"]
    assert sorted(k.decode() for k in client.zrange(keys.UNACKED_INDEX, 0, -1)) == ["alive", "fresh"]


# -- records fenced by their claims; calls paid twice counted (issue: many hosts) ------------


def test_a_record_under_its_own_claim_is_the_result(store: BatchStore) -> None:
    reqs = new_batch(store, "f1", 2)
    assert store.claim("f1", 0, "tok-a", 30).outcome is ClaimOutcome.CLAIMED
    assert store.record_many("f1", [(0, ok(reqs[0], tokens=3))], ["tok-a"]) == [Recorded.RECORDED]
    assert store.redis.exists(keys.claim("f1", 0)) == 0
    assert store.info("f1").usage == {"prompt_tokens": 3, "completion_tokens": 3, "estimated": 1}


def test_a_record_whose_claim_passed_to_another_is_counted_not_kept(store: BatchStore) -> None:
    reqs = new_batch(store, "f2", 1)
    store.redis.set(keys.claim("f2", 0), "tok-b", px=30000)  # the claim lapsed and B took it
    late = ok(reqs[0], "from a", tokens=5)
    assert store.record_many("f2", [(0, late)], ["tok-a"]) == [Recorded.LATE]
    assert store.results_of("f2", [0]) == [None]  # B's result will be the one
    assert store.redis.get(keys.claim("f2", 0)) == b"tok-b"  # A leaves B's claim alone
    assert store.record_many("f2", [(0, ok(reqs[0], "from b", tokens=2))], ["tok-b"]) == [Recorded.RECORDED]
    (raw,) = store.results_of("f2", [0])
    assert raw is not None
    result = ItemResult.from_json(raw)
    assert result.output == "from b" and result.attempts == 2  # B's one, and A's paid call
    assert result.usage == Usage(7, 7, estimated=True)
    info = store.info("f2")
    assert info.usage["prompt_tokens"] == 7 and info.usage["late_calls"] == 1
    assert info.counts == {"ok": 1}


def test_a_second_result_for_a_done_item_is_late_and_the_same_one_sent_again_is_not(store: BatchStore) -> None:
    reqs = new_batch(store, "f3", 1)
    first = ok(reqs[0], "first", tokens=1)
    assert store.record_many("f3", [(0, first)], ["tok-a"]) == [Recorded.RECORDED]
    assert store.record_many("f3", [(0, first)], ["tok-a"]) == [Recorded.NOT]  # a retried write
    assert store.record_many("f3", [(0, ok(reqs[0], "second", tokens=4))], ["tok-b"]) == [Recorded.LATE]
    assert not store.record("f3", 0, ok(reqs[0], "unfenced"))  # no token: first wins, nothing counted
    result = ItemResult.from_json(store.results_of("f3", [0])[0] or b"")
    assert result.output == "first" and result.attempts == 2 and result.usage == Usage(5, 5, estimated=True)
    assert store.info("f3").usage["late_calls"] == 1


def test_an_abandoned_call_is_counted_on_its_item(store: BatchStore) -> None:
    reqs = new_batch(store, "f4", 2)
    calls = [(1, Usage(10, 2, estimated=True), 1, "tok-a"), (1, Usage(10, 0, estimated=True), 2, "tok-b")]
    assert store.count_late("f4", calls) == 2
    store.count_late("f4", calls[:1])  # sent again (its reply was lost): counted once
    store.record("f4", 1, ok(reqs[1]))
    result = ItemResult.from_json(store.results_of("f4", [1])[0] or b"")
    assert result.attempts == 4 and result.usage == Usage(20, 2, estimated=True)
    assert store.info("f4").usage["late_calls"] == 3
    assert store.count_late("gone", [(0, Usage(1, 1, estimated=False), 1, "t")]) == 0


def test_a_late_record_sent_again_counts_once_and_counts_every_call_of_its_run(store: BatchStore) -> None:
    reqs = new_batch(store, "f5", 1)
    store.record_many("f5", [(0, ok(reqs[0], "winner", tokens=1))], ["tok-b"])
    late = dataclasses.replace(ok(reqs[0], "loser", tokens=5), attempts=3)  # its run tried three times
    assert store.record_many("f5", [(0, late)], ["tok-a"]) == [Recorded.LATE]
    assert store.record_many("f5", [(0, late)], ["tok-a"]) == [Recorded.LATE]  # its reply was lost: sent again
    result = ItemResult.from_json(store.results_of("f5", [0])[0] or b"")
    assert result.attempts == 4 and result.usage == Usage(6, 6, estimated=True)
    assert store.info("f5").usage["late_calls"] == 3
    assert store.redis.ttl(keys.late("f5")) > 0  # counted after the batch finished: expires with it


def test_a_reset_item_forgets_its_late_calls(store: BatchStore) -> None:
    reqs = new_batch(store, "f6", 1)
    failed = ItemResult(reqs[0].id, reqs[0].line, Status.FAILED, output="", attempts=1)
    store.record_many("f6", [(0, failed)], ["tok-b"])
    store.record_many("f6", [(0, ok(reqs[0], tokens=2))], ["tok-a"])
    assert store.reset("f6", Status.FAILED) == [0]
    store.record("f6", 0, ok(reqs[0], "again"))
    assert ItemResult.from_json(store.results_of("f6", [0])[0] or b"").attempts == 1


def test_heartbeats_are_aged_by_redis_s_clock(store: BatchStore) -> None:
    store.worker_heartbeat("w1@a", 3, "provider unreachable for 60 s")
    store.redis.hset(keys.WORKERS, "old@b", "1700000000.5")  # a heartbeat of an earlier version
    seen = store.workers()
    assert [w.name for w in seen] == ["w1@a", "old@b"]
    assert seen[0].age < 5 and seen[0].held == 3 and seen[0].note == "provider unreachable for 60 s"
    assert seen[1].age > 3600 and seen[1].held == 0
    age = store.last_worker_age()
    assert age is not None and seen[0].age <= age < 5
    assert worker_seen("x", "garbage", 10.0).age == float("inf")


def test_serve_s_lease_is_held_by_one_renewed_and_released_only_by_its_holder(store: BatchStore) -> None:
    import time

    from aivvm_batch.serve.lease import Lease

    client = store.redis
    with Lease(client, "lease:a", ttl_seconds=1.0) as held:
        assert held
        with Lease(client, "lease:a") as other:
            assert not other
        time.sleep(1.5)  # past its TTL: renewed meanwhile
        assert client.get("lease:a") is not None
    assert not client.exists("lease:a")
    with Lease(client, "lease:b") as held:
        assert held
        client.set("lease:b", "another holder")
    assert client.get("lease:b") == b"another holder"


def test_views_wait_as_long_as_the_poll_says_of_each_view(store: BatchStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import collect

    reqs = new_batch(store, "bv", 3)
    slept: list[float] = []
    seen: list[int | None] = []

    def poll(info: BatchInfo | None) -> float:
        seen.append(None if info is None else info.done)
        return 0.5 if info is not None and info.done == 0 else 0.25

    monkeypatch.setattr(collect.time, "sleep", slept.append)
    for info in collect.views(store, "bv", poll, reconnect_seconds=1):
        if info.finished:
            break
        store.record("bv", info.done, ok(reqs[info.done]))
    assert seen == [0, 1, 2] and slept == [0.5, 0.25, 0.25]
