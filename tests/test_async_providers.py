"""The asynchronous provider path over real HTTP on 127.0.0.1: AsyncHTTP, acomplete, attempt.

The same semantics as the synchronous path (requests) are checked by running both on the
same faults of the stand-in and comparing; the pool limit, cancellation, keep-alive and
proxies with a server here that counts the connections it has open at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from aivvm_batch.stub import StubServer
from jobs.config import Settings
from jobs.records import ChatMessage, ItemRequest
from worker.attempt import attempt
from worker.errors import (
    ProviderError,
    ProviderTimeout,
    ProviderTransportError,
    RateLimited,
)
from worker.providers import (
    PROVIDERS,
    AbstractProvider,
    Aivvm,
    CompletionCall,
    OpenAI,
    StreamEnd,
)
from worker.providers.aio import AsyncHTTP
from worker.providers.call import Item

SETTINGS = Settings(connect_timeout=2.0, read_timeout=5.0, item_deadline=10.0)


class Counting:
    """An Aivvm server that counts the connections open at once; replies take ``delay`` seconds.

    As a proxy it answers too: ``paths`` keeps each request target (absolute through a proxy).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.open = self.peak = self.connections = 0
        self.paths: list[str] = []
        self.cookies: list[str | None] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.open += 1
                    owner.connections += 1
                    owner.peak = max(owner.peak, owner.open)

            def finish(self) -> None:
                with owner.lock:
                    owner.open -= 1
                try:
                    super().finish()
                except OSError:
                    pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.lock:
                    owner.paths.append(self.path)
                    owner.cookies.append(self.headers.get("Cookie"))
                content = json.loads(raw)["messages"][-1]["content"]
                self.send_response(200)
                self.send_header("Set-Cookie", "session=s3cret; Path=/")
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for piece in (b"re: ", content.encode()):
                        time.sleep(owner.delay / 2)
                        self.wfile.write(b"%X\r\n%b\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wait_closed(self, timeout: float = 5.0) -> int:
        """Connections still open once the client has let go (polled: the server learns it late)."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.open

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def counting() -> Iterator[Counting]:
    server = Counting()
    yield server
    server.stop()


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def call(base_url: str, content: str, **kwargs: Any) -> CompletionCall:
    return CompletionCall(model="gpt-4", messages=({"role": "user", "content": content},), base_url=base_url,
                          **kwargs)


def item(content: str, model: str = "gpt-4") -> ItemRequest:
    return ItemRequest(id="q1", line=1, messages=(ChatMessage("user", content),), model=model)


async def collect_async(provider: type[AbstractProvider], completion: CompletionCall,
                        http: AsyncHTTP) -> tuple[list[Item], BaseException | None]:
    """The items :meth:`AbstractProvider.acomplete` handed on, and the error it raised, if any."""
    got: list[Item] = []
    try:
        await provider.acomplete(completion, http, got.append)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return got, exc
    return got, None


def collect_sync(stream: Iterator[Item]) -> tuple[list[Item], BaseException | None]:
    got: list[Item] = []
    try:
        for piece in stream:
            got.append(piece)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return got, exc
    return got, None


def acomplete(provider: type[AbstractProvider], completion: CompletionCall,
            max_connections: int = 4) -> tuple[list[Item], BaseException | None]:
    async def go() -> tuple[list[Item], BaseException | None]:
        async with AsyncHTTP(max_connections) as http:
            return await collect_async(provider, completion, http)
    return asyncio.run(go())


def summary(outcome: tuple[list[Item], BaseException | None]) -> tuple[str, str | None, str | None, bool | None]:
    """What must be equal on both paths: the text, the error's class and kind, transience."""
    items, error = outcome
    text = "".join(i for i in items if isinstance(i, str))
    if error is None:
        return text, None, None, None
    assert isinstance(error, ProviderError), repr(error)
    return text, type(error).__name__, error.kind, error.transient


# --------------------------------------------------------------------------
# The same answers on both paths
# --------------------------------------------------------------------------

FAULTS = ["hello there", "[[stub fault=status code=500]] hi", "[[stub fault=status code=400]] hi",
          "[[stub fault=429 retry_after=2]] hi", "[[stub fault=cut]] hi", "[[stub fault=empty]] hi",
          "[[stub fault=split]] hi", "[[stub fault=badbytes]] hi", "[[stub fault=status code=404]] hi"]


@pytest.mark.parametrize("provider", ["aivvm", "openai"])
@pytest.mark.parametrize("content", FAULTS)
def test_both_paths_answer_alike(stub: StubServer, provider: str, content: str) -> None:
    cls = PROVIDERS[provider]
    base = stub.base_url + ("/v1" if provider == "openai" else "")
    synchronous = collect_sync(cls.stream(call(base, content)))
    asynchronous = acomplete(cls, call(base, content))
    assert summary(asynchronous) == summary(synchronous)
    assert [i for i in asynchronous[0] if isinstance(i, StreamEnd)] == \
        [i for i in synchronous[0] if isinstance(i, StreamEnd)]
    error = asynchronous[1]
    if isinstance(error, ProviderError) and error.retry_after is not None:
        assert error.retry_after == synchronous[1].retry_after  # type: ignore[union-attr]


def test_a_stall_is_a_timeout(stub: StubServer) -> None:
    started = time.monotonic()
    _, error = acomplete(Aivvm, call(stub.base_url, "[[stub fault=stall stall=5]] hi", read_timeout=0.5))
    assert isinstance(error, ProviderTimeout) and error.transient is True
    assert time.monotonic() - started < 3.0


def test_the_item_deadline_ends_a_slow_reply(stub: StubServer) -> None:
    started = time.monotonic()
    _, error = acomplete(Aivvm, call(stub.base_url, "[[stub latency=3 chunks=30]] slow",
                                       deadline=time.monotonic() + 0.3))
    assert isinstance(error, ProviderTimeout)
    assert time.monotonic() - started < 1.5


def test_a_passed_deadline_sends_no_request(counting: Counting) -> None:
    _, error = acomplete(Aivvm, call(counting.base_url, "hi", deadline=time.monotonic() - 1))
    assert isinstance(error, ProviderTimeout)
    assert counting.connections == 0


def test_connection_refused_is_a_transient_transport_error() -> None:
    _, error = acomplete(Aivvm, call(closed_port_url(), "hi"))
    assert isinstance(error, ProviderTransportError)
    assert error.transient is True and error.kind == "connection_error"
    assert str(error).startswith("connection refused: cannot reach http://127.0.0.1:")  # the cause first


# --------------------------------------------------------------------------
# The pool: never more connections than asked, slots given back
# --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_server_never_sees_more_connections_than_the_pool(counting: Counting) -> None:
    counting.delay = 0.2

    async def go() -> list[str]:
        async with AsyncHTTP(5) as http:
            outcomes = await asyncio.gather(*(
                attempt(item(f"n{i}"), ("aivvm",), counting.base_url, SETTINGS, http) for i in range(40)))
        return [o.text for o in outcomes]

    texts = asyncio.run(go())
    assert texts == [f"re: n{i}" for i in range(40)]
    assert counting.peak == 5  # all five used, never a sixth
    assert counting.connections == 5  # kept alive and reused


@pytest.mark.timeout(60)
def test_a_cancelled_stream_gives_its_connection_back(counting: Counting) -> None:
    counting.delay = 2.0

    async def go() -> str:
        async with AsyncHTTP(2) as http:
            slow = [asyncio.create_task(attempt(item(f"slow{i}"), ("aivvm",), counting.base_url, SETTINGS,
                                                      http)) for i in range(2)]
            while counting.open < 2:
                await asyncio.sleep(0.01)
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
            assert await asyncio.to_thread(counting.wait_closed) == 0  # closed, not left hanging
            counting.delay = 0.0
            outcome = await attempt(item("after"), ("aivvm",), counting.base_url, SETTINGS, http)
            return outcome.text

    assert asyncio.run(go()) == "re: after"
    assert counting.peak == 2


def test_openai_streams_keep_their_connection(stub: StubServer) -> None:
    """A reply read to [DONE] and its end leaves the connection in the pool for the next."""
    async def go() -> list[str]:
        async with AsyncHTTP(1) as http:
            texts = []
            for i in range(5):
                items, error = await collect_async(OpenAI, call(stub.base_url + "/v1", f"n{i}"), http)
                assert error is None
                texts.append("".join(x for x in items if isinstance(x, str)))
            return texts

    assert asyncio.run(go()) == [f"Stand-in reply to: n{i}" for i in range(5)]


def test_a_pool_of_no_connections_is_refused() -> None:
    with pytest.raises(ValueError):
        AsyncHTTP(0)


# --------------------------------------------------------------------------
# attempt: one item's attempt, falling back across providers
# --------------------------------------------------------------------------


def run_async(request: ItemRequest, providers: tuple[str, ...], base_url: str | None, **kwargs: Any) -> Any:
    async def go() -> Any:
        async with AsyncHTTP(4) as http:
            return await attempt(request, providers, base_url, SETTINGS, http, **kwargs)
    return asyncio.run(go())


def test_attempt_with_one_provider(stub: StubServer) -> None:
    outcome = run_async(item("hi"), ("aivvm",), stub.base_url)
    assert outcome.error is None and outcome.provider == "aivvm"
    assert outcome.text == "Stand-in reply to: hi"
    assert outcome.first_chunk_ms is not None


def test_attempt_falls_back_while_nothing_streamed(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url + "/v1")
    outcome = run_async(item("hi"), ("aivvm", "openai"), closed_port_url())
    assert outcome.error is None and outcome.provider == "openai"
    assert outcome.text == "Stand-in reply to: hi"
    assert outcome.end is not None and outcome.end.finish_reason == "stop"


def test_attempt_does_not_fall_back_after_a_chunk(stub: StubServer, counting: Counting,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", counting.base_url + "/v1")
    outcome = run_async(item("[[stub fault=cut]] hi"), ("aivvm", "openai"), stub.base_url)
    assert outcome.provider == "aivvm" and outcome.error is not None
    assert outcome.error.kind == "incomplete_reply" and outcome.text
    assert counting.connections == 0


def test_attempt_every_provider_failing_is_one_combined_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", closed_port_url() + "/v1")
    outcome = run_async(item("hi"), ("aivvm", "openai"), closed_port_url())
    assert outcome.error is not None and outcome.error.kind == "connection_error"
    assert outcome.transient is True and outcome.text == ""
    assert "aivvm:" in str(outcome.error) and "openai:" in str(outcome.error)


def test_attempt_scrubs_the_workers_keys(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-scrub-me-0123456789"
    monkeypatch.setenv("AIVVM_API_KEY", key)
    outcome = run_async(item(f"[[stub fault=status code=500]] {key}"), ("aivvm",), stub.base_url)
    assert outcome.error is not None
    assert key not in str(outcome.error)


def test_attempt_awaits_before_call_and_passes_rate_limits_up(counting: Counting) -> None:
    seen: list[tuple[str, str | None]] = []

    async def before_call(provider: type[AbstractProvider], completion: CompletionCall) -> None:
        await asyncio.sleep(0)
        seen.append((provider.name, completion.base_url))
        if len(seen) > 1:
            raise RateLimited(1.5)

    assert run_async(item("hi"), ("aivvm",), counting.base_url, before_call=before_call).text == "re: hi"
    assert seen == [("aivvm", counting.base_url)]
    with pytest.raises(RateLimited):
        run_async(item("hi"), ("aivvm",), counting.base_url, before_call=before_call)
    assert counting.connections == 1


def test_attempt_turns_a_bug_into_an_internal_error(counting: Counting) -> None:
    async def before_call(provider: type[AbstractProvider], completion: CompletionCall) -> None:
        raise KeyError("oops")

    outcome = run_async(item("hi"), ("aivvm",), counting.base_url, before_call=before_call)
    assert outcome.error is not None and outcome.error.kind == "internal_error"
    assert "KeyError" in str(outcome.error)


def test_attempt_refuses_an_unsupported_model_before_any_request(counting: Counting) -> None:
    outcome = run_async(item("hi", model="gpt-5"), ("aivvm",), counting.base_url)
    assert outcome.error is not None and outcome.error.kind == "unsupported_model"
    assert counting.connections == 0


# --------------------------------------------------------------------------
# Proxies from the environment: honoured on both paths alike
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bypass", [False, True])
def test_environment_proxies_are_honoured_like_requests(counting: Counting, monkeypatch: pytest.MonkeyPatch,
                                                        bypass: bool) -> None:
    target = closed_port_url()  # nothing listens: only a proxy can answer
    monkeypatch.setenv("HTTP_PROXY", counting.base_url)
    if bypass:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    synchronous = collect_sync(Aivvm.stream(call(target, "via")))
    asynchronous = acomplete(Aivvm, call(target, "via"))
    assert summary(asynchronous) == summary(synchronous)
    if bypass:
        assert isinstance(asynchronous[1], ProviderTransportError)
        assert counting.paths == []
    else:
        assert asynchronous[1] is None and "".join(map(str, asynchronous[0])) == "re: via"
        assert counting.paths == [f"{target}/api/chat"] * 2  # absolute targets: sent through the proxy


def test_no_cookie_set_by_a_server_rides_along_with_later_calls(counting: Counting) -> None:
    """Batches of different submitters share a worker: a server's cookie must not travel between them."""
    for _ in range(2):
        assert collect_sync(Aivvm.stream(call(counting.base_url, "c")))[1] is None

    async def go() -> None:
        async with AsyncHTTP(1) as http:
            for _ in range(2):
                assert (await collect_async(Aivvm, call(counting.base_url, "c"), http))[1] is None

    asyncio.run(go())
    assert counting.cookies == [None] * 4
