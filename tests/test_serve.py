"""``aivvm-batch serve``: the official openai SDK against a real serve process, real Redis, real workers.

The server runs as its own process (``python -m aivvm_batch.serve``) on the test Redis;
the shared worker process (conftest ``workers``) runs the items against the stand-in.
An "idle" server on another Redis database has no worker, so its items wait: that
makes cancel and expiry deterministic.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import requests
from openai import OpenAI
from openai.types import Batch, FileDeleted, FileObject
from openai.types.batch_error import BatchError as SDKBatchError
from openai.types.chat import ChatCompletion

from aivvm_batch.serve.auth import ANONYMOUS, KeyRing, check_host, check_origin, is_loopback, owner_of
from aivvm_batch.serve.errors import Forbidden, Unauthorized
from aivvm_batch.serve.output import api_line
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from aivvm_batch.serve.driver import Driver, DriverConfig
from aivvm_batch.serve.records import BatchRecords
from jobs.files import CHUNK_BYTES, READ_CHUNKS, FileNotFound, FileStore
from jobs.keys import API_ACTIVE, api_batch, file_data, file_meta
from jobs.queue import Publisher
from jobs.queue import app as celery_app
from jobs.records import BatchOptions, ItemError, ItemResult, Status, Usage
from jobs.store import BatchStore
from tests.serve_helpers import ROOT, Served, request_line, serving, stalled_upload, wait_for, with_db, write_jsonl

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-alice-test-key", "sk-bob-test-key"
KEYS_ENV = {"AIVVM_BATCH_API_KEYS": f"{ALICE},{BOB}"}
MAX_UPLOAD = 4 * 1024 * 1024


# -- pure parts ------------------------------------------------------------------------------


def test_key_ring_maps_each_key_to_its_own_owner() -> None:
    ring = KeyRing.of([ALICE, BOB, ALICE])
    assert ring.owner(f"Bearer {ALICE}") == owner_of(ALICE)
    assert ring.owner(f"bearer  {BOB} ") == owner_of(BOB)
    assert owner_of(ALICE) != owner_of(BOB) and ALICE not in owner_of(ALICE)
    for header in (None, "", "Bearer", f"Basic {ALICE}", "Bearer sk-nobody", f"Bearer {ALICE}x"):
        with pytest.raises(Unauthorized):
            ring.owner(header)
    assert KeyRing.of([]).owner(None) == ANONYMOUS


def test_loopback_host_and_origin_rules() -> None:
    for host in ("127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "10.0.0.1", "example.com", "localhost.example.com", "::", ""):
        assert not is_loopback(host), host
    check_host("127.0.0.1:8080")
    check_host("localhost:8080")
    check_host("[::1]:8080")
    for header in (None, "evil.example:8080", "127.0.0.1.evil.example", "0.0.0.0:8080", "[::1", "a\uff03b"):
        with pytest.raises(Forbidden):  # the last two: urlsplit's ValueError, before a 500
            check_host(header)
    check_origin(None, "127.0.0.1:8080")
    check_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://[::1", "http://["):
        with pytest.raises(Forbidden):
            check_origin(origin, "127.0.0.1:8080")


def test_result_lines_are_openai_output_lines() -> None:
    ok = ItemResult(id="r1", line=1, status=Status.OK, model="gpt-3.5-turbo", output="Hello",
                    attempts=1, usage=Usage(3, 2, True), finish_reason="stop", provider="openai")
    success, raw = api_line(ok, expired=False, created=1_700_000_000)
    line = json.loads(raw)
    assert success and raw.endswith(b"\n") and line["custom_id"] == "r1" and line["error"] is None
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert completion.choices[0].message.content == "Hello" and completion.created > 0
    cancelled = ItemResult(id="r2", line=2, status=Status.CANCELLED,
                           error=ItemError("cancelled", "the batch was cancelled before this item started"))
    for expired, code in ((True, "batch_expired"), (False, "batch_cancelled")):
        success, raw = api_line(cancelled, expired=expired, created=1)
        line = json.loads(raw)
        assert not success and line["response"] is None
        assert SDKBatchError.model_validate(line["error"]).code == code


def test_file_store_writes_and_reads_in_chunks(redis_client: redis.Redis) -> None:
    files = FileStore(redis_client)
    writer = files.writer("owner-x", "big.jsonl", "batch")
    content = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256 + 1)
    for start in range(0, len(content), 65536):
        writer.write(content[start:start + 65536])
    assert redis_client.ttl(file_data(writer.id)) > 0
    stored = writer.commit()
    assert redis_client.llen(file_data(stored.id)) == 3 and redis_client.ttl(file_data(stored.id)) == -1
    assert max(len(c) for c in redis_client.lrange(file_data(stored.id), 0, -1)) == CHUNK_BYTES
    assert b"".join(files.iter_content(stored.id)) == content and stored.bytes == len(content)
    many = files.writer("owner-x", "many.jsonl", "batch")
    content = bytes(range(256)) * (CHUNK_BYTES * (2 * READ_CHUNKS + 3) // 256)
    many.write(content)
    assert b"".join(files.iter_content(many.commit().id)) == content  # read back over three round trips
    deleted = files.iter_content(many.id)
    next(deleted)
    files.delete("owner-x", many.id)  # while it is read (a batch validating it): never a shorter file
    with pytest.raises(FileNotFound):
        b"".join(deleted)
    aborted = files.writer("owner-x", "gone.jsonl", "batch")
    aborted.write(content)
    aborted.abort()
    assert not redis_client.exists(file_data(aborted.id), file_meta(aborted.id))


# -- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(redis_url: str, stub: StubServer, workers: WorkerProcesses,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve on the test Redis, with two keys; the shared worker runs its items."""
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", stub.base_url + "/v1",
                 "--max-upload-bytes", str(MAX_UPLOAD), env=KEYS_ENV,
                 log_dir=tmp_path_factory.mktemp("serve")) as served:
        yield served


@pytest.fixture(scope="module")
def idle_server(redis_url: str, stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve on another Redis database that no worker reads, with a 3-second completion window."""
    with serving("--redis-url", with_db(redis_url, 1), "--provider", "openai", "--base-url",
                 stub.base_url + "/v1", "--completion-window-seconds", "3", env=KEYS_ENV,
                 log_dir=tmp_path_factory.mktemp("serve-idle")) as served:
        yield served


def client(served: Served, key: str = ALICE) -> OpenAI:
    return OpenAI(base_url=served.api, api_key=key, max_retries=0, timeout=30)


def check_batch(batch: Batch) -> Batch:
    """Round trip through the SDK's own model, strictly."""
    return Batch.model_validate(batch.model_dump(), strict=False)


# -- the whole flow ---------------------------------------------------------------------------


def test_sdk_whole_flow(server: Served, tmp_path: Path) -> None:
    api = client(server)
    lines: list[Any] = [request_line(f"r{i}", f"question {i}") for i in range(8)]
    lines.insert(3, b"this line is not json")
    lines.insert(6, request_line("bad-status", "[[stub fault=status code=400]] refuse me"))
    path = write_jsonl(tmp_path / "requests.jsonl", lines)

    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    assert isinstance(uploaded, FileObject)
    assert uploaded.purpose == "batch" and uploaded.bytes == path.stat().st_size
    assert uploaded.filename == "requests.jsonl" and uploaded.id.startswith("file-")
    assert api.files.retrieve(uploaded.id) == uploaded
    assert api.files.content(uploaded.id).content == path.read_bytes()

    created = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"purpose": "test"})
    assert isinstance(created, Batch)
    assert created.status == "validating" and created.metadata == {"purpose": "test"}
    assert created.expires_at == created.created_at + 24 * 3600

    batch = check_batch(wait_for(api, created.id))
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (10, 8, 2)
    for stamp in (batch.in_progress_at, batch.finalizing_at, batch.completed_at):
        assert stamp is not None and batch.created_at <= stamp <= batch.completed_at  # type: ignore[operator]
    assert batch.usage is not None and batch.usage.output_tokens > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.output_file_id and batch.error_file_id

    output = api.files.content(batch.output_file_id).text.splitlines()
    ids = [json.loads(line)["custom_id"] for line in output]
    assert ids == [f"r{i}" for i in range(8)]
    for raw in output:
        line = json.loads(raw)
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content and completion.created >= batch.created_at - 1
    errors = [json.loads(line) for line in api.files.content(batch.error_file_id).text.splitlines()]
    assert [e["id"] for e in errors] == ["batch_req_4", "batch_req_7"]
    assert errors[0]["response"] is None
    assert "line 4" in (SDKBatchError.model_validate(errors[0]["error"]).message or "")
    assert errors[1]["custom_id"] == "bad-status"
    refused = errors[1]
    if refused["response"] is not None:
        assert refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["message"]
    else:
        assert SDKBatchError.model_validate(refused["error"]).message
    output_file = api.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes == len(
        api.files.content(batch.output_file_id).content)

    listed = api.batches.list(limit=100)
    assert created.id in [b.id for b in listed.data]
    file_ids = [f.id for f in api.files.list()]
    assert {uploaded.id, batch.output_file_id, batch.error_file_id} <= set(file_ids)

    slow = write_jsonl(tmp_path / "slow.jsonl",
                       [request_line(f"s{i}", f"[[stub latency=1]] slow {i}") for i in range(120)])
    second = api.batches.create(input_file_id=api.files.create(file=slow.open("rb"), purpose="batch").id,
                                endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = api.batches.cancel(second.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    cancelled = check_batch(wait_for(api, second.id))
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    counts = cancelled.request_counts
    assert counts is not None and counts.total == 120 and counts.completed + counts.failed == 120
    assert counts.failed > 0
    assert cancelled.error_file_id is not None
    codes = {json.loads(line)["error"]["code"] for line in api.files.content(cancelled.error_file_id).text.splitlines()}
    assert codes == {"batch_cancelled"}

    deleted = api.files.delete(uploaded.id)
    assert isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(uploaded.id)
    assert api.batches.retrieve(created.id).status == "completed"


def test_list_batches_pages_with_after_and_limit(server: Served, tmp_path: Path) -> None:
    api = client(server, BOB)
    path = write_jsonl(tmp_path / "one.jsonl", [request_line("only", "hello")])
    made = []
    for _ in range(3):
        file_id = api.files.create(file=path.open("rb"), purpose="batch").id
        made.append(api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                       completion_window="24h").id)
    first = api.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = api.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]
    every = [b.id for b in api.batches.list(limit=2)]
    assert every[:3] == made[::-1] and len(every) == len(set(every))
    for batch_id in made:
        assert wait_for(api, batch_id).status == "completed"


def test_one_idempotency_key_makes_one_batch_and_listing_honours_order(server: Served, tmp_path: Path) -> None:
    api = client(server, ALICE)
    path = write_jsonl(tmp_path / "one.jsonl", [request_line("only", "hello")])
    file_id = api.files.create(file=path.open("rb"), purpose="batch").id
    before = len(list(api.batches.list(limit=100)))
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    headers = {"Authorization": f"Bearer {ALICE}", "Idempotency-Key": f"retry-{uuid.uuid4()}"}
    made = {requests.post(server.api + "/batches", json=body, headers=headers, timeout=30).json()["id"]
            for _ in range(3)}  # a client that retries
    assert len(made) == 1 and len(list(api.batches.list(limit=100))) == before + 1
    other = requests.post(server.api + "/batches", json={**body, "metadata": {"a": "b"}}, headers=headers, timeout=30)
    assert other.status_code == 400 and other.json()["error"]["code"] == "idempotency_key_reused"
    newest = [b.id for b in api.batches.list(limit=100)]
    oldest = [b.id for b in api.batches.list(limit=100, extra_query={"order": "asc"})]
    assert oldest == newest[::-1] and made.pop() == newest[0]


def test_files_and_batches_expire_as_asked_and_an_ended_batch_can_be_deleted(
        server: Served, tmp_path: Path, redis_client: redis.Redis) -> None:
    api = client(server, BOB)
    path = write_jsonl(tmp_path / "one.jsonl", [request_line("only", "hello")])
    hour = api.files.create(file=path.open("rb"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600})
    assert hour.expires_at == hour.created_at + 3600
    assert all(3500 < redis_client.ttl(key) <= 3600 for key in (file_meta(hour.id), file_data(hour.id)))
    default = api.files.create(file=path.open("rb"), purpose="batch")
    assert default.expires_at == default.created_at + 30 * 24 * 3600  # OpenAI's default for batch files
    with pytest.raises(openai.BadRequestError):
        api.files.create(file=path.open("rb"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 60})
    with pytest.raises(openai.BadRequestError):
        api.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h",
                           output_expires_after={"anchor": "created_at", "seconds": 10})
    made = api.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 7200})
    done = wait_for(api, made.id)
    assert done.status == "completed" and done.output_file_id
    output = api.files.retrieve(done.output_file_id)
    assert output.expires_at == output.created_at + 7200
    assert 7000 < redis_client.ttl(file_meta(output.id)) <= 7200
    assert 7000 < redis_client.ttl(api_batch(made.id)) <= 7200  # the record goes with its files

    auth = {"Authorization": f"Bearer {BOB}"}
    deleted = requests.delete(f"{server.api}/batches/{made.id}", headers=auth, timeout=10)
    assert deleted.json() == {"id": made.id, "object": "batch.deleted", "deleted": True}
    assert requests.get(f"{server.api}/batches/{made.id}", headers=auth, timeout=10).status_code == 404
    assert not redis_client.exists(file_meta(output.id), file_data(output.id))
    assert made.id not in [b.id for b in api.batches.list(limit=100)]

    for key in (file_meta(default.id), file_data(default.id)):  # its time has come
        redis_client.pexpire(key, 1)
    time.sleep(0.1)
    assert default.id not in [f.id for f in api.files.list()]
    index = [k for k in redis_client.keys("aivb:owner:*:files") if redis_client.zscore(k, hour.id) is not None]
    assert len(index) == 1 and redis_client.zscore(index[0], default.id) is None  # nothing of it remains


def test_a_lone_surrogate_is_a_400_that_makes_nothing(server: Served, tmp_path: Path) -> None:
    """`requests`' json= and JSON.stringify send one as the escape \\ud83d: before, the batch was made
    and run, the answer was a 500 (a client that retries paid again), and the owner's listing
    answered 500 for good."""
    api = client(server, ALICE)
    path = write_jsonl(tmp_path / "one.jsonl", [request_line("only", "hello")])
    file_id = api.files.create(file=path.open("rb"), purpose="batch").id
    before = [b.id for b in api.batches.list(limit=100)]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"note": "\ud83d"}}
    reply = requests.post(server.api + "/batches", json=body, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "metadata.note"
    assert [b.id for b in api.batches.list(limit=100)] == before
    assert "Traceback" not in server.log_text()


# -- who may see what -------------------------------------------------------------------------


def test_another_key_gets_404_and_a_wrong_key_401(server: Served, tmp_path: Path) -> None:
    alice, bob = client(server, ALICE), client(server, BOB)
    path = write_jsonl(tmp_path / "mine.jsonl", [request_line("a", "alice's secret question")])
    mine = alice.files.create(file=path.open("rb"), purpose="batch")
    batch = alice.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (lambda: bob.files.retrieve(mine.id), lambda: bob.files.content(mine.id),
                 lambda: bob.files.delete(mine.id), lambda: bob.batches.retrieve(batch.id),
                 lambda: bob.batches.cancel(batch.id),
                 lambda: bob.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert mine.id not in [f.id for f in bob.files.list()]
    assert batch.id not in [b.id for b in bob.batches.list(limit=100)]
    with pytest.raises(openai.AuthenticationError):
        client(server, "sk-wrong").files.list()
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": ALICE}):
        reply = requests.get(f"{server.api}/batches/{batch.id}", headers=headers, timeout=10)
        assert reply.status_code == 401
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert alice.files.retrieve(mine.id).id == mine.id
    assert wait_for(alice, batch.id).status == "completed"


def test_bad_input_answers_4xx_in_openai_form(server: Served, redis_client: redis.Redis) -> None:
    auth = {"Authorization": f"Bearer {ALICE}"}
    jsonl = b'{"prompt": "hi"}\n'
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/batches", {"data": b"{not json"}, 400),
        ("POST", "/batches", {"data": b"[1, 2]"}, 400),
        ("POST", "/batches", {"json": {"endpoint": "/v1/chat/completions", "completion_window": "24h"}}, 400),
        ("POST", "/batches", {"json": {"input_file_id": "file-x", "endpoint": "/v1/images/generations",
                                       "completion_window": "24h"}}, 400),
        ("POST", "/batches", {"json": {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                       "completion_window": "48h"}}, 400),
        ("POST", "/batches", {"json": {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h", "metadata": {str(i): "v" for i in range(17)}}},
         400),
        ("POST", "/batches", {"json": {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h"}}, 404),
        ("POST", "/batches", {"data": b"{" + b" " * (2 * 1024 * 1024) + b"}"}, 413),
        ("GET", "/batches?limit=0", {}, 400),
        ("GET", "/batches?limit=abc", {}, 400),
        ("GET", "/batches?after=batch_nope", {}, 404),
        ("GET", "/files?order=sideways", {}, 400),
        ("GET", "/batches/batch_nope", {}, 404),
        ("GET", f"/batches/batch_{'0' * 24}:lease", {}, 404),  # another key of the store: not a batch
        ("GET", f"/files/file-{'0' * 24}:data", {}, 404),
        ("GET", "/batches?limit=\uff11\uff10", {}, 400),  # full-width digits
        ("GET", "/batches?order=sideways", {}, 400),
        ("POST", "/batches", {"json": {"input_file_id": "file-x", "endpoint": "/v1/chat/completions",
                                       "completion_window": "24h", "metadata": {"priority": "11"}}}, 400),
        ("POST", "/files", {"data": b"--x\r\n", "headers": {
            "content-type": "multipart/form-data; boundary=" + "b" * 300}}, 400),
        ("POST", "/batches", {"data": b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", '
                                      b'"completion_window": "24h", "metadata": {"note": "\\ud83d"}}'}, 400),
        ("POST", "/files", {"files": {"file": ("a.jsonl", jsonl)}, "data": {"purpose": "fine-tune"}}, 400),
        ("POST", "/files", {"data": {"purpose": "batch"}}, 400),
        ("POST", "/files", {"data": b"plain body", "headers": {"content-type": "text/plain"}}, 400),
        ("POST", "/files", {"data": b"--x\r\nbroken", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400),
        ("POST", "/files", {"files": {"file": ("big.jsonl", b"x" * (MAX_UPLOAD + 1))}, "data": {"purpose": "batch"}},
         413),
        ("POST", "/files", {"files": [("file", ("a.jsonl", jsonl)), ("file", ("b.jsonl", jsonl))],
                            "data": {"purpose": "batch"}}, 400),
        ("GET", "/nowhere", {}, 404),
        ("PUT", "/batches", {}, 405),
        # past 4,300 digits int() raises ValueError: these were 500s
        ("GET", "/batches?limit=" + "1" * 5000, {}, 400),
        ("GET", "/files?limit=" + "9" * 5000, {}, 400),
        ("POST", "/files", {"files": {"file": ("a.jsonl", jsonl)}, "data": {
            "purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "9" * 5000}}, 400),
        ("GET", "/files", {"headers": {"Origin": "http://[::1"}}, 403),  # urlsplit's ValueError: was a 500
    ]
    files_before = redis_client.keys("aivb:file:*")
    for method, path, kwargs, status in cases:
        headers = {**auth, **kwargs.pop("headers", {})}
        reply = requests.request(method, server.api + path, headers=headers, timeout=30, **kwargs)
        assert reply.status_code == status, (method, path, reply.status_code, reply.text[:300])
        error = reply.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in reply.text
        assert set(error) == {"message", "type", "param", "code"}
    assert set(redis_client.keys("aivb:file:*")) == set(files_before)
    assert "Traceback" not in server.log_text()


def test_a_content_length_of_thousands_of_digits_is_read_not_a_500(server: Served,
                                                                    redis_client: redis.Redis) -> None:
    """Content-Length "000…02" (5,000 digits) is 2: int() of it raised ValueError, a 500."""
    files_before = set(redis_client.keys("aivb:file:*"))
    form = b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b--\r\n"
    for path, content_type, body in (("/v1/batches", b"application/json", b"{}"),
                                     ("/v1/files", b"multipart/form-data; boundary=b", form)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
            connection.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                               b"Authorization: Bearer " + ALICE.encode() + b"\r\nContent-Type: " + content_type
                               + b"\r\nContent-Length: " + str(len(body)).zfill(5000).encode() + b"\r\n\r\n" + body)
            answer = b"".join(iter(lambda: connection.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"
    assert set(redis_client.keys("aivb:file:*")) == files_before
    assert "Traceback" not in server.log_text()


def test_upload_is_stored_in_chunks_and_read_back_whole(server: Served, redis_client: redis.Redis,
                                                        tmp_path: Path) -> None:
    api = client(server)
    line = json.dumps(request_line("x" * 20, "y" * 400)).encode() + b"\n"
    path = tmp_path / "big.jsonl"
    path.write_bytes(line * (3 * 1024 * 1024 // len(line)))
    uploaded = api.files.create(file=path.open("rb"), purpose="batch")
    assert uploaded.bytes == path.stat().st_size
    assert redis_client.llen(file_data(uploaded.id)) == -(-uploaded.bytes // CHUNK_BYTES)
    assert api.files.content(uploaded.id).content == path.read_bytes()
    api.files.delete(uploaded.id)
    assert not redis_client.exists(file_data(uploaded.id), file_meta(uploaded.id))


def test_a_file_that_cannot_be_a_batch_fails_with_errors(server: Served, tmp_path: Path) -> None:
    api = client(server)
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"not json", {"custom_id": "x", "body": {"messages": []}}])
    batch = wait_for(api, api.batches.create(
        input_file_id=api.files.create(file=bad.open("rb"), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at is not None and batch.errors and batch.errors.data
    assert [e.line for e in batch.errors.data] == [1, 2] and all(e.message for e in batch.errors.data)
    assert batch.output_file_id is None
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    batch = wait_for(api, api.batches.create(
        input_file_id=api.files.create(file=empty.open("rb"), purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    assert batch.errors.data[0].code == "empty_file"


# -- cancel and expiry with no worker (deterministic) -----------------------------------------


def test_cancel_ends_every_waiting_item_batch_cancelled(idle_server: Served, tmp_path: Path) -> None:
    api = client(idle_server)
    path = write_jsonl(tmp_path / "wait.jsonl", [request_line(f"w{i}", "wait") for i in range(5)])
    batch = api.batches.create(input_file_id=api.files.create(file=path.open("rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(api, batch.id, ("in_progress",), timeout=20)
    assert api.batches.cancel(batch.id).status == "cancelling"
    done = check_batch(wait_for(api, batch.id))
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    assert done.output_file_id is None and done.error_file_id
    lines = [json.loads(line) for line in api.files.content(done.error_file_id).text.splitlines()]
    assert [line["custom_id"] for line in lines] == [f"w{i}" for i in range(5)]
    assert {line["error"]["code"] for line in lines} == {"batch_cancelled"}
    assert api.batches.cancel(batch.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        api.batches.cancel(_completed_batch(api, tmp_path))


def _completed_batch(api: OpenAI, tmp_path: Path) -> str:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    file_id = api.files.create(file=empty.open("rb"), purpose="batch").id
    batch = wait_for(api, api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                             completion_window="24h").id)
    assert batch.status == "failed"
    return batch.id


def test_unfinished_items_expire_with_the_completion_window(idle_server: Served, tmp_path: Path) -> None:
    api = client(idle_server, BOB)
    path = write_jsonl(tmp_path / "late.jsonl", [request_line(f"l{i}", "late") for i in range(4)])
    batch = api.batches.create(input_file_id=api.files.create(file=path.open("rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at == batch.created_at + 3
    done = check_batch(wait_for(api, batch.id, timeout=30))
    assert done.status == "expired" and done.expired_at is not None and done.expired_at >= done.expires_at  # type: ignore[operator]
    assert done.request_counts is not None and done.request_counts.failed == 4
    lines = [json.loads(line) for line in api.files.content(done.error_file_id or "").text.splitlines()]
    assert [line["error"]["code"] for line in lines] == ["batch_expired"] * 4


# -- deployment -------------------------------------------------------------------------------


def test_without_keys_serve_refuses_other_hosts(redis_url: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "aivvm_batch.serve", "--host", "0.0.0.0", "--redis-url", redis_url],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in __import__("os").environ.items() if k != "AIVVM_BATCH_API_KEYS"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "AIVVM_BATCH_API_KEYS" in proc.stderr
    assert "Traceback" not in proc.stderr
    with serving("--redis-url", with_db(redis_url, 2), log_dir=tmp_path) as served:
        assert requests.get(served.api + "/files", timeout=10).status_code == 200
        rebound = requests.get(served.api + "/files", headers={"Host": "evil.example"}, timeout=10)
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "forbidden"
        forged = requests.post(served.api + "/files", headers={"Origin": "http://evil.example"},
                               files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"}, timeout=10)
        assert forged.status_code == 403


def test_a_stalled_upload_is_closed_and_a_key_has_few_under_way(redis_url: str, tmp_path: Path,
                                                                 redis_client: redis.Redis) -> None:
    """Before: 100 uploads stalled after 1 MB kept every connection open past a minute (serve grew
    102 MB) and each dropped one logged an 82-line traceback."""
    files_before = set(redis_client.keys("aivb:file:*"))
    env = {**KEYS_ENV, "AIVVM_BATCH_CLIENT_IDLE_SECONDS": "2", "AIVVM_BATCH_UPLOADS_PER_KEY": "1"}
    with serving("--redis-url", redis_url, env=env, log_dir=tmp_path) as served:
        stalled = stalled_upload(served.port, ALICE, 1024 * 1024)
        time.sleep(0.5)
        refused = requests.post(served.api + "/files", headers={"Authorization": f"Bearer {ALICE}"},
                                files={"file": ("b.jsonl", b"{}\n")}, data={"purpose": "batch"}, timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        other = requests.post(served.api + "/files", headers={"Authorization": f"Bearer {BOB}"},
                              files={"file": ("b.jsonl", b"{}\n")}, data={"purpose": "batch"}, timeout=10)
        assert other.status_code == 200  # another key's uploads are its own
        started = time.monotonic()
        answer = stalled.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert time.monotonic() - started < 5
        stalled.settimeout(5)
        while stalled.recv(65536):  # the server closes the connection
            pass
        gone = stalled_upload(served.port, ALICE, 64 * 1024)  # the slot is free again; this client goes away
        time.sleep(0.5)
        gone.close()
        time.sleep(1)
        assert requests.get(served.api + "/files", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).ok
        assert requests.delete(served.api + "/files/" + other.json()["id"],
                               headers={"Authorization": f"Bearer {BOB}"}, timeout=10).ok
        log = served.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert log.count("the client sent nothing for 2 s") == 1 and log.count("the client went away") == 1, log
    assert set(redis_client.keys("aivb:file:*")) == files_before  # nothing kept of the dropped uploads


def test_two_replicas_share_one_redis_and_no_disk(server: Served, redis_url: str, tmp_path: Path) -> None:
    """Upload on one replica, create on the other, read on the first: only Redis is shared.

    The second replica is configured with an unreachable provider: a batch runs with the
    provider of the replica that accepted it (see the driver test below for the rule itself).
    """
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", "http://127.0.0.1:9/v1",
                 env=KEYS_ENV, log_dir=tmp_path) as other:
        one, two = client(server), client(other)
        path = write_jsonl(tmp_path / "shared.jsonl", [request_line(f"m{i}", f"shared {i}") for i in range(6)])
        created = []
        for _ in range(3):
            uploaded = two.files.create(file=path.open("rb"), purpose="batch")
            created.append(one.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                              completion_window="24h").id)
        for batch_id in created:
            done = wait_for(two, batch_id)
            assert done.status == "completed" and done.output_file_id and done.request_counts
            assert done.request_counts.completed == 6
            lines = two.files.content(done.output_file_id).text.splitlines()
            assert [json.loads(line)["custom_id"] for line in lines] == [f"m{i}" for i in range(6)]


def test_serve_alone_runs_a_private_redis_and_workers(tmp_path: Path) -> None:
    env = {**KEYS_ENV, "AIVVM_BATCH_REDIS_URL": ""}
    with serving("--stub", "--provider", "openai", "--state-dir", str(tmp_path / "state"), "--concurrency", "8",
                 env=env, log_dir=tmp_path) as served:
        api = client(served)
        path = write_jsonl(tmp_path / "private.jsonl", [request_line(f"p{i}", f"private {i}") for i in range(3)])
        batch = api.batches.create(input_file_id=api.files.create(file=path.open("rb"), purpose="batch").id,
                                   endpoint="/v1/chat/completions", completion_window="24h")
        done = wait_for(api, batch.id, timeout=90)
        assert done.status == "completed" and done.request_counts and done.request_counts.completed == 3
        body = json.loads(api.files.content(done.output_file_id or "").text.splitlines()[0])["response"]["body"]
        assert ChatCompletion.model_validate(body).choices[0].message.content == "Stand-in reply to: private 0"


def test_a_batch_runs_with_the_options_of_the_replica_that_accepted_it(redis_url: str, settings: Any) -> None:
    """Whichever replica's driver submits a batch, it uses the provider the batch was created with."""
    client_ = redis.Redis.from_url(with_db(redis_url, 3))
    store, files, records = BatchStore(client_), FileStore(client_), BatchRecords(client_)
    writer = files.writer("owner-o", "in.jsonl", "batch")
    writer.write(json.dumps(request_line("o1", "hello")).encode() + b"\n")
    stored = writer.commit()
    accepted = BatchOptions(provider="openai", base_url="http://127.0.0.1:8000/v1")
    batch = records.create("owner-o", stored.id, "/v1/chat/completions", "24h", 60, None, accepted)
    other = Driver(store, files, records, Publisher(client_, celery_app),
                   DriverConfig(BatchOptions(provider="aivvm", base_url="http://127.0.0.1:9"), settings))
    other.step(batch.id)
    assert records.get("owner-o", batch.id).status.value == "in_progress"
    assert store.info(batch.store_id).options == accepted
    client_.delete("aivvm-batch", API_ACTIVE)
