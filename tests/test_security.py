"""Secrets and limits: API keys never leave the worker's environment, Redis passwords work
and do not leak, and the input limits hold, all through the real command line.

Each secret test runs on its own private Redis with its own worker process, so the
session worker (started without the keys) cannot take its messages.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs import keys
from tests.conftest import WORKER_ENV

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivvm_batch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def lines_file(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def results_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_clean_error(proc: subprocess.CompletedProcess[str], *forbidden: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("aivvm-batch: error: "), proc.stderr
    for secret in forbidden:
        assert secret not in proc.stderr and secret not in proc.stdout, proc.stderr


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------
# Helpers: a private Redis, a dump of everything in it, a recording Aivvm server
# --------------------------------------------------------------------------


def dump_redis(client: redis.Redis) -> list[bytes]:
    """Every key name and every value in the database, whatever its type."""
    blobs: list[bytes] = []
    for key in client.scan_iter(count=1000):
        blobs.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
            blobs.append(value or b"")
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                blobs += [field, value]
        elif kind == "list":
            blobs += client.lrange(key, 0, -1)
        elif kind == "set":
            blobs += list(client.smembers(key))
        elif kind == "zset":
            blobs += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    blobs += [field, value]
        elif kind != "none":  # "none": expired between SCAN and TYPE
            raise AssertionError(f"unexpected Redis type {kind} for {key!r}")
    return blobs


def task_message_texts(raw: bytes) -> list[bytes]:
    """A kombu message as stored in Redis, and its base64 body decoded."""
    message = json.loads(raw)
    texts = [raw]
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        texts.append(base64.b64decode(body))
    return texts


def assert_no_secret(blobs: list[bytes], secret_values: list[str], where: str) -> None:
    for secret in secret_values:
        needle = secret.encode()
        for blob in blobs:
            assert needle not in blob, f"{where} contains a secret: {blob[:300]!r}"


class AivvmRecorder:
    """A minimal Aivvm-protocol server that records each request's JSON body."""

    def __init__(self, delay: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    recorder.bodies.append(body)
                time.sleep(delay)
                reply = f"Recorded reply to: {body['messages'][-1]['content']}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> AivvmRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------
# 1. API keys never leak
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_api_keys_never_reach_redis_messages_logs_or_results(redis_factory: Callable[..., EmbeddedRedis],
                                                             tmp_path: Path) -> None:
    private_redis = redis_factory()
    openai_key = f"sk-SECRET-{secrets.token_hex(16)}"
    aivvm_key = f"aivvm-SECRET-{secrets.token_hex(16)}"
    secret_values = [openai_key, aivvm_key]
    url = private_redis.url
    client = redis.Redis.from_url(url)
    # The keys are in the submitter's and collector's environment too: they must not copy them.
    env = {"AIVVM_BATCH_REDIS_URL": url, "OPENAI_API_KEY": openai_key, "AIVVM_API_KEY": aivvm_key}
    outputs: list[str] = []

    def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
        proc = cli(*args, env=env)
        outputs.extend([proc.stdout, proc.stderr])
        return proc

    openai_lines = [{"id": f"o{i}", "prompt": f"[[stub latency=0.6]] openai item {i}"} for i in range(5)]
    # one item fails once with a 503, so a retry message (with its kwargs) is published as well
    openai_lines.append({"id": "o-retry", "prompt": "[[stub fault=status code=503 times=1]] retried"})
    aivvm_lines = [{"id": f"a{i}", "prompt": f"aivvm item {i}"} for i in range(3)]
    aivvm_lines.append({"id": "a-sys", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "aivvm with system"}]})
    snapshots: list[bytes] = []
    unacked_seen = 0
    with StubServer(api_key=openai_key) as stub, AivvmRecorder(delay=0.6) as recorder:
        # Submitted while no worker runs: the task messages wait in the queue, read deterministically.
        first = run_cli("submit", str(lines_file(tmp_path / "openai.jsonl", openai_lines)),
                        "--provider", "openai", "--base-url", stub.base_url + "/v1")
        assert first.returncode == 0, first.stderr
        second = run_cli("submit", str(lines_file(tmp_path / "aivvm.jsonl", aivvm_lines)),
                         "--provider", "aivvm", "--base-url", recorder.base_url)
        assert second.returncode == 0, second.stderr
        openai_batch, aivvm_batch = first.stdout.strip(), second.stdout.strip()
        queued = client.lrange(keys.QUEUE, 0, -1)
        # small batches: one item per message (jobs.queue.chunk_size)
        assert len(queued) == len(openai_lines) + len(aivvm_lines)
        for raw in queued:
            snapshots += task_message_texts(raw)
        decoded_bodies = [json.loads(task_message_texts(raw)[1]) for raw in queued]
        assert {(b[0][0], seq) for b in decoded_bodies for seq in b[0][1]} == (
            {(openai_batch, s) for s in range(len(openai_lines))}
            | {(aivvm_batch, s) for s in range(len(aivvm_lines))})

        # the worker's owner lets its keys go to these two servers (and to no base URL a submitter names)
        worker_env = {**WORKER_ENV, "OPENAI_API_KEY": openai_key, "AIVVM_API_KEY": aivvm_key,
                      "AIVVM_BATCH_ALLOWED_BASE_URLS": f"{stub.base_url}/v1,{recorder.base_url}"}
        workers = WorkerProcesses(url, count=1, concurrency=4, log_dir=tmp_path / "worker-logs",
                                  env=worker_env, loglevel="DEBUG").start()
        try:
            # While the items run: the queue and the unacknowledged (in-flight) messages.
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                pipe = client.pipeline(transaction=False)
                pipe.lrange(keys.QUEUE, 0, -1)
                pipe.hgetall("unacked")
                pipe.hget(keys.meta(openai_batch), "finished_at")
                pipe.hget(keys.meta(aivvm_batch), "finished_at")
                queue, unacked, done_openai, done_aivvm = pipe.execute()
                unacked_seen += len(unacked)
                for raw in queue:
                    snapshots += task_message_texts(raw)
                for tag, raw in unacked.items():
                    snapshots.append(tag)
                    snapshots.append(raw)
                    # unacked values are [message, exchange, routing_key]
                    snapshots += task_message_texts(json.dumps(json.loads(raw)[0]).encode())
                if done_openai and done_aivvm:
                    break
                time.sleep(0.05)
            assert unacked_seen, "no in-flight message was ever seen: the snapshot proves nothing"

            openai_out, aivvm_out = tmp_path / "openai.results.jsonl", tmp_path / "aivvm.results.jsonl"
            collected = run_cli("collect", openai_batch, "-o", str(openai_out), "--wait")
            assert collected.returncode == 0, collected.stderr
            collected = run_cli("collect", aivvm_batch, "-o", str(aivvm_out), "--wait")
            assert collected.returncode == 0, collected.stderr
            for batch_id in (openai_batch, aivvm_batch):
                assert run_cli("status", batch_id, "--json").returncode == 0
            assert run_cli("batches", "--json").returncode == 0
        finally:
            workers.stop()

        # Every item ok: the OpenAI stand-in accepted the bearer key (it answers 401 without it)...
        openai_results = results_of(openai_out)
        assert [(r["id"], r["status"]) for r in openai_results] == [(x["id"], "ok") for x in openai_lines]
        assert openai_results[0]["output"] == "Stand-in reply to: openai item 0"
        assert openai_results[-1]["attempts"] == 2
        assert stub.stats()["requests"] == len(openai_lines) + 1
        # ...and the Aivvm server got the key in the body's `key` field, by design of the protocol.
        aivvm_results = results_of(aivvm_out)
        assert [(r["id"], r["status"]) for r in aivvm_results] == [(x["id"], "ok") for x in aivvm_lines]
        assert len(recorder.bodies) == len(aivvm_lines)
        assert {body["key"] for body in recorder.bodies} == {aivvm_key}

    # The scan: nothing anywhere holds either key.
    stored = dump_redis(client)
    assert any(keys.results(openai_batch).encode() == k for k in stored), "the dump found the batch"
    assert_no_secret(stored, secret_values, "Redis")
    assert_no_secret(snapshots, secret_values, "a task message")
    logs = sorted((tmp_path / "worker-logs").glob("*.log"))
    assert logs and all(log.stat().st_size > 0 for log in logs)
    log_text = b"".join(log.read_bytes() for log in logs)
    assert b"DEBUG" in log_text, "the worker logged at DEBUG level"
    assert_no_secret([log_text], secret_values, "the worker log")
    assert_no_secret([(private_redis.data_dir / "redis.log").read_bytes()], secret_values, "the Redis log")
    assert_no_secret([o.encode() for o in outputs], secret_values, "CLI output")
    assert_no_secret([openai_out.read_bytes(), aivvm_out.read_bytes()], secret_values, "a results file")


# --------------------------------------------------------------------------
# 2. A Redis with a password
# --------------------------------------------------------------------------


@pytest.fixture
def redis_with_password(redis_factory: Callable[..., EmbeddedRedis]) -> tuple[EmbeddedRedis, str]:
    password = "s3cret"
    return redis_factory(password=password), password


def with_password(server: EmbeddedRedis, password: str | None) -> str:
    auth = f":{password}@" if password is not None else ""
    return f"redis://{auth}127.0.0.1:{server.port}/0"


@pytest.mark.timeout(120)
def test_redis_password_in_the_url_round_trip(redis_with_password: tuple[EmbeddedRedis, str],
                                              tmp_path: Path) -> None:
    server, password = redis_with_password
    env = {"AIVVM_BATCH_REDIS_URL": with_password(server, password)}
    source = lines_file(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"password {i}"} for i in range(4)])
    with StubServer() as stub:
        workers = WorkerProcesses(with_password(server, password), count=1, concurrency=4,
                                  log_dir=tmp_path / "worker-logs", env=WORKER_ENV, loglevel="INFO").start()
        try:
            submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
            assert submitted.returncode == 0, submitted.stderr
            batch_id = submitted.stdout.strip()
            out = tmp_path / "out.jsonl"
            collected = cli("collect", batch_id, "-o", str(out), "--wait", env=env)
            assert collected.returncode == 0, collected.stderr
            status = cli("status", batch_id, "--json", env=env)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["counts"]["ok"] == 4
        finally:
            workers.stop()
    results = results_of(out)
    assert [(r["id"], r["status"], r["output"]) for r in results] == [
        (f"p{i}", "ok", f"Stand-in reply to: password {i}") for i in range(4)]
    for proc in (submitted, collected, status):
        assert password not in proc.stdout + proc.stderr
    log_text = b"".join(p.read_bytes() for p in (tmp_path / "worker-logs").glob("*.log"))
    assert b"127.0.0.1" in log_text  # the banner names the broker...
    assert password.encode() not in log_text  # ...with the password masked


@pytest.mark.timeout(120)
def test_wrong_or_missing_redis_password_is_a_clean_error(redis_with_password: tuple[EmbeddedRedis, str],
                                                          tmp_path: Path) -> None:
    server, password = redis_with_password
    wrong = f"WRONGpw-{secrets.token_hex(8)}"
    source = lines_file(tmp_path / "in.jsonl", [{"prompt": "x"}])
    for url in (with_password(server, wrong), with_password(server, None)):
        env = {"AIVVM_BATCH_REDIS_URL": url}
        for args in (("submit", str(source)), ("status", "bsomebatch"), ("batches",),
                     ("collect", "bsomebatch", "-o", str(tmp_path / "out.jsonl")),
                     ("cancel", "bsomebatch"), ("retry", "bsomebatch")):
            proc = cli(*args, env=env)
            assert_clean_error(proc, wrong, password)
            lowered = proc.stderr.lower()
            assert "password" in lowered or "authenticat" in lowered or "credential" in lowered, proc.stderr
        assert not (tmp_path / "out.jsonl").exists()
    # Nothing was written with the wrong password.
    client = redis.Redis.from_url(with_password(server, password))
    assert client.dbsize() == 0

    # A worker given the wrong password says so in one line, with the password masked, and stops.
    logs = tmp_path / "bad-worker-logs"
    workers = WorkerProcesses(with_password(server, wrong), count=1, concurrency=2, log_dir=logs,
                              env=WORKER_ENV, loglevel="INFO").start()
    try:
        wait_for(lambda: workers.alive() == 0, 30, "the worker to stop on the refused connection")
        assert workers.processes[0].returncode == 2
    finally:
        workers.stop()
    log_text = b"".join(p.read_bytes() for p in logs.glob("*.log"))
    assert b"refused the credentials" in log_text and b"Traceback" not in log_text
    assert wrong.encode() not in log_text and password.encode() not in log_text
    assert b"password" in log_text


@pytest.mark.timeout(120)
def test_collect_wait_with_a_wrong_password_fails_at_once(redis_with_password: tuple[EmbeddedRedis, str],
                                                          tmp_path: Path) -> None:
    """A refused password is a configuration error, not a Redis restart to wait out."""
    server, _ = redis_with_password
    env = {"AIVVM_BATCH_REDIS_URL": with_password(server, "WRONGpw")}
    started = time.monotonic()
    try:
        proc = cli("collect", "bsomebatch", "-o", str(tmp_path / "out.jsonl"), "--wait", env=env, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("`collect --wait` with a wrong Redis password was still waiting after 30s "
                    "(it retries the refused login as if Redis were restarting)")
    assert_clean_error(proc, "WRONGpw")
    assert time.monotonic() - started < 30


# --------------------------------------------------------------------------
# 4. Input limits, through the command line on the session Redis and worker
# --------------------------------------------------------------------------


def line_of(size: int, item_id: str) -> str:
    """A valid JSON line of exactly ``size`` bytes (line end not included)."""
    empty = json.dumps({"id": item_id, "prompt": ""}, separators=(",", ":"))
    line = json.dumps({"id": item_id, "prompt": "a" * (size - len(empty))}, separators=(",", ":"))
    assert len(line.encode()) == size
    return line


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("workers")
def test_max_line_bytes(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url, "AIVVM_BATCH_MAX_LINE_BYTES": "1000"}
    source = lines_file(tmp_path / "in.jsonl", [
        {"id": "short", "prompt": "short"},
        line_of(1000, "at-limit"),
        line_of(1001, "over-limit"),
        line_of(50_000, "far-over"),
        {"id": "after", "prompt": "after"},
    ])
    submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "2 of 5 lines are invalid" in submitted.stderr
    out = tmp_path / "out.jsonl"
    collected = cli("collect", submitted.stdout.strip(), "-o", str(out), "--wait", env=env)
    assert collected.returncode == 1, collected.stderr
    results = results_of(out)
    assert [(r["line"], r["status"]) for r in results] == [
        (1, "ok"), (2, "ok"), (3, "invalid"), (4, "invalid"), (5, "ok")]
    for result in results[2:4]:
        message = result["error"]["message"]
        assert message.startswith(f"line {result['line']}")
        assert "1000 bytes" in message and "AIVVM_BATCH_MAX_LINE_BYTES" in message, message
    assert results[4]["output"] == "Stand-in reply to: after"


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("workers")
def test_max_line_bytes_does_not_count_the_line_end(redis_url: str, stub: StubServer,
                                                    tmp_path: Path) -> None:
    """The same 1000-byte line is within a 1000-byte limit whether it ends in LF or CRLF."""
    env = {"AIVVM_BATCH_REDIS_URL": redis_url, "AIVVM_BATCH_MAX_LINE_BYTES": "1000"}
    source = tmp_path / "in.jsonl"
    source.write_bytes(line_of(1000, "lf").encode() + b"\n" + line_of(1000, "crlf").encode() + b"\r\n")
    submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    out = tmp_path / "out.jsonl"
    collected = cli("collect", submitted.stdout.strip(), "-o", str(out), "--wait", env=env)
    results = results_of(out)
    assert [(r["id"], r["status"]) for r in results] == [("lf", "ok"), ("crlf", "ok")], results
    assert collected.returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("workers")
def test_max_items(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url, "AIVVM_BATCH_MAX_ITEMS": "3"}
    source = lines_file(tmp_path / "in.jsonl", [{"id": f"m{i}", "prompt": f"item {i}"} for i in range(1, 6)])
    submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    out = tmp_path / "out.jsonl"
    collected = cli("collect", submitted.stdout.strip(), "-o", str(out), "--wait", env=env)
    assert collected.returncode == 1, collected.stderr
    results = results_of(out)
    assert [(r["line"], r["status"]) for r in results] == [(1, "ok"), (2, "ok"), (3, "ok"), (4, "invalid")]
    assert [r["output"] for r in results[:3]] == [f"Stand-in reply to: item {i}" for i in (1, 2, 3)]
    message = results[3]["error"]["message"]
    assert message.startswith("line 4: the file was cut here")
    assert "3 items" in message and "AIVVM_BATCH_MAX_ITEMS" in message, message


def test_past_max_items_the_file_is_not_read(redis_url: str, tmp_path: Path) -> None:
    """200,000 lines past a limit of 10 add one result, not 200,000 (Redis memory stays flat)."""
    from jobs.config import Settings
    from jobs.queue import Publisher, configure
    from jobs.queue import app as celery_app
    from jobs.records import BatchOptions
    from jobs.store import BatchStore
    from jobs.submit import submit_file

    settings = Settings.from_env({"AIVVM_BATCH_MAX_ITEMS": "10"}, redis_url=redis_url)
    client = redis.Redis.from_url(redis_url)
    configure(celery_app, settings)
    source = tmp_path / "many.jsonl"
    source.write_text("{}\n" * 200_000)
    report = submit_file(BatchStore(client), Publisher(client, celery_app), source, BatchOptions(),
                         settings)
    assert (report.total, report.invalid, report.enqueued) == (11, 11, 0)
    assert client.hlen(keys.results(report.batch_id)) == 11
    cut = json.loads(client.hget(keys.results(report.batch_id), 10))
    assert cut["line"] == 11 and cut["error"]["message"].startswith("line 11: the file was cut here")
