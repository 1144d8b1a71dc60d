"""A worker frozen (SIGSTOP) longer than its lease, then thawed: nothing paid for what another
worker recorded meanwhile, and every call it paid counted in the results.

Real Redis, two real worker processes, the stand-in; the lease is 6 s and the sweep runs every
second, so that the frozen worker's items pass to the other within the test.
"""

from __future__ import annotations

import json
import math
import signal
import time

import pytest

from tests.test_reliability import Cluster, cluster, kill  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
HOSTS_ENV = {"AIVVM_BATCH_LEASE": "6", "AIVVM_BATCH_SWEEP_INTERVAL": "1", "AIVVM_BATCH_ITEM_DEADLINE": "60",
             "AIVVM_BATCH_VISIBILITY_TIMEOUT": "300"}
FROZEN_SECONDS = 14.0  # over twice the lease
THAWED_SECONDS = 3.0  # its waits ran out while it was frozen: it acts at once
RPM, LIMITER_LATENCY = 600, 0.2  # the frozen-in-the-limiter run: a call every 0.1 s, replies of 0.2 s


def recorded(cluster: Cluster, batch_id: str, total: int) -> set[str]:
    """The ids of the items recorded so far."""
    return {json.loads(raw)["id"] for _, raw in cluster.store.iter_results(batch_id, total) if raw is not None}


def settled(cluster: Cluster, batch_id: str, extra_calls: int, timeout: float = 30.0) -> None:
    """Until the batch counts ``extra_calls`` late calls: the thawed worker ends its runs after
    the batch has finished (the other worker did its items meanwhile)."""
    deadline = time.monotonic() + timeout
    while cluster.store.info(batch_id).usage.get("late_calls", 0) < extra_calls:
        assert time.monotonic() < deadline, cluster.worker_logs()
        time.sleep(0.2)


def paid_calls(cluster: Cluster, prompts: list[str], stats: dict[str, int]) -> int:
    return sum(stats.get(prompt, 0) for prompt in prompts)


@pytest.mark.timeout(150)
def test_a_worker_frozen_in_the_rate_limiter_calls_nothing_another_recorded(cluster: Cluster) -> None:
    """Items claimed by the frozen worker wait for the shared rate limit (--rpm: a call every
    tenth of a second); thawed, it checks each claim before calling: the items the other worker took and
    recorded meanwhile are not called again. Only the calls in flight at the freeze are paid twice
    (a reply takes 0.2 s and a call starts every 0.1 s: at most three), and each is counted."""
    total = 24
    stub = cluster.stub(latency=LIMITER_LATENCY, chunks=2)
    workers = cluster.start_workers(count=2, concurrency=12, env=HOSTS_ENV)
    prompts = [f"frozen limiter {i}" for i in range(total)]
    batch_id = cluster.submit([{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)],
                              base_url=stub.base_url, rpm=RPM)
    cluster.wait_done(batch_id, 1, timeout=30)  # the others wait for their slots in the limiter
    frozen = workers.processes[0]
    kill(frozen, signal.SIGSTOP)
    try:
        time.sleep(FROZEN_SECONDS)
        done_while_frozen = len(recorded(cluster, batch_id, total))
    finally:
        kill(frozen, signal.SIGCONT)
    cluster.wait_finished(batch_id, timeout=90, workers=workers, alive=2)
    time.sleep(THAWED_SECONDS)  # the batch finished while frozen: what does the thawed worker call?
    calls = paid_calls(cluster, prompts, stub.stats()["by_prompt"])
    settled(cluster, batch_id, calls - total)
    results = cluster.results(batch_id, total)
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"][:3]
    assert done_while_frozen > total // 2, "the other worker should have done the frozen one's items"
    in_flight = math.ceil(LIMITER_LATENCY * RPM / 60) + 1
    assert calls - total <= in_flight, f"{calls} calls for {total} items: the thawed worker called recorded items"
    assert sum(r["attempts"] for r in results) >= calls


@pytest.mark.timeout(150)
def test_a_worker_frozen_mid_stream_has_every_paid_call_counted(cluster: Cluster) -> None:
    """Streams in flight when the worker froze are paid twice (the other worker calls again once
    the lease has passed): each extra call is in the item's attempts and usage, and the frozen
    worker's log says its replies were not recorded."""
    total = 16
    stub = cluster.stub(latency=5.0, chunks=10)  # five seconds a reply (the deadline is 6 s)
    workers = cluster.start_workers(count=2, concurrency=8, env=HOSTS_ENV)
    prompts = [f"frozen stream {i}" for i in range(total)]
    batch_id = cluster.submit([{"id": f"s{i}", "prompt": p} for i, p in enumerate(prompts)],
                              base_url=stub.base_url)
    time.sleep(2.0)  # every item is streaming
    frozen = workers.processes[0]
    kill(frozen, signal.SIGSTOP)
    try:
        time.sleep(FROZEN_SECONDS)
    finally:
        kill(frozen, signal.SIGCONT)
    cluster.wait_finished(batch_id, timeout=90, workers=workers, alive=2)
    time.sleep(THAWED_SECONDS)  # the batch finished while frozen: what does the thawed worker call?
    calls = paid_calls(cluster, prompts, stub.stats()["by_prompt"])
    settled(cluster, batch_id, calls - total)
    results = cluster.results(batch_id, total)
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"][:3]
    assert calls > total, cluster.worker_logs()
    assert sum(r["attempts"] for r in results) >= calls
    info = cluster.store.info(batch_id)
    assert info.usage.get("late_calls", 0) >= calls - total
    log = cluster.worker_logs()
    assert "paid here but not recorded" in log or "abandoned" in log, log[-3000:]
