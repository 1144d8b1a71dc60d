"""Budgets (``--max-requests``, ``--max-tokens-total``): once what a batch paid reaches one, no
new item starts, those in flight finish, the rest end ``cancelled`` with ``budget_exhausted``
(``run`` as people use it: real Redis, real workers, real HTTP to the stand-in)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from aivvm_batch.stub import StubServer
from tests.test_run import prompts, results, run

IN_FLIGHT = 2  # --concurrency: what may be under way when the budget is reached


def budgeted(tmp_path: Path, stub: StubServer, *budget: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    path = prompts(tmp_path / "in.jsonl", [f"budgeted question {i}" for i in range(60)])
    out = tmp_path / "out.jsonl"
    proc = run(str(path), "-o", str(out), "--provider", "openai", "--base-url", f"{stub.base_url}/v1",
               "--workers", "1", "--concurrency", str(IN_FLIGHT), *budget, state=tmp_path / "state")
    return proc, results(out)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_request_budget_stops_new_items_and_cancels_the_rest(tmp_path: Path) -> None:
    with StubServer(latency=0.1) as stub:
        proc, lines = budgeted(tmp_path, stub, "--max-requests", "10")
        paid = stub.stats()["requests"]
    assert proc.returncode == 1, proc.stderr  # not every item is ok
    statuses = Counter(line["status"] for line in lines)
    assert paid == 10  # each call is counted against the budget before it starts
    assert statuses == {"ok": paid, "cancelled": 60 - paid}
    cancelled = [line for line in lines if line["status"] == "cancelled"]
    assert {line["error"]["type"] for line in cancelled} == {"budget_exhausted"}
    assert f"budget spent: {paid} of 10 requests" in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_token_budget_counts_what_the_provider_said_it_charged(tmp_path: Path) -> None:
    with StubServer(latency=0.1) as stub:
        proc, lines = budgeted(tmp_path, stub, "--max-tokens-total", "150")
    ok = [line for line in lines if line["status"] == "ok"]
    spent = sum(line["usage"]["total_tokens"] for line in ok)
    per_item = max(line["usage"]["total_tokens"] for line in ok)
    assert 150 <= spent <= 150 + 2 * IN_FLIGHT * per_item and len(ok) < 60
    assert {line["error"]["type"] for line in lines if line["status"] == "cancelled"} == {"budget_exhausted"}
    assert f"{spent:,} of 150 tokens" in proc.stderr


def test_status_says_what_was_spent_of_the_budget() -> None:
    from aivvm_batch.batch_status import budget_text, info_dict
    from jobs.records import BatchInfo, BatchOptions, BatchState

    info = BatchInfo("b1", "in.jsonl", 0.0, BatchState.RUNNING, BatchOptions(max_tokens_total=5000, max_requests=100),
                     10, usage={"prompt_tokens": 1000, "completion_tokens": 204, "started": 37})
    assert budget_text(info) == "1,204 of 5,000 tokens, 37 of 100 requests"
    assert info_dict(info)["budget"] == {"max_tokens_total": 5000, "max_requests": 100}
    assert budget_text(BatchInfo("b2", "x", 0.0, BatchState.RUNNING, BatchOptions(), 1)) is None
