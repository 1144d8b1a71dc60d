"""Chaos at scale: 1,024 requests in flight (two worker processes of 512) against the stand-in.

A worker is SIGKILLed mid-batch; Redis (append-only) is restarted mid-batch; the workers'
Redis pool is made tiny on purpose. Every time: one result line per item, provider calls
within total + in flight, and a dead worker's items back within a minute (its claims and
messages are leases: nothing waits for the visibility timeout or an item deadline).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from aivvm_batch.workers import WorkerProcesses
from tests.test_reliability import CHAOS_ENV, Cluster, cluster, kill  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

IN_FLIGHT = 1024
# Defaults where they are the guarantee (lease 30 s, sweep every 10 s, visibility timeout an hour):
# a dead worker's work must come back by its lease, not by the visibility timeout.
SCALE_ENV = {**CHAOS_ENV, "AIVVM_BATCH_VISIBILITY_TIMEOUT": "3600", "AIVVM_BATCH_ITEM_DEADLINE": "60",
             "AIVVM_BATCH_READ_TIMEOUT": "20", "AIVVM_BATCH_CONNECT_TIMEOUT": "10"}


def start(cluster: Cluster, env: dict[str, str], name: str) -> WorkerProcesses:
    log_dir = cluster.tmp_path / "logs" / name
    workers = WorkerProcesses(cluster.redis_server.url, count=2, concurrency=IN_FLIGHT // 2,
                              log_dir=log_dir, env=env, loglevel="WARNING")
    cluster.worker_groups.append(workers)
    workers.start()
    deadline = time.monotonic() + 60
    while not all((log_dir / f"worker-{i}.log").exists() for i in range(2)) or \
            len(cluster.store.redis.hkeys("aivb:workers")) < 2:
        assert workers.alive() == 2, cluster.worker_logs()
        assert time.monotonic() < deadline, cluster.worker_logs()
        time.sleep(0.1)
    return workers


def check(cluster: Cluster, batch_id: str, total: int, prompt: str) -> dict[str, int]:
    results = cluster.results(batch_id, total)
    assert [r["status"] for r in results] == ["ok"] * total, [r for r in results if r["status"] != "ok"][:3]
    calls = cluster.stubs[0].stats()["by_prompt"]
    assert {p for p in calls if p.startswith(prompt)} == {f"{prompt} {i}" for i in range(total)}
    assert sum(calls.values()) <= total + IN_FLIGHT
    return calls


@pytest.mark.timeout(240)
def test_sigkill_of_one_of_two_workers_at_1024_in_flight(cluster: Cluster) -> None:
    total = 4096
    stub = cluster.stub(latency=1.0, chunks=4)
    workers = start(cluster, SCALE_ENV, "kill")
    batch_id = cluster.submit([{"id": f"k{i}", "prompt": f"scale kill {i}"} for i in range(total)],
                              base_url=stub.base_url)
    cluster.wait_done(batch_id, total // 3, timeout=90)
    assert stub.stats()["peak_in_flight"] <= IN_FLIGHT
    kill(workers.processes[0], signal.SIGKILL)
    workers.processes[0].wait(10)
    killed = time.monotonic()
    cluster.wait_finished(batch_id, timeout=150, workers=workers, alive=1)
    recovered = time.monotonic() - killed
    calls = check(cluster, batch_id, total, "scale kill")
    # the rest of the batch at 512 in flight takes ~6 s; the dead worker's items come back within a lease
    assert recovered < 60 + 15, recovered
    assert stub.stats()["peak_in_flight"] <= IN_FLIGHT
    print(f"\nscale kill: finished {recovered:.1f}s after the kill; {sum(calls.values()) - total} calls again")


@pytest.mark.timeout(240)
def test_redis_restart_at_1024_in_flight(cluster: Cluster) -> None:
    total = 4096
    stub = cluster.stub(latency=1.0, chunks=4)
    workers = start(cluster, SCALE_ENV, "restart")
    batch_id = cluster.submit([{"id": f"r{i}", "prompt": f"scale restart {i}"} for i in range(total)],
                              base_url=stub.base_url)
    cluster.wait_done(batch_id, total // 3, timeout=90)
    port = cluster.redis_server.port
    cluster.redis_server.stop()
    time.sleep(2)
    cluster.redis_server.start(port=port)
    cluster.wait_finished(batch_id, timeout=180, workers=workers, alive=2)
    calls = check(cluster, batch_id, total, "scale restart")
    print(f"\nscale restart: {sum(calls.values()) - total} calls again")


@pytest.mark.timeout(240)
def test_a_tiny_redis_pool_at_1024_in_flight(cluster: Cluster, tmp_path: Path) -> None:
    total = 4096
    stub = cluster.stub(latency=1.0, chunks=4)
    workers = start(cluster, {**SCALE_ENV, "AIVVM_BATCH_REDIS_POOL": "2"}, "pool")
    batch_id = cluster.submit([{"id": f"p{i}", "prompt": f"scale pool {i}"} for i in range(total)],
                              base_url=stub.base_url)
    cluster.wait_finished(batch_id, timeout=180, workers=workers, alive=2)
    calls = check(cluster, batch_id, total, "scale pool")
    assert max(calls.values()) == 1
    assert stub.stats()["peak_in_flight"] <= IN_FLIGHT
