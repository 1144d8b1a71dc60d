"""run's fork server started from the command's first line, and taken over by run only when
its options agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from aivvm_batch import early


@pytest.mark.parametrize(("args", "expected"), [
    ([], ".aivvm-batch"),
    (["in.jsonl", "-o", "out.jsonl"], ".aivvm-batch"),
    (["in.jsonl", "--state-dir", "/tmp/s1"], "/tmp/s1"),
    (["--state-dir=/tmp/s2", "in.jsonl"], "/tmp/s2"),
    (["--state-dir", "/tmp/a", "--state-dir", "/tmp/b"], "/tmp/b"),  # the last one, as click takes it
    (["in.jsonl", "--state-dir"], ".aivvm-batch"),  # no value: click refuses the line anyway
    (["in.jsonl", "--state-dir="], "."),  # empty: the current directory, as click takes it
])
def test_the_state_dir_is_read_as_run_reads_it(args: list[str], expected: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(early.STATE_DIR_VARIABLE, raising=False)
    assert early.state_dir_of(args) == Path(expected)


def test_the_state_dir_variable_stands_in_for_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(early.STATE_DIR_VARIABLE, "/tmp/from-env")
    assert early.state_dir_of(["in.jsonl"]) == Path("/tmp/from-env")
    assert early.state_dir_of(["in.jsonl", "--state-dir", "/tmp/given"]) == Path("/tmp/given")


@pytest.mark.parametrize("argv", [[], ["submit", "in.jsonl"], ["run", "--help"], ["run", "in.jsonl", "-h"],
                                  ["run", "in.jsonl", "-o", "o", "--dry-run"], ["run", "--", "-in.jsonl"], ["run"],
                                  ["run", "in.jsonl"], ["run", "in.jsonl", "--stub", "--fresh"]])
def test_nothing_starts_but_for_a_run_that_works(argv: list[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(early.STATE_DIR_VARIABLE, str(tmp_path))
    early.start_for(argv)
    assert early.taken(tmp_path / "logs") is None
    assert not (tmp_path / "logs").exists()


@pytest.mark.integration
def test_run_takes_the_fork_server_over_only_where_its_logs_agree(tmp_path: Path) -> None:
    early.start_for(["run", "in.jsonl", "-o", "out.jsonl", "--state-dir", str(tmp_path / "a")])
    workers = early.taken(tmp_path / "a" / "logs")
    assert workers is not None and workers.waiting and workers.alive() == 1
    workers.kill()
    assert workers.alive() == 0

    early.start_for(["run", "in.jsonl", "--output=out.jsonl", "--state-dir", str(tmp_path / "b")])
    started = early._started
    assert started is not None and started.alive() == 1
    assert early.taken(tmp_path / "elsewhere" / "logs") is None  # not run's: ended
    assert started.alive() == 0 and early.taken(tmp_path / "b" / "logs") is None


def test_the_command_goes_through_the_early_start() -> None:
    from importlib.metadata import entry_points

    [script] = [e for e in entry_points(group="console_scripts") if e.name == "aivvm-batch"]
    assert script.value == "aivvm_batch.early:main"


@pytest.mark.integration
def test_the_installed_command_runs_a_batch(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    command = Path(sys.executable).parent / "aivvm-batch"
    if not command.exists():
        pytest.skip("no aivvm-batch script beside this Python (not installed in this environment)")
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"early {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([str(command), "run", str(source), "-o", str(out), "--stub", "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AIVVM_BATCH_REDIS_URL": ""})
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["status"] for line in out.read_text().splitlines()] == ["ok"] * 5
