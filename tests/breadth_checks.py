"""A realistic file of every endpoint, through `run` and through `serve` with the `openai` SDK,
against a server; shared by the stand-in's tests and the real model's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from openai import OpenAI
from openai.types import Batch, Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from .serve_helpers import TERMINAL, serving, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "openai-breadth.jsonl"
BODY_TYPES: dict[str, Callable[[Any], Any]] = {
    "/v1/chat/completions": ChatCompletion.model_validate,
    "/v1/embeddings": CreateEmbeddingResponse.model_validate,
    "/v1/responses": Response.model_validate,
    "/v1/completions": Completion.model_validate,
}
# what differs between two answers of one server to one request (its ids and clock)
PER_ANSWER = ("id", "created", "created_at")


def sample_lines(model: str | None = None) -> list[dict[str, Any]]:
    """samples/openai-breadth.jsonl (every line in the OpenAI Batch form), for ``model`` if given."""
    lines = []
    for text in SAMPLE.read_text().splitlines():
        line = json.loads(text)
        if "body" not in line:
            url = line.pop("url", "/v1/chat/completions")
            line = {"custom_id": line.pop("id"), "method": "POST", "url": url, "body": line}
        if model is not None:
            line["body"]["model"] = model
        lines.append(line)
    return lines


def url_of(line: dict[str, Any]) -> str:
    return str(line.get("url", "/v1/chat/completions"))


def run_lines(base_url: str, lines: list[dict[str, Any]], tmp: Path, *extra: str,
              timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`aivvm-batch run` on ``lines`` with the OpenAI provider at ``base_url``, OpenAI's output form."""
    source = write_jsonl(tmp / "breadth.jsonl", lines)
    out = tmp / "breadth.results.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aivvm_batch", "run", str(source), "-o", str(out), "--provider", "openai",
         "--base-url", base_url, "--format", "openai", "--state-dir", str(tmp / "state"), "--workers", "1",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return done, results


def serve_lines(base_url: str, lines: list[dict[str, Any]], tmp: Path, timeout: float = 300,
                batch_of: Callable[[dict[str, Any]], str] | None = None
                ) -> dict[str, tuple[Batch, list[dict[str, Any]], list[dict[str, Any]]]]:
    """One `serve` batch per endpoint through the SDK (a line goes to the batch of its own ``url``
    unless ``batch_of`` says otherwise): endpoint -> (batch, output lines, error lines)."""
    by_endpoint: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_endpoint.setdefault((batch_of or url_of)(line), []).append(line)
    found = {}
    with serving("--provider", "openai", "--base-url", base_url, "--state-dir", str(tmp / "serve-state"),
                 "--workers", "1", env={"AIVVM_BATCH_API_KEYS": "sk-breadth"}, log_dir=tmp) as served:
        api = OpenAI(base_url=served.api, api_key="sk-breadth", max_retries=0, timeout=60)
        batches = {}
        for endpoint, group in by_endpoint.items():
            source = write_jsonl(tmp / f"serve{len(batches)}.jsonl", group)
            uploaded = api.files.create(file=source.open("rb"), purpose="batch")
            batches[endpoint] = api.batches.create(input_file_id=uploaded.id, endpoint=endpoint,  # type: ignore[arg-type]
                                                   completion_window="24h")
        deadline = time.monotonic() + timeout
        for endpoint, batch in batches.items():
            while batch.status not in TERMINAL:
                assert time.monotonic() < deadline, f"batch still {batch.status}: {served.log_text()}"
                time.sleep(0.3)
                batch = api.batches.retrieve(batch.id)
            output = _file_lines(api, batch.output_file_id)
            errors = _file_lines(api, batch.error_file_id)
            found[endpoint] = (batch, output, errors)
    return found


def _file_lines(api: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines()]


def check_success(line: dict[str, Any], endpoint: str) -> Any:
    """A 200 output line whose body validates as the SDK's type for ``endpoint``; the parsed body."""
    assert line["error"] is None, line
    assert line["response"]["status_code"] == 200, line
    return BODY_TYPES[endpoint](line["response"]["body"])


def answered_directly(base_url: str, line: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
    """The server's own non-streamed answer to the line's request."""
    body = {**line["body"], "stream": False}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    reply = requests.post(base_url + url_of(line).removeprefix("/v1"), json=body, headers=headers, timeout=300)
    reply.raise_for_status()
    return dict(reply.json())


def without_per_answer(value: Any) -> Any:
    """``value`` without the ids and times that differ between two answers to one request."""
    if isinstance(value, dict):
        return {k: without_per_answer(v) for k, v in value.items() if k not in PER_ANSWER}
    if isinstance(value, list):
        return [without_per_answer(v) for v in value]
    return value
