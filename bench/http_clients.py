"""Which asynchronous HTTP client the worker streams with: measured, not guessed.

Each client sends the same Aivvm requests (POST {base}/api/chat), reads every streamed
reply to its end, and checks its text, with at most N requests in flight:

  raw-aiohttp    one aiohttp session and a semaphore, nothing else (the baseline)
  raw-httpx      one httpx AsyncClient and a semaphore, nothing else
  aivvm          worker.attempt.attempt through worker.providers.aio.AsyncHTTP: the
                 product's whole protocol path (bounded decoding, UTF-8, errors, key choice),
                 on its transport (httptools under asyncio's protocols)
  aivvm-aiohttp  the same path on the aiohttp transport (what the worker used before, and
                 still uses behind a proxy)

AsyncHTTP ran on both aiohttp and httpx while they were compared; httpx was dropped
(raw-httpx stays here, so the reason can be measured again: pip install httpx).

against two servers, each in its own process: the stand-in (``python -m aivvm_batch stub``)
and a minimal asyncio server defined here (``serve``), which costs little and counts the
connections it has open at once, so the pool limit is checked: the server must never see
more than N. Figures: items/s, and the client process's CPU milliseconds per item (the
client's own cost, whatever the server's speed). Rounds alternate the clients; the best
round of each is kept.

    python bench/http_clients.py [--quick] [--server fast|stub|both] [--clients raw-aiohttp,aivvm]
    python bench/http_clients.py serve --port P --latency L --chunks K
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = {"id": "gpt-3.5-turbo", "name": "GPT-3.5"}


# --------------------------------------------------------------------------
# The minimal server: asyncio protocol, Aivvm replies in chunks, connection counting
# --------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.open = 0
        self.peak = 0


class AivvmProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive; POST /api/chat answers "Stand-in reply to: <last message>" in chunks."""

    def __init__(self, counter: Counter, latency: float, chunks: int) -> None:
        self.counter, self.latency, self.chunks = counter, latency, chunks
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counter.open += 1
        self.counter.peak = max(self.counter.peak, self.counter.open)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        size = int(headers.get("content-length", "0"))
        if len(self.buffer) < end + 4 + size:
            return
        body, self.buffer = self.buffer[end + 4:end + 4 + size], self.buffer[end + 4 + size:]
        method, path = head[0].split(" ")[:2]
        if method == "GET" and path == "/stats":
            self.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b",
                      json.dumps({"open": self.counter.open, "peak": self.counter.peak}).encode())
        elif method == "POST" and path == "/stats/reset":
            self.counter.peak = self.counter.open
            self.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n%b", b"")
        else:
            messages = json.loads(body).get("messages") or [{}]
            self.reply(f"Stand-in reply to: {messages[-1].get('content', '')}".encode())

    def send(self, template: bytes, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(template % (len(payload), payload) if b"%d" in template else template % payload)
        self.next_request()

    def reply(self, text: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
        step = -(-len(text) // self.chunks)
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        if self.latency <= 0:
            for index, piece in enumerate(pieces):
                self.chunk(piece, index == len(pieces) - 1)
            return
        loop = asyncio.get_running_loop()
        self.schedule(loop, loop.time(), pieces, 0)

    def schedule(self, loop: asyncio.AbstractEventLoop, started: float, pieces: list[bytes], index: int) -> None:
        """Chunk ``index`` at its time on the reply's schedule, then the next (in order)."""
        def send() -> None:
            self.chunk(pieces[index], index == len(pieces) - 1)
            if index + 1 < len(pieces):
                self.schedule(loop, started, pieces, index + 1)
        loop.call_at(started + self.latency * (index + 1) / len(pieces), send)

    def chunk(self, piece: bytes, last: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(b"%X\r\n%b\r\n%b" % (len(piece), piece, b"0\r\n\r\n" if last else b""))
        if last:
            self.busy = False
            self.next_request()


async def serve(port: int, latency: float, chunks: int) -> None:
    counter = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AivvmProtocol(counter, latency, chunks), "127.0.0.1", port,
                                      backlog=4096)
    print(f"ready on {port}", flush=True)
    async with server:
        await server.serve_forever()


# --------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------


def body(index: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"item {index}"}], "key": "",
            "prompt": "Be brief.", "temperature": 0.7}


def expected(index: int) -> str:
    return f"Stand-in reply to: item {index}"


Fetch = Callable[[int], Awaitable[bool]]


async def run_raw_aiohttp(base: str, items: int, in_flight: int) -> int:
    import aiohttp
    semaphore = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        async def fetch(index: int) -> bool:
            async with semaphore, session.post(f"{base}/api/chat", json=body(index)) as response:
                data = b"".join([chunk async for chunk in response.content.iter_any()])
                return response.status == 200 and data.decode() == expected(index)
        return await gather(fetch, items)


async def run_raw_httpx(base: str, items: int, in_flight: int) -> int:
    import httpx
    semaphore = asyncio.Semaphore(in_flight)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        async def fetch(index: int) -> bool:
            async with semaphore, client.stream("POST", f"{base}/api/chat", json=body(index)) as response:
                data = b"".join([chunk async for chunk in response.aiter_raw()])
                return response.status_code == 200 and data.decode() == expected(index)
        return await gather(fetch, items)


async def run_aivvm(base: str, items: int, in_flight: int, on_aiohttp: bool = False) -> int:
    from jobs.config import Settings
    from jobs.records import ChatMessage, ItemRequest
    from worker.attempt import attempt
    from worker.providers.aio import AsyncHTTP
    from worker.providers.aio_aiohttp import AiohttpTransport
    from worker.providers.aio_httptools import HttptoolsTransport
    settings = Settings(connect_timeout=30.0, read_timeout=60.0, item_deadline=600.0)
    semaphore = asyncio.Semaphore(in_flight)
    async with AsyncHTTP(in_flight, transport=AiohttpTransport if on_aiohttp else HttptoolsTransport) as http:
        async def fetch(index: int) -> bool:
            request = ItemRequest(id=f"q{index}", line=index, model="gpt-3.5-turbo", system_message="Be brief.",
                                  messages=(ChatMessage("user", f"item {index}"),))
            async with semaphore:
                outcome = await attempt(request, ("aivvm",), base, settings, http)
            return outcome.error is None and outcome.text == expected(index)
        return await gather(fetch, items)


async def gather(fetch: Fetch, items: int) -> int:
    results = await asyncio.gather(*(fetch(i) for i in range(items)), return_exceptions=True)
    return sum(r is True for r in results)


Client = Callable[[str, int, int], Coroutine[object, object, int]]
CLIENTS: dict[str, Client] = {
    "raw-aiohttp": run_raw_aiohttp,
    "raw-httpx": run_raw_httpx,
    "aivvm": run_aivvm,
    "aivvm-aiohttp": functools.partial(run_aivvm, on_aiohttp=True),
}


def client_runner(name: str) -> Client:
    return CLIENTS[name]


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


@dataclass
class Figure:
    client: str
    rate: float
    cpu_ms: float
    ok: int
    items: int
    in_flight: int
    peak: int | None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(kind: str, latency: float, chunks: int) -> Iterator[str]:
    port = free_port()
    if kind == "fast":
        command = [sys.executable, __file__, "serve", "--port", str(port), "--latency", str(latency),
                   "--chunks", str(chunks)]
    else:
        command = [sys.executable, "-m", "aivvm_batch", "stub", "--port", str(port), "--latency", str(latency),
                   "--chunks", str(chunks)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the {kind} server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stats(base: str, reset: bool = False) -> int | None:
    try:
        if reset:
            urllib.request.urlopen(urllib.request.Request(f"{base}/stats/reset", method="POST", data=b""),
                                   timeout=5).close()
            return None
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as answer:
            return int(json.load(answer)["peak"])
    except OSError:
        return None


def measure(name: str, base: str, items: int, in_flight: int, count_connections: bool) -> Figure:
    if count_connections:
        stats(base, reset=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    started = time.perf_counter()
    ok = asyncio.run(client_runner(name)(base, items, in_flight))
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu
    peak = stats(base) if count_connections else None
    return Figure(name, items / seconds, cpu * 1000 / items, ok, items, in_flight, peak)


def scenario(title: str, kind: str, clients: list[str], items: int, in_flight: int, latency: float,
             chunks: int, rounds: int) -> list[Figure]:
    best: dict[str, Figure] = {}
    with server(kind, latency, chunks) as base:
        for name in clients:  # warm up: imports, first connections
            measure(name, base, min(items, 200), min(in_flight, 64), False)
        for _ in range(rounds):
            for name in clients:
                figure = measure(name, base, items, in_flight, kind == "fast")
                if name not in best or figure.rate > best[name].rate:
                    best[name] = figure
    baseline = best.get("raw-aiohttp")
    print(f"\n## {title}: {kind} server, {items} items, {in_flight} in flight, "
          f"replies of {latency:g} s in {chunks} chunks (best of {rounds})")
    print("| client | items/s | × raw aiohttp | client CPU ms/item | ok | server's peak connections |")
    print("|---|---|---|---|---|---|")
    for name in clients:
        f = best[name]
        ratio = f"{f.rate / baseline.rate:.2f}" if baseline else "—"
        peak = "—" if f.peak is None else f"{f.peak}{' (over!)' if f.peak > in_flight else ''}"
        print(f"| {name} | {f.rate:,.0f} | {ratio} | {f.cpu_ms:.3f} | {f.ok}/{f.items} | {peak} |")
    sys.stdout.flush()
    return list(best.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--latency", type=float, default=0.0)
    serve_parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="fewer items and rounds")
    parser.add_argument("--server", choices=["fast", "stub", "both"], default="both")
    parser.add_argument("--clients", default="", help="comma-separated; default: every client")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port, args.latency, args.chunks))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    clients = [c for c in args.clients.split(",") if c] or [
        name for name in CLIENTS if name != "raw-httpx" or importlib.util.find_spec("httpx") is not None]
    rounds = 1 if args.quick else args.rounds
    scale = 5 if args.quick else 1
    kinds = ["fast", "stub"] if args.server == "both" else [args.server]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; clients: {', '.join(clients)}")
    failed = False
    for kind in kinds:
        figures = scenario("replies at once", kind, clients, 5000 // scale, 256, 0.0, 4, rounds)
        figures += scenario("1 s replies", kind, clients, 4096 // scale, 1024, 1.0, 10, rounds)
        failed |= any(f.ok != f.items or (f.peak or 0) > f.in_flight for f in figures)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
