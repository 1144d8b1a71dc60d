"""The provider's latency and time to first chunk, counted in Redis as results are recorded.

Histograms for Prometheus (:mod:`aivvm_batch.metrics`) that every worker on every host adds to in
the round trip that records its results: one hash per histogram, a field per bucket (counts not
cumulative: the exporter sums them), plus the sum (milliseconds) and the count.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from .keys import OBSERVED_FIRST_CHUNK, OBSERVED_LATENCY
from .records import ItemResult

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INF = "+Inf"


def bucket_of(milliseconds: int) -> str:
    """The field of the smallest bucket that holds it (Prometheus's ``le``)."""
    seconds = milliseconds / 1000
    for bound in BUCKETS:
        if seconds <= bound:
            return str(bound)
    return INF


def observe(pipe: Any, results: Iterable[ItemResult]) -> None:
    """Add the results' latencies to the histograms, on ``pipe`` (a pipeline of the record)."""
    for key, values in ((OBSERVED_LATENCY, [r.latency_ms for r in results if r.latency_ms is not None]),
                        (OBSERVED_FIRST_CHUNK, [r.first_chunk_ms for r in results if r.first_chunk_ms is not None])):
        if not values:
            continue
        for field, count in Counter(bucket_of(ms) for ms in values).items():
            pipe.hincrby(key, field, count)
        pipe.hincrby(key, "sum_ms", sum(values))
        pipe.hincrby(key, "count", len(values))


def histogram(raw: dict[bytes, bytes]) -> tuple[list[tuple[str, int]], float]:
    """Cumulative ``(le, count)`` buckets, ending at ``+Inf``, and the sum in seconds, of a stored hash."""
    counts = {k.decode(): int(v) for k, v in raw.items()}
    total, buckets = 0, []
    for bound in (*map(str, BUCKETS), INF):
        total += counts.get(bound, 0)
        buckets.append((bound, total))
    return buckets, counts.get("sum_ms", 0) / 1000
