"""A batch's status as ``status``, ``batches`` and ``run`` show it: a table or a JSON object for
the batch, a line or an object for each worker seen, and what the batch spent of its budget."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from jobs.records import BatchInfo, Status

if TYPE_CHECKING:
    from jobs.heartbeats import WorkerSeen

WORKERS_SHOWN = 20


def info_table(info: BatchInfo) -> str:
    total = info.total
    percent = f"{100 * info.done / total:.1f}%" if total else "-"
    rows = [("batch", info.id), ("state", info.state.value), ("source", info.source),
            ("provider", info.options.provider), ("created", time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(info.created))),
            ("progress", f"{info.done}/{total if total is not None else '?'} ({percent})")]
    rows += [(s.value, str(info.counts.get(s.value, 0))) for s in Status]
    estimated = info.usage.get("estimated", 0)
    rows += [("prompt tokens", str(info.usage.get("prompt_tokens", 0))),
             ("completion tokens", str(info.usage.get("completion_tokens", 0))
              + (f" ({estimated} items estimated)" if estimated else ""))]
    budget = budget_text(info)
    if budget:
        rows.append(("budget spent", budget))
    late = info.usage.get("late_calls", 0)
    if late:
        rows.append(("calls paid twice", f"{late} (a worker's claim lapsed; counted in the tokens above "
                                          "and in the items' attempts)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def info_dict(info: BatchInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "state": info.state.value,
        "source": info.source,
        "created": info.created,
        "provider": info.options.provider,
        "base_url": info.options.base_url,
        "total": info.total,
        "done": info.done,
        "counts": {s.value: info.counts.get(s.value, 0) for s in Status},
        "usage": {
            "prompt_tokens": info.usage.get("prompt_tokens", 0),
            "completion_tokens": info.usage.get("completion_tokens", 0),
            "items_estimated": info.usage.get("estimated", 0),
            "late_calls": info.usage.get("late_calls", 0),
            "requests_started": info.usage.get("started", 0),
        },
        "budget": {"max_tokens_total": info.options.max_tokens_total, "max_requests": info.options.max_requests},
    }


def budget_text(info: BatchInfo) -> str | None:
    """``"1,204 of 5,000 tokens, 37 of 100 requests"``: what the batch paid of its budget."""
    options, usage = info.options, info.usage
    parts = []
    if options.max_tokens_total is not None:
        spent = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        parts.append(f"{spent:,} of {options.max_tokens_total:,} tokens")
    if options.max_requests is not None:
        parts.append(f"{usage.get('started', 0):,} of {options.max_requests:,} requests")
    return ", ".join(parts) or None


def worker_lines(seen: list[WorkerSeen]) -> list[str]:
    """The workers as ``status`` shows them: when each was last seen, what it holds, its note."""
    if not seen:
        return ["workers: none has ever been seen on this Redis: start one with aivvm-batch worker"]
    lines = ["workers:"]
    for worker in seen[:WORKERS_SHOWN]:
        age = "never" if worker.age == float("inf") else f"{worker.age:.0f} s ago"
        state = "MISSING, " if worker.missing else ""
        line = f"  {worker.name}: {state}seen {age}, {worker.held} items in hand"
        lines.append(line + (f"; {worker.note}" if worker.note else ""))
    if len(seen) > WORKERS_SHOWN:
        lines.append(f"  ... and {len(seen) - WORKERS_SHOWN} more")
    return lines


def worker_dict(seen: WorkerSeen) -> dict[str, Any]:
    return {"name": seen.name, "last_seen_seconds": round(seen.age, 1), "claims_held": seen.held,
            "note": seen.note or None, "missing": seen.missing}
