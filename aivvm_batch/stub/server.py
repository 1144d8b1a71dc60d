"""Serving: the asyncio core (one loop, one task per connection), :class:`StubServer` and :func:`serve`."""

from __future__ import annotations

import asyncio
import email.utils
import math
import resource
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any, Callable

from .exchange import _Exchange
from .http import MAX_HEAD_BYTES, parse_request_head
from .ratelimit import RateLimit
from .state import _StubState

DEFAULT_BACKLOG = 4096


class _Core:
    """The listening socket's server, run inside the loop of :class:`StubServer`'s thread."""

    def __init__(self, state: _StubState, sock: socket.socket, backlog: int) -> None:
        self.state = state
        self.sock = sock
        self.backlog = backlog
        self.stopping = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self._date_second = -1
        self._date = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self.connection, sock=self.sock, backlog=self.backlog, limit=MAX_HEAD_BYTES
        )

    async def shutdown(self) -> None:
        """Stop accepting, end stalls, drop every open connection."""
        self.stopping.set()
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3)

    def http_date(self) -> str:
        now = time.time()
        if int(now) != self._date_second:
            self._date_second = int(now)
            self._date = email.utils.formatdate(now, usegmt=True)
        return self._date

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        self.writers.add(writer)
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self.stopping.is_set():
                try:
                    raw_head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    await _Exchange(self, writer, None).send_text(431, "Request header fields too large")
                    return
                try:
                    head = parse_request_head(raw_head)
                except ValueError as exc:
                    await _Exchange(self, writer, None).send_text(400, f"Bad request: {exc}")
                    return
                exchange = _Exchange(self, writer, head)
                await exchange.handle(reader)
                if exchange.close:
                    return
        except OSError:
            return  # the client went away
        except asyncio.CancelledError:
            if not self.stopping.is_set():
                raise
            # shut down: ends quietly (Python 3.11's stream callback logs a cancelled task as an error)
        finally:
            self.writers.discard(writer)
            if task is not None:
                self.tasks.discard(task)
            writer.close()


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening TCP socket (``port=0`` picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class StubServer:
    """Stand-in chat provider for tries and tests; deterministic, not a model.

    Binds on construction (``port=0`` picks a free port); :meth:`start`
    serves in a daemon thread running one asyncio loop: a connection costs a
    task, not a thread, so thousands of streams can be open at once.  Usable
    as a context manager.  ``reply_bytes`` pads every reply to that many
    bytes; ``backlog`` is the listen queue (capped by the kernel's somaxconn).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        chunks: int = 4,
        api_key: str | None = None,
        reply_bytes: int | None = None,
        backlog: int = DEFAULT_BACKLOG,
        rate_limit: RateLimit | None = None,
    ) -> None:
        if not math.isfinite(latency) or latency < 0:
            raise ValueError("latency must be a finite number >= 0")
        if chunks < 1:
            raise ValueError("chunks must be >= 1")
        if reply_bytes is not None and reply_bytes < 0:
            raise ValueError("reply_bytes must be >= 0")
        if backlog < 1:
            raise ValueError("backlog must be >= 1")
        self._state = _StubState(latency=latency, chunks=chunks, api_key=api_key, reply_bytes=reply_bytes,
                                 rate_limit=rate_limit)
        self._sock = _listening_socket(host, port, backlog)
        self._address: tuple[str, int] = self._sock.getsockname()[:2]
        self._backlog = backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: _Core | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return str(self._address[0])

    @property
    def port(self) -> int:
        return int(self._address[1])

    @property
    def base_url(self) -> str:
        """Aivvm base URL; the OpenAI base is ``base_url + "/v1"``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> StubServer:
        """Serve in a daemon thread (no-op if already started)."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("StubServer was stopped; create a new one")
            if self._thread is None:
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(ready,), name=f"aivvm-stub-{self.port}", daemon=True
                )
                self._thread.start()
                ready.wait(10)
        return self

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._core = _Core(self._state, self._sock, self._backlog)
            loop.run_until_complete(self._core.start())
            self._loop = loop
            ready.set()
            loop.run_forever()
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop serving, end stalls, drop open connections; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread, loop, core = self._thread, self._loop, self._core
        if thread is not None and loop is not None and core is not None:
            future = asyncio.run_coroutine_threadsafe(core.shutdown(), loop)
            try:
                future.result(timeout=5)
            except (TimeoutError, RuntimeError):
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
        self._sock.close()

    def stats(self) -> dict[str, Any]:
        """Same as ``GET /__stub/stats``."""
        return self._state.snapshot()

    def reset(self) -> None:
        """Same as ``POST /__stub/reset``."""
        self._state.reset()

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _install_sigterm(stop: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``stop`` (main thread only); returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new limit.

    Each connection is a file descriptor: a stand-in holding thousands of streams needs more
    than the common soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def serve(
    host: str,
    port: int,
    *,
    latency: float,
    chunks: int,
    api_key: str | None,
    reply_bytes: int | None = None,
    backlog: int = DEFAULT_BACKLOG,
    rate_limit: RateLimit | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run the stand-in provider until KeyboardInterrupt or SIGTERM (blocking).

    ``ready(base_url)`` is called once the server is listening.
    """
    raise_open_file_limit()
    stop = threading.Event()
    restore = _install_sigterm(stop)
    try:
        with StubServer(
            host, port, latency=latency, chunks=chunks, api_key=api_key, reply_bytes=reply_bytes, backlog=backlog,
            rate_limit=rate_limit,
        ) as server:
            if ready is not None:
                ready(server.base_url)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        restore()
