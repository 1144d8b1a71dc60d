"""``serve`` bounded by what a file carries: a file with no request fails in ``validating`` with
OpenAI's ``errors.data`` and leaves no record of its lines in Redis; one tenant's steps never hold
every thread of the driver; the ``Batch`` object's usage details and model come from its answers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from openai import OpenAI

from aivvm_batch.serve.driver import OwnerShares
from aivvm_batch.serve.output import AnswerTotals
from aivvm_batch.serve.validation import MAX_REPORTED_ERRORS, without_request
from aivvm_batch.stub import StubServer
from jobs.errors import MAX_EXPLANATION
from jobs.records import RequestDefaults
from tests.serve_helpers import Served, request_line, serving, wait_for, write_jsonl

ALICE = "sk-alice-bounds-key"


def test_a_file_without_a_request_is_named_by_its_first_problems() -> None:
    lines = b"{}\n\nnot json\n" + b'{"custom_id": "x"}\n' * 200
    found = without_request(io.BytesIO(lines), RequestDefaults(), ("openai",), 1 << 20)
    assert found is not None and len(found.errors) == MAX_REPORTED_ERRORS
    assert [e["line"] for e in found.errors[:3]] == [1, 3, 4]
    assert all(e["code"] == "invalid_request" and str(e["message"]).startswith(f"line {e['line']}")
               for e in found.errors)
    assert without_request(io.BytesIO(b"\n \n"), RequestDefaults(), ("openai",), 1 << 20) == type(found)(())


def test_a_file_with_a_request_is_read_no_further_than_it() -> None:
    class Tripwire(io.BytesIO):
        """Two invalid lines, a request, then a line whose reading fails the test."""

        lines = [b"{}\n", b"[]\n", b'{"id": "a", "prompt": "hello"}\n']

        def readline(self, size: int | None = -1) -> bytes:
            if not self.lines:
                raise AssertionError("read past the first request")
            return self.lines.pop(0)

    assert without_request(Tripwire(), RequestDefaults(), ("aivvm",), 1 << 20) is None


def test_one_owner_takes_at_most_its_share_of_the_threads() -> None:
    shares = OwnerShares(2)
    assert shares.take("a") and shares.take("a") and not shares.take("a")
    assert shares.take("b")
    shares.give_back("a")
    assert shares.take("a") and not shares.take("a")


@pytest.fixture(scope="module")
def server(redis_url: str, stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", stub.base_url + "/v1",
                 env={"AIVVM_BATCH_API_KEYS": ALICE}, log_dir=tmp_path_factory.mktemp("serve-bounds")) as served:
        yield served


@pytest.mark.integration
def test_100k_invalid_lines_fail_in_validating_and_cost_redis_only_their_upload(
        server: Served, redis_client: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "invalid.jsonl"
    path.write_bytes(b"{}\n" * 100_000)
    api = OpenAI(base_url=server.api, api_key=ALICE, max_retries=0, timeout=60)
    before = int(redis_client.info("memory")["used_memory"])
    file_id = api.files.create(file=path.open("rb"), purpose="batch").id
    batch = wait_for(api, api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id, timeout=120)
    grown = int(redis_client.info("memory")["used_memory"]) - before
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data is not None
    assert len(batch.errors.data) == MAX_REPORTED_ERRORS
    assert batch.errors.data[0].line == 1 and batch.errors.data[0].code == "invalid_request"
    assert batch.output_file_id is None and batch.error_file_id is None
    assert grown <= 5 * 2**20, f"Redis grew {grown / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB file"
    # a file with one request among its mistakes runs it, the rest in its error file
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [b"{}", request_line("ok-1", "hello"), b"[]"])
    ran = wait_for(api, api.batches.create(input_file_id=api.files.create(file=mixed.open("rb"), purpose="batch").id,
                                           endpoint="/v1/chat/completions", completion_window="24h").id,
                   statuses=("in_progress", "completed", "failed"))
    assert ran.status != "failed", ran.errors


def test_a_batchs_usage_details_and_model_are_read_from_its_answers() -> None:
    totals = AnswerTotals()
    chat = {"response": {"status_code": 200, "body": {"model": "m-1", "usage": {
        "prompt_tokens": 30, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 12},
        "completion_tokens_details": {"reasoning_tokens": 3}}}}}
    responses = {"response": {"status_code": 200, "body": {"model": "m-1", "usage": {
        "input_tokens": 9, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 4},
        "output_tokens_details": {"reasoning_tokens": 1}}}}}
    odd = {"response": {"status_code": 200, "body": {"model": "m-2", "usage": {
        "prompt_tokens_details": {"cached_tokens": True}, "completion_tokens_details": None}}}}
    refused = {"response": {"status_code": 400, "body": {"model": "m-3", "usage": {
        "prompt_tokens_details": {"cached_tokens": 50}}}}}
    for line in (chat, responses, odd, refused, {"response": None}):
        totals.add(line)
    assert (totals.cached_tokens, totals.reasoning_tokens, totals.model) == (16, 4, "m-1")
    assert AnswerTotals().model is None


def test_a_lines_explanation_is_bounded_whatever_the_line() -> None:
    wide = b'{"prompt": "x", ' + b", ".join(b'"f%d": 1' % i for i in range(25_000)) + b"}\n"
    long_name = b'{"prompt": "x", "' + b"k" * 5000 + b'": 1}\n'
    found = without_request(io.BytesIO(wide + long_name), RequestDefaults(), ("openai",), 1 << 24)
    assert found is not None and [e["line"] for e in found.errors] == [1, 2]
    assert all(len(str(e["message"])) <= MAX_EXPLANATION for e in found.errors)
    assert "and 24,995 more" in str(found.errors[0]["message"])
