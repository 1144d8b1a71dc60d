"""Two tenants on one `serve`: does a small batch wait for the whole of a big one?

`serve --stub` (its private Redis and one worker of CONCURRENCY slots; the stand-in answers in
LATENCY seconds), two API keys. Measured through the openai SDK, each from its upload to its
batch's `completed`:

* tenant B's 1-line batch alone;
* the same behind tenant A's batch of BIG items (A's batch created first and under way);
* two equal batches of EQUAL items, one per tenant, created together: their end times.

    .venv/bin/python bench/tenants.py [--big 1500,100000] [--equal 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import BadRequestError, OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aivvm_batch.private_redis import free_port  # noqa: E402
from bench.serve_bench import TERMINAL, batch_of, wait_until_healthy, write_requests  # noqa: E402

A, B = "sk-tenant-a", "sk-tenant-b"
LATENCY = 0.5
CONCURRENCY = 16


def start(api: OpenAI, path: Path) -> str:
    with open(path, "rb") as f:
        file_id = api.files.create(file=f, purpose="batch").id
    return api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id


def finish(api: OpenAI, batch_id: str, timeout: float = 600) -> float:
    """Seconds from now until the batch ends (it must complete)."""
    started = time.monotonic()
    while True:
        batch = api.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            assert batch.status == "completed", batch
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise SystemExit(f"batch {batch_id} still {batch.status} after {timeout} s")
        time.sleep(0.05)


def timed(api: OpenAI, path: Path) -> float:
    started = time.monotonic()
    assert batch_of(api, path).status == "completed"
    return time.monotonic() - started


def wait_in_progress(api: OpenAI, batch_id: str) -> None:
    while api.batches.retrieve(batch_id).status == "validating":
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", default="1500,100000", help="sizes of tenant A's batch, comma-separated")
    parser.add_argument("--equal", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        port = free_port()
        env = {**os.environ, "AIVVM_BATCH_API_KEYS": f"{A},{B}", "AIVVM_BATCH_REDIS_URL": "",
               "AIVVM_BATCH_STUB_LATENCY": str(LATENCY), "AIVVM_BATCH_STUB_CHUNKS": "2"}
        log = open(tmp / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch.serve", "--port", str(port), "--stub",
                                 "--provider", "openai", "--concurrency", str(CONCURRENCY),
                                 "--state-dir", str(tmp / "state")],
                                cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_healthy(base, proc, 60, f"serve (see {tmp / 'serve.log'})")
            time.sleep(2)
            a = OpenAI(base_url=base + "/v1", api_key=A, max_retries=0, timeout=600)
            b = OpenAI(base_url=base + "/v1", api_key=B, max_retries=0, timeout=600)
            one = write_requests(tmp / "one.jsonl", 1, "b")
            alone = timed(b, one)
            print(f"{CONCURRENCY} slots, {LATENCY:g} s replies; B's 1 line alone: {alone:.1f} s", flush=True)
            for size in (int(s) for s in args.big.split(",")):
                big = start(a, write_requests(tmp / f"big{size}.jsonl", size, "a"))
                wait_in_progress(a, big)
                behind = timed(b, one)
                print(f"B's 1 line behind A's {size:,} items: {behind:.1f} s "
                      f"(target: within {max(10.0, 3 * alone):.1f} s)", flush=True)
                try:
                    a.batches.cancel(big)
                except BadRequestError:  # it ended first (a small one)
                    pass
                finish_cancelled(a, big)
            paths = [write_requests(tmp / f"eq-{t}.jsonl", args.equal, t) for t in ("a", "b")]
            ends: dict[str, float] = {}
            started = time.monotonic()
            ids = {"A": start(a, paths[0]), "B": start(b, paths[1])}

            def watch(name: str, api: OpenAI) -> None:
                finish(api, ids[name])
                ends[name] = time.monotonic() - started
            threads = [threading.Thread(target=watch, args=(n, c)) for n, c in (("A", a), ("B", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"two batches of {args.equal} items, created together: A ended at {ends['A']:.1f} s, "
                  f"B at {ends['B']:.1f} s ({abs(ends['A'] - ends['B']) / max(ends.values()):.0%} apart; "
                  "target: within 20%)", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            log.close()


def finish_cancelled(api: OpenAI, batch_id: str) -> None:
    while api.batches.retrieve(batch_id).status not in TERMINAL:
        time.sleep(0.1)


if __name__ == "__main__":
    main()
