"""100 uploads that stall after 1 MB: how much larger `serve` grows, and when each is closed.

`serve` on a private Redis with its defaults (a body idle 30 s is closed with a 408; 4 uploads
under way per key), 25 keys, 4 stalled uploads each: every client sends its headers and 1 MB of a
larger file, then nothing. Prints serve's RSS before and at its peak, and the time until the
last connection is closed.

    .venv/bin/python bench/stalled_uploads.py [--uploads 100] [--sent-mb 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aivvm_batch.private_redis import free_port  # noqa: E402
from bench.serve_bench import wait_until_healthy  # noqa: E402
from tests.private_server_helpers import private_redis  # noqa: E402
from tests.serve_helpers import stalled_upload  # noqa: E402

PER_KEY = 4


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--sent-mb", type=float, default=1.0)
    args = parser.parse_args()
    keys = [f"sk-stall-{i}" for i in range((args.uploads + PER_KEY - 1) // PER_KEY)]
    with tempfile.TemporaryDirectory() as folder, private_redis(Path(folder) / "redis") as server:
        port = free_port()
        log = open(Path(folder) / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "aivvm_batch.serve", "--port", str(port), "--redis-url",
                                 server.url], cwd=ROOT, env={**os.environ, "AIVVM_BATCH_API_KEYS": ",".join(keys)},
                                stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until_healthy(f"http://127.0.0.1:{port}", proc, 60, "serve")
            before = peak = rss_mib(proc.pid)
            started = time.monotonic()
            open_ones = [stalled_upload(port, keys[i // PER_KEY], int(args.sent_mb * 2**20))
                         for i in range(args.uploads)]
            for connection in open_ones:
                connection.setblocking(False)
            closed_at: list[float] = []
            while open_ones and time.monotonic() - started < 180:
                time.sleep(0.2)
                peak = max(peak, rss_mib(proc.pid))
                still = []
                for connection in open_ones:
                    try:
                        data = connection.recv(65536)
                    except BlockingIOError:
                        still.append(connection)
                        continue
                    except OSError:
                        data = b""
                    if data:
                        still.append(connection)  # the 408 came; the close follows
                    else:
                        closed_at.append(time.monotonic() - started)
                        connection.close()
                open_ones = still
            print(f"{args.uploads} uploads stalled after {args.sent_mb:g} MB ({len(keys)} keys): serve RSS "
                  f"{before:.0f} MiB before, {peak:.0f} MiB at its peak (+{peak - before:.0f} MiB); "
                  f"{len(closed_at)} closed, the last after {max(closed_at, default=0):.1f} s; "
                  f"{len(open_ones)} still open")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            log.close()


if __name__ == "__main__":
    main()
