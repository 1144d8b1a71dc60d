"""Prometheus metrics read from Redis at each scrape: one exporter sees every host's workers.

What a batch has done (items by status, attempt errors by type, 429s among them, tokens, calls paid
twice), what waits (its held messages), who works (every worker's last heartbeat, the items it
holds, whether it finds the provider unreachable), how fast the provider answers (histograms the
workers add to as they record, :mod:`jobs.observations`) and how full Redis is live in Redis; reading them
at scrape time needs nothing from the workers and no multiprocess bookkeeping. Batches are the
newest :data:`BATCHES` only, so labels stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs import keys
from jobs.errors import BatchError
from jobs.observations import histogram
from jobs.records import Status
from jobs.store import BatchStore

BATCHES = 50
UNREACHABLE_NOTE = "provider unreachable"


class StoreCollector(Collector):
    """A collector over one Redis (a scrape costs a few pipelined round trips)."""

    def __init__(self, store: BatchStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("aivvm_batch_redis_up", "1 if Redis answered this scrape")
        try:
            families = list(self._families())
        except (BatchError, redis.RedisError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        store = self.store
        memory = store.memory()
        used = GaugeMetricFamily("aivvm_batch_redis_used_memory_bytes", "Redis's used_memory")
        used.add_metric([], memory.used)
        limit = GaugeMetricFamily("aivvm_batch_redis_maxmemory_bytes", "Redis's maxmemory (0: none)")
        limit.add_metric([], memory.maxmemory)
        full = GaugeMetricFamily("aivvm_batch_redis_full", "1 when Redis is at its maxmemory")
        full.add_metric([], int(memory.full))
        yield from (used, limit, full)

        seen = GaugeMetricFamily("aivvm_batch_worker_last_seen_seconds",
                                 "seconds since each worker's last heartbeat (Redis's clock)", labels=["worker"])
        held = GaugeMetricFamily("aivvm_batch_worker_held_items", "items each worker holds claims on",
                                 labels=["worker"])
        slots = GaugeMetricFamily("aivvm_batch_worker_slots", "requests each worker has in flight at most",
                                  labels=["worker"])
        unreachable = GaugeMetricFamily("aivvm_batch_worker_provider_unreachable",
                                        "1 when the worker finds its provider unreachable", labels=["worker"])
        missing = GaugeMetricFamily("aivvm_batch_workers_missing", "workers not seen for a minute or more")
        workers = store.workers()
        for worker in workers:
            seen.add_metric([worker.name], worker.age)
            held.add_metric([worker.name], worker.held)
            slots.add_metric([worker.name], worker.slots)
            unreachable.add_metric([worker.name], int(UNREACHABLE_NOTE in worker.note))
        missing.add_metric([], sum(w.missing for w in workers))
        yield from (seen, held, slots, unreachable, missing)

        items = GaugeMetricFamily("aivvm_batch_items", "a batch's items by status (pending: not ended yet)",
                                  labels=["batch", "status"])
        queued = GaugeMetricFamily("aivvm_batch_held_messages",
                                   "a batch's messages held back for its turn on the queue", labels=["batch"])
        tokens = CounterMetricFamily("aivvm_batch_tokens", "tokens a batch's calls were charged",
                                     labels=["batch", "kind"])
        late = CounterMetricFamily("aivvm_batch_late_calls",
                                   "calls paid for items another worker had taken over (paid twice)",
                                   labels=["batch"])
        errors = CounterMetricFamily("aivvm_batch_attempt_errors", "a batch's failed attempts by error type",
                                     labels=["batch", "type"])
        batches = store.list_batches(limit=BATCHES)
        pipe = store.redis.pipeline(transaction=False)
        for info in batches:
            pipe.llen(keys.held(info.id))
        lengths = cast("list[int]", pipe.execute())
        for info, waiting in zip(batches, lengths):
            for status in Status:
                items.add_metric([info.id, status.value], info.counts.get(status.value, 0))
            if info.total is not None:
                items.add_metric([info.id, "pending"], max(0, info.total - info.done))
            queued.add_metric([info.id], waiting)
            for kind in ("prompt_tokens", "completion_tokens"):
                tokens.add_metric([info.id, kind.removesuffix("_tokens")], info.usage.get(kind, 0))
            late.add_metric([info.id], info.usage.get("late_calls", 0))
            by_type: dict[str, int] = {}
            for text, count in info.errors.items():
                kind = text.partition(":")[0].strip() or "unknown"
                by_type[kind] = by_type.get(kind, 0) + count
            for kind, count in sorted(by_type.items()):
                errors.add_metric([info.id, kind], count)
        yield from (items, queued, tokens, late, errors)

        pipe = store.redis.pipeline(transaction=False)
        pipe.hgetall(keys.OBSERVED_LATENCY)
        pipe.hgetall(keys.OBSERVED_FIRST_CHUNK)
        latency, first_chunk = pipe.execute()
        for name, help_text, raw in (
                ("aivvm_batch_provider_latency_seconds", "a recorded call, from its start to its last chunk",
                 latency),
                ("aivvm_batch_provider_first_chunk_seconds", "a recorded call, from its start to its first chunk",
                 first_chunk)):
            buckets, total = histogram(raw)
            yield HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=total)
