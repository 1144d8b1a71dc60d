"""`make bench`: issue 10's figures, each beside the raw asyncio client measured in the same run.

Everything runs on this machine: the stand-in provider in its own process (`aivvm-batch stub`),
the raw client in its own process (bench/baseline.py: one aiohttp session, a semaphore), and
`aivvm-batch run` as a user runs it (a subprocess with its defaults unless the row says
otherwise: its own private Redis, its own workers, start-up included). The raw client runs
before and after `run` on each row, and its faster run is the baseline. Steady-state figures
(10%-90% of the requests, from their arrival times at the stand-in) stand beside the end-to-end
ones, never instead. Rows that need a Redis (memory, submit, collect, chunks, rate) use a private
redis-server the benchmark starts.

    python bench/run.py [--quick] [--only latency1,latency10,varied,atonce,defaults,embeddings,tools,
                                           memory,submit,collect,chunks,cpu,inflight,rate,serve,clients]

`varied` gives each reply its own time, 0.1 to 1.0 s spread evenly (a stand-in directive in each
prompt, the same on both sides: `bench.baseline.varied_latency`); its ideal is their sum over the
slots, every slot busy until the last reply.

`embeddings` and `tools` run `run --provider openai --base-url BASE/v1` on OpenAI lines (`/v1/embeddings`
lines; chat lines with one tool and tool_choice "required", answered by streamed tool-call deltas)
beside the raw client doing the least a user's script must (`bench/baseline.py --endpoint`).

`--quick` runs small sizes (a smoke run of about two minutes); `inflight` sums up the peaks of
the run rows that ran. A row that fails is reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aivvm_batch.private_redis import free_port  # noqa: E402
from bench.baseline import tools_line, varied_latency  # noqa: E402 - the raw client's own lines
from tests.private_server_helpers import private_redis, stub_process  # noqa: E402

ALL_ROWS = ("latency1", "latency10", "varied", "atonce", "defaults", "embeddings", "tools", "memory", "submit",
            "collect", "chunks", "cpu", "inflight", "rate", "serve", "clients")
RUN_ROWS = ("latency1", "latency10", "varied", "atonce", "defaults", "embeddings", "tools")


@dataclass
class Row:
    name: str
    figure: str
    baseline: str
    ideal: str
    target: str
    met: bool | None


ROWS: list[Row] = []
PEAKS: list[tuple[str, int, int]] = []  # (row, peak seen by the stand-in, in flight asked)
STAND_IN_PIDS: dict[str, int] = {}  # base URL -> the stand-in's process


def report(row: Row) -> None:
    ROWS.append(row)
    print(f"  {row.name}: {row.figure} | raw {row.baseline} | ideal {row.ideal} | "
          f"target {row.target} | met: {mark(row.met)}", flush=True)


def mark(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "–"}[met]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any AIVVM_BATCH_* setting (a user's defaults), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIVVM_BATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


# -- the stand-in and the raw client ----------------------------------------------------------


@contextmanager
def stand_in_process(latency: float, chunks: int, log: Path) -> Iterator[str]:
    """`aivvm-batch stub` in its own process; yields its base URL."""
    with stub_process(log, "--latency", str(latency), "--chunks", str(chunks), env=clean_env()) as (proc, base):
        STAND_IN_PIDS[base] = proc.pid
        yield base


def end(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stub_stats(base: str) -> dict[str, Any]:
    return requests.get(base + "/__stub/stats", timeout=30).json()


def stub_reset(base: str) -> None:
    requests.post(base + "/__stub/reset", timeout=30).raise_for_status()


def steady(times: list[float]) -> float:
    """Requests/s between the 10% and the 90% arrival at the stand-in (start-up and tail left out)."""
    times = sorted(times)
    if len(times) < 10:
        return float("nan")
    lo, hi = int(len(times) * 0.1), int(len(times) * 0.9)
    return (hi - lo) / max(times[hi] - times[lo], 1e-9)


@dataclass(frozen=True)
class Measured:
    items_per_s: float
    steady_per_s: float
    seconds: float
    ok: int
    peak: int
    extra: dict[str, Any] = field(default_factory=dict)


def raw_client(base: str, items: int, in_flight: int, client: str = "aiohttp",
               prompt: str = "raw {i}", endpoint: str = "aivvm") -> Measured:
    """bench/baseline.py in its own process, the stand-in's arrivals for the steady state."""
    stub_reset(base)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "baseline.py"), "--base", base,
                           "--items", str(items), "--in-flight", str(in_flight), "--client", client,
                           "--prompt", prompt, "--endpoint", endpoint],
                          capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"raw client failed: {proc.stderr.strip().splitlines()[-1:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = stub_stats(base)
    return Measured(items / figures["seconds"], steady(stats["times"]), figures["seconds"], figures["ok"],
                    stats["peak_in_flight"], figures)


def write_prompts(path: Path, n: int, prompt: Callable[[int], str]) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "prompt": prompt(i)}) + "\n")
    return path


def write_lines(path: Path, n: int, line: Callable[[int], dict[str, Any]]) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(line(i)) + "\n")
    return path


def aivvm_run(base: str, path: Path, tmp: Path, *, concurrency: int | None, timeout: float,
              provider: str | None = None, base_path: str = "",
              carries: Callable[[dict[str, Any]], bool] | None = None, checkout: Path = ROOT) -> Measured:
    """`aivvm-batch run FILE -o OUT [--provider P] --base-url BASE[PATH] [--concurrency N]`, start-up included.

    ``carries``: what an ok result must hold besides its status (the vector, the tool call); how
    many do is ``extra["carrying"]``. ``checkout``: the project's directory whose `run` it is
    (bench/alternate.py). Seconds from its start to the first request at the stand-in:
    ``extra["first_request_s"]``.
    """
    stub_reset(base)
    out = tmp / f"{path.stem}.results.jsonl"
    log = tmp / f"{path.stem}.run.log"
    args = [sys.executable, "-m", "aivvm_batch", "run", str(path), "-o", str(out), "--base-url", base + base_path,
            "--state-dir", str(tmp / f"{path.stem}.state")]
    if provider is not None:
        args += ["--provider", provider]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    env = clean_env() if checkout == ROOT else clean_env(PYTHONPATH=str(checkout))
    started, started_at = time.monotonic(), time.time()  # the stand-in's times are the wall clock's
    with open(log, "wb") as err:
        proc = subprocess.run(args, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=err,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"run exited {proc.returncode}: {tail}")
    with open(out, "rb") as f:
        results = [json.loads(line) for line in f]
    ok = sum(1 for r in results if r.get("status") == "ok")
    stats = stub_stats(base)
    extra: dict[str, Any] = {"first_request_s": min(stats["times"], default=started_at) - started_at}
    if carries is not None:
        extra["carrying"] = sum(1 for r in results if r.get("status") == "ok" and _holds(carries, r))
    return Measured(len(results) / seconds, steady(stats["times"]), seconds, ok, stats["peak_in_flight"], extra)


def _holds(carries: Callable[[dict[str, Any]], bool], result: dict[str, Any]) -> bool:
    try:
        return bool(carries(result))
    except (KeyError, IndexError, TypeError):
        return False


def run_default_concurrency() -> int:
    """`run`'s own default for --concurrency, read from its command."""
    from aivvm_batch.cli_run import run

    for param in run.params:
        if "--concurrency" in param.opts:
            return int(param.default)  # type: ignore[arg-type]
    raise RuntimeError("run has no --concurrency")


# -- rows: `run` end to end beside the raw client --------------------------------------------


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    latency: float
    chunks: int
    items: int
    in_flight: int | None  # None: run's default
    target: float  # ratio to the raw client
    endpoint: str = "aivvm"  # aivvm: prompt lines to the Aivvm API; embeddings, tools: OpenAI lines
    varied: bool = False  # each reply's time its own (bench.baseline.varied_latency), not `latency`


def embeddings_line(i: int) -> dict[str, Any]:
    return {"id": f"e{i}", "url": "/v1/embeddings", "input": f"text {i}", "model": "e"}


# endpoint -> (its input line, what an ok result of it carries); run with --provider openai
OPENAI_ROWS: dict[str, tuple[Callable[[int], dict[str, Any]], Callable[[dict[str, Any]], bool]]] = {
    "embeddings": (embeddings_line, lambda r: len(r["body"]["data"][0]["embedding"]) > 0),
    "tools": (tools_line, lambda r: bool(json.loads(r["tool_calls"][0]["function"]["arguments"]))),
}


def shapes(quick: bool) -> dict[str, Shape]:
    if quick:
        return {
            "latency1": Shape("latency1", "1 s replies (10 chunks)", 1.0, 10, 1024, 256, 0.90),
            "latency10": Shape("latency10", "3 s replies (50 chunks; 10 s in the full run)", 3.0, 50, 1024, 512, 0.85),
            "varied": Shape("varied", "replies of 0.1 to 1.0 s (4 chunks)", 0.0, 4, 2048, 256, 0.90, varied=True),
            "atonce": Shape("atonce", "replies at once", 0.0, 4, 2000, 256, 0.50),
            "defaults": Shape("defaults", "replies at once, `run` defaults", 0.0, 4, 1000, None, 0.50),
            "embeddings": Shape("embeddings", "embeddings, 1 s replies (OpenAI, JSON body)", 1.0, 10, 1024, 256, 0.90,
                                "embeddings"),
            "tools": Shape("tools", "tool calls, 1 s replies (OpenAI, 10 streamed deltas)", 1.0, 10, 1024, 256, 0.90,
                           "tools"),
        }
    return {
        "latency1": Shape("latency1", "1 s replies (10 chunks)", 1.0, 10, 16_384, 1024, 0.90),
        "latency10": Shape("latency10", "10 s replies (50 chunks)", 10.0, 50, 8192, 4096, 0.85),
        "varied": Shape("varied", "replies of 0.1 to 1.0 s (4 chunks)", 0.0, 4, 8192, 256, 0.90, varied=True),
        "atonce": Shape("atonce", "replies at once", 0.0, 4, 10_000, 256, 0.70),
        "defaults": Shape("defaults", "replies at once, `run` defaults", 0.0, 4, 3000, None, 0.50),
        "embeddings": Shape("embeddings", "embeddings, 1 s replies (OpenAI, JSON body)", 1.0, 10, 4096, 256, 0.90,
                            "embeddings"),
        "tools": Shape("tools", "tool calls, 1 s replies (OpenAI, 10 streamed deltas)", 1.0, 10, 4096, 256, 0.90,
                       "tools"),
    }


def bench_run_row(shape: Shape, tmp: Path) -> None:
    in_flight = shape.in_flight or run_default_concurrency()
    asked = f"--concurrency {shape.in_flight}" if shape.in_flight else f"defaults ({in_flight} in flight)"
    print(f"{shape.title}: {shape.items:,} items, {asked}", flush=True)
    openai = shape.endpoint != "aivvm"
    # a prompt template for each side ({i}: the item's number; {latency}: its reply time, varied rows)
    varied = "[[stub latency={latency}]] " if shape.varied else ""
    raw_prompt, our_prompt = varied + "raw {i}", varied + shape.key + " {i}"
    with stand_in_process(shape.latency, shape.chunks, tmp / "stub.log") as base:
        raws = [raw_client(base, shape.items, in_flight, prompt=raw_prompt, endpoint=shape.endpoint)]
        if shape.varied:  # every slot busy to the end: the replies' times over the slots
            ideal_s = sum(varied_latency(i) for i in range(shape.items)) / in_flight
        else:
            ideal_s = math.ceil(shape.items / in_flight) * shape.latency
        timeout = max(900.0, ideal_s * 20)
        if openai:
            line, carries = OPENAI_ROWS[shape.endpoint]
            path = write_lines(tmp / f"{shape.key}.jsonl", shape.items, line)
            ours = aivvm_run(base, path, tmp, concurrency=shape.in_flight, timeout=timeout,
                             provider="openai", base_path="/v1", carries=carries)
        else:
            path = write_prompts(tmp / f"{shape.key}.jsonl", shape.items,
                                 lambda i: our_prompt.format(i=i, latency=varied_latency(i)))
            ours = aivvm_run(base, path, tmp, concurrency=shape.in_flight, timeout=timeout)
        # the raw client again after: the better of its two runs is the baseline (a machine whose
        # speed drifts during the row never counts in our favour)
        raws.append(raw_client(base, shape.items, in_flight, prompt=raw_prompt, endpoint=shape.endpoint))
        raw = max(raws, key=lambda m: m.items_per_s)
    PEAKS.append((shape.key, ours.peak, in_flight))
    ratio = ours.items_per_s / raw.items_per_s
    ideal = f"{shape.items / ideal_s:,.0f} items/s" if ideal_s else "–"
    of_ideal = f", {ours.items_per_s * ideal_s / shape.items:.2f} of ideal" if ideal_s else ""
    raw_of_ideal = f", {raw.items_per_s * ideal_s / shape.items:.2f} of ideal" if ideal_s else ""
    name = f"{shape.title}, {shape.items:,} items, {in_flight:,} in flight: `run` end to end"
    if openai:  # both sides must have every item back whole
        what = {"embeddings": "a vector", "tools": "a tool call"}[shape.endpoint]
        all_ok = ours.ok == ours.extra["carrying"] == shape.items and all(m.ok == shape.items for m in raws)
        report(Row(name, f"{ours.items_per_s:,.0f} items/s ({ratio:.2f}× raw{of_ideal}; {ours.ok:,} ok, "
                         f"{ours.extra['carrying']:,} with {what}, {ours.seconds:.1f} s, peak {ours.peak:,})",
                   f"{raw.items_per_s:,.0f} items/s{raw_of_ideal} ({raw.seconds:.1f} s; ok "
                   f"{' / '.join(f'{m.ok:,}' for m in raws)}, peak {' / '.join(f'{m.peak:,}' for m in raws)})",
                   ideal, f"≥ {shape.target:.2f}× raw", ratio >= shape.target and all_ok))
    else:
        report(Row(name, f"{ours.items_per_s:,.0f} items/s ({ratio:.2f}× raw{of_ideal}; {ours.ok:,} ok, "
                         f"{ours.seconds:.1f} s)",
                   f"{raw.items_per_s:,.0f} items/s{raw_of_ideal}", ideal, f"≥ {shape.target:.2f}× raw",
                   ratio >= shape.target and ours.ok == shape.items))
    report(Row(f"{shape.title}: steady state (10%–90% of arrivals)",
               f"{ours.steady_per_s:,.0f} items/s ({ours.steady_per_s / raw.steady_per_s:.2f}× raw)",
               f"{raw.steady_per_s:,.0f} items/s", ideal, "reported", None))


# -- rows on the benchmark's own Redis ----------------------------------------------------------


class PeakRss:
    """Wall time and peak RSS of one child: its VmHWM, polled while it runs, then reaped with wait4."""

    @staticmethod
    def run(args: list[str], env: dict[str, str], timeout: float = 3600) -> tuple[str, float, float]:
        started = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err)
            deadline = started + timeout
            peak_kb = 0
            while True:
                peak_kb = max(peak_kb, _high_water_kb(proc.pid))
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"{args[3]} did not finish in {timeout:.0f} s")
                time.sleep(0.02)
            seconds = time.monotonic() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            if proc.returncode != 0:
                raise RuntimeError(f"{args[3]} exited {proc.returncode}: "
                                   f"{err.read().decode(errors='replace').strip()[-300:]}")
            # ru_maxrss also counts the benchmark's own memory, inherited until the child's exec
            return out.read().decode(), seconds, (peak_kb or usage.ru_maxrss) / 1024


def _high_water_kb(pid: int) -> int:
    """The child's peak RSS so far (VmHWM: its own, since its exec), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "aivvm_batch", *args]


class OnRedis:
    """The benchmark's private redis-server and the `aivvm-batch` commands pointed at it."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.client = redis.Redis.from_url(url)
        self.env = clean_env(AIVVM_BATCH_REDIS_URL=url)

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def submit(self, path: Path, base: str) -> tuple[str, float, float]:
        """(batch id, seconds, peak RSS MB) of `aivvm-batch submit FILE --base-url BASE`."""
        stdout, seconds, rss = PeakRss.run(cli_args("submit", str(path), "--base-url", base), self.env)
        return stdout.strip().splitlines()[-1].strip(), seconds, rss


def naive_send_task(url: str, n: int) -> float:
    """Lines/s of the obvious submit: one Celery send_task per line, on a queue of its own."""
    from celery import Celery

    app = Celery("bench-naive", broker=url)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("bench.naive", args=("bnaive", i), queue="bench-naive", producer=producer)
    rate = n / (time.monotonic() - started)
    redis.Redis.from_url(url).delete("bench-naive")
    return rate


def bench_memory(on: OnRedis, quick: bool) -> None:
    n = 20_000 if quick else 100_000
    print(f"Redis memory per queued item: {n:,} submitted, no worker", flush=True)
    path = write_prompts(on.tmp / "memory.jsonl", n, lambda i: f"Write a haiku about queue number {i}")
    on.client.flushall()
    before = on.used_memory()
    on.submit(path, "http://127.0.0.1:9")
    per_item = (on.used_memory() - before) / n
    on.client.flushall()
    report(Row(f"Redis memory per queued item ({n:,} submitted, no worker)", f"{per_item:,.0f} B", "–", "–",
               "≤ 300 B", per_item <= 300))
    invalid = on.tmp / "invalid.jsonl"
    invalid.write_bytes(b"{}\n" * n)
    before = on.used_memory()
    on.submit(invalid, "http://127.0.0.1:9")
    per_line = (on.used_memory() - before) / n
    on.client.flushall()
    report(Row(f"Redis memory per invalid line, submit ({n:,} lines of {{}}: each kept to be explained)",
               f"{per_line:,.0f} B", "–", "–", "–", None))
    per_line = serve_invalid_bytes(on, invalid) / n
    on.client.flushall()
    report(Row(f"Redis memory per invalid line, serve ({n:,} lines of {{}}, the upload included)",
               f"{per_line:,.1f} B", "–", "–", "≤ 50 B", per_line <= 50))


def serve_invalid_bytes(on: OnRedis, path: Path) -> int:
    """Redis's growth for a file of no valid line sent through serve (it fails in validating)."""
    from openai import OpenAI

    from bench.serve_bench import KEY, batch_of, wait_until_healthy

    port = free_port()
    log = open(on.tmp / "serve-invalid.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch.serve", "--port", str(port), "--redis-url", on.url],
                            cwd=ROOT, env={**os.environ, "AIVVM_BATCH_API_KEYS": KEY}, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, proc, 60, f"serve (see {on.tmp / 'serve-invalid.log'})")
        client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=600)
        before = on.used_memory()
        batch_of(client, path)
        return on.used_memory() - before
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def bench_submit_collect(on: OnRedis, quick: bool, do_submit: bool, do_collect: bool) -> None:
    n = 100_000 if quick else 1_000_000
    print(f"submit and collect, {n:,} lines (no workers)", flush=True)
    path = write_prompts(on.tmp / "big.jsonl", n, lambda i: f"Write a haiku about queue number {i}")
    on.client.flushall()
    batch_id, seconds, rss = on.submit(path, "http://127.0.0.1:9")
    if do_submit:
        naive_n = 5_000 if quick else 20_000
        naive = naive_send_task(on.url, naive_n)
        rate = n / seconds
        report(Row(f"`submit` of {n:,} lines (the command, start-up included)",
                   f"{rate:,.0f} lines/s, peak RSS {rss:.0f} MB",
                   f"{naive:,.0f} lines/s (Celery send_task per line, {naive_n:,} lines)", "–",
                   "≥ 60,000 lines/s, < 60 MB", rate >= 60_000 and rss < 60))
    if do_collect:
        fill_results(on, batch_id, n)
        out = on.tmp / "big.results.jsonl"
        _, seconds, rss = PeakRss.run(cli_args("collect", batch_id, "-o", str(out)), on.env)
        with open(out, "rb") as f:
            lines = sum(1 for _ in f)
        if lines != n:
            raise RuntimeError(f"collect wrote {lines:,} lines, not {n:,}")
        rate = n / seconds
        report(Row(f"`collect` of {n:,} results in input order", f"{rate:,.0f} results/s, peak RSS {rss:.0f} MB",
                   "–", "–", "reported", None))
    on.client.flushall()


def fill_results(on: OnRedis, batch_id: str, n: int) -> None:
    """Record ``n`` finished results directly (running them would measure the workers, not collect)."""
    from jobs import keys
    from jobs.store import BatchStore

    result = {"id": "", "line": 0, "status": "ok", "model": "gpt-3.5-turbo",
              "output": "Stand-in reply to: Write a haiku about queue number 0", "error": None,
              "attempts": 1, "latency_ms": 812, "first_chunk_ms": 95,
              "usage": {"prompt_tokens": 10, "completion_tokens": 14, "total_tokens": 24, "estimated": True},
              "finish_reason": "stop", "provider": "aivvm"}
    for start in range(0, n, 5000):
        pipe = on.client.pipeline(transaction=False)
        mapping: dict[Any, Any] = {}
        for seq in range(start, min(start + 5000, n)):
            result.update(id=f"q{seq}", line=seq + 1)
            mapping[seq] = json.dumps(result)
        pipe.hset(keys.results(batch_id), mapping=mapping)
        pipe.hincrby(keys.counts(batch_id), "ok", len(mapping))
        pipe.execute()
    BatchStore(on.client).finalize(batch_id, n)


@contextmanager
def warm_worker(on: OnRedis, tmp: Path, base: str, in_flight: int, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """One `aivvm-batch worker --concurrency N` on the benchmark's Redis, warmed by a first batch."""
    log = open(tmp / f"{name}-worker.log", "wb")
    worker = subprocess.Popen(cli_args("worker", "--concurrency", str(in_flight), "--loglevel", "WARNING"),
                              cwd=ROOT, env=on.env, stdout=log, stderr=log, start_new_session=True)
    try:
        warm = write_prompts(tmp / f"{name}-warm.jsonl", 100, lambda i: f"warm {i}")
        batch_id, _, _ = on.submit(warm, base)
        PeakRss.run(cli_args("collect", batch_id, "-o", str(tmp / f"{name}-warm.out"), "--wait"), on.env, 300)
        yield worker
    finally:
        end(worker, 30)
        log.close()


def bench_chunks(on: OnRedis, tmp: Path, quick: bool) -> None:
    """Reply chunks per second one worker process decodes, replies at once, 100 chunks each."""
    n, in_flight, per_reply = (400, 128, 100) if quick else (2000, 256, 100)
    directive = f"[[stub bytes=4000 chunks={per_reply}]]"
    print(f"chunk throughput: one worker process, --concurrency {in_flight}, {n:,} replies of "
          f"{per_reply} chunks (4,000 bytes)", flush=True)
    with stand_in_process(0.0, 4, tmp / "stub.log") as base:
        raw = raw_client(base, n, in_flight, prompt=directive + " raw {i}")
        with warm_worker(on, tmp, base, in_flight, "chunks"):
            stub_reset(base)
            path = write_prompts(tmp / "chunks.jsonl", n, lambda i: f"{directive} chunks {i}")
            started = time.monotonic()
            batch_id, _, _ = on.submit(path, base)
            PeakRss.run(cli_args("collect", batch_id, "-o", str(tmp / "chunks.out"), "--wait"), on.env, 1800)
            seconds = time.monotonic() - started
            peak = stub_stats(base)["peak_in_flight"]
    PEAKS.append(("chunks (worker --concurrency)", peak, in_flight))
    ours = n * per_reply / seconds
    raw_rate = n * per_reply / raw.seconds
    report(Row(f"chunk throughput, one worker process ({n:,} replies × {per_reply} chunks, at once)",
               f"{ours:,.0f} chunks/s ({n / seconds:,.0f} items/s, submit to collect)",
               f"{raw_rate:,.0f} chunks/s", "–", "reported", None))


def process_cpu(pid: int) -> float:
    """User and system CPU seconds of a live process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_cpu(on: OnRedis, tmp: Path, quick: bool) -> None:
    """CPU an item answered at once costs one warm worker process, beside the raw client's.

    Each is also divided by what the item cost the stand-in in the same pass: the stand-in's
    work per item is fixed, so the quotient is steady when the machine's speed is not.
    """
    n, in_flight, passes = (2000, 128, 2) if quick else (10_000, 128, 3)
    print(f"CPU per item: one worker process, --concurrency {in_flight}, {n:,} replies at once, "
          f"{passes} passes", flush=True)
    with stand_in_process(0.0, 4, tmp / "stub.log") as base:
        stand_in = STAND_IN_PIDS[base]
        raw_cpu, raw_stub = [], []
        for _ in range(passes):
            stub_reset(base)
            before, stub_before = resource.getrusage(resource.RUSAGE_CHILDREN), process_cpu(stand_in)
            raw_client(base, n, in_flight)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            raw_cpu.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n)
            raw_stub.append((process_cpu(stand_in) - stub_before) / n)
        ours, ours_stub = [], []
        with warm_worker(on, tmp, base, in_flight, "cpu") as worker:
            pid = worker.pid  # `aivvm-batch worker` execs Celery's worker: the same process
            for number in range(passes):
                path = write_prompts(tmp / f"cpu{number}.jsonl", n, lambda i: f"cpu {number} {i}")
                batch_id, _, _ = on.submit(path, base)
                cpu_before, stub_before = process_cpu(pid), process_cpu(stand_in)
                PeakRss.run(cli_args("collect", batch_id, "-o", str(tmp / "cpu.out"), "--wait"), on.env, 1800)
                ours.append((process_cpu(pid) - cpu_before) / n)
                ours_stub.append((process_cpu(stand_in) - stub_before) / n)
    median = statistics.median
    ours_q = median(o / s for o, s in zip(ours, ours_stub))
    raw_q = median(r / s for r, s in zip(raw_cpu, raw_stub))
    report(Row(f"CPU per item answered at once, one worker process ({n:,} items, {in_flight} in flight; "
               f"median of {passes}; ÷ the stand-in's CPU per item)",
               f"{median(ours) * 1e6:,.0f} µs ({ours_q:.2f}× the stand-in's)",
               f"{median(raw_cpu) * 1e6:,.0f} µs ({raw_q:.2f}× the stand-in's)", "–", "reported", None))


def bench_inflight() -> None:
    if not PEAKS:
        report(Row("never more in flight than asked", "no run row ran", "–", "–", "peak ≤ N", None))
        return
    detail = "; ".join(f"{key}: {peak:,} / {asked:,}" for key, peak, asked in PEAKS)
    report(Row("never more in flight than asked (stand-in's peak / N)", detail, "–", "–", "peak ≤ N",
               all(peak <= asked for _, peak, asked in PEAKS)))


def windows(times: list[float], width: float) -> int:
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def bench_rate(on: OnRedis, tmp: Path, quick: bool) -> None:
    rpm, seconds = 600, (20 if quick else 60)
    print(f"global rate limit: 4 worker processes, --rpm {rpm}, {seconds} s", flush=True)
    per_second = rpm / 60
    n = int(per_second * (seconds + 8))
    with stand_in_process(0.05, 2, tmp / "stub.log") as base:
        logs = [open(tmp / f"rate-worker-{i}.log", "wb") for i in range(4)]
        workers = [subprocess.Popen(cli_args("worker", "--concurrency", "32", "--loglevel", "WARNING"),
                                    cwd=ROOT, env=on.env, stdout=log, stderr=log, start_new_session=True)
                   for log in logs]
        try:
            warm = write_prompts(tmp / "rate-warm.jsonl", 40, lambda i: f"warm {i}")
            batch_id, _, _ = on.submit(warm, base)
            PeakRss.run(cli_args("collect", batch_id, "-o", str(tmp / "rate-warm.out"), "--wait"), on.env, 300)
            time.sleep(1)
            stub_reset(base)
            started = time.monotonic()
            path = write_prompts(tmp / "rate.jsonl", n, lambda i: f"rate {i}")
            stdout, _, _ = PeakRss.run(cli_args("submit", str(path), "--base-url", base, "--rpm", str(rpm)), on.env)
            batch_id = stdout.strip().splitlines()[-1]
            while time.monotonic() - started < seconds + 3:
                time.sleep(0.5)
            times = sorted(stub_stats(base)["times"])
            PeakRss.run(cli_args("cancel", batch_id), on.env)
            first = times[0]
            in_window = [t for t in times if t - first < seconds]
            rate = len(in_window) / seconds * 60
            worst10 = windows(in_window, 10.0)
            report(Row(f"rate seen at the stand-in over {seconds} s, `--rpm {rpm}`",
                       f"{rate:.0f}/min ({rate / rpm - 1:+.1%})", "–", f"{rpm}/min", "within 5%",
                       abs(rate / rpm - 1) <= 0.05))
            report(Row("worst 10-second window", f"{worst10} requests ({worst10 / (per_second * 10) - 1:+.1%})",
                       "–", f"{per_second * 10:.0f}", "≤ +5%", worst10 <= per_second * 10 * 1.05))
            stub_reset(base)
            lines = [f"pause {i}" for i in range(120)]
            lines[20] = "[[stub fault=429 retry_after=3 times=1]] pause 20"
            path = write_prompts(tmp / "pause.jsonl", len(lines), lambda i: lines[i])
            stdout, _, _ = PeakRss.run(cli_args("submit", str(path), "--base-url", base, "--rpm", "1200"), on.env)
            batch_id = stdout.strip().splitlines()[-1]
            PeakRss.run(cli_args("collect", batch_id, "-o", str(tmp / "pause.out"), "--wait"), on.env, 600)
            times = sorted(stub_stats(base)["times"])
            gap = max(b - a for a, b in zip(times, times[1:]))
            report(Row("429 with Retry-After: 3 s on one item: longest silence at the stand-in, 4 workers",
                       f"{gap:.2f} s", "–", "≥ 3 s", "every worker waits", gap >= 3.0))
        finally:
            for proc in workers:
                proc.terminate()
            for proc in workers:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()


def bench_serve_row(tmp: Path, quick: bool) -> None:
    from bench.serve_bench import bench_serve

    lines = 1000 if quick else 10_000
    print(f"issue 11: `serve` through the OpenAI SDK beside `run`, the same {lines:,}-line file", flush=True)
    with stand_in_process(0.0, 4, tmp / "stub.log") as base:
        figures = bench_serve(base, tmp / "serve", lines)
    serve_rate, run_rate = figures.lines / figures.serve_seconds, figures.lines / figures.run_seconds
    report(Row(f"`serve` through the OpenAI SDK, {lines:,} lines (upload to output file)",
               f"{serve_rate:,.0f} items/s ({figures.serve_seconds:.1f} s, {figures.serve_ok:,} lines)",
               "–", "–", "reported", None))
    report(Row(f"`run` on the same {lines:,} lines (whole command)",
               f"{run_rate:,.0f} items/s ({figures.run_seconds:.1f} s, {figures.run_ok:,} ok)",
               "–", "–", "reported", None))


def bench_clients(tmp: Path, quick: bool) -> None:
    """aiohttp against httpx, the raw client alone: which asynchronous client to keep."""
    shapes_ = [(0.0, 4, 1000 if quick else 10_000, 256), (1.0, 10, 256 if quick else 2048, 256 if quick else 1024)]
    for latency, chunks, items, in_flight in shapes_:
        label = "replies at once" if not latency else f"{latency:g} s replies"
        print(f"raw clients: {label}, {items:,} items, {in_flight:,} in flight", flush=True)
        with stand_in_process(latency, chunks, tmp / "stub.log") as base:
            aiohttp_ = raw_client(base, items, in_flight, "aiohttp")
            httpx_ = raw_client(base, items, in_flight, "httpx")
        report(Row(f"raw httpx AsyncClient vs raw aiohttp, {label}, {items:,} items, {in_flight:,} in flight",
                   f"httpx {httpx_.items_per_s:,.0f} items/s ({httpx_.items_per_s / aiohttp_.items_per_s:.2f}×)",
                   f"aiohttp {aiohttp_.items_per_s:,.0f} items/s", "–", "reported", None))


# -- main ----------------------------------------------------------------------------------------


def guarded(name: str, body: Callable[[], None]) -> None:
    """Run one row; a failure is a row that says so, and the others still run."""
    try:
        body()
    except Exception as exc:  # noqa: BLE001 - the benchmark reports and goes on
        traceback.print_exc()
        report(Row(name, f"failed: {type(exc).__name__}: {str(exc)[:200]}", "–", "–", "–", False))


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("celery", "kombu", "redis", "aiohttp", "httpx", "httpx2", "requests"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default=",".join(ALL_ROWS), help="comma-separated rows to run")
    args = parser.parse_args()
    chosen = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROWS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; "
          f"{versions()}; {'quick' if args.quick else 'full'} sizes", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aivvm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        run_shapes = shapes(args.quick)
        for key in RUN_ROWS:
            if key in chosen:
                guarded(run_shapes[key].title, functools.partial(bench_run_row, run_shapes[key], tmp))
        if {"memory", "submit", "collect", "chunks", "cpu", "rate"} & set(chosen):
            with private_redis(tmp / "redis") as server:
                on = OnRedis(server.url, tmp)
                print(f"redis-server {on.client.info('server')['redis_version']} (private, port {server.port})")
                if "memory" in chosen:
                    guarded("Redis memory per queued item", lambda: bench_memory(on, args.quick))
                if {"submit", "collect"} & set(chosen):
                    guarded("submit / collect", lambda: bench_submit_collect(
                        on, args.quick, "submit" in chosen, "collect" in chosen))
                if "chunks" in chosen:
                    guarded("chunk throughput", lambda: bench_chunks(on, tmp, args.quick))
                if "cpu" in chosen:
                    guarded("CPU per item", lambda: bench_cpu(on, tmp, args.quick))
                if "rate" in chosen:
                    guarded("rate limit", lambda: bench_rate(on, tmp, args.quick))
        if "inflight" in chosen:
            bench_inflight()
        if "serve" in chosen:
            guarded("serve beside run", lambda: bench_serve_row(tmp, args.quick))
        if "clients" in chosen:
            guarded("raw clients", lambda: bench_clients(tmp, args.quick))
    print(f"\n{len(ROWS)} rows in {time.monotonic() - started:.0f} s\n")
    print("| figure | measured | raw asyncio client (same run) | ideal | target | met |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        print(f"| {row.name} | {row.figure} | {row.baseline} | {row.ideal} | {row.target} | {mark(row.met)} |")


if __name__ == "__main__":
    main()
