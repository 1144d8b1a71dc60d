"""The worker runtime: chunked messages, slots, leases, and no item stranded by an error.

The first tests are pure (no Redis). The others run one process's runtime in the test (its
event loop and pools, no Celery) against a private redis-server and the stand-in.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from jobs import keys
from jobs.config import Settings
from jobs.queue import Publisher, celery_threads, chunk_size, chunks, configure, message_items
from jobs.queue import app as celery_app
from jobs.records import BatchOptions, ChatMessage, ItemRequest, Status
from jobs.store import BatchStore
from jobs.submit import submit_file
from worker.attempt import Attempt
from worker.chunk import run_chunk
from worker.credit import Credit
from worker.decision import Done, ItemState, decide
from worker.errors import IncompleteReply, ProviderHTTPError, ProviderTimeout
from worker.item import Handoff
from worker.runtime import Runtime, new_event_loop

FAST = {"AIVVM_BATCH_BACKOFF_BASE": "0.2", "AIVVM_BATCH_BACKOFF_CAP": "2", "AIVVM_BATCH_MAX_RETRIES": "3",
        "AIVVM_BATCH_READ_TIMEOUT": "5", "AIVVM_BATCH_LEASE": "3"}


# -- pure --------------------------------------------------------------------------------------


def test_chunks_spread_a_small_batch_and_stay_small_for_a_big_one() -> None:
    assert [chunk_size(n) for n in (1, 63, 64, 127, 128, 3000, 4096, 10_000, 5_000_000)] == \
        [1, 1, 1, 1, 2, 46, 64, 64, 64]
    # messages of 128 items once the workers' slots are known and each holds one whole
    assert [chunk_size(n, 128) for n in (3000, 8191, 8192, 10_000)] == [46, 64, 128, 128]
    assert chunk_size(10_000, 127) == 64 and chunk_size(10_000, 512) == 128
    assert len(list(chunks(list(range(3000)), chunk_size(3000)))) == 66  # at least 64 messages
    assert [celery_threads(n) for n in (1, 32, 64, 256, 1024, 4096)] == [1, 32, 64, 64, 128, 512]


def test_credit_takes_a_message_while_one_of_its_items_finds_a_free_slot() -> None:
    credit = Credit(slots=128)
    assert credit.can_take([])  # nothing held: the first message always
    credit.took("t1", "task1", 64)
    assert credit.can_take(["t1"]) and credit.room(["t1"]) == 1  # 64 held: another 64 fit
    credit.took("t2", "task2", 64)
    assert not credit.can_take(["t1", "t2"]) and credit.room(["t1", "t2"]) == 0  # every slot busy
    credit.ended("task1")
    # one free slot: the next message is taken, its other 63 items wait for this process's slots
    assert credit.held(["t1", "t2"]) == 127 and credit.can_take(["t1", "t2"]) and credit.room(["t1", "t2"]) == 1
    for _ in range(64):
        credit.ended("task1")
    assert credit.held(["t1", "t2"]) == 64 and credit.room(["t1", "t2"]) == 1
    credit.ended("task2")
    assert credit.room(["t1", "t2"]) == 2  # 65 free: one message whole and one in part
    credit.settled("t2")
    credit.ended("task2")  # a message already settled: nothing changes
    assert credit.held(["t1", "t2", "t9"]) == 0  # a tag it never took holds nothing
    credit.took("big", "task3", 500)  # a chunk larger than the slots still runs, alone
    assert credit.can_take([]) and not credit.can_take(["big"])
    assert Credit(slots=0).can_take(["big"])  # no slots known: Celery's prefetch alone


def test_credit_wakes_the_consumer_once_when_a_slot_frees_after_a_refusal() -> None:
    credit, wakes = Credit(slots=128), []
    credit.on_room = lambda: wakes.append(1)
    credit.took("t1", "task1", 64)
    credit.took("t2", "task2", 64)
    assert credit.can_take(["t1"])
    credit.ended("task1")
    assert wakes == []  # nothing was refused yet: the consumer is not asleep on the credit
    credit.took("t3", "task3", 64)  # taken beside the slot that freed: 127 running, 64 more held
    assert not credit.can_take(["t1", "t2", "t3"])
    for _ in range(63):
        credit.ended("task1")
    assert wakes == []  # 63 items ended, as many of t3 started: every slot still busy
    credit.ended("task2")
    assert wakes == [1] and credit.can_take(["t1", "t2", "t3"])
    credit.ended("task2")
    assert wakes == [1]  # once per refusal, not at every end


def _blocked_in_brpop(client: redis.Redis, address: str) -> bool:
    """The client connected from ``address`` waits in a BRPOP (other tests' workers may too)."""
    return any(c.get("addr") == address and c.get("cmd") == "brpop" and "b" in c.get("flags", "")
               for c in client.client_list())


@pytest.mark.integration
@pytest.mark.timeout(30)
@pytest.mark.parametrize("message_waiting", [False, True])
def test_closing_a_channel_ends_its_brpop_in_flight_and_keeps_the_message_it_took(
        redis_url: str, redis_client: redis.Redis, message_waiting: bool) -> None:
    """A worker's warm shutdown closes its channel while a BRPOP waits on the server: the BRPOP is
    ended at once (here its timeout is a minute, beyond the test's), and a message it took meanwhile
    is read and delivered, not dropped with the connection."""
    from kombu import Connection, Consumer, Queue

    name = f"unblock-{message_waiting}"
    received: list[Any] = []
    with Connection(redis_url, transport="worker.transport:Transport") as connection:
        channel = connection.channel()
        channel.brpop_timeout = 60
        consumer = Consumer(channel, [Queue(name, routing_key=name)], accept=["json"],
                            callbacks=[lambda body, message: received.append(body)])
        consumer.consume()
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=0.3)  # the BRPOP stays sent, waiting on the server
        host, port = channel.client.connection._sock.getsockname()[:2]
        address = f"{host}:{port}"
        assert channel._in_poll and _blocked_in_brpop(redis_client, address)
        if message_waiting:  # the pending BRPOP takes it: its reply is on the way
            with Connection(redis_url) as publishing:
                publishing.Producer().publish({"n": 1}, routing_key=name, serializer="json")
            deadline = time.monotonic() + 5
            while _blocked_in_brpop(redis_client, address) and time.monotonic() < deadline:
                time.sleep(0.01)
        channel.close()
    assert not _blocked_in_brpop(redis_client, address)
    assert received == ([{"n": 1}] if message_waiting else [])
    # delivered and never acknowledged: kombu puts it back on the queue as the channel closes
    assert redis_client.llen(name) == (1 if message_waiting else 0)
    redis_client.delete(name)


def test_a_chunk_message_is_celerys_own_and_carries_its_items() -> None:
    publisher = Publisher(redis.Redis(), celery_app)  # builds messages without a server
    raw = publisher.message("b1", [4, 5, 9], {"attempt": 2}, countdown=3)
    message = json.loads(raw)
    assert message["headers"]["task"] == "worker.tasks.complete_item"
    assert message["headers"]["id"] == keys.task_id("b1", 4, 3)
    assert message["headers"]["eta"] > message["headers"]["eta"][:10]  # an ISO time
    assert json.loads(publisher.message("b1", [1]))["headers"]["eta"] is None
    assert message_items(raw) == ("b1", [4, 5, 9])
    assert message_items(b"not json") is None


def request(prompt: str = "hi") -> ItemRequest:
    return ItemRequest("q1", 1, (ChatMessage("user", prompt),))


def failed(error: Exception, text: str = "") -> Attempt:
    return Attempt("aivvm", "gpt-3.5-turbo", text, error, 10, None, None, "aivvm")  # type: ignore[arg-type]


def test_the_event_loop_is_uvloops_where_installed_else_asyncios(monkeypatch: pytest.MonkeyPatch) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    loop = new_event_loop()
    try:
        assert loop.run_until_complete(answer()) == 42
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    plain = new_event_loop()
    try:
        assert plain.run_until_complete(answer()) == 42
        assert isinstance(plain, asyncio.BaseEventLoop)
    finally:
        plain.close()


def test_item_decisions_retry_give_up_and_pause() -> None:
    settings = Settings.from_env(FAST)
    now = 1000.0
    retry = decide(request(), failed(ProviderTimeout("read timed out")), ItemState(), settings, now)
    assert retry.result is None and retry.again is not None and retry.error == "timeout: read timed out"
    assert retry.again.state.attempt == 2 and now + 0.1 <= retry.again.state.not_before <= now + 0.2
    assert retry.again.reason.startswith("retry in ")
    limited = ProviderHTTPError(429, "slow down", retry_after=30.0)
    paused = decide(request(), failed(limited), ItemState(attempt=2), settings, now)
    assert paused.pause == 30.0 and paused.again is not None and paused.again.state.not_before >= now + 30
    last = decide(request(), failed(ProviderTimeout("again")), ItemState(attempt=4), settings, now)
    assert last.again is None and last.result is not None and last.result.status is Status.FAILED
    assert last.result.attempts == 4
    cut = decide(request(), failed(IncompleteReply("cut"), "partial"), ItemState(attempt=2, cuts=2), settings, now)
    assert cut.again is None and cut.result is not None and cut.result.output == "partial"
    assert cut.result.usage is not None and cut.result.usage.completion_tokens == 2


# -- one runtime, a private Redis, the stand-in ------------------------------------------------


class Bench:
    def __init__(self, tmp_path: Path, server: EmbeddedRedis, stub: StubServer) -> None:
        self.tmp_path = tmp_path
        self.client = redis.Redis.from_url(server.url)
        self.url = server.url
        self.stub = stub
        self.store = BatchStore(self.client)
        self.files = 0
        self.batches: list[str] = []

    def settings(self, **env: str) -> Settings:
        return Settings.from_env({**FAST, **env}, redis_url=self.url)

    def submit(self, prompts: list[str], worker_slots: int | None = None) -> str:
        self.files += 1
        path = self.tmp_path / f"in-{self.files}.jsonl"
        path.write_text("".join(json.dumps({"id": f"i{n}", "prompt": p}) + "\n" for n, p in enumerate(prompts)))
        settings = self.settings()
        configure(celery_app, settings)
        report = submit_file(self.store, Publisher(self.client, celery_app), path,
                             BatchOptions(base_url=self.stub.base_url), settings, worker_slots=worker_slots)
        self.batches.append(report.batch_id)
        return report.batch_id

    def queued(self) -> list[tuple[str, list[int], dict[str, Any]]]:
        """Every message of the queue and of the batches' windows (held ones wait their turn)."""
        found = []
        lists = [keys.QUEUE, *(keys.held(batch_id) for batch_id in self.batches)]
        for raw in (raw for name in lists for raw in self.client.lrange(name, 0, -1)):
            items = message_items(raw)
            assert items is not None
            kwargs = json.loads(base64.b64decode(json.loads(raw)["body"]))[1]
            kwargs.pop("window", None)
            found.append((items[0], items[1], kwargs))
        return found

    def drain(self, runtime: Runtime) -> list[Done | Handoff]:
        """Run every queued message's chunk on the runtime at once, as a worker's threads would."""
        messages = self.queued()
        self.client.delete(keys.QUEUE, *(keys.held(batch_id) for batch_id in self.batches))

        async def all_chunks() -> list[Done | Handoff]:
            ends = await asyncio.gather(*(run_chunk(runtime, b, seqs, ItemState.from_kwargs(**kw))
                                          for b, seqs, kw in messages))
            return [end for chunk in ends for end in chunk]

        return runtime.run(all_chunks())


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server, StubServer(latency=0.3, chunks=3) as stub:
        yield Bench(tmp_path, server, stub)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_file_is_cut_into_equal_messages_from_its_first_line(bench: Bench) -> None:
    """Sized from the file's line count, not from its first block: every message but the last
    holds chunk_size(total) items, so that the slots of a worker are a whole number of messages."""
    bench.submit([f"line {i}" for i in range(5000)])
    sizes = Counter(len(seqs) for _, seqs, _ in bench.queued())
    assert chunk_size(5000) == 64 and sizes == Counter({64: 5000 // 64, 5000 % 64: 1})


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_workers_of_128_slots_take_a_big_file_in_messages_of_128(bench: Bench) -> None:
    """`run` says its workers' slots: a file of 8,192 lines or more goes in messages of 128 items,
    a whole number of them in each worker's slots; the batch keeps that size for its window."""
    batch_id = bench.submit([f"line {i}" for i in range(9000)], worker_slots=128)
    sizes = Counter(len(seqs) for _, seqs, _ in bench.queued())
    assert sizes == Counter({128: 9000 // 128, 9000 % 128: 1})
    assert bench.client.hget(keys.meta(batch_id), "chunk") == b"128"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_never_more_requests_in_flight_than_the_concurrency(bench: Bench) -> None:
    batch_id = bench.submit([f"slot {i}" for i in range(120)])
    assert len(bench.queued()) == 120 // chunk_size(120)  # chunks of 1..2 items
    runtime = Runtime.start(bench.settings(), celery_app, concurrency=7)
    try:
        ends = bench.drain(runtime)
    finally:
        runtime.close()
    assert ends == [Done("ok")] * 120
    assert bench.store.info(batch_id).counts == {"ok": 120}
    stats = bench.stub.stats()
    assert stats["peak_in_flight"] == 7 and set(stats["by_prompt"].values()) == {1}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_chunk_says_once_when_every_item_needs_no_slot_and_before_it_ends(bench: Bench) -> None:
    """The window's place of a message is freed then (worker.window), not after its records."""
    batch_id = bench.submit([f"ended {i}" for i in range(6)])
    runtime = Runtime.start(bench.settings(), celery_app, concurrency=2)
    ended: list[str] = []
    try:
        ends = runtime.run(run_chunk(runtime, batch_id, [0, 1, 2, 2, 3], ItemState(),
                                     on_end=lambda: ended.append("item"), on_all_ended=lambda: ended.append("all")))
    finally:
        runtime.close()
    assert ends == [Done("ok")] * 4  # a seq given twice runs once
    assert ended == ["item"] * 4 + ["all"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_an_error_at_any_step_releases_the_claim_and_puts_the_item_back(bench: Bench) -> None:
    batch_id = bench.submit([f"broken {i}" for i in range(3)])
    runtime = Runtime.start(bench.settings(), celery_app, concurrency=4)
    real_record = runtime.io.record
    failures = {"left": 1}

    async def record_failing_once(arg: Any) -> bool:
        if arg[1] == 1 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("a bug in recording")
        return await real_record(arg)

    runtime.io.record = record_failing_once  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        ends = bench.drain(runtime)
        assert time.monotonic() - started < 10
        assert ends[0] == ends[2] == Done("ok") and isinstance(ends[1], Handoff)
        assert not bench.client.exists(keys.claim(batch_id, 1))  # released at once, not after a lease
        [(again_batch, again_seqs, again)] = bench.queued()
        assert (again_batch, again_seqs, again["attempt"]) == (batch_id, [1], 2)
        assert ends[1].countdown <= 2.0  # back within seconds
        assert bench.drain(runtime) == [Done("ok")]  # the put-back message finishes it
    finally:
        runtime.close()
    assert bench.store.info(batch_id).counts == {"ok": 3}


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_tiny_redis_pool_is_waited_for_never_an_item_lost(bench: Bench) -> None:
    batch_id = bench.submit([f"pool {i}" for i in range(200)])
    runtime = Runtime.start(bench.settings(AIVVM_BATCH_REDIS_POOL="1"), celery_app, concurrency=64)
    try:
        ends = bench.drain(runtime)
    finally:
        runtime.close()
    assert ends == [Done("ok")] * 200
    assert bench.store.info(batch_id).counts == {"ok": 200}
    assert set(bench.stub.stats()["by_prompt"].values()) == {1}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_claim_is_a_lease_renewed_while_the_worker_lives(bench: Bench) -> None:
    batch_id = bench.submit(["[[stub latency=5 chunks=5]] longer than the lease"])
    runtime = Runtime.start(bench.settings(), celery_app, concurrency=2)  # lease 3 s, renewed every 1 s
    try:
        future = asyncio.run_coroutine_threadsafe(
            run_chunk(runtime, batch_id, [0], ItemState()), runtime.loop)
        deadline = time.monotonic() + 3
        while not bench.client.exists(keys.claim(batch_id, 0)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ttls = []
        for _ in range(8):  # 4 s: longer than the lease; the claim never lapses
            ttls.append(bench.client.pttl(keys.claim(batch_id, 0)))
            time.sleep(0.5)
        assert future.result(timeout=20) == [Done("ok")]
    finally:
        runtime.close()
    alive = [t for t in ttls if t > 0]
    assert len(alive) >= 7 and max(alive) <= 3000, ttls  # a short lease, kept alive
    assert bench.stub.stats()["requests"] == 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_dead_workers_claims_lapse_within_a_lease(bench: Bench) -> None:
    batch_id = bench.submit(["[[stub latency=20 chunks=2]] never finished here"])
    runtime = Runtime.start(bench.settings(), celery_app, concurrency=2)
    future = asyncio.run_coroutine_threadsafe(run_chunk(runtime, batch_id, [0], ItemState()), runtime.loop)
    deadline = time.monotonic() + 5
    while not bench.client.exists(keys.claim(batch_id, 0)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runtime.loop.call_soon_threadsafe(runtime.loop.stop)  # the loop dies: nothing renews any more
    time.sleep(3.5)
    assert not bench.client.exists(keys.claim(batch_id, 0))
    future.cancel()
    runtime.close()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_redis_memory_per_queued_item_is_small(tmp_path: Path) -> None:
    """100,000 lines submitted with no worker: chunked messages cost a few bytes an item
    (one message per item cost 935 bytes; measured with chunks: about 330 bytes an item in all)."""
    with EmbeddedRedis(tmp_path / "redis", persistent=False) as server:
        client = redis.Redis.from_url(server.url)
        settings = Settings.from_env({}, redis_url=server.url)
        configure(celery_app, settings)
        source = tmp_path / "in.jsonl"
        source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Write a haiku about queue number {i}"})
                                  + "\n" for i in range(100_000)))
        before = int(client.info("memory")["used_memory"])
        submit_file(BatchStore(client), Publisher(client, celery_app), source, BatchOptions(), settings)
        per_item = (int(client.info("memory")["used_memory"]) - before) / 100_000
        assert client.llen(keys.QUEUE) < 100_000 / 32
        assert per_item < 600, per_item
