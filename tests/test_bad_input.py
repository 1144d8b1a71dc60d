"""Hostile and broken input files through the real command line: every line gets its verdict.

``aivvm-batch run`` as a user runs it (its own private Redis and worker process,
real HTTP to the session's stand-in provider): one result per non-blank line, in
input order, broken lines ``invalid`` with their line number and the problem,
valid lines ``ok``, exit code 1, and never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aivvm_batch.stub import StubServer
from tests.conftest import WORKER_ENV, Batches

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
BOM = b"\xef\xbb\xbf"
HUGE_BYTES = 10 * 1024 * 1024
DEFAULT_LIMIT = 1024 * 1024


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 110) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "aivvm_batch", *args], capture_output=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def run_env() -> dict[str, str]:
    # "" = no --redis-url: `run` starts its own private Redis, whatever the caller's environment says
    return {**WORKER_ENV, "AIVVM_BATCH_REDIS_URL": "", "AIVVM_BATCH_PROVIDER": "aivvm",
            "AIVVM_BATCH_FORMAT": "native"}


def j(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


# (raw line without its line end, line end, expectation)
# expectation: ("ok", prompt) for a valid line, ("invalid", [substrings of the error message]),
# or ("blank", None) for a line that must be skipped.
Corpus = list[tuple[bytes, bytes, tuple[str, Any]]]


def corpus() -> Corpus:
    deep = b"[" * 100_000
    return [
        # 1: a UTF-8 BOM opens the file; the line itself is valid
        (BOM + j({"id": "v1", "prompt": "first valid"}), b"\n", ("ok", "first valid")),
        # 2: invalid JSON
        (b'{"id": "bad-json", "prompt": "x"', b"\n", ("invalid", ["not valid JSON"])),
        # 3-6: wrong types
        (j({"id": "wt-prompt", "prompt": 42}), b"\n",
         ("invalid", ["field 'prompt'", "non-empty string"])),
        (j({"id": ["x"], "prompt": "y"}), b"\n",
         ("invalid", ["field 'id'", "must be a string or an integer, got a list"])),
        (j({"id": "wt-temp", "prompt": "y", "temperature": "hot"}), b"\r\n",
         ("invalid", ["field 'temperature'", "number from 0 to 2"])),
        (j({"id": "wt-messages", "messages": "hello"}), b"\n",
         ("invalid", ["field 'messages'", "non-empty list, got a string"])),
        # 7: a blank CRLF line: skipped, but it still counts for the line numbers
        (b"", b"\r\n", ("blank", None)),
        # 8: missing messages (CRLF)
        (j({"id": "nomsg"}), b"\r\n", ("invalid", ["missing", "'messages'"])),
        # 9: empty messages
        (j({"id": "empty-msgs", "messages": []}), b"\n",
         ("invalid", ["field 'messages'", "must be a non-empty list"])),
        # 10: unknown role
        (j({"id": "role", "messages": [{"role": "wizard", "content": "x"}]}), b"\n",
         ("invalid", ["field 'messages[0].role'", "unknown role 'wizard'"])),
        # 11-12: content that is not a string
        (j({"id": "content-obj", "messages": [{"role": "user", "content": {"text": "x"}}]}), b"\n",
         ("invalid", ["field 'messages[0].content'", "must be a string or a list of parts, got an object"])),
        (j({"id": "content-null", "messages": [{"role": "user", "content": None}]}), b"\n",
         ("invalid", ["field 'messages[0].content'", "null only on an assistant turn with tool_calls"])),
        # 13: valid, CRLF, with a leading system message
        (j({"id": "v2", "messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "second valid"}]}), b"\r\n",
         ("ok", "second valid")),
        # 14: a 10 MB line (valid JSON, far over the 1 MiB default limit)
        (b'{"id": "huge", "prompt": "' + b"a" * HUGE_BYTES + b'"}', b"\n",
         ("invalid", [f"limit of {DEFAULT_LIMIT} bytes", "AIVVM_BATCH_MAX_LINE_BYTES"])),
        # 15: the line after the huge one is read whole and numbered right
        (j({"id": "v3", "prompt": "after the huge line"}), b"\n", ("ok", "after the huge line")),
        # 16-18: bytes that are not UTF-8 (Latin-1, garbage, an encoded surrogate)
        (b'{"id": "latin1", "prompt": "caf\xe9"}', b"\n", ("invalid", ["not valid UTF-8"])),
        (b"\xff\xfe garbage", b"\r\n", ("invalid", ["not valid UTF-8"])),
        (b'{"id": "cesu", "prompt": "\xed\xa0\x80"}', b"\n", ("invalid", ["not valid UTF-8"])),
        # 19: duplicate id (of line 1)
        (j({"id": "v1", "prompt": "duplicate id"}), b"\n", ("invalid", ["duplicate id 'v1'"])),
        # 20-21: deep nesting, bare and inside a valid-looking object
        (deep, b"\n", ("invalid", ["nested too deeply"])),
        (b'{"id": "deep", "prompt": "x", "stop": ' + deep, b"\n", ("invalid", ["nested too deeply"])),
        # 22-23: lone surrogate escapes
        (b'{"id": "surrogate", "prompt": "\\ud800 alone"}', b"\n", ("invalid", ["surrogate"])),
        (b'{"id": "surrogate2", "messages": [{"role": "user", "content": "x \\udfff"}]}', b"\r\n",
         ("invalid", ["surrogate"])),
        # 24: valid OpenAI Batch form, CRLF
        (j({"custom_id": "v4", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "fourth valid"}]}}), b"\r\n",
         ("ok", "fourth valid")),
        # 25: whitespace only: skipped
        (b"   \t  ", b"\n", ("blank", None)),
        # 26-28: JSON that is not an object
        (b"[1, 2, 3]", b"\n", ("invalid", ["expected a JSON object, got a list"])),
        (b'"just a string"', b"\n", ("invalid", ["expected a JSON object, got a string"])),
        (b"null", b"\n", ("invalid", ["expected a JSON object, got null"])),
        # 29: a BOM in the middle of the file is not stripped: not JSON
        (BOM + j({"id": "bom-mid", "prompt": "x"}), b"\n", ("invalid", ["not valid JSON"])),
        # 30: an integer beyond Python's digit limit
        (b'{"id": ' + b"1" * 5000 + b', "prompt": "x"}', b"\n", ("invalid", ["not valid JSON"])),
        # 31: valid, non-ASCII
        (j({"id": "v5", "prompt": "emoji 🎉 and 日本語"}), b"\n", ("ok", "emoji 🎉 and 日本語")),
        # 32-35: more shapes that are not requests
        (j({"id": "unknown-field", "prompt": "x", "colour": "red"}), b"\n",
         ("invalid", ["field 'colour'", "unknown field"])),
        (j({"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}), b"\n",
         ("invalid", ["not both"])),
        (j({"id": "sys-only", "messages": [{"role": "system", "content": "x"}]}), b"\n",
         ("invalid", ["only a system message"])),
        (j({"custom_id": "b-get", "method": "GET", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "x"}]}}), b"\n",
         ("invalid", ["field 'method'", "POST"])),
        (j({"id": "", "prompt": "x"}), b"\n", ("invalid", ["field 'id'", "must not be empty"])),
        # 37: the last line, valid, without an id and without a line end
        (j({"prompt": "last line, no newline"}), b"", ("ok", "last line, no newline")),
    ]


def write_corpus(path: Path, lines: Corpus) -> None:
    with open(path, "wb") as f:
        for raw, end, _ in lines:
            f.write(raw + end)


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


@pytest.mark.timeout(120)
def test_a_corpus_of_broken_lines_through_run(stub: StubServer, tmp_path: Path) -> None:
    lines = corpus()
    source = tmp_path / "corpus.jsonl"
    write_corpus(source, lines)
    out = tmp_path / "results.jsonl"
    proc = cli("run", str(source), "-o", str(out), "--base-url", stub.base_url,
               "--state-dir", str(tmp_path / "state"), env=run_env())
    stderr = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == 1, stderr

    expected = [(number, kind, detail) for number, (_, _, (kind, detail)) in enumerate(lines, 1)
                if kind != "blank"]
    results = read_results(out)
    assert [r["line"] for r in results] == [number for number, _, _ in expected], \
        "one result per non-blank line, in input order"
    for result, (number, kind, detail) in zip(results, expected):
        assert result["status"] == kind, (number, result)
        if kind == "ok":
            assert result["error"] is None, result
            assert result["output"] == f"Stand-in reply to: {detail}", result
        else:
            assert result["error"]["type"] == "invalid_line", result
            message = result["error"]["message"]
            assert message.startswith(f"line {number}"), (number, message)
            for needle in detail:
                assert needle in message, (number, needle, message)
            assert len(message) < 1000, "the error must not echo a huge line"
            assert result["output"] is None

    by_line = {r["line"]: r for r in results}
    assert by_line[1]["id"] == "v1"  # the BOM did not become part of the line
    assert by_line[3]["id"] == "wt-prompt"  # a broken line keeps the id it meant to have
    assert by_line[14]["id"] == "line-14"
    assert by_line[37]["id"] == "line-37"  # default id: line-N
    assert sum(r["status"] == "ok" for r in results) == 6
    assert out.stat().st_size < 100_000, "the huge line is not copied into the results"
    assert "summary:" in stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\n\n   \n\t\r\n\r\n", id="blank-lines-only"),
    pytest.param(BOM, id="bom-only"),
    pytest.param(BOM + b"\r\n  \n", id="bom-then-blank-lines"),
])
def test_a_file_with_no_items_succeeds_with_an_empty_results_file(content: bytes, stub: StubServer,
                                                                  tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    out = tmp_path / "results.jsonl"
    proc = cli("run", str(source), "-o", str(out), "--base-url", stub.base_url,
               "--state-dir", str(tmp_path / "state"), env=run_env())
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert out.exists()
    assert out.read_bytes() == b""


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("workers")
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_standard_json_numbers_are_invalid(literal: str, batches: Batches,
                                               stub: StubServer) -> None:
    """NaN and Infinity are not JSON (RFC 8259), and 1e400 overflows a double: the line is invalid.

    Python's json module accepts all of them (1e400 becomes inf); the parser keeps
    pass-through parameters unchecked, so such a value would otherwise reach the
    OpenAI provider, where requests refuses to encode it and the item is retried
    as if the server were unreachable.
    """
    results = batches.run([
        {"id": "good", "prompt": "fine"},
        f'{{"id": "odd", "prompt": "x", "top_p": {literal}}}',
        f'{{"id": "odd2", "prompt": "x", "max_tokens": {literal}}}',
    ], timeout=90, provider="openai", base_url=stub.base_url + "/v1")
    assert results[0]["status"] == "ok", results[0]
    for result, field in zip(results[1:], ("top_p", "max_tokens")):
        assert result["status"] == "invalid", json.dumps(result)
        assert result["error"]["message"].startswith(f"line {result['line']}"), result
        assert field in result["error"]["message"] or "JSON" in result["error"]["message"], result
