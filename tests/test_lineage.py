"""worker.lineage in real processes: a child of the fork server is adopted by its subreaper
(``run``) and then dies with it, or, its ``run`` gone, gives up at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A process (standing for `run`) forks a fork server, which forks a worker and exits; the worker
# waits for its adoption by the first process and prints what it found and how long it waited.
FAMILY = textwrap.dedent("""
    import os, sys, time
    from worker.lineage import adopt_orphans, adopted_by
    if sys.argv[1] == "reaper":
        assert adopt_orphans()
    run = os.getpid()
    reader, writer = os.pipe()
    server = os.fork()
    if server == 0:
        forker = os.getpid()
        if os.fork() == 0:
            time.sleep(0.2)  # the fork server has exited meanwhile
            started = time.monotonic()
            adopted = adopted_by(run, forker, timeout=5)
            os.write(writer, f"{adopted} {time.monotonic() - started:.3f} {os.getppid() == run}".encode())
            os._exit(0)
        os._exit(0)
    os.waitpid(server, 0)
    os.close(writer)
    print(os.read(reader, 100).decode())
    if sys.argv[1] == "reaper":
        os.wait()  # the adopted worker is this process's to wait for
""")


def family(role: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", FAMILY, role], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, check=True)
    return done.stdout.split()


@pytest.mark.timeout(60)
def test_a_worker_is_adopted_by_the_subreaper_that_started_its_fork_server() -> None:
    adopted, waited, parent_is_run = family("reaper")
    assert adopted == "True" and parent_is_run == "True"
    assert float(waited) < 1


@pytest.mark.timeout(60)
def test_a_worker_whose_run_cannot_adopt_it_gives_up_at_once() -> None:
    adopted, waited, parent_is_run = family("not-a-reaper")  # the orphan goes to another reaper
    assert adopted == "False" and parent_is_run == "False"
    assert float(waited) < 1  # not the whole 5 s timeout
