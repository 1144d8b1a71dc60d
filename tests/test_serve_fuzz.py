"""A fuzzer against a real ``serve``: no request, however wrong, is answered with a 5xx.

schemathesis reads the OpenAPI schema serve publishes (``GET /openapi.json``) and sends, for every
operation, requests inside the schema's bounds and outside them (wrong types, missing fields,
strings where numbers go, odd multipart bodies...), with one of two keys. Path ids and a new
batch's ``input_file_id`` are at times real ones (files, an ended and a running batch), so the
handlers past the lookups are swept too. Every answer must be a non-5xx that the schema declares,
in its declared form (the File, the Batch, OpenAI's error body), and a refused request makes no batch.

Each operation and kind of data (inside the schema, outside it) is a test of its own over schemathesis'
``operation.as_strategy``: its pytest loader (``schemathesis.pytest.from_fixture``) fails on pytest 9.2,
whose nodes have no ``_nodeid`` any more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from aivvm_batch.serve.auth import owner_of
from aivvm_batch.serve.openapi import PATHS
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs.keys import owner_batches
from tests.serve_helpers import Served, request_line, serving, wait_for, write_jsonl

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-alice-fuzz-key", "sk-bob-fuzz-key"
KEYS = (ALICE, BOB)
OPERATIONS = [(method.upper(), path) for path, methods in PATHS.items() for method in methods]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module")
def fuzzed_server(redis_url: str, stub: StubServer, workers: WorkerProcesses,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", stub.base_url + "/v1",
                 "--max-upload-bytes", str(64 * 1024), env={"AIVVM_BATCH_API_KEYS": f"{ALICE},{BOB}"},
                 log_dir=tmp_path_factory.mktemp("serve-fuzz")) as served:
        yield served


@pytest.fixture
def real_ids(fuzzed_server: Served, tmp_path: Path) -> Iterator[dict[str, list[str]]]:
    """Alice's real objects, new for each operation (a sweep may delete them): an input file, an
    ended batch and a running one (its one item waits on the stand-in)."""
    api = OpenAI(base_url=fuzzed_server.api, api_key=ALICE, max_retries=0, timeout=30)
    quick = write_jsonl(tmp_path / "quick.jsonl", [request_line("quick", "hello")])
    slow = write_jsonl(tmp_path / "slow.jsonl", [request_line("slow", "[[stub latency=20]] hello")])
    file_ids = [api.files.create(file=(path.name, path.read_bytes()), purpose="batch").id for path in (quick, slow)]
    ended, running = (api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id for file_id in file_ids)
    assert wait_for(api, ended).status == "completed"
    yield {"file_id": file_ids, "batch_id": [ended, running]}
    with contextlib.suppress(openai.APIStatusError):  # the sweep may have cancelled or deleted it
        api.batches.cancel(running)


@pytest.fixture(scope="module")
def api_schema(fuzzed_server: Served) -> BaseSchema:
    schema = schemathesis.openapi.from_url(fuzzed_server.base + "/openapi.json")
    schema.config.update(base_url=fuzzed_server.base)
    return schema


def chosen_ids(real: dict[str, list[str]]) -> st.SearchStrategy[dict[str, str] | None]:
    """The generated ids as they are (None), or real ones: one of each kind."""
    return st.none() | st.fixed_dictionaries({name: st.sampled_from(ids) for name, ids in real.items()})


def with_ids(case: Case, ids: dict[str, str]) -> None:
    """The case's ids (in its path, and a new batch's ``input_file_id``) replaced by ``ids``."""
    for name in case.path_parameters or {}:
        if name in ids:
            case.path_parameters[name] = ids[name]
    if isinstance(case.body, dict) and "input_file_id" in case.body:
        case.body["input_file_id"] = ids["file_id"]


@pytest.mark.parametrize("mode", list(GenerationMode))
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_request_is_answered_with_a_server_error(fuzzed_server: Served, api_schema: BaseSchema,
                                                     real_ids: dict[str, list[str]], redis_client: redis.Redis,
                                                     method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode), key=st.sampled_from(KEYS), ids=chosen_ids(real_ids))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def sweep(case: Case, key: str, ids: dict[str, str] | None) -> None:
        if ids is not None:
            with_ids(case, ids)
        batches = owner_batches(owner_of(key))
        before = redis_client.zcard(batches)
        response = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=30)
        if response.status_code >= 400:  # a refused request made no batch
            assert redis_client.zcard(batches) == before, response.text

    logged = len(fuzzed_server.log_text())
    sweep()
    assert "Traceback" not in fuzzed_server.log_text()[logged:]  # nor an error past the answer's start
