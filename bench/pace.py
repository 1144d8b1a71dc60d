"""`make bench` (pace): `run` with its defaults against a rate-limited stand-in, beside a raw
asyncio client that retries each 429 after the server's retry-after, in the same run.

The stand-in (`aivvm-batch stub --rpm R --burst B [--tpm T]`, in its own process) enforces token
buckets and states them in OpenAI's `x-ratelimit-*` headers; beyond them it answers 429 with
`retry-after` and `retry-after-ms`. Per row: the ideal time at the provider's limit (the burst at
once, the rest at the limit's rate), the time end to end (start-up included), the efficiency
(ideal / measured), the share of requests refused, and items failed.

    python bench/pace.py [--quick] [--only ...,pace]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import clean_env, cli_args, stub_reset, stub_stats, write_prompts  # noqa: E402
from tests.private_server_helpers import stub_process  # noqa: E402

IN_FLIGHT = 128  # run's default concurrency, for the raw client too
LATENCY = 0.2


@dataclass(frozen=True)
class Limit:
    rpm: int
    burst: int
    tpm: int | None = None
    workers: int | None = None  # run's default (one per core) when None

    def label(self) -> str:
        tokens = f", {self.tpm:,} tokens/min" if self.tpm else ""
        workers = f", --workers {self.workers}" if self.workers else ""
        return f"{self.rpm:,}/min, burst {self.burst}{tokens}{workers}"


@dataclass(frozen=True)
class Outcome:
    seconds: float
    requests: int
    refused: int
    failed: int


def prompt(i: int) -> str:
    return f"paced request number {i}"


def tokens(text: str) -> int:
    """What the stand-in charges a request against --tpm."""
    return math.ceil(len(text) / 4) + 1


def ideal_seconds(limit: Limit, n: int) -> float:
    by_requests = max(0, n - limit.burst) / (limit.rpm / 60)
    if not limit.tpm:
        return by_requests
    burst_tokens = max(1.0, limit.tpm / 60)
    by_tokens = max(0.0, sum(tokens(prompt(i)) for i in range(n)) - burst_tokens) / (limit.tpm / 60)
    return max(by_requests, by_tokens)


def stand_in_options(limit: Limit) -> list[str]:
    """The stand-in's options for ``limit``: its latency and the rate it keeps to."""
    options = ["--latency", str(LATENCY), "--rpm", str(limit.rpm), "--burst", str(limit.burst)]
    if limit.tpm:
        options += ["--tpm", str(limit.tpm)]
    return options


def run_batch(limit: Limit, base: str, n: int, tmp: Path) -> Outcome:
    path = write_prompts(tmp / f"pace-{limit.rpm}-{n}.jsonl", n, prompt)
    out = tmp / "pace.out.jsonl"
    args = ["run", str(path), "-o", str(out), "--provider", "openai", "--base-url", f"{base}/v1",
            "--state-dir", str(tempfile.mkdtemp(dir=tmp)), "--fresh"]
    if limit.workers:
        args += ["--workers", str(limit.workers)]
    started = time.monotonic()
    subprocess.run(cli_args(*args), cwd=ROOT, env=clean_env(), capture_output=True, timeout=900)
    seconds = time.monotonic() - started
    statuses = [json.loads(line)["status"] for line in out.read_text().splitlines()] if out.exists() else []
    stats = stub_stats(base)
    return Outcome(seconds, stats["requests"], stats["rate_limited"], n - statuses.count("ok"))


async def raw_client(base: str, n: int) -> Outcome:
    """Every request until it is admitted, each 429 waited out after its retry-after(-ms)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    failed = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal failed
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt(i)}]}
        async with gate:
            for _ in range(1000):
                async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                    if response.status == 429:
                        wait = response.headers.get("retry-after-ms")
                        seconds = float(wait) / 1000 if wait else float(response.headers.get("retry-after", "1"))
                        await response.read()
                        await asyncio.sleep(seconds)
                        continue
                    await response.read()
                    if response.status != 200:
                        failed += 1
                    return
            failed += 1

    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT)) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    seconds = time.monotonic() - started
    stats = stub_stats(base)
    return Outcome(seconds, stats["requests"], stats["rate_limited"], failed)


def row(limit: Limit, n: int, tmp: Path) -> None:
    with stub_process(tmp / "pace-stub.log", *stand_in_options(limit), env=clean_env()) as (_, base):
        batch = run_batch(limit, base, n, tmp)
        stub_reset_limits(base)
        raw = asyncio.run(raw_client(base, n))
    ideal = ideal_seconds(limit, n)
    for name, got in (("run (defaults)", batch), ("raw asyncio, retry-after", raw)):
        refused = got.refused / max(got.requests, 1)
        print(f"| {limit.label()} | {n:,} | {name} | {got.seconds:.1f} s | {ideal:.1f} s | "
              f"{ideal / got.seconds:.2f} | {got.refused:,}/{got.requests:,} ({refused:.0%}) | {got.failed} |", flush=True)


def stub_reset_limits(base: str) -> None:
    """Counts start again; the bucket refills while the raw client starts (a fresh burst)."""
    stub_reset(base)
    time.sleep(3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="bench/run.py's rows: this one runs if they name `pace`")
    args = parser.parse_args()
    if args.only and "pace" not in args.only.split(","):
        return
    scale = 4 if args.quick else 1
    rows = [(Limit(600, 10), 300), (Limit(1200, 40), 800), (Limit(6000, 100), 3000),
            (Limit(1200, 40, tpm=4800), 400), (Limit(1200, 40, workers=4), 800)]
    print(f"pace: `run` against a rate-limited stand-in ({LATENCY} s replies), beside a raw asyncio client "
          f"({IN_FLIGHT} in flight) that waits out each 429's retry-after; requests counted by the stand-in",
          flush=True)
    print("| limit | items | client | time | ideal | efficiency | refused | failed |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for limit, n in rows:
            row(limit, n // scale, Path(tmp))


if __name__ == "__main__":
    main()
