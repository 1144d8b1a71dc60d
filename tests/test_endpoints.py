"""Every endpoint end to end on the stand-in: `run`, `serve` with the `openai` SDK, real workers.

The stand-in speaks tool-call deltas split across events, logprobs, several choices, embeddings,
the Responses API's events and legacy completions (tests/test_stub_endpoints.py holds it to the
SDK's types); here each joined answer must equal its own non-streamed answer to the same request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aivvm_batch.stub import StubServer

from .breadth_checks import (
    ROOT,
    SAMPLE,
    answered_directly,
    check_success,
    run_lines,
    sample_lines,
    serve_lines,
    url_of,
    without_per_answer,
)
from .conftest import Batches

pytestmark = pytest.mark.integration
SCHEMA_LINE = {"id": "person", "messages": [{"role": "user", "content": "Invent a person."}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {
                   "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                   "required": ["name", "age"]}}}}


def test_run_gives_every_endpoint_s_own_answers(stub: StubServer, tmp_path: Path) -> None:
    base = stub.base_url + "/v1"
    given = sample_lines("gpt-4o-mini") + [{"custom_id": "batch-completions", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": "Once upon a time", "logprobs": 2}},
                              {"custom_id": "batch-two", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "m", "messages": [{"role": "user", "content": "twice"}], "n": 2,
                                        "logprobs": True, "top_logprobs": 1}}]
    done, results = run_lines(base, given, tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in given]
    for line, result in zip(given, results):
        check_success(result, url_of(line))
        direct = answered_directly(base, line)
        assert without_per_answer(result["response"]["body"]) == without_per_answer(direct), line["custom_id"]
        assert result["response"]["request_id"].startswith("req_")
    tools = next(r for r in results if r["custom_id"] == "batch-tools")["response"]["body"]
    message = tools["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert tools["choices"][0]["finish_reason"] == "tool_calls"
    two = next(r for r in results if r["custom_id"] == "batch-two")["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1]


def test_the_native_form_carries_the_answer_beside_the_text(stub: StubServer, tmp_path: Path) -> None:
    out = tmp_path / "native.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aivvm_batch", "run", str(SAMPLE), "-o", str(out), "--provider", "openai",
         "--base-url", stub.base_url + "/v1", "--state-dir", str(tmp_path / "state"), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert all(r["status"] == "ok" for r in results.values())
    for form in ("batch", "simple"):
        tools = results[f"{form}-tools"]
        assert tools["output"] == "" and tools["tool_calls"][0]["function"]["name"] == "get_weather"
        assert tools["finish_reason"] == "tool_calls"
        assert results[f"{form}-logprobs"]["logprobs"]["content"]
        assert results[f"{form}-embeddings"]["output"] is None
        assert results[f"{form}-embeddings"]["body"]["data"][0]["embedding"]
        assert results[f"{form}-responses"]["output"].startswith("Stand-in reply")
        assert results[f"{form}-responses"]["body"]["status"] == "completed"
        assert json.loads(results[f"{form}-schema"]["output"])["age"] == 1
        assert results[f"{form}-parts"]["completion"]["id"].startswith("chatcmpl")


def test_aivvm_refuses_what_it_cannot_send_before_any_call(stub: StubServer, tmp_path: Path) -> None:
    stub.reset()
    out = tmp_path / "aivvm.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aivvm_batch", "run", str(SAMPLE), "-o", str(out), "--base-url", stub.base_url,
         "--state-dir", str(tmp_path / "state"), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["status"] for r in results} == {"invalid"}
    assert all("the aivvm provider" in r["error"]["message"] for r in results)
    assert stub.stats()["requests"] == 0


@pytest.mark.usefixtures("workers")
def test_a_reply_off_its_schema_is_asked_again_then_fails(batches: Batches) -> None:
    once = {**SCHEMA_LINE, "id": "once", "messages": [{"role": "user", "content": "[[stub fault=badjson times=1]] p"}]}
    always = {**SCHEMA_LINE, "id": "always", "messages": [{"role": "user", "content": "[[stub fault=badjson]] p"}]}
    results = {r["id"]: r for r in batches.run([SCHEMA_LINE, once, always], provider="openai")}
    assert results["person"]["status"] == "ok" and results["person"]["attempts"] == 1
    assert results["once"]["status"] == "ok" and results["once"]["attempts"] == 2
    failed = results["always"]
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert failed["error"]["type"] == "schema_mismatch"
    assert failed["error"]["message"] == ("the reply does not follow the schema at the top: "
                                        "'name' is a required property")
    paid = results["person"]["usage"]["prompt_tokens"]
    assert failed["usage"]["prompt_tokens"] == 2 * paid  # both attempts were paid


@pytest.mark.parametrize("line", [
    {"id": "huge-vectors", "url": "/v1/embeddings", "input": "[[stub bytes=6000000]] corpus"},
    {"id": "endless-arguments",
     "messages": [{"role": "user", "content": "[[stub bytes=6000000 chunks=3000]] weather"}],
     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
         "type": "object", "properties": {"city": {"type": "string"}}}}}], "tool_choice": "required"},
])
@pytest.mark.usefixtures("workers")
def test_vectors_and_tool_calls_are_bounded_too(batches: Batches, line: dict[str, Any]) -> None:
    (result,) = batches.run([line], provider="openai")
    assert result["status"] == "failed"
    assert result["error"]["type"] == "reply_too_large", result["error"]


def test_serve_runs_a_batch_per_endpoint_with_the_sdk(stub: StubServer, tmp_path: Path) -> None:
    stray = {"custom_id": "stray-chat", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "not an embedding"}]}}
    given = [*sample_lines(), stray]
    found = serve_lines(stub.base_url + "/v1", given, tmp_path,
                        batch_of=lambda line: "/v1/embeddings" if line is stray else url_of(line))
    assert set(found) == {"/v1/chat/completions", "/v1/embeddings", "/v1/responses"}
    for endpoint, (batch, output, errors) in found.items():
        assert batch.status == "completed", batch
        expected = [line["custom_id"] for line in given if url_of(line) == endpoint and line is not stray]
        assert [line["custom_id"] for line in output] == expected
        for line in output:
            check_success(line, endpoint)
    (refused,) = found["/v1/embeddings"][2]  # the chat line in the embeddings batch: its error file
    assert refused["custom_id"] == "stray-chat" and refused["response"] is None
    assert "the batch's endpoint is /v1/embeddings" in refused["error"]["message"]
