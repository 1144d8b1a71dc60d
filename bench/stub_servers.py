"""Could aiohttp's or uvicorn's server replace the stand-in's hand-written HTTP/1.1 core?

The stand-in (`aivvm-batch stub`) parses requests itself on asyncio streams. This bench sends
the same N streamed chat requests at once to three servers, each in its own process, each
streaming the same bytes (the stand-in's own reply, taken from it first) paced over LATENCY
seconds in CHUNKS chunks:

* the stand-in;
* aiohttp's web server (``web.StreamResponse``);
* uvicorn (its default HTTP parser) with Starlette's ``StreamingResponse``.

It prints, per server, the wall time of the N streams beside the pace asked (LATENCY), the
server's CPU time per stream (from /proc), its peak RSS, and how many streams failed.

    .venv/bin/python bench/stub_servers.py [--streams 2000] [--latency 2] [--chunks 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Iterator

import aiohttp
import requests

REQUEST = {"model": "bench", "messages": [{"role": "user", "content": "hello there"}], "stream": True}

# the two servers under trial: one reply (its SSE events, kept in a file) paced over LATENCY; each
# parses the request and encodes every event as JSON, as the stand-in does (the HTTP layer differs)
SERVER = {
    "aiohttp": """
        import asyncio, json, sys
        from aiohttp import web
        events = json.load(open(sys.argv[2]))
        pause = float(sys.argv[3]) / len(events)
        def wire(event):
            if event is None:
                return b"data: [DONE]\\n\\n"
            return ("data: " + json.dumps(event, separators=(",", ":")) + "\\n\\n").encode()
        async def chat(request):
            json.loads(await request.read())
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in events:
                await asyncio.sleep(pause)
                await response.write(wire(event))
            await response.write_eof()
            return response
        async def health(request):
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/health", health)
        web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=4096, print=None,
                    access_log=None)
    """,
    "uvicorn": """
        import asyncio, json, sys
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse, StreamingResponse
        from starlette.routing import Route
        events = json.load(open(sys.argv[2]))
        pause = float(sys.argv[3]) / len(events)
        def wire(event):
            if event is None:
                return b"data: [DONE]\\n\\n"
            return ("data: " + json.dumps(event, separators=(",", ":")) + "\\n\\n").encode()
        async def paced():
            for event in events:
                await asyncio.sleep(pause)
                yield wire(event)
        async def chat(request):
            json.loads(await request.body())
            return StreamingResponse(paced(), media_type="text/event-stream")
        async def health(request):
            return PlainTextResponse("ok")
        app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                Route("/health", health)])
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=4096,
                    log_level="warning", access_log=False)
    """,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def server(name: str, events_file: Path, latency: float, chunks: int) -> Iterator[tuple[str, int]]:
    port = free_port()
    if name == "stand-in":
        argv = [sys.executable, "-m", "aivvm_batch", "stub", "--port", str(port),
                "--latency", str(latency), "--chunks", str(chunks)]
    else:
        argv = [sys.executable, "-c", textwrap.dedent(SERVER[name]), str(port), str(events_file),
                str(latency)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=raise_open_files)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{name} did not start")
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


async def streams(base: str, n: int) -> tuple[float, int]:
    """N streamed requests at once; the wall time and how many failed or came back short."""
    failed = 0
    connector = aiohttp.TCPConnector(limit=n)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one() -> None:
            nonlocal failed
            try:
                async with session.post(base + "/v1/chat/completions", json=REQUEST) as response:
                    body = await response.read()
                    if response.status != 200 or b"[DONE]" not in body:
                        failed += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failed += 1
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - started, failed


def stand_in_events(latency: float, chunks: int) -> list[object]:
    """The stand-in's own reply to REQUEST: each SSE event's JSON (None for ``[DONE]``)."""
    with server("stand-in", Path(), 0.0, chunks) as (base, _pid):
        body = requests.post(base + "/v1/chat/completions", json=REQUEST, timeout=10).text
    data = [event.strip().removeprefix("data:").strip() for event in body.split("\n\n") if event.strip()]
    return [None if d == "[DONE]" else json.loads(d) for d in data]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    raise_open_files()
    events = stand_in_events(args.latency, args.chunks)
    with tempfile.TemporaryDirectory() as tmp:
        events_file = Path(tmp) / "events.json"
        events_file.write_text(json.dumps(events))
        print(f"{args.streams} streams at once, {len(events)} events each, paced over "
              f"{args.latency:g} s; {args.rounds} rounds, medians")
        print(f"{'server':<10} {'wall s':>8} {'over pace':>10} {'CPU ms/stream':>14} "
              f"{'peak RSS MiB':>13} {'failed':>7}")
        for name in ("stand-in", "aiohttp", "uvicorn"):
            walls, cpus, failures, rss = [], [], 0, 0.0
            with server(name, events_file, args.latency, args.chunks) as (base, pid):
                for _ in range(args.rounds):
                    before = cpu_seconds(pid)
                    wall, failed = asyncio.run(streams(base, args.streams))
                    cpus.append((cpu_seconds(pid) - before) * 1000 / args.streams)
                    walls.append(wall)
                    failures += failed
                rss = peak_rss_mib(pid)
            print(f"{name:<10} {median(walls):>8.2f} {median(walls) - args.latency:>10.2f} "
                  f"{median(cpus):>14.3f} {rss:>13.1f} {failures:>7}")


if __name__ == "__main__":
    main()
