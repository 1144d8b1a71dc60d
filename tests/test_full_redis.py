"""A Redis that is full (maxmemory, noeviction) or that evicts keys, with real workers.

Each test starts its own redis-server with a memory limit, the stand-in provider and
real Celery worker processes. Redis is filled with a filler key while items are in
flight, then emptied again: the batch must finish with one result per line and no item
sent to the provider twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs import keys
from jobs.config import Settings
from jobs.errors import ConfigError, StoreFull
from jobs.queue import Publisher, celery_settings, configure
from jobs.queue import app as celery_app
from jobs.records import BatchInfo, BatchOptions
from jobs.store import BatchStore
from jobs.submit import submit_file

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
ROOT = Path(__file__).resolve().parent.parent

# A visibility timeout far longer than the test: nothing may rely on redelivery by it.
FULL_ENV = {
    "AIVVM_BATCH_VISIBILITY_TIMEOUT": "900",
    "AIVVM_BATCH_ITEM_DEADLINE": "20",
    "AIVVM_BATCH_BACKOFF_CAP": "2",
    "AIVVM_BATCH_BACKOFF_BASE": "0.2",
    "AIVVM_BATCH_READ_TIMEOUT": "5",
    "AIVVM_BATCH_CONNECT_TIMEOUT": "2",
    "AIVVM_BATCH_MAX_RETRIES": "3",
    "AIVVM_BATCH_SWEEP_INTERVAL": "2",
    "AIVVM_BATCH_PREFETCH_MULTIPLIER": "1",
    # every retry is handed on as a message, so that retries are published into the full Redis
    "AIVVM_BATCH_INLINE_WAIT": "0",
}
FILLER = "test:filler"


def cli(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIVVM_BATCH_REDIS_URL": url}
    return subprocess.run([sys.executable, "-m", "aivvm_batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


class Limited:
    """One test's own Redis with a memory limit and policy, stand-in and workers."""

    def __init__(self, tmp_path: Path, server: EmbeddedRedis, stub: StubServer) -> None:
        self.tmp_path = tmp_path
        self.server = server
        self.url = self.server.url
        self.settings = Settings.from_env(FULL_ENV, redis_url=self.url)
        self.client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        self.store = BatchStore(self.client, self.settings.result_ttl)
        configure(celery_app, self.settings)
        self.publisher = Publisher(self.client, celery_app)
        self.stub = stub
        self.workers: WorkerProcesses | None = None
        self.files = 0

    def start_workers(self, count: int = 2, concurrency: int = 16) -> WorkerProcesses:
        log_dir = self.tmp_path / "logs"
        self.workers = WorkerProcesses(self.url, count=count, concurrency=concurrency, log_dir=log_dir,
                                       env=FULL_ENV, loglevel="INFO").start()
        deadline = time.monotonic() + 60
        logs = [log_dir / f"worker-{i}.log" for i in range(count)]
        while not all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
            assert self.workers.alive() == count, self.logs()
            assert time.monotonic() < deadline, f"workers not ready\n{self.logs()}"
            time.sleep(0.1)
        return self.workers

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.tmp_path / "logs").glob("*.log")))

    def write(self, lines: list[Any]) -> Path:
        self.files += 1
        path = self.tmp_path / f"in-{self.files}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    def submit(self, lines: list[Any]) -> str:
        return submit_file(self.store, self.publisher, self.write(lines),
                           BatchOptions(base_url=self.stub.base_url), self.settings).batch_id

    def fill(self) -> int:
        """Fill Redis up to its limit with one list, in smaller and smaller blocks (a refused
        command's own buffer is freed again); returns the bytes added."""
        added = 0
        for size in (65536, 4096, 256, 16, 1):
            while True:
                try:
                    self.client.rpush(FILLER, b"x" * size)
                except redis.exceptions.OutOfMemoryError:
                    break
                added += size
        return added

    @contextmanager
    def kept_full(self) -> Iterator[None]:
        """Redis full until the block ends: filled to its limit, and the limit then lowered
        below what it holds, so that the memory workers free (taking messages) does not
        let writes through."""
        self.fill()
        limit = int(self.client.config_get("maxmemory")["maxmemory"])
        used = int(self.client.info("memory")["used_memory"])
        self.client.config_set("maxmemory", str(used - 4 * 2**20))
        try:
            yield
        finally:
            self.client.config_set("maxmemory", str(limit))
            self.client.delete(FILLER)

    def wait_finished(self, batch_id: str, timeout: float) -> BatchInfo:
        deadline = time.monotonic() + timeout
        while True:
            info = self.store.info(batch_id)
            if info.finished:
                return info
            assert self.workers is None or self.workers.alive() == self.workers.count, (
                f"a worker died: {info}\n{self.logs()}")
            assert time.monotonic() < deadline, (
                f"not finished after {timeout}s: {info}, unfinished "
                f"{list(self.store.unfinished(batch_id, info.total or 0))[:20]}, "
                f"claims {len(list(self.client.scan_iter(match=keys.claim_pattern(batch_id))))}, "
                f"queued {self.client.llen(keys.QUEUE)}, unacked {self.client.hlen('unacked')}\n{self.logs()}")
            time.sleep(0.1)

    def results(self, batch_id: str, total: int) -> list[dict[str, Any]]:
        pairs = list(self.store.iter_results(batch_id, total))
        assert [raw is not None for _, raw in pairs] == [True] * total
        assert self.client.hlen(keys.results(batch_id)) == total
        return [json.loads(raw) for _, raw in pairs if raw is not None]

    def close(self) -> None:
        """Its workers and client; its Redis and stand-in stop with the factories that made them."""
        if self.workers is not None:
            self.workers.stop(timeout=15)
        self.client.close()


@pytest.fixture
def limited_factory(tmp_path: Path, redis_factory: Callable[..., EmbeddedRedis],
                    stub_factory: Callable[..., StubServer]) -> Iterator[Any]:
    saved = {key: celery_app.conf.get(key) for key in celery_settings(Settings())}
    made: list[Limited] = []

    def make(maxmemory: str = "40mb", policy: str = "noeviction") -> Limited:
        folder = tmp_path / f"r{len(made)}"
        folder.mkdir()
        made.append(Limited(folder, redis_factory(maxmemory=maxmemory, policy=policy), stub_factory()))
        return made[-1]

    try:
        yield make
    finally:
        for one in made:
            one.close()
        celery_app.conf.update(saved)


@pytest.mark.timeout(240)
def test_workers_wait_out_a_full_redis_and_pay_each_item_once(limited_factory: Any) -> None:
    full = limited_factory()
    full.start_workers(count=2, concurrency=8)
    total = 200
    # every tenth reply is cut once, mid-stream: some of those retries are published into the full Redis
    lines = [{"id": f"t{i}", "prompt": f"[[stub fault=cut times=1 latency=1.2 chunks=4]] flaky {i}"}
             if i % 10 == 5 else {"id": f"f{i}", "prompt": f"[[stub latency=0.6 chunks=3]] full {i}"}
             for i in range(total)]
    batch_id = full.submit(lines)
    deadline = time.monotonic() + 30
    while full.store.info(batch_id).done < 20:
        assert time.monotonic() < deadline, full.logs()
        time.sleep(0.05)
    with full.kept_full():
        done_when_full = full.store.info(batch_id).done
        time.sleep(4)  # replies in flight arrive, and cannot be recorded
        assert full.store.info(batch_id).done <= done_when_full + 2 * 8
        logs = full.logs(tail=10**8)
        assert "record the reply: Redis is full" in logs, "no paid reply had to wait"
        assert "publish its retry: Redis is full" in logs, "no retry had to wait"
        status = cli("status", batch_id, url=full.url)
        assert status.returncode == 0, status.stderr
        assert "Redis is full" in status.stdout, status.stdout
        assert full.workers is not None and full.workers.alive() == 2, full.logs()
    info = full.wait_finished(batch_id, timeout=90)
    results = full.results(batch_id, total)
    assert [r["status"] for r in results] == ["ok"] * total, [r for r in results if r["status"] != "ok"][:3]
    assert info.counts == {"ok": total}
    by_prompt = full.stub.stats()["by_prompt"]
    assert {p: n for p, n in by_prompt.items() if p.startswith("full") and n != 1} == {}
    assert {p: n for p, n in by_prompt.items() if p.startswith("flaky") and n != 2} == {}
    logs = full.logs(tail=10**8)
    assert "Redis is full" in logs
    assert "Unrecoverable error" not in logs


@pytest.mark.timeout(180)
def test_a_worker_taking_items_from_a_full_redis_calls_no_provider_until_it_can_claim(
        limited_factory: Any) -> None:
    full = limited_factory()
    total = 40
    batch_id = full.submit([{"id": f"c{i}", "prompt": f"claim {i}"} for i in range(total)])
    with full.kept_full():
        full.start_workers(count=1, concurrency=4)  # and it starts in a full Redis
        time.sleep(3)
        assert full.stub.stats()["requests"] == 0, "a provider call started without a claim"
        assert full.workers is not None and full.workers.alive() == 1, full.logs()
    full.wait_finished(batch_id, timeout=60)
    results = full.results(batch_id, total)
    assert [r["status"] for r in results] == ["ok"] * total
    assert set(full.stub.stats()["by_prompt"].values()) == {1}
    assert "claim: Redis is full" in full.logs(tail=10**8)


@pytest.mark.timeout(120)
def test_submit_into_a_full_redis_fails_in_one_line_and_leaves_nothing(limited_factory: Any) -> None:
    full = limited_factory("20mb")
    source = full.write([{"id": f"s{i}", "prompt": "p" * 2000 + str(i)} for i in range(14_000)])
    submitted = cli("submit", str(source), "--base-url", full.stub.base_url, url=full.url, timeout=120)
    assert submitted.returncode == 2, submitted.stderr
    assert submitted.stderr.count("\n") == 1 and "Traceback" not in submitted.stderr, submitted.stderr
    assert "Redis is full" in submitted.stderr and "nothing was submitted" in submitted.stderr
    assert full.client.zcard(keys.BATCH_INDEX) == 0
    assert [k for k in full.client.scan_iter(match=f"{keys.PREFIX}:*")] == []
    # what was queued before Redis filled up finds no batch: a worker pays for nothing
    full.start_workers(count=1, concurrency=8)
    deadline = time.monotonic() + 30
    while full.client.llen(keys.QUEUE) or full.client.hlen("unacked"):
        assert time.monotonic() < deadline, full.logs()
        time.sleep(0.1)
    assert full.stub.stats()["requests"] == 0


def test_store_full_is_translated_at_the_store_boundary(limited_factory: Any) -> None:
    full = limited_factory("20mb")
    batch_id = full.submit([{"prompt": "one"}])
    full.fill()
    with pytest.raises(StoreFull, match="Redis is full"):
        full.store.claim(batch_id, 0, "token", 10)
    memory = full.store.memory()
    assert memory.full and memory.policy == "noeviction" and memory.maxmemory == 20 * 1024 * 1024


def test_a_claim_can_be_kept_and_released_in_a_full_redis(limited_factory: Any) -> None:
    """What a worker holding a paid reply needs while Redis is full: PEXPIRE and DEL still work."""
    full = limited_factory("20mb")
    batch_id = full.submit([{"prompt": "one"}])
    assert full.store.claim(batch_id, 0, "mine", 5).outcome.value == "claimed"
    full.fill()
    assert full.store.keep_claim(batch_id, 0, "mine", 600)
    assert full.client.pttl(keys.claim(batch_id, 0)) > 500_000
    assert not full.store.keep_claim(batch_id, 0, "someone else's", 600)
    full.store.release(batch_id, 0, "mine")
    assert not full.client.exists(keys.claim(batch_id, 0))


def test_the_rate_limiter_in_a_full_redis_says_come_back_later(limited_factory: Any) -> None:
    from worker.errors import RateLimited
    from worker.ratelimit import FULL_RETRY_SECONDS, RateLimiter

    async def inline(call: Callable[[], float]) -> float:
        return call()

    full = limited_factory("20mb")
    limiter = RateLimiter(full.client)
    full.fill()
    with pytest.raises(RateLimited) as refused:
        asyncio.run(limiter.acquire_async("scope", inline, rpm=60))
    assert refused.value.delay == FULL_RETRY_SECONDS
    limiter.pause("scope", 5)  # skipped, not raised


@pytest.mark.timeout(120)
def test_an_evicting_redis_is_refused_by_submit_run_and_workers(limited_factory: Any, tmp_path: Path) -> None:
    lru = limited_factory("50mb", "allkeys-lru")
    with pytest.raises(ConfigError, match="maxmemory-policy must be noeviction.*allkeys-lru"):
        lru.store.check_server()
    source = lru.write([{"prompt": "never sent"}])
    for args in (("submit", str(source)), ("run", str(source), "-o", str(tmp_path / "out.jsonl"),
                                             "--redis-url", lru.url)):
        proc = cli(*args, "--base-url", lru.stub.base_url, url=lru.url)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "maxmemory-policy must be noeviction" in proc.stderr and "allkeys-lru" in proc.stderr
    assert lru.client.zcard(keys.BATCH_INDEX) == 0
    log = tmp_path / "celery.log"
    with open(log, "wb") as out:
        plain = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker.tasks", "worker", "--pool", "threads",
             "--concurrency", "2", "--without-gossip", "--without-mingle"],
            env={**os.environ, "AIVVM_BATCH_REDIS_URL": lru.url}, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=60)
    assert plain.returncode != 0
    assert "maxmemory-policy must be noeviction" in log.read_text()
    worker = cli("worker", url=lru.url)
    assert worker.returncode != 0
    assert "maxmemory-policy must be noeviction" in worker.stdout + worker.stderr


def test_a_redis_without_config_get_falls_back_to_info(limited_factory: Any) -> None:
    lru = limited_factory("50mb", "volatile-lru")
    lru.client.execute_command("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    lru.client.acl_setuser("default", enabled=True, nopass=True, commands=["+@all", "-config"], keys=["*"],
                           channels=["*"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        lru.client.config_get("maxmemory-policy")
    with pytest.raises(ConfigError, match="volatile-lru"):
        lru.store.check_server()


def test_submit_into_a_redis_already_full_leaves_no_half_made_batch(limited_factory: Any) -> None:
    full = limited_factory("20mb")
    source = full.write([{"prompt": "x"}])
    full.fill()
    # just under the limit: the batch's first write is taken, and the next ones are refused
    while int(full.client.info("memory")["used_memory"]) >= 20 * 2**20:
        full.client.rpop(FILLER)
    with pytest.raises(StoreFull):
        submit_file(full.store, full.publisher, source, BatchOptions(), full.settings)
    assert [k for k in full.client.scan_iter(match=f"{keys.PREFIX}:*")] == []
