"""``aivvm-batch run`` as people use it: the real command, a real private Redis, real workers,
real HTTP to the stand-in (whose call counter tells what was paid for)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from jobs import keys
from jobs.records import BatchState
from jobs.store import BatchStore
from tests.conftest import WORKER_ENV

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "aivvm_batch", "run"]
# fast retries and short timeouts (tests/conftest.py), and only the private Redis
ENV = {**os.environ, **WORKER_ENV, "AIVVM_BATCH_REDIS_URL": ""}
for _variable in ("AIVVM_BASE_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "AIVVM_API_KEY"):
    ENV.pop(_variable, None)


def run(*args: str, state: Path, stdin: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*COMMAND, *args, "--state-dir", str(state)], input=stdin, capture_output=True,
                          timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"i{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def calls(stub: StubServer) -> int:
    return int(stub.stats()["requests"])


@pytest.fixture
def stub(stub_factory: Callable[..., StubServer]) -> StubServer:
    """A stand-in of each test's own, in place of the shared one: these tests count its calls."""
    return stub_factory()


class Session:
    """A ``run`` started in a session of its own, as a shell starts a foreground job."""

    def __init__(self, args: list[str], state: Path) -> None:
        self.state = state
        self.proc = subprocess.Popen([*COMMAND, *args, "--state-dir", str(state)], env=ENV, cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []

    def ctrl_c(self) -> None:
        """What a terminal does: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def read_until(self, needle: str, timeout: float = 60) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"{needle!r} not said; stderr so far:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        stream: IO[str] | None = self.proc.stderr
        assert stream is not None
        rest = stream.read()
        self.proc.wait(timeout)
        return self.proc.returncode, "".join(self.lines) + rest

    def children(self) -> list[int]:
        """PIDs of the workers and the Redis this run started that are still alive."""
        found = [pid for pid, _ in run_workers(self.state, self.proc.pid) if alive(pid)]
        redis_pid = self.state / "redis" / "redis.pid"
        if redis_pid.exists():
            pid = int(redis_pid.read_text().strip())
            try:
                if b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sessions() -> Iterator[list[Session]]:
    started: list[Session] = []
    yield started
    for session in started:
        session.kill()


def wait_for(predicate: Any, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# 1. Resume identity ---------------------------------------------------------------------------

def test_a_run_against_another_server_keeps_nothing_from_the_stand_in(tmp_path: Path, stub: StubServer) -> None:
    """`make demo` (the stand-in), then a real server: its replies, not the stand-in's."""
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    source = ROOT / "samples" / "simple.jsonl"
    total = len(source.read_text().splitlines())
    demo = run(str(source), "-o", str(out), "--stub", state=state)
    assert demo.returncode == 0, demo.stderr
    real = run(str(source), "-o", str(out), "--base-url", stub.base_url, state=state)
    assert real.returncode == 0, real.stderr
    assert calls(stub) == total
    assert f"nothing kept, all {total} items run again" in real.stderr
    assert all(r["status"] == "ok" for r in results(out))


def test_after_fixing_the_base_url_the_failed_items_are_sent_again(tmp_path: Path, stub: StubServer) -> None:
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    source = prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(3)])
    wrong = run(str(source), "-o", str(out), "--base-url", "http://127.0.0.1:9", state=state)
    assert wrong.returncode == 1, wrong.stderr
    assert {r["status"] for r in results(out)} == {"failed"}
    fixed = run(str(source), "-o", str(out), "--base-url", stub.base_url, state=state)
    assert fixed.returncode == 0, fixed.stderr
    assert [r["status"] for r in results(out)] == ["ok"] * 3
    assert calls(stub) == 3


def test_editing_one_line_pays_for_that_line_only_and_fresh_starts_over(tmp_path: Path,
                                                                        stub: StubServer) -> None:
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    texts = [f"question {i}" for i in range(10)]
    source = prompts(tmp_path / "in.jsonl", texts)
    first = run(str(source), "-o", str(out), "--base-url", stub.base_url, state=state)
    assert first.returncode == 0, first.stderr
    assert calls(stub) == 10
    texts[4] = "question four, edited"
    prompts(source, texts)
    second = run(str(source), "-o", str(out), "--base-url", stub.base_url, state=state)
    assert second.returncode == 0, second.stderr
    assert re.search(r"resuming batch b[0-9a-f]{15}: 9 of 10 results kept, 1 line changed", second.stderr)
    assert stub.stats()["by_prompt"]["question four, edited"] == 1
    assert calls(stub) == 11
    assert results(out)[4]["output"] == "Stand-in reply to: question four, edited"
    fresh = run(str(source), "-o", str(out), "--base-url", stub.base_url, "--fresh", state=state)
    assert fresh.returncode == 0, fresh.stderr
    assert calls(stub) == 21


def test_a_changed_default_model_is_a_changed_request(tmp_path: Path, stub: StubServer) -> None:
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "two", "model": "gpt-4"}\n')
    base = [str(source), "-o", str(out), "--base-url", stub.base_url]
    assert run(*base, "--model", "gpt-4-0613", state=state).returncode == 0
    assert [r["model"] for r in results(out)] == ["gpt-4-0613", "gpt-4"]
    same = run(*base, "--model", "gpt-4-0613", state=state)
    assert "2 of 2 results kept" in same.stderr
    assert calls(stub) == 2
    other = run(*base, "--model", "gpt-3.5-turbo", state=state)
    assert other.returncode == 0, other.stderr
    assert "1 of 2 results kept, 1 line changed" in other.stderr
    assert [r["model"] for r in results(out)] == ["gpt-3.5-turbo", "gpt-4"]
    assert stub.stats()["by_prompt"] == {"one": 2, "two": 1}


def test_the_batch_id_run_prints_works_with_status_collect_and_batches(tmp_path: Path, redis_url: str,
                                                                        stub: StubServer) -> None:
    out = tmp_path / "out.jsonl"
    source = prompts(tmp_path / "in.jsonl", ["one", "two"])
    done = run(str(source), "-o", str(out), "--base-url", stub.base_url, "--redis-url", redis_url,
               "--workers", "1", state=tmp_path / "state")
    assert done.returncode == 0, done.stderr
    match = re.search(r"batch (b[0-9a-f]{15})", done.stderr)
    assert match, done.stderr
    batch_id = match.group(1)
    env = {**ENV, "AIVVM_BATCH_REDIS_URL": redis_url}
    cli = [sys.executable, "-m", "aivvm_batch"]
    status = subprocess.run([*cli, "status", batch_id, "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert json.loads(status.stdout)["counts"]["ok"] == 2
    again = tmp_path / "again.jsonl"
    collected = subprocess.run([*cli, "collect", batch_id, "-o", str(again)], capture_output=True, text=True,
                               env=env, timeout=60)
    assert collected.returncode == 0, collected.stderr
    assert again.read_text() == out.read_text()
    listed = subprocess.run([*cli, "batches"], capture_output=True, text=True, env=env, timeout=60)
    assert batch_id in listed.stdout


# 2. Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_ctrl_c_lets_the_items_in_flight_finish_and_nothing_is_paid_twice(tmp_path: Path, stub: StubServer,
                                                                          sessions: list[Session]) -> None:
    total, concurrency = 60, 8
    source = prompts(tmp_path / "in.jsonl", [f"[[stub latency=1 chunks=2]] item {i}" for i in range(total)])
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    args = [str(source), "-o", str(out), "--base-url", stub.base_url, "--concurrency", str(concurrency),
            "--workers", "2"]
    first = Session(args, state)
    sessions.append(first)
    url = first.read_until("on the private Redis")
    wait_for(lambda: calls(stub) >= total // 3, what="a third of the calls")
    # the private Redis is reachable while the run lasts, with the command it printed
    private = re.search(r"--redis-url (redis://[^\s;]+);", url)
    assert private, url
    batch_id = re.search(r"batch (b[0-9a-f]{15})", url).group(1)  # type: ignore[union-attr]
    status = subprocess.run([sys.executable, "-m", "aivvm_batch", "status", batch_id, "--redis-url",
                             private.group(1)], capture_output=True, text=True, env=ENV, timeout=60)
    assert status.returncode == 0 and batch_id in status.stdout, status.stderr
    # one run per state folder
    assert_clean_error(run(*args, state=state), "another `aivvm-batch run` is using")

    first.ctrl_c()
    said = first.read_until("Ctrl-C again to abandon them")
    assert re.search(r"waiting for \d+ items in flight", said)
    code, err = first.finish()
    assert code == 130, err
    assert "run the same command again to continue" in err and "Traceback" not in err
    assert f"kept in {state} ({out} is written whole, once every item has ended)" in err  # where they are
    assert first.children() == []
    assert not out.exists()
    paid = calls(stub)
    assert paid < total

    second = run(*args, state=state)
    assert second.returncode == 0, second.stderr
    assert re.search(rf"resuming batch {batch_id}: {paid} of {total} results kept", second.stderr), second.stderr
    assert [r["status"] for r in results(out)] == ["ok"] * total
    by_prompt = stub.stats()["by_prompt"]
    assert set(by_prompt) == {f"item {i}" for i in range(total)}
    assert max(by_prompt.values()) == 1
    assert calls(stub) == total


@pytest.mark.timeout(240)
def test_ctrl_c_while_run_submits_keeps_what_its_workers_paid_for(tmp_path: Path, stub: StubServer,
                                                                   sessions: list[Session]) -> None:
    """A large input is still being submitted when the first items are paid: the rest of the input
    is recorded without being sent, and the batch stays, with every reply recorded, to resume."""
    total, concurrency = 200_000, 4
    source = tmp_path / "in.jsonl"
    source.write_text("".join(f'{{"id": "i{i}", "prompt": "[[stub latency=0.1]] item {i}"}}\n' for i in range(total)))
    state = tmp_path / "state"
    session = Session([str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url,
                       "--concurrency", str(concurrency), "--workers", "2"], state)
    sessions.append(session)
    wait_for(lambda: calls(stub) >= 2 * concurrency, what="the first calls")
    session.ctrl_c()
    session.read_until("interrupted while submitting")
    code, err = session.finish(timeout=120)
    assert code == 130 and "Traceback" not in err, err
    paid = calls(stub)
    with EmbeddedRedis(state / "redis") as redis_server:  # the run's own Redis, from its data
        store = BatchStore(redis.Redis.from_url(redis_server.url))
        [batch_id] = store.redis.hvals(keys.RUN_BATCHES)
        info = store.info(batch_id.decode())
    assert info.total == total and info.state is BatchState.CANCELLED
    # each reply paid for is recorded (none is lost to be paid again); nothing else was sent
    assert info.counts.get("ok", 0) == paid, (info.counts, paid)
    assert info.counts.get("cancelled", 0) == total - paid


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_abandons_the_items_in_flight_at_once(tmp_path: Path, stub: StubServer,
                                                               sessions: list[Session]) -> None:
    source = prompts(tmp_path / "in.jsonl", [f"[[stub latency=60 chunks=2]] slow {i}" for i in range(10)])
    state = tmp_path / "state"
    session = Session([str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url,
                       "--concurrency", "4", "--workers", "1"], state)
    sessions.append(session)
    wait_for(lambda: calls(stub) >= 4, what="four calls in flight")
    session.ctrl_c()
    session.read_until("waiting for 4 items in flight")
    started = time.monotonic()
    session.ctrl_c()
    code, err = session.finish(timeout=30)
    # far sooner than the 60 s the items in flight would take
    assert time.monotonic() - started < 30
    assert code == 130, err
    assert "4 items in flight abandoned, to be sent again" in err
    assert "Traceback" not in err
    assert session.children() == []


# 3. Standard streams -------------------------------------------------------------------------

def test_standard_input_and_output(tmp_path: Path, stub: StubServer) -> None:
    state = tmp_path / "state"
    source = prompts(tmp_path / "in.jsonl", ["alpha", "beta", "gamma"])
    piped = run("-", "-o", "-", "--base-url", stub.base_url, state=state, stdin=source.read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert [r["output"] for r in map(json.loads, piped.stdout.splitlines())] == [
        "Stand-in reply to: alpha", "Stand-in reply to: beta", "Stand-in reply to: gamma"]
    assert "results: standard output" in piped.stderr
    assert calls(stub) == 3
    # the same content again: kept; the input was read once and is kept with the batch
    again = run("/dev/stdin", "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url, state=state,
                stdin=source.read_bytes())
    assert again.returncode == 0, again.stderr
    assert "3 of 3 results kept" in again.stderr
    assert calls(stub) == 3
    assert [p.read_bytes() for p in (state / "spool").iterdir()] == [source.read_bytes()]
    # the file itself is another input: all of it runs, none of it is lost
    real = run(str(source), "-o", str(tmp_path / "real.jsonl"), "--base-url", stub.base_url, state=state)
    assert real.returncode == 0, real.stderr
    assert [r["status"] for r in results(tmp_path / "real.jsonl")] == ["ok"] * 3


# 4. Before paying ----------------------------------------------------------------------------

def test_mistakes_are_refused_before_redis_starts_or_anything_is_paid(tmp_path: Path, stub: StubServer) -> None:
    state = tmp_path / "state"
    source = prompts(tmp_path / "in.jsonl", ["one", "two"])
    base = ["--base-url", stub.base_url]
    assert_clean_error(run(str(source), "-o", str(source), *base, state=state), "is the input file")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"prompt": "one"}, {"prompt": "two"}], indent=2))
    assert_clean_error(run(str(array), "-o", str(tmp_path / "o.jsonl"), *base, state=state), "JSON array")
    csv = tmp_path / "in.csv"
    csv.write_text("id,prompt\n1,hello\n")
    assert_clean_error(run(str(csv), "-o", str(tmp_path / "o.jsonl"), *base, state=state), "CSV")
    assert_clean_error(run(str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"), *base,
                           state=state), "missing.jsonl")
    assert_clean_error(run(str(source), "-o", str(tmp_path / "o.jsonl"), "--base-url", "127.0.0.1:8000",
                           state=state), "--base-url 127.0.0.1:8000", "no scheme")
    assert_clean_error(run(str(source), "-o", "/proc/x", *base, state=state), "/proc/x")
    assert calls(stub) == 0
    assert not (state / "redis").exists()
    assert not prestarted_workers(), "the workers started beside the refused runs are left running"
    assert not (tmp_path / "o.jsonl").exists()


# 5. Systematic failures ----------------------------------------------------------------------

FAST_FAILURES = 1000


def test_a_server_that_is_down_is_said_at_once_and_the_run_stops(tmp_path: Path) -> None:
    # items waiting for a retry free their slot, so the first failures end together: enough
    # items that some are left to save when the run sees them
    total = 400
    source = prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(total)])
    out = tmp_path / "out.jsonl"
    down = run(str(source), "-o", str(out), "--base-url", "http://127.0.0.1:9", "--concurrency", "4",
               "--workers", "1", state=tmp_path / "state")
    assert down.returncode == 1, down.stderr
    assert re.search(r"\d+ of \d+ attempts failed: connection_error: connection refused: cannot reach "
                     r"http://127.0.0.1:9/api/chat",
                     down.stderr), down.stderr
    assert "stopped early: the first" in down.stderr
    assert re.search(r"failed attempts: \d+, most often \d+× connection_error", down.stderr)  # progress line
    statuses = [r["status"] for r in results(out)]
    assert len(statuses) == total
    assert statuses.count("failed") >= 8 and statuses.count("cancelled") > 0
    assert set(statuses) == {"failed", "cancelled"}


def test_a_base_url_ending_in_the_protocol_path_is_warned_about(tmp_path: Path, stub: StubServer) -> None:
    # a 404 from the stand-in takes milliseconds: enough items that the run sees the first ones end
    source = prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(FAST_FAILURES)])
    proc = run(str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url + "/api/chat",
               "--workers", "1", "--concurrency", "1", state=tmp_path / "state")
    assert proc.returncode == 1
    assert f"warning: --base-url {stub.base_url}/api/chat: the base URL ends in /api/chat" in proc.stderr
    assert "stopped early" in proc.stderr
    assert "cancelled" in {r["status"] for r in results(tmp_path / "out.jsonl")}


def test_a_missing_api_key_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    source = prompts(tmp_path / "in.jsonl", [f"q{i}" for i in range(FAST_FAILURES)])
    with StubServer(api_key="sk-needed") as keyed:
        proc = run(str(source), "-o", str(tmp_path / "out.jsonl"), "--provider", "openai",
                   "--base-url", keyed.base_url + "/v1", "--workers", "1", "--concurrency", "1",
                   state=tmp_path / "state")
        assert calls(keyed) < FAST_FAILURES
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"attempts failed: (unauthorized|invalid_api_key): HTTP 401.*"
                     r"\(OPENAI_API_KEY is not set in this environment\)", proc.stderr), proc.stderr
    assert "stopped early: the first" in proc.stderr


# 6. Defaults that use the machine ------------------------------------------------------------

def command_lines() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process this machine shows."""
    for entry in Path("/proc").iterdir():
        try:
            yield int(entry.name), (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue


def prestarted_workers() -> list[int]:
    """Processes of ``python -m worker --fork-from-stdin`` started by a run of this checkout (the
    runs here start in ROOT and their workers keep it; another checkout's tests are not ours)."""
    return [pid for pid, args in command_lines() if b"--fork-from-stdin" in args and cwd_of(pid) == ROOT]


def cwd_of(pid: int) -> Path | None:
    try:
        return Path(f"/proc/{pid}/cwd").resolve(strict=True)
    except OSError:
        return None


@pytest.mark.timeout(120)
def test_workers_started_before_their_redis_leave_quietly_when_it_never_comes(tmp_path: Path) -> None:
    workers = WorkerProcesses(concurrencies=[1, 2], log_dir=tmp_path / "logs").prestart()
    processes = list(workers.processes)
    # one process imports for both, and forks them once it is given their Redis
    assert len(processes) == 1 and workers.alive() == 1 and workers.waiting
    workers.stop(timeout=60)
    assert [p.returncode for p in processes] == [0]
    logs = [log.read_text() for log in (tmp_path / "logs").glob("worker-*.log")]
    assert len(logs) == 1 and not any("Traceback" in log for log in logs), logs


@pytest.mark.timeout(60)
def test_a_fork_server_that_died_before_forking_leaves_no_worker_to_wait_for(tmp_path: Path) -> None:
    workers = WorkerProcesses(concurrencies=[1, 2], log_dir=tmp_path / "logs").prestart()
    [forker] = workers.processes
    forker.kill()
    forker.wait()
    workers.start("redis://127.0.0.1:1/0")  # its input is closed: nothing is raised
    assert workers.processes == [] and workers.alive() == 0  # run then says the workers exited


def run_workers(state: Path, run_pid: int) -> list[tuple[int, int]]:
    """(process id, requests in flight) of each worker of the run, as its log says when it starts
    (its name with the host, ``%h`` expanded)."""
    said = re.compile(rf"^worker run{run_pid}-\d+@[^%\s]+: process (\d+), (\d+) requests in flight$", re.M)
    return sorted((int(m[1]), int(m[2])) for log in (state / "logs").glob("worker-*.log")
                  for m in said.finditer(log.read_text(errors="replace")))


def alive(pid: int) -> bool:
    """A live worker process (not a zombie, not another process that took the pid since)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"worker" in cmdline


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.timeout(120)
def test_one_worker_per_core_and_the_concurrency_is_shared(tmp_path: Path, stub: StubServer,
                                                           sessions: list[Session]) -> None:
    source = prompts(tmp_path / "in.jsonl", [f"[[stub latency=30]] slow {i}" for i in range(4)])
    cores = os.cpu_count() or 1
    for number, (extra, count, total) in enumerate([([], cores, 128),
                                                     (["--workers", "2", "--concurrency", "5"], 2, 5)]):
        session = Session([str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url, *extra],
                          tmp_path / f"state{number}")
        sessions.append(session)
        wait_for(lambda: len(run_workers(session.state, session.proc.pid)) == count, what="the workers")
        workers = run_workers(session.state, session.proc.pid)
        # processes of their own, adopted by run (it waits for them, and they die with it)
        assert all(alive(pid) and parent_of(pid) == session.proc.pid for pid, _ in workers), workers
        shares = sorted(share for _, share in workers)
        assert sum(shares) == total and shares[-1] - shares[0] <= 1, shares
        wait_for(lambda: calls(stub) >= 4 * (number + 1), what="the four items in flight")
        session.ctrl_c()
        session.read_until("Ctrl-C again")
        session.ctrl_c()
        assert session.finish()[0] == 130


@pytest.mark.timeout(120)
def test_the_workers_die_with_run_even_when_it_is_killed(tmp_path: Path, stub: StubServer,
                                                        sessions: list[Session]) -> None:
    source = prompts(tmp_path / "in.jsonl", [f"[[stub latency=30]] slow {i}" for i in range(2)])
    session = Session([str(source), "-o", str(tmp_path / "out.jsonl"), "--base-url", stub.base_url,
                       "--workers", "2"], tmp_path / "state")
    sessions.append(session)
    wait_for(lambda: len(run_workers(session.state, session.proc.pid)) == 2, what="the workers")
    wait_for(lambda: calls(stub) >= 2, what="the items in flight")
    workers = [pid for pid, _ in run_workers(session.state, session.proc.pid)]
    assert all(alive(pid) for pid in workers)
    session.kill()  # SIGKILL: run cannot stop them itself
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10, what="the workers to die with run")
