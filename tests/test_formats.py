"""The OpenAI result form, validated with the OpenAI SDK's own types.

Each line follows OpenAI's per-line object of batch output and error files
(``BatchRequestOutput`` in their OpenAPI document); a success's ``response.body``
must be an ``openai.types.chat.ChatCompletion``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict

from aivvm_batch.stub import StubServer
from jobs.formats import ResultFormat, openai_line, render
from jobs.records import ItemError, ItemResult, Status, Usage, invalid_result

ROOT = Path(__file__).resolve().parent.parent
AIVVM_BATCH = str(Path(sys.executable).parent / "aivvm-batch")


class OutputResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status_code: int
    request_id: str
    body: dict[str, Any]


class OutputError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str
    message: str


class BatchRequestOutput(BaseModel):
    """The OpenAPI ``BatchRequestOutput`` (the SDK has no type for it): one line of an output file."""

    model_config = ConfigDict(extra="forbid")
    id: str
    custom_id: str
    response: OutputResponse | None
    error: OutputError | None


class ErrorBody(BaseModel):
    class Detail(BaseModel):
        message: str
        type: str
        param: str | None
        code: str | None

    error: Detail


def checked(line: dict[str, Any]) -> tuple[BatchRequestOutput, ChatCompletion | ErrorBody | None]:
    """Validate one output line; also its body, as a completion (200) or an error body."""
    output = BatchRequestOutput.model_validate(line)
    assert (output.response is None) != (output.error is None), line
    if output.response is None:
        return output, None
    if output.response.status_code == 200:
        return output, ChatCompletion.model_validate(output.response.body, strict=True)
    return output, ErrorBody.model_validate(output.response.body)


def ok(**overrides: Any) -> ItemResult:
    fields: dict[str, Any] = dict(id="q1", line=3, status=Status.OK, model="gpt-4", output="Hello!",
                                  attempts=1, usage=Usage(5, 7, estimated=True), finish_reason="stop",
                                  provider="aivvm")
    fields.update(overrides)
    return ItemResult(**fields)


def test_a_success_is_a_chat_completion_with_its_created_time() -> None:
    output, body = checked(openai_line(ok(created=1_700_000_123)))
    assert isinstance(body, ChatCompletion)
    assert output.custom_id == "q1"
    assert body.created == 1_700_000_123
    assert body.choices[0].message.content == "Hello!"
    assert body.usage is not None and body.usage.total_tokens == 12


def test_a_result_without_created_takes_the_batchs_time_as_an_integer() -> None:
    _, body = checked(openai_line(ok(), batch_created=1_700_000_000.75))
    assert isinstance(body, ChatCompletion)
    assert body.created == 1_700_000_000


@pytest.mark.parametrize(("model", "finish", "shown_finish"), [
    (None, None, "stop"), ("m", "length", "length"), ("m", "eos_token", "stop")])
def test_a_success_validates_whatever_the_provider_reported(model: str | None, finish: str | None,
                                                           shown_finish: Literal["stop", "length"]) -> None:
    _, body = checked(openai_line(ok(model=model, finish_reason=finish, usage=None), 1.0))
    assert isinstance(body, ChatCompletion)
    assert body.choices[0].finish_reason == shown_finish
    assert body.usage is None


def test_metadata_of_the_line_is_in_the_completion() -> None:
    _, body = checked(openai_line(ok(metadata=(("team", "red"),)), 1.0))
    assert isinstance(body, ChatCompletion) and body.metadata == {"team": "red"}


def test_a_failure_with_an_http_answer_keeps_its_status_and_an_error_body() -> None:
    result = ok(status=Status.FAILED, output="", usage=None,
                error=ItemError("rate_limited", "429 Too Many Requests: slow down", http_status=429))
    output, body = checked(openai_line(result))
    assert output.error is None
    assert output.response is not None and output.response.status_code == 429
    assert isinstance(body, ErrorBody)
    assert (body.error.type, body.error.message) == ("rate_limited", "429 Too Many Requests: slow down")


@pytest.mark.parametrize("result", [
    ok(status=Status.FAILED, output="", error=ItemError("connect_error", "connection refused")),
    invalid_result(4, "line 4, field 'prompt': must be a non-empty string"),
    ok(status=Status.CANCELLED, output=None, error=ItemError("cancelled", "the batch was cancelled")),
])
def test_a_failure_without_an_http_answer_has_no_response_and_an_error(result: ItemResult) -> None:
    output, body = checked(openai_line(result))
    assert output.response is None and body is None
    assert output.error is not None and result.error is not None
    assert (output.error.code, output.error.message) == (result.error.type, result.error.message)


def test_native_lines_are_written_as_stored() -> None:
    raw = ok(created=5).to_json().encode()
    assert render(raw, ResultFormat.NATIVE) == raw
    assert ItemResult.from_json(raw) == ok(created=5)


@pytest.mark.integration
@pytest.mark.usefixtures("workers")
def test_collect_in_the_openai_form_validates_with_the_sdk(redis_url: str, stub: StubServer,
                                                           tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in [
        {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}},
        {"id": "bad", "prompt": ""},
        {"id": "unsupported", "prompt": "x", "model": "gpt-5"},
        {"prompt": "no id"},
    ]))
    env = {**os.environ, "AIVVM_BATCH_REDIS_URL": redis_url}
    started = int(time.time())
    submitted = subprocess.run([AIVVM_BATCH, "submit", str(source), "--base-url", stub.base_url],
                               capture_output=True, text=True, env=env, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    out = tmp_path / "openai.jsonl"
    collected = subprocess.run([AIVVM_BATCH, "collect", submitted.stdout.strip(), "-o", str(out), "--wait",
                                "--format", "openai"], capture_output=True, text=True, env=env, timeout=120)
    assert collected.returncode == 1, collected.stderr
    checks = [checked(json.loads(line)) for line in out.read_text().splitlines()]
    assert [c[0].custom_id for c in checks] == ["r1", "bad", "unsupported", "line-4"]
    first, bodies = checks[0], [c[1] for c in checks]
    assert isinstance(first[1], ChatCompletion)
    assert started - 1 <= first[1].created <= time.time() + 1
    assert first[1].choices[0].message.content == "Stand-in reply to: Hi"
    assert bodies[1] is None and checks[1][0].error is not None and checks[1][0].error.code == "invalid_line"
    assert bodies[2] is None and checks[2][0].error is not None
    assert checks[2][0].error.code == "unsupported_model"
    assert isinstance(bodies[3], ChatCompletion)


def test_without_any_time_created_is_now() -> None:
    before = int(time.time())
    _, body = checked(openai_line(ok()))
    assert isinstance(body, ChatCompletion)
    assert before <= body.created <= time.time()
