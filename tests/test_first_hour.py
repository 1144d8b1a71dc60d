"""What a new user met in the first hour (issue 23, points 8-19), each held to what it should be:
the real commands where it takes them (real Redis, workers, stand-in), literal values otherwise."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from aivvm_batch.failure_signs import attempts_warning
from aivvm_batch.options import counted
from aivvm_batch.progress import Progress
from jobs.records import BatchInfo, BatchOptions, BatchState
from tests.test_run import ENV, ROOT, prompts, results, run
from worker.decision import error_text, shortened
from worker.providers.exchange import connection_error, os_cause

COMMAND = [sys.executable, "-m", "aivvm_batch"]


def lines(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"about {i}"}) + "\n" for i in ids))
    return path


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_8_serve_stopped_with_ctrl_c_exits_130_without_aborted(tmp_path: Path) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen([*COMMAND, "serve", "--port", str(number), "--stub", "--workers", "0",
                             "--state-dir", str(tmp_path / "state")], env=ENV, cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stderr is not None
    started = proc.stderr.readline()
    assert "OpenAI API at" in started, started
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the whole group
    rest = proc.stderr.read()
    assert proc.wait(60) == 130
    assert "Aborted!" not in rest and "Traceback" not in rest and "interrupted; serve stopped" in rest


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_9_and_17_duplicate_ids_are_counted_and_worded_as_validate_words_them(tmp_path: Path) -> None:
    path = lines(tmp_path / "in.jsonl", ["a", "b", "a", "c", "b", "d"])
    checked = subprocess.run([*COMMAND, "validate", str(path)], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert "line 3: duplicate id 'a' (first used on line 1)" in checked.stdout
    proc = run(str(path), "-o", str(tmp_path / "out.jsonl"), "--stub", state=tmp_path / "state")
    assert "2 of 6 lines are invalid" in proc.stderr, proc.stderr
    errors = [r["error"]["message"] for r in results(tmp_path / "out.jsonl") if r["error"]]
    assert errors == ["line 3: duplicate id 'a' (first used on line 1)",
                      "line 5: duplicate id 'b' (first used on line 2)"]


def info_with(errors: dict[str, int], failed: int = 0) -> BatchInfo:
    return BatchInfo("b1", "in.jsonl", 0.0, BatchState.RUNNING, BatchOptions(), 50,
                     counts={"failed": failed}, errors=errors)


def test_10_the_alarm_is_raised_only_when_the_failures_agree() -> None:
    assert attempts_warning(info_with({"http_error: HTTP 400": 4, "server_error: HTTP 503": 3})) is None
    said = attempts_warning(info_with({"connection_error: connection refused": 7}))
    assert said == "7 of 7 attempts failed: connection_error: connection refused"


def test_11_a_refused_connection_says_its_cause_first() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9)")

    class Wrapped(Exception):  # as aiohttp's ClientConnectorError keeps the OS error
        os_error = refused

    assert os_cause(Wrapped("Cannot connect to host 127.0.0.1:9 ssl:default")) == "connection refused"
    assert os_cause(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == "name not resolved"
    assert os_cause(ValueError("no OS error in here")) is None
    error = connection_error("http://127.0.0.1:9/api/chat", Wrapped("Cannot connect"))
    assert str(error) == "connection refused: cannot reach http://127.0.0.1:9/api/chat"


@pytest.mark.integration
def test_12_run_dry_run_checks_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\nnot json\n')
    proc = run(str(path), "-o", str(tmp_path / "out.jsonl"), "--dry-run", state=tmp_path / "state")
    assert proc.returncode == 1 and "1 valid, 1 invalid" in proc.stdout and "line 2: not valid JSON" in proc.stdout
    assert not (tmp_path / "state").exists() and not (tmp_path / "out.jsonl").exists()


def test_13_a_note_goes_on_a_line_of_its_own_above_the_bar() -> None:
    stream = io.StringIO()
    progress = Progress(stream, live=True)
    progress.update(info_with({}, failed=1))
    progress.note("aivvm-batch: no worker has taken an item for 60 s")
    progress.close()
    shown = [part.strip() for part in stream.getvalue().replace("\r", "\n").split("\n")]
    assert "aivvm-batch: no worker has taken an item for 60 s" in shown


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_15_a_closed_stderr_costs_the_batch_nothing(tmp_path: Path) -> None:
    path = prompts(tmp_path / "in.jsonl", [f"piped {i}" for i in range(40)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([*COMMAND, "run", str(path), "-o", str(out), "--stub", "--state-dir",
                             str(tmp_path / "state")], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    proc.stderr.readline()
    proc.stderr.close()  # as `run ... 2>&1 | head -1` does
    assert proc.wait(90) == 0
    assert [r["status"] for r in results(out)] == ["ok"] * 40


@pytest.mark.integration
def test_16_a_missing_output_folder_is_refused_not_made(tmp_path: Path) -> None:
    path = prompts(tmp_path / "in.jsonl", ["hi"])
    proc = run(str(path), "-o", str(tmp_path / "no" / "such" / "out.jsonl"), "--stub", state=tmp_path / "state")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not exist (create it first)" in proc.stderr and not (tmp_path / "no").exists()


def test_17_counts_agree_with_their_nouns() -> None:
    assert [counted(n, "item") for n in (0, 1, 2)] == ["0 items", "1 item", "2 items"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_18_run_stub_takes_its_latency_from_the_environment_and_says_where_the_batch_stays(tmp_path: Path) -> None:
    path = prompts(tmp_path / "in.jsonl", [f"slow {i}" for i in range(3)])
    proc = run(str(path), "-o", str(tmp_path / "out.jsonl"), "--stub", state=tmp_path / "state",
               env={"AIVVM_BATCH_STUB_LATENCY": "0.6"})
    assert proc.returncode == 0, proc.stderr
    assert all(r["latency_ms"] >= 550 for r in results(tmp_path / "out.jsonl"))  # the stand-in's, as measured
    assert f"afterwards it is kept in {tmp_path / 'state'}, where the next run of this input resumes it" in proc.stderr
    refused = run(str(path), "-o", str(tmp_path / "out.jsonl"), "--stub", state=tmp_path / "state",
                  env={"AIVVM_BATCH_STUB_LATENCY": "soon"})
    assert refused.returncode == 2 and "AIVVM_BATCH_STUB_LATENCY='soon' is not a number" in refused.stderr


def test_19_long_error_texts_end_at_a_word_with_an_ellipsis() -> None:
    text = error_text("server_error", "word " * 60)
    assert len(text) <= 160 and text.endswith("word…")
    assert shortened("short enough", 160) == "short enough"
    assert shortened("x" * 200, 20) == "x" * 19 + "…"  # no space to cut at: at the limit
