"""The raw asyncio client: one HTTP session, a semaphore, nothing else.

The baseline every `make bench` figure stands beside: it sends the same Aivvm requests as the
workers (POST {base}/api/chat), reads each streamed reply to its end and decodes it as UTF-8,
with at most IN_FLIGHT requests open at once. No queue, no Redis, no retries, no results file.
Run in its own process by bench/run.py; prints one JSON object:

    python bench/baseline.py --base http://127.0.0.1:8787 --items 10000 --in-flight 256 [--client aiohttp|httpx]
                             [--endpoint aivvm|embeddings|tools]

`--endpoint embeddings` POSTs {base}/v1/embeddings ({"model": "e", "input": "text <i>"}), reads the
JSON body and json.loads it (what any user must do to get the vector). `--endpoint tools` POSTs
{base}/v1/chat/completions with one tool, tool_choice "required" and "stream": true, reads the
event stream, json.loads each `data:` event until [DONE] and joins the tool call's arguments (the
least a user's script must do). In RawFigures, `chunks` counts body reads (aivvm), bodies
(embeddings) or `data:` events (tools); `reply_bytes` counts decoded characters (aivvm), body
bytes (embeddings) or the joined arguments' characters (tools).
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


def varied_latency(i: int) -> float:
    """Item ``i``'s reply time in the rows of varied replies: 0.1 to 1.0 s, spread evenly over
    every run of 1,000 items (the prompt's ``{latency}``; `run`'s lines carry the same)."""
    return round(0.1 + 0.9 * ((i * 7919) % 1000) / 999, 3)


def chat_body(i: int) -> dict[str, object]:
    content = PROMPT[0].format(i=i, latency=varied_latency(i))
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "key": "",
            "prompt": "You are a helpful assistant.", "temperature": 0.7}


def embeddings_body(i: int) -> dict[str, object]:
    return {"model": "e", "input": f"text {i}"}


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_MODEL = "gpt-3.5-turbo"  # what `run --provider openai` sends for a line that names no model


def tools_line(i: int) -> dict[str, object]:
    """The `tools` row's input line (bench/run.py writes these for `run`)."""
    return {"id": f"t{i}", "messages": [{"role": "user", "content": f"weather {i}"}], "tools": [WEATHER_TOOL],
            "tool_choice": "required"}


def tools_body(i: int) -> dict[str, object]:
    body = tools_line(i)
    del body["id"]
    return {"model": TOOLS_MODEL, **body, "stream": True}


# each endpoint: (path, request body); the clients read each kind of answer as a user must
ENDPOINTS = {"aivvm": ("/api/chat", chat_body), "embeddings": ("/v1/embeddings", embeddings_body),
             "tools": ("/v1/chat/completions", tools_body)}


class ToolCallArguments:
    """Fed the raw lines of an OpenAI event stream: json.loads each `data:` event until [DONE] and
    join ``choices[0].delta.tool_calls[0].function.arguments``; (events, len(arguments)) at the end."""

    def __init__(self) -> None:
        self.events = 0
        self.parts: list[str] = []
        self.done = False

    def line(self, raw: bytes) -> None:
        if not raw.startswith(b"data:") or self.done:
            return
        data = raw[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        self.events += 1
        choices = json.loads(data).get("choices") or []
        if choices:
            calls = choices[0].get("delta", {}).get("tool_calls")
            if calls:
                arguments = calls[0].get("function", {}).get("arguments")
                if arguments:
                    self.parts.append(arguments)

    def result(self) -> tuple[int, int]:
        if not self.done:
            raise RuntimeError("the event stream ended before [DONE]")
        arguments = "".join(self.parts)
        json.loads(arguments)  # a whole tool call, or the item failed
        return self.events, len(arguments)


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


async def run_aiohttp(base: str, items: int, in_flight: int,
                      endpoint: str = "aivvm") -> tuple[float, tuple[int, int, int]]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    path, body = ENDPOINTS[endpoint]
    url = base + path
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def chat(i: int) -> tuple[int, int]:
            decoder = codecs.getincrementaldecoder("utf-8")()
            chunks = size = 0
            async with session.post(url, json=body(i)) as resp:
                resp.raise_for_status()
                async for data in resp.content.iter_any():
                    chunks += 1
                    size += len(decoder.decode(data))
            decoder.decode(b"", final=True)
            return chunks, size

        async def embeddings(i: int) -> tuple[int, int]:
            async with session.post(url, json=body(i)) as resp:
                resp.raise_for_status()
                data = await resp.read()
            if not json.loads(data)["data"][0]["embedding"]:
                raise RuntimeError("no vector")
            return 1, len(data)

        async def tools(i: int) -> tuple[int, int]:
            stream = ToolCallArguments()
            async with session.post(url, json=body(i)) as resp:
                resp.raise_for_status()
                async for line in resp.content:  # one line at a time
                    stream.line(line)
            return stream.result()

        call = {"aivvm": chat, "embeddings": embeddings, "tools": tools}[endpoint]

        started = time.monotonic()
        counts = await _drive(call, items, in_flight)
        return time.monotonic() - started, counts


async def run_httpx(base: str, items: int, in_flight: int,
                    endpoint: str = "aivvm") -> tuple[float, tuple[int, int, int]]:
    try:
        import httpx
    except ImportError:
        import httpx2 as httpx  # type: ignore[no-redef]  # the OpenAI SDK's fork, where httpx is absent

    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    timeout = httpx.Timeout(600.0, connect=60.0, pool=None)
    path, body = ENDPOINTS[endpoint]
    url = base + path
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def chat(i: int) -> tuple[int, int]:
            decoder = codecs.getincrementaldecoder("utf-8")()
            chunks = size = 0
            async with client.stream("POST", url, json=body(i)) as resp:
                resp.raise_for_status()
                async for data in resp.aiter_raw():
                    chunks += 1
                    size += len(decoder.decode(data))
            decoder.decode(b"", final=True)
            return chunks, size

        async def embeddings(i: int) -> tuple[int, int]:
            resp = await client.post(url, json=body(i))
            resp.raise_for_status()
            data = resp.content
            if not json.loads(data)["data"][0]["embedding"]:
                raise RuntimeError("no vector")
            return 1, len(data)

        async def tools(i: int) -> tuple[int, int]:
            stream = ToolCallArguments()
            async with client.stream("POST", url, json=body(i)) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    stream.line(line.encode("utf-8"))
            return stream.result()

        call = {"aivvm": chat, "embeddings": embeddings, "tools": tools}[endpoint]

        started = time.monotonic()
        counts = await _drive(call, items, in_flight)
        return time.monotonic() - started, counts


CLIENTS = {"aiohttp": run_aiohttp, "httpx": run_httpx}


def measure(base: str, items: int, in_flight: int, client: str = "aiohttp", endpoint: str = "aivvm") -> RawFigures:
    seconds, (ok, chunks, size) = asyncio.run(CLIENTS[client](base, items, in_flight, endpoint))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return RawFigures(client, items, in_flight, seconds, ok, chunks, size, rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--in-flight", type=int, required=True)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp")
    parser.add_argument("--prompt", default=PROMPT[0], help="prompt template; {i} is the item's number, {latency} "
                                                                "its reply time in the varied rows (aivvm)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="aivvm",
                        help="aivvm chat (default), OpenAI embeddings, or OpenAI chat with a tool call, streamed")
    args = parser.parse_args()
    PROMPT[0] = args.prompt
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asdict(measure(args.base, args.items, args.in_flight, args.client, args.endpoint))))


if __name__ == "__main__":
    main()
