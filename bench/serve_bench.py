"""`aivvm-batch serve` through the OpenAI SDK beside `aivvm-batch run`, on the same file.

Both start a private Redis and the same number of worker processes, as a user on one
machine would. The serve figure is the time from the start of the upload to the last
byte of the output file (the server already listening, its workers started); the run
figure is the whole command, its own Redis and worker start-up included.

    python bench/serve_bench.py [--lines 10000] [--stub http://127.0.0.1:8787]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aivvm_batch.private_redis import free_port  # noqa: E402

KEY = "sk-bench"
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class ServeFigures:
    lines: int
    serve_seconds: float
    run_seconds: float
    serve_ok: int
    run_ok: int


def wait_until_healthy(base: str, proc: subprocess.Popen[bytes], seconds: float, what: str) -> None:
    """Poll ``base``/health until it answers; raise if ``proc`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(base + "/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def write_requests(path: Path, n: int, tag: str = "r") -> Path:
    """``n`` OpenAI batch lines, ids ``<tag>0``, ``<tag>1``…"""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{tag}{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-3.5-turbo",
                                         "messages": [{"role": "user", "content": f"bench {tag} {i}"}]}}) + "\n")
    return path


def time_serve(path: Path, stub_base: str, tmp: Path, workers: int, concurrency: int) -> tuple[float, int]:
    from openai import OpenAI

    port = free_port()
    env = {**os.environ, "AIVVM_BATCH_API_KEYS": KEY, "AIVVM_BATCH_REDIS_URL": ""}
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch.serve", "--port", str(port), "--base-url", stub_base,
                             "--workers", str(workers), "--concurrency", str(concurrency),
                             "--state-dir", str(tmp / "serve-state")],
                            cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(base, proc, 60, f"serve (see {tmp / 'serve.log'})")
        time.sleep(2)  # let its workers finish starting, as a long-running server's have
        client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=600)
        started = time.monotonic()
        batch = batch_of(client, path)
        content = client.files.content(batch.output_file_id).content if batch.output_file_id else b""
        seconds = time.monotonic() - started
        return seconds, content.count(b"\n")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def batch_of(client: Any, path: Path) -> Any:
    """Upload ``path``, make it a batch and wait for its end: the ended ``Batch``."""
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in TERMINAL:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    return batch


def time_run(path: Path, stub_base: str, tmp: Path, workers: int, concurrency: int) -> tuple[float, int]:
    out = tmp / "run.results.jsonl"
    env = {**os.environ, "AIVVM_BATCH_REDIS_URL": ""}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "aivvm_batch", "run", str(path), "-o", str(out), "--base-url", stub_base,
                    "--workers", str(workers), "--concurrency", str(concurrency), "--state-dir", str(tmp / "run-state")],
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    seconds = time.monotonic() - started
    with open(out, "rb") as f:
        ok = sum(1 for line in f if json.loads(line)["status"] == "ok")
    return seconds, ok


def bench_serve(stub_base: str, tmp: Path, lines: int = 10_000, workers: int = 2,
                concurrency: int = 64) -> ServeFigures:
    """Time serve (upload to last result, through the SDK) and run on the same ``lines``-line file."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_requests(tmp / "serve-bench.jsonl", lines)
    serve_seconds, serve_ok = time_serve(path, stub_base, tmp, workers, concurrency)
    run_seconds, run_ok = time_run(path, stub_base, tmp, workers, concurrency)
    return ServeFigures(lines, serve_seconds, run_seconds, serve_ok, run_ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--stub", default=None, help="a running stand-in (default: start one in this process)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.stub:
            figures = bench_serve(args.stub, Path(tmp), args.lines)
        else:
            from aivvm_batch.stub import StubServer

            with StubServer() as stub:
                figures = bench_serve(stub.base_url, Path(tmp), args.lines)
    print(f"serve, upload to last result: {figures.serve_seconds:.1f} s for {figures.lines:,} lines "
          f"({figures.lines / figures.serve_seconds:,.0f} items/s, {figures.serve_ok:,} ok)")
    print(f"run, whole command:           {figures.run_seconds:.1f} s for {figures.lines:,} lines "
          f"({figures.lines / figures.run_seconds:,.0f} items/s, {figures.run_ok:,} ok)")


if __name__ == "__main__":
    main()
