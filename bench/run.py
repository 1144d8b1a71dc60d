"""`make bench`: the project's figures beside a baseline measured in the same run, and the ideal.

Everything runs on this machine: a private redis-server, the stand-in provider in its
own process, real Celery worker processes. Figures come from this run only.

    python bench/run.py [--quick] [--only latency,overhead,submit,collect,rate]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aivvm_batch.embedded import EmbeddedRedis, free_port  # noqa: E402
from aivvm_batch.workers import WorkerProcesses  # noqa: E402
from jobs.config import Settings  # noqa: E402
from jobs.queue import TASK_NAME, Publisher, configure  # noqa: E402
from jobs.queue import app as celery_app  # noqa: E402
from jobs.records import BatchOptions  # noqa: E402
from jobs.store import BatchStore  # noqa: E402
from jobs.submit import submit_file  # noqa: E402


@dataclass
class Row:
    name: str
    figure: str
    baseline: str
    ideal: str
    target: str
    met: bool | None


ROWS: list[Row] = []


def report(row: Row) -> None:
    ROWS.append(row)
    mark = {True: "yes", False: "NO", None: "-"}[row.met]
    print(f"  {row.name}: {row.figure} | baseline {row.baseline} | ideal {row.ideal} | "
          f"target {row.target} | met: {mark}", flush=True)


@contextmanager
def stub_process(latency: float, chunks: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch", "stub", "--port", str(port),
                             "--latency", str(latency), "--chunks", str(chunks)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def stub_stats(base: str) -> dict:
    return requests.get(base + "/__stub/stats", timeout=10).json()


def stub_reset(base: str) -> None:
    requests.post(base + "/__stub/reset", timeout=10)


class Bench:
    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.settings = Settings.from_env({}, redis_url=redis_url)
        self.client = redis.Redis.from_url(redis_url)
        self.store = BatchStore(self.client)
        configure(celery_app, self.settings)
        self.publisher = Publisher(self.client, celery_app)

    def write(self, name: str, n: int, prompt: Callable[[int], str]) -> Path:
        path = self.tmp / name
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"q{i}", "prompt": prompt(i)}) + "\n")
        return path

    def run_batch(self, path: Path, options: BatchOptions) -> tuple[str, float, list[tuple[float, int]]]:
        """Submit and wait; return the batch id, seconds from submit to the last result, progress samples."""
        started = time.monotonic()
        batch_id = submit_file(self.store, self.publisher, path, options, self.settings).batch_id
        samples = []
        while True:
            info = self.store.info(batch_id)
            samples.append((time.monotonic() - started, info.done))
            if info.finished:
                return batch_id, time.monotonic() - started, samples
            time.sleep(0.05)

    def workers(self, count: int, concurrency: int, env: dict[str, str] | None = None) -> WorkerProcesses:
        workers = WorkerProcesses(self.redis_url, count=count, concurrency=concurrency,
                                  log_dir=self.tmp / "logs", env=env or {},
                                  pool=os.environ.get("BENCH_POOL", "threads")).start()
        return workers


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Items/s between 10% and 90% of completions (excludes start-up and the tail)."""
    lo = next(s for s in samples if s[1] >= total * 0.1)
    hi = next(s for s in samples if s[1] >= total * 0.9)
    return (hi[1] - lo[1]) / max(hi[0] - lo[0], 1e-9)


def bench_latency(bench: Bench, quick: bool) -> None:
    print("1. latency-bound efficiency (stand-in: 1 s per reply, 10 chunks; 2 workers x 128 slots)")
    slots, latency = 256, 1.0
    n = slots * (6 if quick else 15)
    with stub_process(latency, 10) as base:
        workers = bench.workers(2, slots // 2)
        try:
            warm = bench.write("warm.jsonl", slots, lambda i: f"warm {i}")
            bench.run_batch(warm, BatchOptions(base_url=base))
            path = bench.write("latency.jsonl", n, lambda i: f"latency {i}")
            batch_id, seconds, samples = bench.run_batch(path, BatchOptions(base_url=base))
            latencies = [json.loads(raw)["latency_ms"] for _, raw in bench.store.iter_results(batch_id, n)]
        finally:
            workers.stop()
    mean_ms = sum(latencies) / len(latencies)
    print(f"  mean reply time seen by the workers: {mean_ms:.0f} ms (the stand-in's nominal: {latency * 1000:.0f} ms);"
          f" slots / mean reply time = {slots / (mean_ms / 1000):.1f} items/s")
    ideal = slots / latency
    end_to_end = n / seconds
    steady = steady_rate(samples, n)
    report(Row("latency-bound throughput, end to end", f"{end_to_end:.1f} items/s ({end_to_end / ideal:.1%})",
               "-", f"{ideal:.0f} items/s", ">= 97%", end_to_end / ideal >= 0.97))
    report(Row("latency-bound throughput, steady state (10%-90%)", f"{steady:.1f} items/s ({steady / ideal:.1%})",
               "-", f"{ideal:.0f} items/s", ">= 97%", steady / ideal >= 0.97))


def raw_baseline(base: str, n: int, threads: int) -> float:
    local = threading.local()

    def call(i: int) -> int:
        session = getattr(local, "s", None) or setattr(local, "s", requests.Session()) or local.s
        body = {"model": {"id": "gpt-3.5-turbo", "name": "GPT-3.5"},
                "messages": [{"role": "user", "content": f"raw {i}"}], "key": "", "prompt": "x",
                "temperature": 0.7}
        with session.post(base + "/api/chat", json=body, stream=True, timeout=30) as r:
            return len(r.content)

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(call, range(n)))
    assert all(sizes)
    return n / (time.monotonic() - started)


def bench_overhead(bench: Bench, quick: bool) -> None:
    print("2. pipeline overhead (stand-in answers at once)")
    n = 2000 if quick else 6000
    with stub_process(0.0, 4) as base:
        baseline = raw_baseline(base, n, 64)
        workers = bench.workers(2, 64)
        try:
            bench.run_batch(bench.write("warm2.jsonl", 200, lambda i: f"warm {i}"), BatchOptions(base_url=base))
            _, seconds, _ = bench.run_batch(bench.write("overhead.jsonl", n, lambda i: f"overhead {i}"),
                                            BatchOptions(base_url=base))
        finally:
            workers.stop()
    ours = n / seconds
    report(Row("end-to-end items/s, submit to last result", f"{ours:.0f} items/s ({ours / baseline:.0%} of raw)",
               f"{baseline:.0f} items/s (64 threads + requests)", "-", ">= 50% of raw", ours / baseline >= 0.5))


MEASURE = """
import json, resource, sys, time
sys.argv = ["aivvm-batch"] + sys.argv[1:]
from aivvm_batch.cli import main
started = time.monotonic()
try:
    main(standalone_mode=False)
finally:
    print(json.dumps({"seconds": time.monotonic() - started,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""


def measured_cli(*args: str, env: dict[str, str]) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env})
    figures = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.stdout, figures


def bench_submit_collect(bench: Bench, quick: bool, do_submit: bool, do_collect: bool) -> None:
    n = 200_000 if quick else 1_000_000
    print(f"3./4. submit and collect, {n:,} lines (no workers: the queue just fills)")
    path = bench.write("big.jsonl", n, lambda i: f"Write a haiku about queue number {i}")
    env = {"AIVVM_BATCH_REDIS_URL": bench.redis_url}
    memory_before = bench.client.info("memory")["used_memory"]
    stdout, figures = measured_cli("submit", str(path), "--base-url", "http://127.0.0.1:9", env=env)
    batch_id = stdout.strip()
    rate = n / figures["seconds"]
    naive_n = 10_000 if quick else 20_000
    started = time.monotonic()
    with celery_app.producer_or_acquire() as producer:
        for i in range(naive_n):
            celery_app.send_task(TASK_NAME, args=("bnaive", i), producer=producer)
    naive = naive_n / (time.monotonic() - started)
    if do_submit:
        report(Row(f"submit {n:,} lines", f"{rate:,.0f} lines/s, peak RSS {figures['rss_mb']:.0f} MB",
                   f"{naive:,.0f} lines/s (send_task per line, {naive_n:,} lines)", "-",
                   ">= 20,000 lines/s, < 100 MB", rate >= 20_000 and figures["rss_mb"] < 100))
    bench.client.delete("aivvm-batch")
    if not do_collect:
        return
    result = {"id": "", "line": 0, "status": "ok", "model": "gpt-3.5-turbo",
              "output": "Stand-in reply to: Write a haiku about queue number 0", "error": None,
              "attempts": 1, "latency_ms": 812, "first_chunk_ms": 95,
              "usage": {"prompt_tokens": 10, "completion_tokens": 14, "total_tokens": 24, "estimated": True},
              "finish_reason": "stop", "provider": "aivvm"}
    before_results = bench.client.info("memory")["used_memory"]
    for start in range(0, n, 5000):
        pipe = bench.client.pipeline(transaction=False)
        mapping = {}
        for seq in range(start, min(start + 5000, n)):
            result.update(id=f"q{seq}", line=seq + 1)
            mapping[seq] = json.dumps(result)
        pipe.hset(f"aivb:{{{batch_id}}}:res", mapping=mapping)
        pipe.hincrby(f"aivb:{{{batch_id}}}:counts", "ok", len(mapping))
        pipe.execute()
    bench.store.finalize(batch_id, n)
    per_item = (bench.client.info("memory")["used_memory"] - memory_before) / n
    results_only = (bench.client.info("memory")["used_memory"] - before_results) / n
    out = bench.tmp / "big.results.jsonl"
    _, figures = measured_cli("collect", batch_id, "-o", str(out), env=env)
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    assert lines == n, lines
    rate = n / figures["seconds"]
    naive_n = 50_000 if quick else 100_000
    started = time.monotonic()
    key = f"aivb:{{{batch_id}}}:res"
    with open(bench.tmp / "naive.jsonl", "wb") as f:
        for seq in range(naive_n):
            f.write(bench.client.hget(key, seq) + b"\n")
    naive = naive_n / (time.monotonic() - started)
    report(Row(f"collect {n:,} results in input order", f"{rate:,.0f} results/s, peak RSS {figures['rss_mb']:.0f} MB",
               f"{naive:,.0f} results/s (HGET per item, {naive_n:,} items)", "-",
               ">= 50,000 results/s, < 100 MB", rate >= 50_000 and figures["rss_mb"] < 100))
    report(Row("Redis memory per finished item", f"{per_item:,.0f} bytes (results alone: {results_only:,.0f})",
               "-", "-", "reported", None))


def windows(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def bench_rate(bench: Bench, quick: bool) -> None:
    rpm, seconds = 600, (20 if quick else 60)
    print(f"5. global rate limit: 4 workers, --rpm {rpm}, {seconds} s")
    per_second = rpm / 60
    n = int(per_second * (seconds + 8))
    with stub_process(0.05, 2) as base:
        workers = bench.workers(4, 32)
        try:
            bench.run_batch(bench.write("warm5.jsonl", 40, lambda i: f"warm {i}"), BatchOptions(base_url=base))
            time.sleep(1)
            stub_reset(base)
            started = time.monotonic()
            batch_id = submit_file(bench.store, bench.publisher, bench.write("rate.jsonl", n, lambda i: f"rate {i}"),
                                   BatchOptions(base_url=base, rpm=rpm), bench.settings).batch_id
            while time.monotonic() - started < seconds + 3:
                time.sleep(0.5)
            times = sorted(stub_stats(base)["times"])
            bench.store.cancel(batch_id)
            first = times[0]
            in_window = [t for t in times if t - first < seconds]
            rate = len(in_window) / seconds * 60
            worst10 = windows(in_window, 10.0)
            report(Row(f"rate seen at the stand-in over {seconds} s", f"{rate:.0f}/min ({rate / rpm - 1:+.1%})",
                       "-", f"{rpm}/min", "within 5%", abs(rate / rpm - 1) <= 0.05))
            report(Row("worst 10-second window", f"{worst10} requests ({worst10 / (per_second * 10) - 1:+.1%})",
                       "-", f"{per_second * 10:.0f}", "<= +5%", worst10 <= per_second * 10 * 1.05))
            stub_reset(base)
            lines = [f"pause {i}" for i in range(120)]
            lines[20] = "[[stub fault=429 retry_after=3 times=1]] pause 20"
            path = bench.write("pause.jsonl", len(lines), lambda i: lines[i])
            bench.run_batch(path, BatchOptions(base_url=base, rpm=1200))
            times = sorted(stub_stats(base)["times"])
            gap = max(b - a for a, b in zip(times, times[1:]))
            report(Row("429 Retry-After: 3 s, longest silence across all 4 workers", f"{gap:.2f} s", "-", ">= 3 s",
                       ">= 3 s (every worker waits)", gap >= 3.0))
        finally:
            workers.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", default="latency,overhead,submit,collect,rate")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        with EmbeddedRedis(Path(tmp) / "redis", persistent=False) as server:
            bench = Bench(server.url, Path(tmp))
            print(f"redis-server {bench.client.info('server')['redis_version']} (private, port {server.port})")
            if "latency" in chosen:
                bench_latency(bench, args.quick)
            if "overhead" in chosen:
                bench_overhead(bench, args.quick)
            if "rate" in chosen:
                bench_rate(bench, args.quick)
            if chosen & {"submit", "collect"}:
                bench_submit_collect(bench, args.quick, "submit" in chosen, "collect" in chosen)
    print("\n| figure | measured | baseline (same run) | ideal | target | met |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        print(f"| {row.name} | {row.figure} | {row.baseline} | {row.ideal} | {row.target} | "
              f"{ {True: 'yes', False: 'NO', None: '-'}[row.met]} |")


if __name__ == "__main__":
    main()
