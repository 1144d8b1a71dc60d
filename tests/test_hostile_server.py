"""A provider server that is hostile: bombs, endless bodies, redirects, web pages, TLS trouble,
and a submitter who points workers at it to collect their keys.

Real HTTP on 127.0.0.1. The first part makes calls in this process (so memory can be measured
with tracemalloc), on the synchronous transport (requests, as ``create_completion`` calls) and
through the worker's attempt on an event loop; the last part runs real Celery worker processes
on a private Redis, with API keys in their environment.

The hostile server picks its behaviour from the first word of the last user message.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import ssl
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from aivvm_batch.workers import WorkerProcesses
from jobs.config import Settings
from jobs.queue import Publisher, configure
from jobs.queue import app as celery_app
from jobs.records import ChatMessage, ItemRequest
from jobs.store import BatchStore
from tests.conftest import WORKER_ENV, Batches
from tests.private_server_helpers import private_redis
from worker.attempt import Attempt, attempt
from worker.decision import to_result
from worker.errors import ProviderError
from worker.providers import PROVIDERS, CompletionCall, StreamEnd
from worker.providers.aio import AsyncHTTP
from worker.providers.credentials import choose_key

CAP = 1024 * 1024  # the reply cap these tests set
BOMB_SIZE = 64 * 1024 * 1024  # decompressed size of the bombs
ENDLESS_LIMIT = 64 * 1024 * 1024  # an "endless" body stops here, so the test ends even unfixed
BLOCK = 64 * 1024
HTML = b"<!doctype html><html><head><title>Sign in</title></head><body><form>login</form></body></html>"
PATHS = ["sync", "async"]  # requests (create_completion's), and the worker's attempt on an event loop


@cache
def bomb(wbits: int) -> bytes:
    """BOMB_SIZE zero bytes, compressed (31: gzip, 15: zlib-wrapped deflate); about 64 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(BOMB_SIZE // len(zeros))]
    return b"".join(parts) + compressor.flush()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # clients that hang up (as the worker does past the cap) are expected here


class Hostile:
    """A provider server; behaviour by the first word of the last user message."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def do_GET(self) -> None:  # noqa: N802
                owner.record(self, b"")
                self.reply(200, HTML, "text/html; charset=utf-8")

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.record(self, raw)
                body = json.loads(raw or b"{}")
                words = (body.get("messages") or [{}])[-1].get("content", "").split()
                name = words[0] if words else "hello"
                getattr(self, "b_" + name.replace("-", "_"))(body, words[1:])

            # -- plumbing ----------------------------------------------------------

            @property
            def sse(self) -> bool:
                return self.path.endswith("/chat/completions")

            def reply(self, status: int, data: bytes, content_type: str | None = None,
                      headers: tuple[tuple[str, str], ...] = ()) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.write(data)

            def write(self, data: bytes) -> bool:
                try:
                    self.wfile.write(data)
                    self.wfile.flush()
                    return True
                except OSError:
                    self.close_connection = True
                    return False

            def chunked(self, status: int, content_type: str, pieces: Iterator[bytes]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in pieces:
                    if not self.write(b"%X\r\n%b\r\n" % (len(piece), piece)):
                        return
                self.write(b"0\r\n\r\n")

            def text(self) -> str:
                return "text/event-stream" if self.sse else "text/plain; charset=utf-8"

            def ok_body(self, text: str) -> bytes:
                if not self.sse:
                    return text.encode()
                return (b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text},
                                                             "finish_reason": "stop"}]}).encode()
                        + b"\n\ndata: [DONE]\n\n")

            # -- behaviours ----------------------------------------------------------

            def b_hello(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(200, self.ok_body("hello"), self.text())

            def b_bomb(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(200, bomb(31), self.text(), (("Content-Encoding", "gzip"),))

            def b_deflate_bomb(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(200, bomb(15), self.text(), (("Content-Encoding", "deflate"),))

            def b_error_bomb(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(500, bomb(31), "text/plain", (("Content-Encoding", "gzip"),))

            def b_brotli(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(200, os.urandom(64), self.text(), (("Content-Encoding", "br"),))

            def b_endless(self, body: dict[str, Any], args: list[str]) -> None:
                def pieces() -> Iterator[bytes]:
                    if self.sse:  # one event line that never ends
                        yield b"data: "
                    for _ in range(ENDLESS_LIMIT // BLOCK):
                        yield b"a" * BLOCK
                self.chunked(200, self.text(), pieces())

            def b_error_endless(self, body: dict[str, Any], args: list[str]) -> None:
                self.chunked(500, "text/plain", (b"e" * BLOCK for _ in range(ENDLESS_LIMIT // BLOCK)))

            def b_redirect(self, body: dict[str, Any], args: list[str]) -> None:
                status, location = int(args[0]), args[1]
                self.reply(status, b"moved", "text/plain", (("Location", location),))

            def b_html(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(200, HTML, "text/html; charset=utf-8")

            def b_choices(self, body: dict[str, Any], args: list[str]) -> None:
                events = [(0, "Hel"), (1, "Bon"), (0, "lo"), (1, "jour"), (0, " world"), (1, " monde")]
                data = b"".join(
                    b"data: %b\n\n" % json.dumps({"choices": [{"index": i, "delta": {"content": t},
                                                               "finish_reason": None}]}).encode()
                    for i, t in events)
                data += b"data: %b\n\n" % json.dumps({"choices": [
                    {"index": 1, "delta": {}, "finish_reason": "length"},
                    {"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode()
                self.reply(200, data + b"data: [DONE]\n\n", "text/event-stream")

            def b_echo(self, body: dict[str, Any], args: list[str]) -> None:
                """401, echoing whatever credentials arrived (as careless servers do)."""
                message = (f"Incorrect API key provided: {body.get('key')!s}. "
                           f"You sent {self.headers.get('Authorization')}")
                payload = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
                self.reply(401, payload.encode(), "application/json")

            def b_deny(self, body: dict[str, Any], args: list[str]) -> None:
                self.reply(int(args[0]), b"Unauthorized", "text/plain")

            def b_surrogate(self, body: dict[str, Any], args: list[str]) -> None:
                """A JSON-escaped lone surrogate (half an emoji), in a reply or a 400's error body."""
                if args and args[0] == "400":
                    payload = b'{"error": {"message": "bad \\ud83d input", "type": "invalid_\\ud83d"}}'
                    self.reply(400, payload, "application/json")
                    return
                event = b'data: {"choices": [{"index": 0, "delta": {"content": "half \\ud83d emoji"}, ' \
                        b'"finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
                self.reply(200, event if self.sse else "half \ud83d emoji".encode("utf-8", "surrogatepass"),
                           self.text())

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self.lock:
            self.seen.append(Seen(handler.command, handler.path, headers, body))

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Hostile]:
    """Another host, where redirects point."""
    server = Hostile()
    yield server
    server.stop()


SETTINGS = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0, max_reply_bytes=CAP)


def item(content: str, model: str = "gpt-4") -> ItemRequest:
    return ItemRequest(id="q1", line=1, messages=(ChatMessage("user", content),), model=model)


class Runner(Protocol):
    def __call__(self, content: str, base_url: str, provider: str = "aivvm",
                 settings: Settings = SETTINGS) -> Attempt: ...


async def attempt_on_loop(request: ItemRequest, provider: str, base_url: str, settings: Settings) -> Attempt:
    async with AsyncHTTP(4) as http:
        return await attempt(request, (provider,), base_url, settings, http)


def through_requests(request: ItemRequest, provider: str, base_url: str, settings: Settings) -> Attempt:
    """One call on the synchronous transport, made as ``create_completion`` makes it (the key
    chosen against ``settings``), told as an attempt."""
    cls = PROVIDERS[provider]
    key = choose_key(cls, cls.base_url(base_url), settings.allowed_base_urls)
    call = CompletionCall(model=cls.check_model(request.model or ""),
                          messages=tuple(m.to_dict() for m in request.messages), base_url=base_url,
                          api_key=key.key, key_withheld=key.withheld, connect_timeout=settings.connect_timeout,
                          read_timeout=settings.read_timeout, deadline=time.monotonic() + settings.item_deadline,
                          max_reply_bytes=settings.max_reply_bytes,
                          max_decompression_ratio=settings.max_decompression_ratio)
    texts: list[str] = []
    end, error = None, None
    try:
        for piece in cls.stream(call):
            if isinstance(piece, StreamEnd):
                end = piece
            else:
                texts.append(piece)
    except ProviderError as exc:
        error = exc
    return Attempt(provider, call.model, "".join(texts), error, 0, None, end)


@pytest.fixture(params=PATHS)
def run(request: pytest.FixtureRequest) -> Runner:
    """One attempt through the synchronous path (requests) or the asynchronous one (its own loop)."""
    path = request.param

    def runner(content: str, base_url: str, provider: str = "aivvm", settings: Settings = SETTINGS) -> Attempt:
        if path == "sync":
            return through_requests(item(content), provider, base_url, settings)
        return asyncio.run(attempt_on_loop(item(content), provider, base_url, settings))
    return runner


def measured(call: Callable[[], Attempt]) -> tuple[Attempt, int]:
    """The attempt and the peak of Python memory allocated while it ran."""
    tracemalloc.start()
    try:
        outcome = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, peak


def base(hostile: Hostile, provider: str) -> str:
    return hostile.base_url + ("/v1" if provider == "openai" else "")


# --------------------------------------------------------------------------
# 1. Size: bombs and endless bodies
# --------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("provider", ["aivvm", "openai"])
@pytest.mark.parametrize("behaviour", ["bomb", "deflate-bomb", "endless"])
def test_a_reply_past_the_cap_fails_as_reply_too_large_and_memory_stays_flat(
        run: Runner, hostile: Hostile, provider: str, behaviour: str) -> None:
    bomb(31), bomb(15)  # made before measuring
    outcome, peak = measured(lambda: run(behaviour, base(hostile, provider), provider))
    assert outcome.error is not None, f"{len(outcome.text)} characters recorded as ok"
    assert outcome.error.kind == "reply_too_large", outcome.error
    assert outcome.error.transient is False
    assert len(outcome.text.encode()) <= CAP
    assert peak < 8 * CAP, f"peak {peak / 2**20:.1f} MiB for a reply capped at {CAP / 2**20:.0f} MiB"
    if provider == "aivvm" and behaviour == "endless":
        assert outcome.text == "a" * CAP  # the partial text is kept, up to the cap


@pytest.mark.timeout(60)
def test_the_cap_is_the_setting(run: Runner, hostile: Hostile) -> None:
    small = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0, max_reply_bytes=1000)
    outcome = run("endless", hostile.base_url, settings=small)
    assert outcome.error is not None and outcome.error.kind == "reply_too_large"
    assert outcome.text == "a" * 1000
    assert "1000 bytes" in str(outcome.error)


@pytest.mark.timeout(60)
def test_the_decompression_ratio_is_bounded_below_the_cap(run: Runner, hostile: Hostile) -> None:
    """A huge cap does not let a bomb through: past 100x expansion the reply is refused."""
    roomy = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0,
                     max_reply_bytes=2 * BOMB_SIZE, max_decompression_ratio=100.0)
    outcome, peak = measured(lambda: run("bomb", hostile.base_url, settings=roomy))
    assert outcome.error is not None and outcome.error.kind == "reply_too_large"
    assert "ratio" in str(outcome.error) or "expands" in str(outcome.error)
    assert peak < 16 * CAP


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["error-bomb", "error-endless"])
def test_an_error_body_is_bounded(run: Runner, hostile: Hostile, behaviour: str) -> None:
    outcome, peak = measured(lambda: run(behaviour, hostile.base_url))
    assert outcome.error is not None
    assert outcome.error.kind == "server_error"
    assert len(str(outcome.error)) < 1000
    assert str(outcome.error).isprintable()
    assert peak < 8 * CAP


@pytest.mark.timeout(30)
def test_an_encoding_never_asked_for_is_malformed(run: Runner, hostile: Hostile) -> None:
    outcome = run("brotli", hostile.base_url)
    assert outcome.error is not None and outcome.error.kind == "malformed_reply"
    assert "br" in str(outcome.error)
    assert outcome.error.transient is False


# --------------------------------------------------------------------------
# 2. Several choices
# --------------------------------------------------------------------------


def test_only_choice_zero_is_kept(run: Runner, hostile: Hostile) -> None:
    outcome = run("choices", base(hostile, "openai"), "openai")
    assert outcome.error is None, outcome.error
    assert outcome.text == "Hello world"
    assert outcome.end is not None and outcome.end.finish_reason == "stop"


# --------------------------------------------------------------------------
# 3. Redirects and web pages
# --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed(run: Runner, hostile: Hostile, elsewhere: Hostile, monkeypatch: pytest.MonkeyPatch,
                                      provider: str, status: int) -> None:
    key = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv("AIVVM_API_KEY" if provider == "aivvm" else "OPENAI_API_KEY", key)
    allowed = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0,
                       allowed_base_urls=base(hostile, provider))
    before = len(elsewhere.seen)
    location = f"{elsewhere.base_url}/login"
    outcome = run(f"redirect {status} {location}", base(hostile, provider), provider, allowed)
    assert elsewhere.seen[before:] == []
    assert outcome.error is not None
    assert outcome.error.kind == "redirect"
    assert outcome.error.transient is False
    assert location in str(outcome.error)
    assert to_result(item("x"), outcome, 1).error.http_status == status  # type: ignore[union-attr]


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_a_web_page_is_not_a_reply(run: Runner, hostile: Hostile, provider: str) -> None:
    outcome = run("html", base(hostile, provider), provider)
    assert outcome.error is not None
    assert outcome.error.kind == "malformed_reply"
    assert outcome.error.transient is False
    assert "text/html" in str(outcome.error)


# --------------------------------------------------------------------------
# 4. TLS
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Hostile(tls=context)
    yield server
    server.stop()


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_an_untrusted_certificate_is_a_permanent_tls_error(run: Runner, self_signed: Hostile, provider: str) -> None:
    outcome = run("hello", base(self_signed, provider), provider)
    assert outcome.error is not None
    assert outcome.error.kind == "tls_error"
    assert outcome.error.transient is False
    assert "certificate" in str(outcome.error)
    assert "TLS" in str(outcome.error)


# --------------------------------------------------------------------------
# 5. Keys go only where the worker's owner said (in this process)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_a_key_is_withheld_from_a_base_url_not_allowed(run: Runner, hostile: Hostile, monkeypatch: pytest.MonkeyPatch,
                                                       provider: str) -> None:
    key = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv("AIVVM_API_KEY" if provider == "aivvm" else "OPENAI_API_KEY", key)
    before = len(hostile.seen)
    outcome = run("hello", base(hostile, provider), provider)
    assert outcome.error is None, outcome.error
    sent = hostile.seen[before:]
    assert len(sent) == 1
    assert key.encode() not in sent[0].body
    assert key not in json.dumps(sent[0].headers)
    assert "authorization" not in sent[0].headers
    if provider == "aivvm":
        assert json.loads(sent[0].body)["key"] == ""


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
@pytest.mark.parametrize("how", ["setting", "base-url-variable"])
def test_a_key_goes_to_an_allowed_base_url(run: Runner, hostile: Hostile, monkeypatch: pytest.MonkeyPatch,
                                           provider: str, how: str) -> None:
    key = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv("AIVVM_API_KEY" if provider == "aivvm" else "OPENAI_API_KEY", key)
    # written otherwise than the batch's: upper-case host, default-less port, trailing slash
    written = base(hostile, provider).replace("http://127.0.0.1", "HTTP://127.0.0.1") + "/"
    settings = SETTINGS
    if how == "setting":
        settings = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0,
                            allowed_base_urls=f"https://example.invalid, {written}")
    else:
        monkeypatch.setenv("AIVVM_BASE_URL" if provider == "aivvm" else "OPENAI_BASE_URL", written)
    before = len(hostile.seen)
    outcome = run("hello", base(hostile, provider), provider, settings)
    assert outcome.error is None, outcome.error
    sent = hostile.seen[before:][0]
    if provider == "aivvm":
        assert json.loads(sent.body)["key"] == key
    else:
        assert sent.headers["authorization"] == f"Bearer {key}"


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_a_withheld_key_is_named_in_a_401(run: Runner, hostile: Hostile, monkeypatch: pytest.MonkeyPatch,
                                          provider: str) -> None:
    variable = "AIVVM_API_KEY" if provider == "aivvm" else "OPENAI_API_KEY"
    monkeypatch.setenv(variable, "sk-" + secrets.token_hex(8))
    outcome = run("deny 401", base(hostile, provider), provider)
    assert outcome.error is not None and outcome.error.kind == "unauthorized"
    message = str(outcome.error)
    assert variable in message and "AIVVM_BATCH_ALLOWED_BASE_URLS" in message
    assert "not sent" in message or "withheld" in message


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_an_echoed_key_is_redacted(run: Runner, hostile: Hostile, monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    key = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv("AIVVM_API_KEY" if provider == "aivvm" else "OPENAI_API_KEY", key)
    allowed = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=30.0,
                       allowed_base_urls=base(hostile, provider))
    outcome = run("echo", base(hostile, provider), provider, allowed)
    assert outcome.error is not None and outcome.error.kind in ("unauthorized", "invalid_request_error")
    result = to_result(item("echo"), outcome, 1)
    assert key not in result.to_json()
    assert "[redacted]" in result.to_json()
    assert result.error is not None and result.error.http_status == 401


# --------------------------------------------------------------------------
# Real worker processes
# --------------------------------------------------------------------------


def worker_rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class Cluster:
    """A private Redis and one real worker process with keys in its environment."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.redis_server = private_redis(tmp_path / "redis").start()
        settings = Settings.from_env(WORKER_ENV, redis_url=self.redis_server.url)
        client = redis.Redis.from_url(self.redis_server.url)
        configure(celery_app, settings)
        self.batches = Batches(BatchStore(client, settings.result_ttl), Publisher(client, celery_app),
                               settings, tmp_path)
        self.log_dir = tmp_path / "worker-logs"
        self.workers = WorkerProcesses(self.redis_server.url, count=1, concurrency=8, log_dir=self.log_dir, loglevel="INFO",
                                       env={**WORKER_ENV, **env}).start()
        deadline = time.monotonic() + 60
        while " ready." not in self.log():
            assert self.workers.alive() == 1, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        path = self.log_dir / "worker-0.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def pid(self) -> int:
        return self.workers.processes[0].pid

    def stop(self) -> None:
        self.workers.stop()
        self.redis_server.stop()


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {"OPENAI_API_KEY": "sk-WORKER-" + secrets.token_hex(16),
            "AIVVM_API_KEY": "aivvm-WORKER-" + secrets.token_hex(16)}


@pytest.fixture(scope="module")
def allowed_server() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, str],
            allowed_server: Hostile) -> Iterator[Cluster]:
    env = {**keys, "AIVVM_BATCH_MAX_REPLY_BYTES": str(CAP),
           "AIVVM_BATCH_ALLOWED_BASE_URLS": f"{allowed_server.base_url}/,{allowed_server.base_url}/v1"}
    started = Cluster(tmp_path_factory.mktemp("hostile-cluster"), env)
    yield started
    started.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_workers_send_their_keys_only_to_allowed_base_urls(cluster: Cluster, hostile: Hostile,
                                                           allowed_server: Hostile,
                                                           keys: dict[str, str]) -> None:
    lines = [{"id": f"q{i}", "prompt": "hello"} for i in range(3)] + [{"id": "denied", "prompt": "deny 401"}]
    runs = {}
    for server in (hostile, allowed_server):
        for provider in ("aivvm", "openai"):
            before = len(server.seen)
            results = cluster.batches.run(lines, provider=provider, base_url=base(server, provider))
            runs[server.base_url, provider] = (results, server.seen[before:])
    for provider, variable in (("aivvm", "AIVVM_API_KEY"), ("openai", "OPENAI_API_KEY")):
        key = keys[variable]
        # the submitter's server: no key, in the body or in any header
        results, seen = runs[hostile.base_url, provider]
        assert len(seen) == 4
        for request in seen:
            assert key.encode() not in request.body
            assert key not in json.dumps(request.headers)
            assert "authorization" not in request.headers
        assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed"]
        denied = results[-1]["error"]
        assert denied["type"] == "unauthorized" and denied["http_status"] == 401
        assert variable in denied["message"] and "AIVVM_BATCH_ALLOWED_BASE_URLS" in denied["message"]
        # the owner's server: the key arrives
        results, seen = runs[allowed_server.base_url, provider]
        assert [r["status"] for r in results] == ["ok", "ok", "ok", "failed"]
        for request in seen:
            if provider == "aivvm":
                assert json.loads(request.body)["key"] == key
            else:
                assert request.headers["authorization"] == f"Bearer {key}"
    log = cluster.log()
    assert not any(key in log for key in keys.values())
    warned = [line for line in log.splitlines() if "not an allowed base URL" in line]
    # one warning per (provider, base URL) that was refused, however many items went there
    assert len(warned) == 2, warned
    assert all(hostile.base_url in line for line in warned)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_hostile_server_through_a_real_worker(cluster: Cluster, hostile: Hostile, elsewhere: Hostile) -> None:
    bomb(31)
    elsewhere_before = len(elsewhere.seen)
    rss_before = worker_rss_kib(cluster.pid, "VmRSS")
    lines = [{"id": "bomb", "prompt": "bomb"}, {"id": "endless", "prompt": "endless"},
             {"id": "redirect", "prompt": f"redirect 302 {elsewhere.base_url}/login"},
             {"id": "html", "prompt": "html"}, {"id": "hello", "prompt": "hello"}]
    results = {r["id"]: r for r in cluster.batches.run(lines, base_url=hostile.base_url)}
    peak = worker_rss_kib(cluster.pid, "VmHWM")
    for name in ("bomb", "endless"):
        assert results[name]["status"] == "failed"
        assert results[name]["error"]["type"] == "reply_too_large"
        assert results[name]["attempts"] == 1
        assert len(results[name]["output"].encode()) <= CAP
    assert results["redirect"]["error"]["type"] == "redirect"
    assert results["redirect"]["error"]["http_status"] == 302
    assert results["redirect"]["attempts"] == 1
    assert results["html"]["error"]["type"] == "malformed_reply"
    assert results["hello"]["status"] == "ok" and results["hello"]["output"] == "hello"
    assert elsewhere.seen[elsewhere_before:] == []
    assert (peak - rss_before) * 1024 < 48 * CAP, f"worker peak {peak} KiB, {rss_before} KiB before"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_text_no_utf8_carries_is_kept_losslessly_and_a_400_is_not_retried(cluster: Cluster, hostile: Hostile) -> None:
    """A lone surrogate (``\\ud83d`` in a server's JSON) in a reply or in a 400's body: the reply is
    recorded as sent (JSON escapes), the 400 fails once; neither is an internal error, nor paid twice."""
    before = len(hostile.seen)
    lines = [{"id": "reply", "prompt": "surrogate"}, {"id": "refused", "prompt": "surrogate 400"}]
    results = {r["id"]: r for r in cluster.batches.run(lines, provider="openai", base_url=f"{hostile.base_url}/v1")}
    assert results["reply"]["status"] == "ok" and results["reply"]["attempts"] == 1
    assert results["reply"]["output"] == "half \ud83d emoji"
    refused = results["refused"]
    assert refused["status"] == "failed" and refused["attempts"] == 1, refused
    assert refused["error"]["http_status"] == 400 and "input" in refused["error"]["message"]
    assert len(hostile.seen) - before == 2
