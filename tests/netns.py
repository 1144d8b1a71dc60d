"""Many hosts on one machine: network namespaces joined by a bridge, links cut with iptables.

Each host is a network namespace with one address on a private /24 of its own; the test
process is the bridge's address (``.1``), so it reaches every host. ``cut(a, b)`` drops the
packets between two hosts in both directions (as a partition does: no reset, no refusal),
``heal(a, b)`` lets them through again. Everything made is removed by :meth:`Net.close`.
Needs root, ``ip`` (iproute2) and ``iptables``.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def available() -> str | None:
    """Why this machine cannot run the tier, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"aivbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def iptables(self, *rule: str) -> None:
        subprocess.run(self.exec(["iptables", "-w", *rule]), check=True, capture_output=True)


_NET_NUMBERS = itertools.count(random.randrange(100))


class Net:
    """Hosts on a private subnet; see the module's docstring."""

    def __init__(self) -> None:
        # one tag per net of this process: a net's links go with its namespaces a moment after
        # they are deleted, and a random tag met the previous test's leftovers ("File exists")
        self.tag = f"{os.getpid() % 10000:04d}{next(_NET_NUMBERS) % 100:02d}"
        self.subnet = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"aivb{self.tag}"
        self.address = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        host = Host(name, f"aivb{self.tag}{name}", f"{self.subnet}.{10 + n}")
        veth = f"aivv{self.tag}{n}"
        _ip("netns", "add", host.namespace)
        self.hosts.append(host)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("netns", "exec", host.namespace, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("netns", "exec", host.namespace, "ip", "link", "set", "eth0", "up")
        _ip("netns", "exec", host.namespace, "ip", "link", "set", "lo", "up")
        return host

    def start(self, host: Host, argv: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """A process on ``host`` (its own process group, so that it can be signalled as one)."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(host.exec(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=out, start_new_session=True)
        host.processes.append(process)
        return process

    @staticmethod
    def _rules(a: Host, b: Host | str) -> list[tuple[str, ...]]:
        other = b if isinstance(b, str) else b.address
        return [("INPUT", "-s", other, "-j", "DROP"), ("OUTPUT", "-d", other, "-j", "DROP")]

    def cut(self, a: Host, b: Host | str) -> None:
        """Drop every packet between ``a`` and ``b`` (a host, or an address such as the test's)."""
        for chain, *rule in self._rules(a, b):
            a.iptables("-I", chain, *rule)

    def heal(self, a: Host, b: Host | str) -> None:
        for chain, *rule in self._rules(a, b):
            a.iptables("-D", chain, *rule)

    def slow(self, host: Host, delay: float, loss: float, log: Path) -> None:
        """Every packet ``host`` sends to another host waits ``delay`` seconds (the NFQUEUE
        delayer, tests/delayer.py, in its namespace), and a fraction ``loss`` of them is dropped."""
        queue = self.hosts.index(host) + 1
        self.start(host, [sys.executable, str(Path(__file__).with_name("delayer.py")), "--queue", str(queue),
                          "--delay", str(delay)], dict(os.environ), log)
        time.sleep(0.3)  # bound before any packet waits for it (--queue-bypass until then)
        subnet = f"{self.subnet}.0/24"
        host.iptables("-A", "OUTPUT", "-d", subnet, "-m", "statistic", "--mode", "random", "--probability",
                      str(loss), "-j", "DROP")
        host.iptables("-A", "OUTPUT", "-d", subnet, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass")

    def fast(self, host: Host) -> None:
        """Undo :meth:`slow` (the delayer stays, idle)."""
        host.iptables("-F", "OUTPUT")

    def close(self) -> None:
        for host in self.hosts:
            for process in host.processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for process in host.processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        # anything else left in a namespace (a child that escaped its group) goes with it
        for host in self.hosts:
            pids = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.2)
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
