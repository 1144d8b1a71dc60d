"""Crash and fault tests: kill workers, restart Redis, kill `run`, mix provider faults, redeliver.

Every test has its own Redis (append-only), its own stand-in provider and its own worker
processes, because it kills things. Timeouts are short so that redelivery happens within
the test; every test asserts exactly one result per input line and counts that add up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import SPLIT_TEXT, StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs import keys
from jobs.config import Settings
from jobs.errors import BatchNotFound, StoreUnavailable
from jobs.queue import Publisher, celery_settings, configure
from jobs.queue import app as celery_app
from jobs.records import BatchInfo, BatchOptions
from jobs.store import BatchStore
from jobs.submit import submit_file
from tests.private_server_helpers import private_redis

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
ROOT = Path(__file__).resolve().parent.parent

# Short enough that a dead worker's messages come back within the test.
CHAOS_ENV = {
    "AIVVM_BATCH_VISIBILITY_TIMEOUT": "12",
    "AIVVM_BATCH_ITEM_DEADLINE": "6",
    "AIVVM_BATCH_BACKOFF_CAP": "2",
    "AIVVM_BATCH_BACKOFF_BASE": "0.2",
    "AIVVM_BATCH_READ_TIMEOUT": "3",
    "AIVVM_BATCH_CONNECT_TIMEOUT": "2",
    "AIVVM_BATCH_MAX_RETRIES": "5",
}
MAX_RETRIES = int(CHAOS_ENV["AIVVM_BATCH_MAX_RETRIES"])
# An unfinished item with no claim and no message queued or unacknowledged anywhere can only
# finish if the product enqueues it again: give it this long (over twice the visibility
# timeout) before calling it lost, instead of waiting for the whole test timeout.
ORPHAN_GRACE = 30.0


def reply(prompt: str) -> str:
    return f"Stand-in reply to: {prompt}"


class Cluster:
    """One test's own Redis, stand-in providers and worker processes; all stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis_server = private_redis(tmp_path / "redis", persistent=True).start()
        self.settings = Settings.from_env(CHAOS_ENV, redis_url=self.redis_server.url)
        self.client = redis.Redis.from_url(self.redis_server.url, socket_connect_timeout=2)
        self.store = BatchStore(self.client, self.settings.result_ttl)
        configure(celery_app, self.settings)
        self.publisher = Publisher(self.client, celery_app)
        self.stubs: list[StubServer] = []
        self.worker_groups: list[WorkerProcesses] = []
        self.files = 0

    def stub(self, **kwargs: Any) -> StubServer:
        server = StubServer(**kwargs).start()
        self.stubs.append(server)
        return server

    def start_workers(self, count: int = 2, concurrency: int = 16, ready_timeout: float = 60.0,
                      env: dict[str, str] | None = None) -> WorkerProcesses:
        log_dir = self.tmp_path / "logs" / f"group-{len(self.worker_groups)}"
        workers = WorkerProcesses(self.redis_server.url, count=count, concurrency=concurrency,
                                  log_dir=log_dir, env={**CHAOS_ENV, **(env or {})}, loglevel="INFO")
        self.worker_groups.append(workers)
        workers.start()
        deadline = time.monotonic() + ready_timeout
        logs = [log_dir / f"worker-{i}.log" for i in range(count)]
        while not all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
            assert workers.alive() == count, self.worker_logs()
            assert time.monotonic() < deadline, f"workers not ready after {ready_timeout}s\n{self.worker_logs()}"
            time.sleep(0.1)
        return workers

    def worker_logs(self) -> str:
        """Each worker log's errors, then its tail."""
        parts = []
        for path in sorted((self.tmp_path / "logs").glob("*/*.log")):
            text = path.read_text(errors="replace")
            errors = [line for line in text.splitlines() if "CRITICAL/" in line or "ERROR/" in line][:10]
            parts.append(f"--- {path.parent.name}/{path.name}\n" + "\n".join(errors) + "\n...\n" + text[-2000:])
        return "\n".join(parts)

    def write(self, lines: list[dict[str, Any]]) -> Path:
        self.files += 1
        path = self.tmp_path / f"batch-{self.files}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    def submit(self, lines: list[dict[str, Any]], **options: Any) -> str:
        report = submit_file(self.store, self.publisher, self.write(lines), BatchOptions(**options),
                             self.settings)
        assert report.total == report.enqueued == len(lines)
        return report.batch_id

    def info(self, batch_id: str) -> BatchInfo | None:
        try:
            return self.store.info(batch_id)
        except StoreUnavailable:
            return None

    def wait_done(self, batch_id: str, at_least: int, timeout: float) -> BatchInfo:
        """Until at least ``at_least`` items have a result (Redis may be away meanwhile)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info(batch_id)
            if info is not None and (info.done >= at_least or info.finished):
                return info
            assert time.monotonic() < deadline, (
                f"batch {batch_id}: fewer than {at_least} results after {timeout}s: {info}\n{self.worker_logs()}")
            time.sleep(0.05)

    def wait_finished(self, batch_id: str, timeout: float, workers: WorkerProcesses | None = None,
                      alive: int = 0) -> BatchInfo:
        """Until the batch is finished.

        Fails early when an unfinished item has no message left, or when fewer than ``alive``
        of ``workers`` are still running.
        """
        deadline = time.monotonic() + timeout
        orphans_since: float | None = None
        while True:
            info = self.info(batch_id)
            if info is not None and info.finished:
                return info
            if workers is not None:
                assert workers.alive() >= alive, (
                    f"worker processes exited (codes {[p.poll() for p in workers.processes]}) before batch "
                    f"{batch_id} finished ({info})\n{self.worker_logs()}")
            orphans = self.orphans(batch_id, info.total) if info is not None and info.total else []
            orphans_since = (orphans_since or time.monotonic()) if orphans else None
            assert not (orphans and time.monotonic() - orphans_since > ORPHAN_GRACE), (
                f"batch {batch_id}: items {orphans} are lost: no result, no claim, and no message "
                f"for them is queued or unacknowledged anywhere ({info})")
            assert time.monotonic() < deadline, (
                f"batch {batch_id} not finished after {timeout}s: {info}, unfinished items "
                f"{list(self.store.unfinished(batch_id, info.total or 0)) if info else '?'}\n{self.worker_logs()}")
            time.sleep(0.1)

    def orphans(self, batch_id: str, total: int) -> list[int]:
        """Unfinished items that nothing will ever complete: no claim, no message queued or unacked."""
        try:
            if self.client.llen(keys.QUEUE) or self.client.hlen("unacked"):
                return []
            unfinished = list(self.store.unfinished(batch_id, total))
            return [seq for seq in unfinished if not self.client.exists(keys.claim(batch_id, seq))]
        except (redis.exceptions.ConnectionError, StoreUnavailable):
            return []

    def wait_queue_drained(self, timeout: float) -> None:
        """Until no message is queued or held unacknowledged (late duplicates have run)."""
        deadline = time.monotonic() + timeout
        while self.client.llen(keys.QUEUE) or self.client.hlen("unacked"):
            assert time.monotonic() < deadline, (
                f"queue not drained after {timeout}s: {self.client.llen(keys.QUEUE)} queued, "
                f"{self.client.hlen('unacked')} unacked")
            time.sleep(0.2)

    def results(self, batch_id: str, total: int) -> list[dict[str, Any]]:
        """Exactly one result per input line, in input order, and counts that add up to the total."""
        pairs = list(self.store.iter_results(batch_id, total))
        assert [seq for seq, _ in pairs] == list(range(total))
        missing = [seq for seq, raw in pairs if raw is None]
        assert not missing, f"items without a result: {missing}"
        assert self.client.hlen(keys.results(batch_id)) == total
        info = self.store.info(batch_id)
        assert info.total == total
        assert sum(info.counts.values()) == total, info.counts
        assert info.done == total
        results = [json.loads(raw) for _, raw in pairs if raw is not None]
        assert [r["line"] for r in results] == list(range(1, total + 1))
        return results

    def close(self) -> None:
        for workers in self.worker_groups:
            workers.stop(timeout=15)
        for server in self.stubs:
            server.stop()
        self.redis_server.stop()
        self.client.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # configure() rewrites the shared Celery app's settings: put them back afterwards.
    saved = {key: celery_app.conf.get(key) for key in celery_settings(Settings())}
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()
        celery_app.conf.update(saved)


def kill(process: subprocess.Popen[bytes], sig: int) -> None:
    os.kill(process.pid, sig)


@pytest.mark.timeout(90)
def test_workers_answer_remote_control_only_with_task_events(cluster: Cluster) -> None:
    """Celery's remote control (Flower's workers page) is a pub/sub connection per worker: only
    when task events are on (AIVVM_BATCH_TASK_EVENTS=1), as for Flower."""
    def subscribed() -> int:
        return sum(1 for c in cluster.store.redis.client_list() if int(c.get("sub", 0)) + int(c.get("psub", 0)))

    quiet = cluster.start_workers(count=1, concurrency=4)
    assert subscribed() == 0
    quiet.stop()
    cluster.start_workers(count=1, concurrency=4, env={"AIVVM_BATCH_TASK_EVENTS": "1"})
    deadline = time.monotonic() + 10
    while subscribed() == 0:  # its control consumer subscribes as its consumer starts
        assert time.monotonic() < deadline, cluster.worker_logs()
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_worker_killed_mid_batch_loses_nothing(cluster: Cluster) -> None:
    total = 300
    stub = cluster.stub(latency=0.3, chunks=3)
    workers = cluster.start_workers(count=2, concurrency=16)
    lines = [{"id": f"k{i}", "prompt": f"kill {i}"} for i in range(total)]
    batch_id = cluster.submit(lines, base_url=stub.base_url)

    at_kill = cluster.wait_done(batch_id, total // 2, timeout=60)
    assert not at_kill.finished
    victim = workers.processes[0]
    kill(victim, signal.SIGKILL)
    victim.wait(10)
    killed_at = time.monotonic()

    # The dead worker's messages come back after the visibility timeout, at a sweep of the other.
    cluster.wait_finished(batch_id, timeout=140, workers=workers, alive=1)
    recovered_in = time.monotonic() - killed_at
    results = cluster.results(batch_id, total)
    assert [r["id"] for r in results] == [f"k{i}" for i in range(total)]
    assert [r["status"] for r in results] == ["ok"] * total
    assert all(r["output"] == reply(f"kill {i}") for i, r in enumerate(results))
    assert cluster.store.info(batch_id).counts == {"ok": total}
    assert workers.alive() == 1

    cluster.wait_queue_drained(timeout=30)
    assert cluster.store.info(batch_id).counts == {"ok": total}
    calls = stub.stats()["by_prompt"]
    assert set(calls) == {f"kill {i}" for i in range(total)}
    twice = sorted(p for p, n in calls.items() if n > 1)
    # Only items in flight on the killed worker (at most its concurrency, 16) may be sent twice:
    # their request reached the provider but no result was recorded before the kill.
    # Observed: 15-16 a run, i.e. every item the killed worker was streaming (figures with -s).
    # Recovery takes about the visibility timeout (12 s, shorter than the lease here) plus a sweep:
    # the workers' sweep puts back the messages no live worker renewed for that long.
    assert max(calls.values()) <= 2
    assert len(twice) <= 16, twice
    print(f"\nworker kill: {at_kill.done}/{total} done at the kill, recovered in {recovered_in:.1f}s, "
          f"{len(twice)} prompts sent twice")


@pytest.mark.timeout(150)
def test_warm_shutdown_mid_batch_loses_nothing(cluster: Cluster) -> None:
    total = 150
    stub = cluster.stub(latency=0.5, chunks=3)
    workers = cluster.start_workers(count=2, concurrency=16)
    lines = [{"id": f"w{i}", "prompt": f"warm {i}"} for i in range(total)]
    batch_id = cluster.submit(lines, base_url=stub.base_url)

    at_term = cluster.wait_done(batch_id, total // 2, timeout=60)
    assert not at_term.finished
    victim = workers.processes[0]
    kill(victim, signal.SIGTERM)
    started = time.monotonic()
    # Warm shutdown: in-flight items finish, then the process exits by itself.
    assert victim.wait(60) == 0, cluster.worker_logs()
    exited_in = time.monotonic() - started

    cluster.wait_finished(batch_id, timeout=60, workers=workers, alive=1)
    results = cluster.results(batch_id, total)
    assert [r["id"] for r in results] == [f"w{i}" for i in range(total)]
    assert [r["status"] for r in results] == ["ok"] * total
    assert cluster.store.info(batch_id).counts == {"ok": total}
    cluster.wait_queue_drained(timeout=30)
    calls = stub.stats()["by_prompt"]
    assert set(calls) == {f"warm {i}" for i in range(total)}
    # A warm shutdown finishes what it started: nothing is sent twice.
    assert max(calls.values()) == 1, {p: n for p, n in calls.items() if n > 1}
    assert workers.alive() == 1
    print(f"\nwarm shutdown: exited in {exited_in:.1f}s")


@pytest.mark.timeout(180)
def test_redis_restart_mid_batch(cluster: Cluster) -> None:
    total = 200
    stub = cluster.stub(latency=0.3, chunks=3)
    workers = cluster.start_workers(count=2, concurrency=16)
    lines = [{"id": f"r{i}", "prompt": f"restart {i}"} for i in range(total)]
    batch_id = cluster.submit(lines, base_url=stub.base_url)
    out = cluster.tmp_path / "out.jsonl"
    collector_log = cluster.tmp_path / "collector.log"
    env = {**os.environ, **CHAOS_ENV, "AIVVM_BATCH_REDIS_URL": cluster.redis_server.url}
    with open(collector_log, "wb") as log:
        collector = subprocess.Popen([sys.executable, "-m", "aivvm_batch", "collect", batch_id, "-o", str(out),
                                      "--wait"], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log)
    try:
        at_stop = cluster.wait_done(batch_id, total // 2, timeout=60)
        assert not at_stop.finished
        port = cluster.redis_server.port
        cluster.redis_server.stop()  # SIGTERM: the append-only file is flushed
        time.sleep(2)
        cluster.redis_server.start(port=port)
        restarted = time.monotonic()

        cluster.wait_finished(batch_id, timeout=130, workers=workers, alive=2)
        finished_in = time.monotonic() - restarted
        # Both workers rode out the restart (none died on the reconnection).
        assert workers.alive() == 2, cluster.worker_logs()
        assert collector.wait(20) == 0, collector_log.read_text()
    finally:
        if collector.poll() is None:
            collector.kill()
            collector.wait()
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [f"r{i}" for i in range(total)]
    assert [r["status"] for r in results] == ["ok"] * total
    assert all(r["output"] == reply(f"restart {i}") for i, r in enumerate(results))
    assert cluster.results(batch_id, total) == results
    assert cluster.store.info(batch_id).counts == {"ok": total}
    calls = stub.stats()["by_prompt"]
    assert set(calls) == {f"restart {i}" for i in range(total)}
    twice = [p for p, n in calls.items() if n > 1]
    print(f"\nredis restart: {at_stop.done}/{total} done at the stop, finished {finished_in:.1f}s after the "
          f"restart, {len(twice)} prompts sent twice")


@pytest.mark.timeout(150)
def test_provider_faults_mixed_in_one_batch(cluster: Cluster) -> None:
    faults = cluster.stub(latency=0.0, chunks=4)
    slow_down = cluster.stub(latency=0.0, chunks=2)  # its own server: its request times are this item's
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    workers = cluster.start_workers(count=2, concurrency=8)
    try:
        mixed = [
            {"id": "s500", "prompt": "[[stub fault=status code=500 times=1]] five hundred"},
            {"id": "s502", "prompt": "[[stub fault=status code=502 times=2]] five oh two"},
            {"id": "s503", "prompt": "[[stub fault=status code=503 times=1]] five oh three"},
            {"id": "cut", "prompt": "[[stub fault=cut times=1]] cut once"},
            {"id": "stall", "prompt": "[[stub fault=stall stall=10 times=1]] stall once"},
            {"id": "bad", "prompt": "[[stub fault=badbytes]] bad bytes"},
            {"id": "split", "prompt": "[[stub fault=split]] split characters"},
            {"id": "s400", "prompt": "[[stub fault=status code=400]] bad request"},
            {"id": "gpt5", "prompt": "which model", "model": "gpt-5"},
            {"id": "fine", "prompt": "no fault"},
        ]
        mixed_id = cluster.submit(mixed, base_url=faults.base_url)
        limited_id = cluster.submit([{"id": "s429", "prompt": "[[stub fault=429 retry_after=2 times=1]] slow down"}],
                                    base_url=slow_down.base_url)
        refused_id = cluster.submit([{"id": "refused", "prompt": "nobody home"}],
                                    base_url=f"http://127.0.0.1:{closed.getsockname()[1]}")
        for batch_id in (mixed_id, limited_id, refused_id):
            cluster.wait_finished(batch_id, timeout=90, workers=workers, alive=2)
    finally:
        closed.close()

    by_id = {r["id"]: r for r in cluster.results(mixed_id, len(mixed))}
    expected = {  # id: (status, error type, attempts, requests seen by the provider)
        "s500": ("ok", None, 2, 2),
        "s502": ("ok", None, 3, 3),
        "s503": ("ok", None, 2, 2),
        "cut": ("ok", None, 2, 2),
        "stall": ("ok", None, 2, 2),
        "bad": ("ok", None, 1, 1),
        "split": ("ok", None, 1, 1),
        "s400": ("failed", "http_error", 1, 1),
        "gpt5": ("failed", "unsupported_model", 1, 0),
        "fine": ("ok", None, 1, 1),
    }
    prompts = {"s500": "five hundred", "s502": "five oh two", "s503": "five oh three", "cut": "cut once",
               "stall": "stall once", "bad": "bad bytes", "split": "split characters", "s400": "bad request",
               "gpt5": "which model", "fine": "no fault"}
    calls = faults.stats()["by_prompt"]
    seen = {
        item: (by_id[item]["status"], (by_id[item]["error"] or {}).get("type"), by_id[item]["attempts"],
               calls.get(prompts[item], 0))
        for item in expected
    }
    assert seen == expected
    for item in ("s500", "s502", "s503", "cut", "stall", "fine"):
        assert by_id[item]["output"] == reply(prompts[item]), by_id[item]
        assert by_id[item]["error"] is None
    assert "\ufffd" in by_id["bad"]["output"]
    assert by_id["bad"]["output"].replace("\ufffd", "") == reply("bad bytes")
    assert by_id["split"]["output"] == f"{SPLIT_TEXT} {reply('split characters')}"
    assert by_id["s400"]["error"]["message"].startswith("HTTP 400")
    assert by_id["gpt5"]["error"] == {"type": "unsupported_model", "message": "Model is not supported: gpt-5"}
    assert cluster.store.info(mixed_id).counts == {"ok": 8, "failed": 2}

    [limited] = cluster.results(limited_id, 1)
    assert (limited["status"], limited["attempts"], limited["output"]) == ("ok", 2, reply("slow down"))
    stats = slow_down.stats()
    assert stats["by_prompt"] == {"slow down": 2}
    first, second = stats["times"]
    assert second - first >= 2.0, "Retry-After: 2 was not honoured"

    [refused] = cluster.results(refused_id, 1)
    assert refused["status"] == "failed"
    assert refused["error"]["type"] == "connection_error"
    assert refused["attempts"] == MAX_RETRIES + 1


@pytest.mark.timeout(180)
def test_run_killed_with_sigkill_then_resumed(tmp_path: Path) -> None:
    """SIGKILL of `run` (its Redis gets SIGTERM, its workers SIGKILL), then the same command again."""
    total, concurrency = 40, 4
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"i{i}", "prompt": f"[[stub latency=0.4 chunks=2]] item {i}"}) + "\n"
                              for i in range(total)))
    out = tmp_path / "out.jsonl"
    with StubServer() as stub:
        args = [sys.executable, "-m", "aivvm_batch", "run", str(source), "-o", str(out),
                "--base-url", stub.base_url, "--concurrency", str(concurrency),
                "--state-dir", str(tmp_path / "state")]
        env = {**os.environ, **CHAOS_ENV, "AIVVM_BATCH_REDIS_URL": ""}
        with open(tmp_path / "first.log", "wb") as log:
            first = subprocess.Popen(args, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while stub.stats()["requests"] < total // 2:
                assert first.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "the first run sent too few requests"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert not out.exists()
        calls_before = stub.stats()["requests"]
        assert total // 2 <= calls_before < total

        second = subprocess.run(args, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr + "\n" + (tmp_path / "state" / "logs" / "worker-0.log").read_text(
            errors="replace")[-3000:]
        stats = stub.stats()
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [f"i{i}" for i in range(total)]
    assert [r["status"] for r in results] == ["ok"] * total
    assert all(r["output"] == reply(f"item {i}") for i, r in enumerate(results))
    calls = stats["by_prompt"]
    assert set(calls) == {f"item {i}" for i in range(total)}
    # Finished items are not sent again: only the ones in flight at the kill (<= concurrency).
    assert stats["requests"] == sum(calls.values()) <= total + concurrency, calls
    assert max(calls.values()) <= 2


@pytest.mark.timeout(150)
def test_duplicate_deliveries_under_load(cluster: Cluster) -> None:
    total = 100
    stub = cluster.stub(latency=0.3, chunks=3)
    workers = cluster.start_workers(count=2, concurrency=16)
    lines = [{"id": f"d{i}", "prompt": f"dup {i}"} for i in range(total)]
    batch_id = cluster.submit(lines, base_url=stub.base_url)
    cluster.publisher.publish(batch_id, list(range(total)))
    cluster.publisher.publish(batch_id, list(range(total)))

    cluster.wait_finished(batch_id, timeout=90, workers=workers, alive=2)
    # Let every extra delivery (and the retries of those that found the item busy) run out.
    cluster.wait_queue_drained(timeout=60)
    results = cluster.results(batch_id, total)
    assert [r["id"] for r in results] == [f"d{i}" for i in range(total)]
    assert [r["status"] for r in results] == ["ok"] * total
    assert all(r["attempts"] == 1 for r in results)
    assert cluster.store.info(batch_id).counts == {"ok": total}
    calls = stub.stats()["by_prompt"]
    assert calls == {f"dup {i}": 1 for i in range(total)}
    assert stub.stats()["requests"] == total


@pytest.mark.timeout(120)
def test_message_taken_by_a_worker_killed_before_recording_it_is_not_lost(cluster: Cluster) -> None:
    """The window of test_worker_killed_mid_batch_loses_nothing, made deterministic.

    kombu's Redis transport takes a message with BRPOP and only afterwards, in a second round
    trip, writes it to the ``unacked`` hash from which a dead worker's messages are restored.
    A worker killed in between (here: frozen with SIGSTOP while its BRPOP is pending, so Redis
    hands it the message, then SIGKILLed) takes the item's only message with it.
    """
    stub = cluster.stub()
    first = cluster.start_workers(count=1, concurrency=4)
    warm = cluster.submit([{"id": "warm", "prompt": "warm up"}], base_url=stub.base_url)
    cluster.wait_finished(warm, timeout=30)
    victim = first.processes[0]

    taken = taken_prompt = None
    for attempt in range(5):  # an idle worker nearly always has a BRPOP pending; retry if we missed it
        time.sleep(0.5)  # let the worker go back to waiting in BRPOP
        kill(victim, signal.SIGSTOP)
        prompt = f"taken by a frozen worker {attempt}"
        batch_id = cluster.submit([{"id": "taken", "prompt": prompt}], base_url=stub.base_url)
        time.sleep(0.3)
        if not cluster.client.llen(keys.QUEUE) and not cluster.client.hlen("unacked"):
            taken, taken_prompt = batch_id, prompt  # Redis popped it for the frozen worker, which recorded nothing
            break
        kill(victim, signal.SIGCONT)
        cluster.wait_finished(batch_id, timeout=30)
    assert taken is not None, "the frozen worker never had a BRPOP pending"
    kill(victim, signal.SIGKILL)
    victim.wait(10)

    # Another worker is up; whatever the product does about a vanished message, the item must end.
    second = cluster.start_workers(count=1, concurrency=4)
    cluster.wait_finished(taken, timeout=70, workers=second, alive=1)
    [result] = cluster.results(taken, 1)
    assert result["status"] == "ok"
    assert result["output"] == reply(taken_prompt)
    assert stub.stats()["by_prompt"][taken_prompt] == 1


@pytest.mark.timeout(60)
def test_a_batch_lost_in_a_restart_without_persistence_is_explained(tmp_path: Path) -> None:
    """`collect` on a batch that a Redis without persistence lost says the Redis may have lost it."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=False).start()
    saved = {key: celery_app.conf.get(key) for key in celery_settings(Settings())}
    try:
        settings = Settings.from_env({}, redis_url=server.url)
        client = redis.Redis.from_url(server.url)
        configure(celery_app, settings)
        store, publisher = BatchStore(client), Publisher(client, celery_app)
        source = tmp_path / "in.jsonl"
        source.write_text(json.dumps({"prompt": "soon forgotten"}) + "\n")
        lost = submit_file(store, publisher, source, BatchOptions(), settings).batch_id
        port = server.port
        server.stop()
        server.start(port=port)
        collected = subprocess.run(
            [sys.executable, "-m", "aivvm_batch", "collect", lost, "-o", str(tmp_path / "out.jsonl")],
            capture_output=True, text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL,
            env={**os.environ, "AIVVM_BATCH_REDIS_URL": server.url})
        assert collected.returncode == 2
        assert collected.stderr.count("\n") == 1, collected.stderr
        assert f"batch '{lost}' not found" in collected.stderr
        assert "this Redis holds no batch at all" in collected.stderr
        assert "lost its data" in collected.stderr
        submit_file(store, publisher, source, BatchOptions(), settings)  # the index is no longer empty
        with pytest.raises(BatchNotFound, match=r"keeps no data across restarts .*started \d+ s ago"):
            store.info(lost)
    finally:
        server.stop()
        celery_app.conf.update(saved)


def test_an_unknown_batch_on_a_persistent_redis_has_no_data_loss_hint(cluster: Cluster) -> None:
    cluster.store.create("bknown", "x", BatchOptions())
    with pytest.raises(BatchNotFound) as raised:
        cluster.store.info("bunknown")
    assert raised.value.hint == ""
