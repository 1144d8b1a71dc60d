"""The answer cache (``--cache``): what counts as the same request (pure), and two runs of
different files on one Redis, the second paying only for what was not asked before (real
Redis, real workers, real HTTP to the stand-in)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from aivvm_batch.stub import StubServer
from jobs.cache import MAX_ENTRY_BYTES, cache_key, entry, reused
from jobs.records import BatchOptions, ChatMessage, ItemRequest, ItemResult, Status, Usage
from tests.test_run import results, run

OPTIONS = BatchOptions(provider="openai", base_url="http://127.0.0.1:1/v1", cache=True)


def request(text: str = "hi", **changes: object) -> ItemRequest:
    base = ItemRequest(id="a", line=1, messages=(ChatMessage("user", text),), model="m",
                       params=(("max_tokens", 5),), metadata=(("k", "v"),))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_the_same_request_is_the_same_whatever_its_id_line_or_metadata() -> None:
    assert cache_key(OPTIONS, request()) == cache_key(OPTIONS, request(id="b", line=9, metadata=()))


@pytest.mark.parametrize("other", [
    request("ho"), request(model="n"), request(params=(("max_tokens", 6),)), request(temperature=0.5),
    request(system_message="be brief"),
])
def test_anything_sent_that_differs_is_another_request(other: ItemRequest) -> None:
    assert cache_key(OPTIONS, request()) != cache_key(OPTIONS, other)


@pytest.mark.parametrize("options", [
    dataclasses.replace(OPTIONS, base_url="http://127.0.0.1:2/v1"), dataclasses.replace(OPTIONS, provider="aivvm"),
    dataclasses.replace(OPTIONS, cache_scope="tenant-b"),
])
def test_another_provider_url_or_namespace_is_another_request(options: BatchOptions) -> None:
    assert cache_key(OPTIONS, request()) != cache_key(options, request())


def test_only_ok_answers_of_bounded_size_are_kept_and_reused_as_cached() -> None:
    ok = ItemResult(id="a", line=1, status=Status.OK, output="hello", attempts=2, usage=Usage(3, 4, False),
                    provider="openai")
    kept = entry(ok, OPTIONS)
    assert kept is not None
    again = reused(kept.encode(), request(id="z", line=7))
    assert again is not None and (again.id, again.line, again.output, again.attempts, again.cached) == \
        ("z", 7, "hello", 0, True)
    assert again.metadata == (("k", "v"),) and json.loads(again.to_json())["cached"] is True
    assert entry(dataclasses.replace(ok, status=Status.FAILED), OPTIONS) is None
    assert entry(again, OPTIONS) is None  # a reused answer is not kept again
    assert entry(dataclasses.replace(ok, output="x" * MAX_ENTRY_BYTES), OPTIONS) is None
    fallback = dataclasses.replace(OPTIONS, provider="openai,aivvm")
    assert entry(dataclasses.replace(ok, provider="aivvm"), fallback) is None  # a fallback's server is not keyed
    assert reused(b"not json", request()) is None


def lines(pairs: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"id": item_id, "prompt": text}) + "\n" for item_id, text in pairs)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_second_file_pays_only_for_the_requests_not_asked_before(tmp_path: Path) -> None:
    asked = [f"question {i}" for i in range(40)]
    first, second, third = (tmp_path / name for name in ("first.jsonl", "second.jsonl", "third.jsonl"))
    first.write_text(lines([(f"a{i}", text) for i, text in enumerate(asked)]))
    again = [(f"b{i}", text) for i, text in enumerate(asked)] + [(f"new{i}", f"new question {i}") for i in range(6)]
    random.Random(5).shuffle(again)
    second.write_text(lines(again))
    third.write_text(lines([(f"c{i}", text) for i, text in enumerate(asked)]))
    state = tmp_path / "state"
    with StubServer() as stub:
        base = ["--provider", "openai", "--base-url", f"{stub.base_url}/v1"]
        assert run(str(first), "-o", str(tmp_path / "first.out"), *base, "--cache", state=state).returncode == 0
        assert stub.stats()["requests"] == 40
        stub.reset()
        proc = run(str(second), "-o", str(tmp_path / "second.out"), *base, "--cache", state=state)
        assert proc.returncode == 0, proc.stderr
        assert stub.stats()["requests"] == 6  # exactly the new ones
        assert "40 of 46 lines answered from the cache" in proc.stderr
        stub.reset()
        assert run(str(third), "-o", str(tmp_path / "third.out"), *base, state=state).returncode == 0
        assert stub.stats()["requests"] == 40  # without --cache every line is paid
    by_id = {r["id"]: r for r in results(tmp_path / "second.out")}
    firsts = {r["output"]: r for r in results(tmp_path / "first.out")}
    for item_id, text in again:
        result = by_id[item_id]
        assert result["status"] == "ok"
        if item_id.startswith("b"):
            assert result["cached"] is True and result["attempts"] == 0
            assert result["output"] in firsts and result["usage"] == firsts[result["output"]]["usage"]
        else:
            assert "cached" not in result and result["attempts"] == 1


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_serve_caches_a_tenants_answers_for_that_tenant_alone(tmp_path: Path) -> None:
    from openai import OpenAI

    from tests.serve_helpers import request_line, serving, wait_for, write_jsonl

    alice, bob = "sk-alice-cache-test", "sk-bob-cache-test"
    with StubServer() as stub, serving("--provider", "openai", "--base-url", f"{stub.base_url}/v1", "--cache",
                                       "--state-dir", str(tmp_path / "state"), log_dir=tmp_path,
                                       env={"AIVVM_BATCH_API_KEYS": f"{alice},{bob}"}) as served:
        def batch_of(key: str, name: str, prefix: str) -> int:
            api = OpenAI(base_url=served.api, api_key=key, max_retries=0, timeout=30)
            path = write_jsonl(tmp_path / name, [request_line(f"{prefix}{i}", f"shared question {i}")
                                                 for i in range(5)])
            uploaded = api.files.create(file=path.open("rb"), purpose="batch")
            before = stub.stats()["requests"]
            created = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
            batch = wait_for(api, created.id, timeout=120)
            assert batch.status == "completed" and batch.request_counts.completed == 5
            return int(stub.stats()["requests"]) - before

        assert batch_of(alice, "a1.jsonl", "a") == 5
        assert batch_of(bob, "b1.jsonl", "b") == 5  # another tenant: never answered from alice's
        assert batch_of(alice, "a2.jsonl", "again") == 0


def test_cache_needs_the_base_url_it_is_keyed_by(redis_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.test_run import ENV, ROOT

    path = tmp_path / "in.jsonl"
    path.write_text(lines([("a", "hi")]))
    proc = subprocess.run([sys.executable, "-m", "aivvm_batch", "submit", str(path), "--provider", "openai", "--cache",
                           "--redis-url", redis_url], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--cache needs --base-url" in proc.stderr
