"""`make bench-hosts`: a batch across hosts with and without slow links, beside the raw client.

Redis, the provider and two workers each on a host of their own (network namespaces, as the
many-hosts tier builds them: tests/netns.py; needs root, iproute2 and iptables). The same 512
items of 2 s replies run four ways: the raw asyncio client (bench/baseline.py, one per worker
host, 64 in flight each) and the batch (two workers of 64 slots, submitted from the bridge),
first on plain links, then with 200 ms one way and 1% loss between every two hosts (the NFQUEUE
delayer: this kernel has no netem). Each figure is end to end: submission included for the batch.

    sudo python bench/slow_links.py [--items 512] [--delay 0.2] [--loss 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402
from tests.test_netns import Hosts  # noqa: E402

RAW_PORT = 8788
REPLY_SECONDS = 2
IN_FLIGHT = 64
ENV = {"AIVVM_BATCH_LEASE": "15"}


def raw_seconds(hosts: Hosts, items: int) -> float:
    """The raw client on each worker host, half the items each, at once: the slower one's time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--base",
            f"http://{hosts.provider.address}:{RAW_PORT}", "--items", str(items // 2), "--in-flight", str(IN_FLIGHT)]
    runs = [subprocess.Popen(host.exec(argv), stdout=subprocess.PIPE, env=env) for host in hosts.worker_hosts]
    figures = [json.loads(run.communicate(timeout=600)[0]) for run in runs]
    assert all(f["ok"] == items // 2 for f in figures), figures
    return max(float(f["seconds"]) for f in figures)


def batch_seconds(hosts: Hosts, items: int, name: str) -> float:
    asked = [f"[[stub latency={REPLY_SECONDS}]] {name} {i}" for i in range(items)]
    started = time.monotonic()
    batch_id = hosts.submit(asked)
    results = hosts.wait_finished(batch_id, timeout=600)
    took = time.monotonic() - started
    assert all(r["status"] == "ok" for r in results)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds, one way")
    parser.add_argument("--loss", type=float, default=0.01)
    args = parser.parse_args()
    why = netns.available()
    if why is not None:
        print(f"bench-hosts skipped: {why}")
        return
    with tempfile.TemporaryDirectory(prefix="aivvm-bench-hosts-") as tmp:
        hosts = Hosts(Path(tmp))
        try:
            hosts.net.start(hosts.provider, [sys.executable, "-m", "aivvm_batch", "stub", "--host", hosts.provider.address,
                                             "--port", str(RAW_PORT), "--latency", str(REPLY_SECONDS), "--chunks", "4"],
                            {**os.environ, "PYTHONPATH": str(ROOT)}, Path(tmp) / "stub-raw.log")
            for index in range(2):
                hosts.start_worker(index, IN_FLIGHT, env=ENV)
            figures = {"plain": (raw_seconds(hosts, args.items), batch_seconds(hosts, args.items, "plain"))}
            for host in hosts.net.hosts:
                hosts.net.slow(host, args.delay, args.loss, Path(tmp) / f"delayer-{host.name}.log")
            figures["slow"] = (raw_seconds(hosts, args.items), batch_seconds(hosts, args.items, "slow"))
        finally:
            hosts.close()
    print(f"{args.items} items of {REPLY_SECONDS} s, 2 hosts x {IN_FLIGHT} in flight; slow: "
          f"{args.delay * 1000:.0f} ms one way, {args.loss:.0%} loss between every two hosts")
    print(f"{'links':8}{'raw asyncio':>14}{'aivvm-batch':>14}{'batch/raw':>12}")
    for links, (raw, batch) in figures.items():
        print(f"{links:8}{raw:>12.1f} s{batch:>12.1f} s{raw / batch:>11.2f}x")
    (raw_plain, batch_plain), (raw_slow, batch_slow) = figures["plain"], figures["slow"]
    print(f"slow / plain throughput: raw {raw_plain / raw_slow:.2f}x, aivvm-batch {batch_plain / batch_slow:.2f}x")


if __name__ == "__main__":
    main()
