"""Against a real OpenAI-compatible server nobody here wrote: ``llmock`` from PyPI.

The stand-in is ours, so it could share our misreadings of the protocol; llmock
streams its own server-sent events (role-only first delta, ``logprobs``, usage),
and the result lines must still validate with the ``openai`` SDK's own types.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openai import OpenAI
from openai.types import Batch
from openai.types.chat import ChatCompletion

from aivvm_batch.private_redis import free_port

from .serve_helpers import serving, write_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
LLMOCK = shutil.which("llmock", path=str(Path(sys.executable).parent)) or shutil.which("llmock")


@pytest.fixture(scope="module")
def llmock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``llmock serve`` on a free loopback port; its OpenAI base URL (with /v1)."""
    if LLMOCK is None:
        pytest.fail("llmock is not installed: pip install -e '.[test]'")
    port = free_port()
    log = tmp_path_factory.mktemp("llmock") / "llmock.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([LLMOCK, "serve", "--port", str(port)], stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base + "/v1/models", timeout=1)
                break
            except requests.RequestException:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"llmock did not start: {log.read_text(errors='replace')}")
                time.sleep(0.1)
        yield base + "/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


def _lines(n: int) -> list[dict[str, object]]:
    return [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]}}
            for i in range(n)]


def test_run_against_llmock_gives_sdk_valid_completions(llmock: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [*_lines(5), {"prompt": "no model given"}])
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "aivvm_batch", "run", str(source), "-o", str(out), "--provider", "openai",
         "--base-url", llmock, "--model", "gpt-4o-mini", "--format", "openai",
         "--state-dir", str(tmp_path / "state"), "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2", "r3", "r4", "line-6"]
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.model == "gpt-4o-mini"  # --model filled the line that named none
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.total_tokens > 0


def test_serve_with_the_sdk_against_llmock(llmock: str, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "requests.jsonl", _lines(6))
    with serving("--provider", "openai", "--base-url", llmock, "--state-dir", str(tmp_path / "state"),
                 "--workers", "1", env={"AIVVM_BATCH_API_KEYS": "sk-llmock-test"},
                 log_dir=tmp_path) as served:
        api = OpenAI(base_url=served.api, api_key="sk-llmock-test", max_retries=0, timeout=30)
        uploaded = api.files.create(file=source.open("rb"), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
        deadline = time.monotonic() + 90
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline, f"batch still {batch.status}: {served.log_text()}"
            time.sleep(0.5)
            batch = api.batches.retrieve(batch.id)
        assert isinstance(batch, Batch) and batch.status == "completed", served.log_text()
        assert batch.request_counts is not None and batch.request_counts.completed == 6
        assert batch.output_file_id is not None and batch.error_file_id is None
        output = [json.loads(line) for line in api.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(6)]
    for line in output:
        assert ChatCompletion.model_validate(line["response"]["body"]).choices[0].message.content
