"""/metrics: what a batch did, who works and how full Redis is, read from Redis at each scrape."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aivvm_batch.metrics import StoreCollector
from aivvm_batch.private_redis import free_port
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs.observations import bucket_of, histogram
from jobs.store import BatchStore

from .conftest import Batches


def scrape(store: BatchStore) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_scrape_counts_each_batchs_items_tokens_and_errors_and_names_the_workers(
        batches: Batches, workers: WorkerProcesses, stub: StubServer, store: BatchStore) -> None:
    batch_id = batches.submit([{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": "there"},
                               {"id": "c", "prompt": "[[stub fault=status code=400]] bad request"}],
                               base_url=stub.base_url)
    batches.wait(batch_id)
    samples = scrape(store)

    def of(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert of("aivvm_batch_redis_up") == 1
    assert of("aivvm_batch_items", batch=batch_id, status="ok") == 2
    assert of("aivvm_batch_items", batch=batch_id, status="failed") == 1
    assert of("aivvm_batch_items", batch=batch_id, status="pending") == 0
    assert of("aivvm_batch_tokens_total", batch=batch_id, kind="completion") > 0
    assert sum(v for (name, labels), v in samples.items()
               if name == "aivvm_batch_attempt_errors_total" and ("batch", batch_id) in labels) == 1
    assert of("aivvm_batch_held_messages", batch=batch_id) == 0
    seen = {dict(labels)["worker"]: v for (name, labels), v in samples.items()
            if name == "aivvm_batch_worker_last_seen_seconds"}
    assert seen and min(seen.values()) < 60
    assert not any("%h" in worker for worker in seen), seen  # a name given with %h is expanded
    assert of("aivvm_batch_redis_used_memory_bytes") > 0
    # every call the workers recorded is in the provider's histograms (the 400 too: it answered)
    calls = of("aivvm_batch_provider_latency_seconds_count")
    assert calls >= 3 and of("aivvm_batch_provider_latency_seconds_bucket", le="+Inf") == calls
    assert of("aivvm_batch_provider_first_chunk_seconds_count") >= 2
    assert of("aivvm_batch_provider_latency_seconds_bucket", le="0.1") <= calls


def test_a_scrape_with_redis_gone_says_so_instead_of_failing(store: BatchStore) -> None:
    gone = BatchStore(type(store.redis)(host="127.0.0.1", port=9, socket_connect_timeout=0.5))
    samples = scrape(gone)
    assert samples == {("aivvm_batch_redis_up", ()): 0}


def test_the_exporter_command_serves_the_same_and_ends_on_ctrl_c(redis_url: str) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "aivvm_batch", "metrics", "--redis-url", redis_url,
                                "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        deadline = time.monotonic() + 30
        while "aivvm_batch_redis_up" not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:
                continue
        assert "aivvm_batch_redis_up 1.0" in text
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr


def test_latencies_fall_in_prometheus_buckets_summed_cumulatively() -> None:
    assert [bucket_of(ms) for ms in (0, 100, 101, 999, 1000, 119_999, 120_001)] == [
        "0.1", "0.1", "0.25", "1.0", "1.0", "120.0", "+Inf"]
    buckets, total = histogram({b"0.1": b"2", b"1.0": b"3", b"+Inf": b"1", b"sum_ms": b"4500", b"count": b"6"})
    assert dict(buckets) == {"0.1": 2, "0.25": 2, "0.5": 2, "1.0": 5, "2.5": 5, "5.0": 5, "10.0": 5, "30.0": 5,
                             "60.0": 5, "120.0": 5, "+Inf": 6}
    assert total == 4.5
