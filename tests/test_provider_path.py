"""One worker cannot reach the provider, another can: no item fails, and status says which.

The cut path is a proxy that refuses connections, set in one worker's environment only
(``HTTP_PROXY``, which the workers honour as requests does): its calls fail before any answer,
as they would behind a cut link. Real Redis, two real worker processes, the stand-in.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.test_reliability import Cluster, cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
PATH_ENV = {"AIVVM_BATCH_SWEEP_INTERVAL": "1", "AIVVM_BATCH_CONNECT_TIMEOUT": "1"}


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.timeout(150)
def test_items_go_round_a_worker_that_cannot_reach_the_provider(cluster: Cluster) -> None:
    total = 60
    stub = cluster.stub(latency=0.2, chunks=2)
    cut = cluster.start_workers(count=1, concurrency=8,
                                env={**PATH_ENV, "HTTP_PROXY": f"http://127.0.0.1:{closed_port()}"})
    cluster.start_workers(count=1, concurrency=8, env=PATH_ENV)
    time.sleep(3)  # a sweep or two: each worker knows the other is alive
    batch_id = cluster.submit([{"id": f"p{i}", "prompt": f"path {i}"} for i in range(total)],
                              base_url=stub.base_url)
    cluster.wait_finished(batch_id, timeout=90)
    results = cluster.results(batch_id, total)
    assert [r for r in results if r["status"] != "ok"][:1] == []
    assert sum(stub.stats()["by_prompt"].get(f"path {i}", 0) for i in range(total)) == total
    log = (cut.log_dir / "worker-0.log").read_text(errors="replace")
    assert "handed to another worker: this one cannot reach the provider" in log
    deadline = time.monotonic() + 10
    while not any("provider unreachable" in w.note for w in cluster.store.workers()):
        assert time.monotonic() < deadline, cluster.store.workers()
        time.sleep(0.3)
