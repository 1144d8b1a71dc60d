"""The raw asyncio client: one HTTP session, a semaphore, nothing else.

The baseline every `make bench` figure stands beside: it sends the same Aivvm requests as the
workers (POST {base}/api/chat), reads each streamed reply to its end and decodes it as UTF-8,
with at most IN_FLIGHT requests open at once. No queue, no Redis, no retries, no results file.
Run in its own process by bench/run.py; prints one JSON object:

    python bench/baseline.py --base http://127.0.0.1:8787 --items 10000 --in-flight 256 [--client aiohttp|httpx]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

MODEL = {"id": "gpt-3.5-turbo", "name": "GPT-3.5"}


@dataclass(frozen=True)
class RawFigures:
    client: str
    items: int
    in_flight: int
    seconds: float
    ok: int
    chunks: int
    reply_bytes: int
    rss_mb: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds


PROMPT = ["raw {i}"]  # the template, set from --prompt (a stand-in directive may go in it)


def chat_body(i: int) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT[0].format(i=i)}], "key": "",
            "prompt": "You are a helpful assistant.", "temperature": 0.7}


Call = Callable[[int], Awaitable[tuple[int, int]]]


async def _drive(call: Call, items: int, in_flight: int) -> tuple[int, int, int]:
    """Run ``call`` for every item, ``in_flight`` at most at once; (ok, chunks, bytes)."""
    gate = asyncio.Semaphore(in_flight)

    async def one(i: int) -> tuple[int, int] | None:
        async with gate:
            try:
                return await call(i)
            except Exception:  # noqa: BLE001 - a failed item is counted, not fatal
                return None

    results = await asyncio.gather(*(one(i) for i in range(items)))
    done = [r for r in results if r is not None]
    return len(done), sum(c for c, _ in done), sum(b for _, b in done)


async def run_aiohttp(base: str, items: int, in_flight: int) -> tuple[float, tuple[int, int, int]]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(i: int) -> tuple[int, int]:
            decoder = codecs.getincrementaldecoder("utf-8")()
            chunks = size = 0
            async with session.post(base + "/api/chat", json=chat_body(i)) as resp:
                resp.raise_for_status()
                async for data in resp.content.iter_any():
                    chunks += 1
                    size += len(decoder.decode(data))
            decoder.decode(b"", final=True)
            return chunks, size

        started = time.monotonic()
        counts = await _drive(call, items, in_flight)
        return time.monotonic() - started, counts


async def run_httpx(base: str, items: int, in_flight: int) -> tuple[float, tuple[int, int, int]]:
    try:
        import httpx
    except ImportError:
        import httpx2 as httpx  # type: ignore[no-redef]  # the OpenAI SDK's fork, where httpx is absent

    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    timeout = httpx.Timeout(600.0, connect=60.0, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def call(i: int) -> tuple[int, int]:
            decoder = codecs.getincrementaldecoder("utf-8")()
            chunks = size = 0
            async with client.stream("POST", base + "/api/chat", json=chat_body(i)) as resp:
                resp.raise_for_status()
                async for data in resp.aiter_raw():
                    chunks += 1
                    size += len(decoder.decode(data))
            decoder.decode(b"", final=True)
            return chunks, size

        started = time.monotonic()
        counts = await _drive(call, items, in_flight)
        return time.monotonic() - started, counts


CLIENTS = {"aiohttp": run_aiohttp, "httpx": run_httpx}


def measure(base: str, items: int, in_flight: int, client: str = "aiohttp") -> RawFigures:
    seconds, (ok, chunks, size) = asyncio.run(CLIENTS[client](base, items, in_flight))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return RawFigures(client, items, in_flight, seconds, ok, chunks, size, rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp")
    parser.add_argument("--prompt", default=PROMPT[0], help="prompt template; {i} is the item's number")
    args = parser.parse_args()
    PROMPT[0] = args.prompt
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asdict(measure(args.base, args.items, args.in_flight, args.client))))


if __name__ == "__main__":
    main()
