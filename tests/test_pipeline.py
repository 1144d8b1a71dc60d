"""The whole path with real parts: a Redis server, a Celery worker process, HTTP to the stand-in."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs import keys
from jobs.records import Status
from jobs.store import BatchStore
from tests.conftest import Batches

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("workers")]


ROOT = Path(__file__).resolve().parent.parent


def reply(prompt: str) -> str:
    return f"Stand-in reply to: {prompt}"


def cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivvm_batch", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "AIVVM_BATCH_REDIS_URL": redis_url})


def test_both_input_forms_complete_in_input_order(batches: Batches, stub: StubServer) -> None:
    lines = [
        {"id": "q1", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hello one"}],
         "model": "gpt-4", "temperature": 0.2},
        {"id": "q2", "prompt": "Hello two"},
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hello three"}]}},
        {"prompt": "Hello four"},
    ] + [{"id": f"n{i}", "prompt": f"number {i}"} for i in range(40)]
    results = batches.run(lines, base_url=stub.base_url)
    assert [r["id"] for r in results] == ["q1", "q2", "r1", "line-4"] + [f"n{i}" for i in range(40)]
    assert [r["line"] for r in results] == list(range(1, 45))
    assert {r["status"] for r in results} == {"ok"}
    assert results[0]["output"] == reply("Hello one")
    assert results[0]["model"] == "gpt-4"
    assert results[2]["output"] == reply("Hello three")
    assert results[10]["output"] == reply("number 6")
    assert all(r["attempts"] == 1 and r["latency_ms"] >= r["first_chunk_ms"] >= 0 for r in results)


def test_invalid_lines_get_their_own_results_and_the_rest_completes(batches: Batches, stub: StubServer) -> None:
    lines: list[object] = [
        {"id": "good1", "prompt": "fine"},
        "{not json",
        {"id": "nomsg"},
        {"id": "role", "messages": [{"role": "wizard", "content": "x"}]},
        b"\xff\xfe not utf-8",
        {"id": "good1", "prompt": "duplicate id"},
        "",
        {"id": "good2", "prompt": "also fine"},
    ]
    results = batches.run(lines, base_url=stub.base_url)
    by_line = {r["line"]: r for r in results}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 8]
    assert by_line[1]["status"] == by_line[8]["status"] == "ok"
    for line in (2, 3, 4, 5, 6):
        assert by_line[line]["status"] == "invalid"
        assert by_line[line]["error"]["type"] == "invalid_line"
        assert by_line[line]["error"]["message"].startswith(f"line {line}")
    assert "not valid JSON" in by_line[2]["error"]["message"]
    assert "'messages'" in by_line[3]["error"]["message"]
    assert "unknown role 'wizard'" in by_line[4]["error"]["message"]
    assert "UTF-8" in by_line[5]["error"]["message"]
    assert "duplicate id 'good1'" in by_line[6]["error"]["message"]
    assert by_line[3]["id"] == "nomsg"


def test_text_split_across_chunks_and_invalid_bytes(batches: Batches, stub: StubServer) -> None:
    results = batches.run([
        {"id": "split", "prompt": "[[stub fault=split]] accents"},
        {"id": "bad", "prompt": "[[stub fault=badbytes]] bytes"},
    ], base_url=stub.base_url)
    assert results[0]["status"] == "ok"
    assert "héllo wörld — 日本語 ✓ 🎉" in results[0]["output"]
    assert "\ufffd" not in results[0]["output"]
    assert results[1]["status"] == "ok"
    assert "\ufffd" in results[1]["output"]
    assert results[1]["output"].replace("\ufffd", "") == reply("bytes")


def test_unsupported_model_fails_without_a_request(batches: Batches, stub: StubServer) -> None:
    stub.reset()
    results = batches.run([{"id": "m", "prompt": "which model", "model": "gpt-5"}], base_url=stub.base_url)
    assert results[0]["status"] == "failed"
    assert results[0]["error"] == {"type": "unsupported_model", "message": "Model is not supported: gpt-5"}
    assert results[0]["attempts"] == 1
    assert stub.stats()["requests"] == 0


def test_transient_failures_are_retried_until_success(batches: Batches, stub: StubServer) -> None:
    results = batches.run([
        {"id": "503", "prompt": "[[stub fault=status code=503 times=2]] a"},
        {"id": "cut", "prompt": "[[stub fault=cut times=1]] b"},
        {"id": "empty", "prompt": "[[stub fault=empty times=1]] c"},
        {"id": "stall", "prompt": "[[stub fault=stall stall=6 times=1]] d"},
        {"id": "reset", "prompt": "[[stub fault=reset times=1]] e"},
    ], base_url=stub.base_url)
    assert [r["status"] for r in results] == ["ok"] * 5
    assert [r["attempts"] for r in results] == [3, 2, 2, 2, 2]
    assert [r["output"] for r in results] == [reply(p) for p in "abcde"]


def test_retry_after_is_honoured(batches: Batches, stub: StubServer) -> None:
    stub.reset()
    results = batches.run([{"id": "429", "prompt": "[[stub fault=429 retry_after=2 times=1]] slow down"}],
                          base_url=stub.base_url)
    assert results[0]["status"] == "ok" and results[0]["attempts"] == 2
    first, second = stub.stats()["times"][-2:]
    assert second - first >= 2.0


def test_permanent_and_exhausted_failures(batches: Batches, stub: StubServer, settings) -> None:
    results = batches.run([
        {"id": "400", "prompt": "[[stub fault=status code=400]] bad request"},
        {"id": "500", "prompt": "[[stub fault=status code=500]] always down"},
        {"id": "cut", "prompt": "[[stub fault=cut chunks=4]] always cut"},
        {"id": "empty", "prompt": "[[stub fault=empty]] nothing"},
    ], base_url=stub.base_url, timeout=90)
    by_id = {r["id"]: r for r in results}
    assert by_id["400"]["status"] == "failed"
    assert by_id["400"]["attempts"] == 1
    assert by_id["400"]["error"]["type"] == "http_error"
    assert by_id["500"]["error"]["type"] == "server_error"
    assert by_id["500"]["attempts"] == settings.max_retries + 1
    assert by_id["cut"]["error"]["type"] == "incomplete_reply"
    assert by_id["cut"]["output"] and reply("always cut").startswith(by_id["cut"]["output"])
    assert by_id["empty"]["error"]["type"] == "empty_reply"
    assert by_id["empty"]["attempts"] == settings.max_retries + 1


def test_connection_refused_is_retried_then_failed(batches: Batches) -> None:
    results = batches.run([{"id": "x", "prompt": "nobody home"}], base_url="http://127.0.0.1:9", timeout=90)
    assert results[0]["status"] == "failed"
    assert results[0]["error"]["type"] == "connection_error"
    assert results[0]["attempts"] == 4


def test_a_message_delivered_twice_is_recorded_once(batches: Batches, stub: StubServer,
                                                    store: BatchStore, publisher) -> None:
    stub.reset()
    batch_id = batches.submit([{"id": "once", "prompt": "twice delivered"}], base_url=stub.base_url)
    publisher.publish(batch_id, [0, 0])
    batches.wait(batch_id)
    time.sleep(1.0)
    assert len(batches.results(batch_id)) == 1
    assert store.info(batch_id).counts == {"ok": 1}
    assert stub.stats()["by_prompt"]["twice delivered"] == 1


def test_finished_batch_expires_after_the_result_ttl(batches: Batches, stub: StubServer,
                                                     redis_client: redis.Redis, settings) -> None:
    batch_id = batches.submit([{"prompt": "ttl"}], base_url=stub.base_url)
    batches.wait(batch_id)
    ttls = [redis_client.ttl(k) for k in keys.batch_keys(batch_id) if redis_client.exists(k)]
    assert ttls and all(0 < t <= settings.result_ttl for t in ttls)


def test_cancel_ends_pending_items_cancelled(batches: Batches, stub: StubServer, store: BatchStore) -> None:
    lines = [{"id": f"c{i}", "prompt": f"[[stub latency=1 chunks=2]] slow {i}"} for i in range(100)]
    batch_id = batches.submit(lines, base_url=stub.base_url)
    time.sleep(1.5)
    cancelled = store.cancel(batch_id)
    info = batches.wait(batch_id)
    assert cancelled > 0
    assert info.counts.get("cancelled", 0) >= cancelled
    assert info.counts.get("ok", 0) + info.counts.get("cancelled", 0) == 100
    statuses = [r["status"] for r in batches.results(batch_id)]
    assert len(statuses) == 100 and "ok" in statuses


def test_retry_command_runs_failed_items_again(batches: Batches, stub: StubServer,
                                               store: BatchStore, publisher) -> None:
    batch_id = batches.submit([
        {"id": "flaky", "prompt": "[[stub fault=status code=404 times=1]] once missing"},
        {"id": "fine", "prompt": "fine"},
    ], base_url=stub.base_url)
    batches.wait(batch_id)
    assert store.info(batch_id).counts == {"ok": 1, "failed": 1}
    seqs = store.reset(batch_id, Status.FAILED)
    assert seqs == [0]
    publisher.publish(batch_id, seqs)
    batches.wait(batch_id)
    assert store.info(batch_id).counts == {"ok": 2}
    assert batches.results(batch_id)[0]["output"] == reply("once missing")


def test_a_pickled_message_is_refused(redis_client: redis.Redis, batches: Batches, stub: StubServer,
                                      workers: WorkerProcesses) -> None:
    import base64
    import pickle

    body = base64.b64encode(pickle.dumps(([], {}, {}))).decode()
    evil = {"body": body, "content-encoding": "binary", "content-type": "application/x-python-serialize",
            "headers": {"lang": "py", "task": "worker.tasks.complete_item", "id": "evil",
                        "root_id": "evil", "retries": 0},
            "properties": {"delivery_tag": "evil-tag", "body_encoding": "base64",
                           "delivery_info": {"exchange": keys.QUEUE, "routing_key": keys.QUEUE},
                           "priority": 0, "delivery_mode": 2}}
    redis_client.lpush(keys.QUEUE, json.dumps(evil))
    results = batches.run([{"prompt": "still working"}], base_url=stub.base_url)
    assert results[0]["status"] == "ok"
    assert workers.alive() == 1
    logs = "".join(p.read_text(errors="replace") for p in workers.log_dir.glob("*.log"))
    assert "application/x-python-serialize" in logs


def test_a_batch_rate_limit_spaces_the_requests(batches: Batches, stub: StubServer) -> None:
    stub.reset()
    results = batches.run([{"prompt": f"limited {i}"} for i in range(16)], base_url=stub.base_url, rpm=300)
    assert [r["status"] for r in results] == ["ok"] * 16
    times = sorted(stub.stats()["times"])
    # 300 per minute is one request every 0.2 s: 16 requests cannot take less than 15 intervals
    assert times[-1] - times[0] >= 15 * 0.2 * 0.9


def test_openai_provider_end_to_end_with_server_usage(batches: Batches, stub: StubServer) -> None:
    results = batches.run([
        {"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 50}},
        {"id": "o2", "prompt": "[[stub fault=status code=503 times=1]] retried"},
    ], provider="openai", base_url=stub.base_url + "/v1")
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert results[0]["output"] == reply("Hello there")
    assert results[0]["model"] == "gpt-4o" and results[0]["provider"] == "openai"
    assert results[0]["usage"]["estimated"] is False and results[0]["usage"]["completion_tokens"] > 0
    assert results[0]["finish_reason"] == "stop"
    assert results[1]["attempts"] == 2


def test_fallback_to_the_next_provider_before_any_chunk(batches: Batches, stub: StubServer) -> None:
    # aivvm at a closed port fails before any chunk: the item moves on to openai (OPENAI_BASE_URL
    # is read by the worker: the session worker was started with the stand-in's /v1 there)
    results = batches.run([{"id": "f", "prompt": "fall back"}], provider="aivvm,openai",
                          base_url="http://127.0.0.1:9")
    assert results[0]["status"] == "ok"
    assert results[0]["provider"] == "openai"
    assert results[0]["output"] == reply("fall back")


SAMPLE_STATUSES = {  # as README.md's table says
    "simple.jsonl": {line: "ok" for line in range(1, 7)},
    "openai-batch.jsonl": {1: "ok", 2: "ok", 3: "ok"},
    "mixed-with-mistakes.jsonl": {1: "ok", 2: "ok", 3: "invalid", 5: "invalid", 6: "invalid",
                                  7: "invalid", 8: "failed", 9: "invalid", 10: "ok"},
}


@pytest.mark.parametrize("name", sorted(SAMPLE_STATUSES))
def test_samples_end_as_the_readme_says(name: str, batches: Batches, stub: StubServer) -> None:
    from jobs.records import BatchOptions
    from jobs.submit import submit_file

    path = Path(__file__).resolve().parent.parent / "samples" / name
    batch_id = submit_file(batches.store, batches.publisher, path, BatchOptions(base_url=stub.base_url),
                           batches.settings).batch_id
    batches.wait(batch_id)
    assert {r["line"]: r["status"] for r in batches.results(batch_id)} == SAMPLE_STATUSES[name]


def test_a_reply_cut_every_time_has_its_own_smaller_budget_and_every_attempt_is_counted(
        batches: Batches, stub: StubServer, settings) -> None:
    stub.reset()
    results = batches.run([
        {"id": "always", "prompt": "[[stub fault=cut chunks=4]] always cut short"},
        {"id": "once", "prompt": "[[stub fault=cut times=1 chunks=4]] cut short once"},
    ], base_url=stub.base_url, timeout=90)
    always, once = results
    assert settings.max_cut_retries < settings.max_retries
    calls = stub.stats()["by_prompt"]
    assert calls["always cut short"] == always["attempts"] == settings.max_cut_retries + 1
    assert always["status"] == "failed" and always["error"]["type"] == "incomplete_reply"
    prompt_tokens = math.ceil(len("[[stub fault=cut chunks=4]] always cut short") / 4)
    partial_tokens = math.ceil(len(always["output"]) / 4)
    assert always["usage"]["prompt_tokens"] == prompt_tokens * calls["always cut short"]
    assert always["usage"]["completion_tokens"] == partial_tokens * calls["always cut short"], always
    assert once["status"] == "ok" and calls["cut short once"] == once["attempts"] == 2
    full_tokens = math.ceil(len(reply("cut short once")) / 4)
    assert full_tokens < once["usage"]["completion_tokens"] < 2 * full_tokens
    assert once["usage"]["prompt_tokens"] == 2 * math.ceil(len("[[stub fault=cut times=1 chunks=4]] cut short once") / 4)


def test_failed_attempts_are_counted_by_cause_and_logged_with_the_reason(
        batches: Batches, stub: StubServer, store: BatchStore, workers: WorkerProcesses,
        redis_url: str) -> None:
    batch_id = batches.submit([
        {"id": "twice", "prompt": "[[stub fault=status code=503 times=2]] counted"},
        {"id": "empty", "prompt": "[[stub fault=empty times=1]] empty once"},
        {"id": "fine", "prompt": "no error"},
    ], base_url=stub.base_url)
    info = batches.wait(batch_id)
    assert info.errors == {"server_error: HTTP 503: Error": 2,
                           "empty_reply: the server answered 200 with an empty body": 1}
    assert info.top_error == ("server_error: HTTP 503: Error", 2)
    logs = "".join(p.read_text(errors="replace") for p in workers.log_dir.glob("*.log"))
    assert re.search(rf"batch {batch_id} item 1: retry in [0-9.]+ s: empty_reply: the server answered "
                     "200 with an empty body", logs), logs[-3000:]
    status = cli("status", batch_id, redis_url=redis_url)
    assert "most frequent error (2 attempts): server_error: HTTP 503: Error" in status.stdout
    as_json = json.loads(cli("status", batch_id, "--json", redis_url=redis_url).stdout)
    assert as_json["top_error"] == {"error": "server_error: HTTP 503: Error", "count": 2}


def test_workers_say_they_are_alive(store: BatchStore, workers: WorkerProcesses) -> None:
    age = store.last_worker_age()
    assert age is not None and age < 60
    seen = store.workers()
    assert any(w.name.startswith("run") and "@" in w.name and w.age < 60 for w in seen), seen


def test_batches_json_reports_usage_as_status_does(batches: Batches, stub: StubServer,
                                                   redis_url: str) -> None:
    batch_id = batches.submit([{"prompt": f"usage {i}"} for i in range(3)], base_url=stub.base_url)
    batches.wait(batch_id)
    status = json.loads(cli("status", batch_id, "--json", redis_url=redis_url).stdout)
    listed = [json.loads(line) for line in cli("batches", "--json", redis_url=redis_url).stdout.splitlines()]
    mine = [b for b in listed if b["id"] == batch_id]
    assert mine and mine[0]["usage"] == status["usage"]
    assert status["usage"]["completion_tokens"] > 0


def test_cancel_says_how_many_it_cancelled_and_how_many_are_still_in_flight(
        batches: Batches, stub: StubServer, store: BatchStore, redis_url: str) -> None:
    total = 80
    batch_id = batches.submit([{"prompt": f"[[stub latency=2 chunks=2]] slow cancel {i}"} for i in range(total)],
                              base_url=stub.base_url)
    time.sleep(1.0)
    done_before = store.info(batch_id).done
    proc = cli("cancel", batch_id, redis_url=redis_url)
    assert proc.returncode == 0, proc.stderr
    found = re.fullmatch(rf"{batch_id}: (\d+) items? cancelled; (\d+) in flight will finish "
                         r"\(those that would be retried end cancelled instead\)\n", proc.stderr)
    assert found, proc.stderr
    cancelled, in_flight = int(found[1]), int(found[2])
    assert cancelled > 0 and in_flight > 0
    assert done_before + cancelled + in_flight == total
    info = batches.wait(batch_id)
    assert info.counts.get("cancelled", 0) >= cancelled
    assert info.counts.get("ok", 0) + info.counts.get("cancelled", 0) == total


def test_worker_loglevel_has_help() -> None:
    assert "Worker log level" in cli("worker", "--help", redis_url="redis://127.0.0.1:9/0").stdout
