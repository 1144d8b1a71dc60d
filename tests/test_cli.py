"""The ``aivvm-batch`` commands as a user runs them: real processes, exit codes, messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import pytest

from aivvm_batch.private_redis import EmbeddedRedis
from aivvm_batch.stub import StubServer
from tests.conftest import WORKER_ENV

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aivvm_batch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd or ROOT)


def lines_file(path: Path, lines: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


@pytest.mark.usefixtures("workers")
def test_submit_status_collect(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    source = lines_file(tmp_path / "in.jsonl", [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}])
    submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert re.fullmatch(r"b[0-9a-f]{15}", batch_id)
    out = tmp_path / "out.jsonl"
    collected = cli("collect", batch_id, "-o", str(out), "--wait", env=env)
    assert collected.returncode == 0, collected.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in results] == [("a", "ok"), ("b", "ok")]
    status = cli("status", batch_id, "--json", env=env)
    assert json.loads(status.stdout)["counts"]["ok"] == 2
    table = cli("status", batch_id, env=env)
    assert "2/2 (100.0%)" in table.stdout
    listed = cli("batches", "--json", env=env)
    assert batch_id in {json.loads(line)["id"] for line in listed.stdout.splitlines()}
    openai_out = tmp_path / "openai.jsonl"
    assert cli("collect", batch_id, "-o", str(openai_out), "--format", "openai", env=env).returncode == 0
    first = json.loads(openai_out.read_text().splitlines()[0])
    assert first["custom_id"] == "a"
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "Stand-in reply to: one"


@pytest.mark.usefixtures("workers")
def test_collect_exits_1_when_any_item_is_not_ok(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    batch_id = cli("submit", str(source), "--base-url", stub.base_url, env=env).stdout.strip()
    out = tmp_path / "out.jsonl"
    collected = cli("collect", batch_id, "-o", str(out), "--wait", env=env)
    assert collected.returncode == 1
    assert [json.loads(x)["status"] for x in out.read_text().splitlines()] == ["ok", "invalid"]


def test_user_mistakes_get_one_line_and_exit_2(redis_url: str, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    assert_clean_error(cli("collect", "bnosuchbatch", "-o", str(tmp_path / "x"), env=env),
                       "bnosuchbatch", "not found")
    assert_clean_error(cli("submit", str(tmp_path / "missing.jsonl"), env=env), "missing.jsonl")
    assert_clean_error(cli("status", "b1", "--redis-url", "redis://127.0.0.1:9/0"), "Redis is unreachable")
    directory = cli("submit", str(tmp_path), env=env)
    assert directory.returncode == 2 and "Traceback" not in directory.stderr
    assert "is a directory" in directory.stderr
    bad_env = cli("status", "b1", env={**env, "AIVVM_BATCH_MAX_RETRIES": "many"})
    assert_clean_error(bad_env, "AIVVM_BATCH_MAX_RETRIES")
    usage = cli("submit", str(tmp_path / "x.jsonl"), "--provider", "nope", env=env)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "nope" in usage.stderr


def test_run_with_the_embedded_default_and_the_stand_in(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    proc = cli("run", str(ROOT / "samples" / "simple.jsonl"), "-o", str(out), "--stub",
               "--state-dir", str(tmp_path / "state"), env={"AIVVM_BATCH_REDIS_URL": ""})
    assert proc.returncode == 0, proc.stderr
    sample_lines = (ROOT / "samples" / "simple.jsonl").read_text().splitlines()
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(results) == len(sample_lines)
    assert all(r["status"] == "ok" and r["output"].startswith("Stand-in reply to: ") for r in results)
    assert f"results: {out}" in proc.stderr
    assert f"{len(sample_lines)}/{len(sample_lines)} done ({len(sample_lines)} ok)" in proc.stderr  # plain progress


def test_run_with_a_state_dir_that_cannot_be_made_says_so_in_one_line(tmp_path: Path) -> None:
    source = ROOT / "samples" / "simple.jsonl"
    proc = cli("run", str(source), "-o", str(tmp_path / "out.jsonl"), "--stub",
               "--state-dir", str(source / "state"), env={"AIVVM_BATCH_REDIS_URL": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--state-dir {source / 'state'}: cannot make it a directory" in proc.stderr


def test_run_interrupted_then_run_again_continues(tmp_path: Path) -> None:
    """SIGINT mid-batch, then the same command: finished items are not sent again."""
    total, concurrency = 40, 4
    source = lines_file(tmp_path / "in.jsonl",
                        [{"id": f"i{i}", "prompt": f"[[stub latency=0.4 chunks=2]] item {i}"} for i in range(total)])
    out = tmp_path / "out.jsonl"
    with StubServer() as stub:
        args = [sys.executable, "-m", "aivvm_batch", "run", str(source), "-o", str(out),
                "--base-url", stub.base_url, "--concurrency", str(concurrency),
                "--state-dir", str(tmp_path / "state")]
        env = {**os.environ, **WORKER_ENV, "AIVVM_BATCH_REDIS_URL": ""}
        first = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while stub.stats()["requests"] < total // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 130, err
        assert not out.exists()
        calls_before = stub.stats()["requests"]
        assert calls_before < total
        second = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        calls = stub.stats()["by_prompt"]
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [f"i{i}" for i in range(total)]
    assert all(r["status"] == "ok" for r in results)
    assert sum(calls.values()) <= total + concurrency
    assert max(calls.values()) <= 2


@pytest.mark.usefixtures("workers")
def test_collect_follow_and_usage_totals(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    source = lines_file(tmp_path / "in.jsonl",
                        [{"id": f"f{i}", "prompt": f"[[stub latency=0.3 chunks=3]] follow {i}"} for i in range(30)])
    batch_id = cli("submit", str(source), "--base-url", stub.base_url, env=env).stdout.strip()
    out = tmp_path / "follow.jsonl"
    followed = cli("collect", batch_id, "-o", str(out), "--follow", env=env)
    assert followed.returncode == 0, followed.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(f"f{i}" for i in range(30))
    status = json.loads(cli("status", batch_id, "--json", env=env).stdout)
    assert status["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in results) > 0
    assert status["usage"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in results) > 0
    assert status["usage"]["items_estimated"] == 30
    assert "prompt tokens" in cli("status", batch_id, env=env).stdout


def test_every_option_has_an_environment_variable_with_the_prefix() -> None:
    from aivvm_batch.cli import main

    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and param.name != "help":
                assert param.envvar and param.envvar.startswith("AIVVM_BATCH_"), (name, param.name)
                assert param.show_envvar, (name, param.name)


@pytest.mark.usefixtures("workers")
def test_cancel_then_retry_the_cancelled_items(redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    source = lines_file(tmp_path / "in.jsonl",
                        [{"id": f"c{i}", "prompt": f"[[stub latency=0.5 chunks=2]] cancel me {i}"} for i in range(150)])
    batch_id = cli("submit", str(source), "--base-url", stub.base_url, env=env).stdout.strip()
    cancelled = cli("cancel", batch_id, env=env)
    assert cancelled.returncode == 0 and re.search(r"\d+ items? cancelled", cancelled.stderr)
    out = tmp_path / "out.jsonl"
    assert cli("collect", batch_id, "-o", str(out), "--wait", env=env).returncode == 1
    statuses = [json.loads(x)["status"] for x in out.read_text().splitlines()]
    assert len(statuses) == 150 and "cancelled" in statuses
    retried = cli("retry", batch_id, "--status", "cancelled", env=env)
    again = statuses.count("cancelled")
    assert retried.returncode == 0 and f"{again} item{'s' if again != 1 else ''} enqueued again" in retried.stderr
    assert cli("collect", batch_id, "-o", str(out), "--wait", env=env, timeout=180).returncode == 0
    assert {json.loads(x)["status"] for x in out.read_text().splitlines()} == {"ok"}


AIVVM_BATCH = str(Path(sys.executable).parent / "aivvm-batch")


def aivvm_batch(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed ``aivvm-batch`` command, as a user types it."""
    return subprocess.run([AIVVM_BATCH, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT)


@pytest.fixture
def lonely_redis(redis_factory: Callable[..., EmbeddedRedis]) -> str:
    """A private Redis that no worker serves."""
    return redis_factory().url


@pytest.mark.parametrize("url", ["redis://h:notaport/0", "http://localhost:6379/0", "redis://h/notadb",
                                 "redis://:s3cret@h:99999/0"])
def test_every_command_refuses_a_malformed_redis_url_in_one_line(url: str, tmp_path: Path) -> None:
    source = lines_file(tmp_path / "in.jsonl", [{"prompt": "x"}])
    commands = [["status", "b1"], ["cancel", "b1"], ["retry", "b1"], ["batches"], ["submit", str(source)],
                ["collect", "b1", "-o", str(tmp_path / "out.jsonl")], ["worker"]]
    for command in commands:
        for proc in (aivvm_batch(*command, "--redis-url", url),
                     aivvm_batch(*command, env={"AIVVM_BATCH_REDIS_URL": url})):
            assert_clean_error(proc, "Redis URL", "is not valid")
            assert "s3cret" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.usefixtures("workers")
def test_n_above_1_is_invalid_and_default_ids_do_not_collide_with_given_ones(
        redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    source = lines_file(tmp_path / "in.jsonl", [
        {"custom_id": "3", "body": {"messages": [{"role": "user", "content": "given id 3"}]}},
        {"id": "two", "prompt": "two choices", "n": 2},
        {"prompt": "no id, line 3"},
        {"id": "one", "prompt": "one choice", "n": 1},
    ])
    submitted = aivvm_batch("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    out = tmp_path / "out.jsonl"
    collected = aivvm_batch("collect", submitted.stdout.strip(), "-o", str(out), "--wait", env=env)
    assert collected.returncode == 1, collected.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["status"]) for r in results] == [
        ("3", "ok"), ("two", "invalid"), ("line-3", "ok"), ("one", "ok")]
    assert results[1]["error"]["message"].startswith("line 2, field 'n': the aivvm provider cannot send n > 1")
    assert results[2]["output"] == "Stand-in reply to: no id, line 3"


@pytest.mark.timeout(90)
def test_collect_wait_with_no_worker_says_so_once_and_times_out(lonely_redis: str, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": lonely_redis, "AIVVM_BATCH_IDLE_WARNING": "1"}
    source = lines_file(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    batch_id = aivvm_batch("submit", str(source), env=env).stdout.strip()
    out = tmp_path / "out.jsonl"
    waited = aivvm_batch("collect", batch_id, "-o", str(out), "--wait", "--timeout", "4", env=env, timeout=60)
    assert waited.returncode == 124, waited.stderr
    assert "Traceback" not in waited.stderr
    warning = "no worker has taken an item for 1 s: start one with aivvm-batch worker"
    assert waited.stderr.count(warning) == 1, waited.stderr
    assert f"batch {batch_id} did not finish within 4 s (0/5 items done)" in waited.stderr
    assert not out.exists()
    followed = aivvm_batch("collect", batch_id, "-o", str(out), "--follow", "--timeout", "2", env=env,
                           timeout=60)
    assert followed.returncode == 124, followed.stderr
    assert out.read_bytes() == b""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["--wait", "--follow"])
def test_ctrl_c_while_collect_waits_exits_130_with_one_line(mode: str, lonely_redis: str,
                                                            tmp_path: Path) -> None:
    env = {**os.environ, "AIVVM_BATCH_REDIS_URL": lonely_redis}
    source = lines_file(tmp_path / "in.jsonl", [{"prompt": "never done"}])
    batch_id = aivvm_batch("submit", str(source), env=env).stdout.strip()
    collector = subprocess.Popen([AIVVM_BATCH, "collect", batch_id, "-o", str(tmp_path / "out.jsonl"), mode],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert collector.stderr is not None
    first_progress = collector.stderr.readline()  # the plain progress line: it is waiting now
    assert f"batch {batch_id}: 0/1 done" in first_progress
    collector.send_signal(signal.SIGINT)
    _, err = collector.communicate(timeout=30)
    assert collector.returncode == 130, err
    assert "Aborted" not in err and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "interrupted" in err, err
