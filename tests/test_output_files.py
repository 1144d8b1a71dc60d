"""Where results are written: links, devices, standard output, the input file, modes (jobs/output.py).

The command-line tests run ``aivvm-batch`` as a user types it, in a subprocess, on a
real batch (the session's Redis, worker process and stand-in provider).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aivvm_batch.stub import StubServer
from jobs.errors import ConfigError
from jobs.output import Kind, check_output, default_mode, open_output, resolve, write_atomically

ROOT = Path(__file__).resolve().parent.parent
AIVVM_BATCH = str(Path(sys.executable).parent / "aivvm-batch")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, umask: int | None = None,
        stdout: object = subprocess.PIPE, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``aivvm-batch ARGS`` as a user runs it (optionally with another umask or stdout)."""
    return subprocess.run([AIVVM_BATCH, *args], text=True, timeout=timeout, cwd=cwd, stdout=stdout,
                          stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))  # type: ignore[call-overload]


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# -- the library, on real files ---------------------------------------------------------------


def test_check_output_refuses_the_input_file_also_through_links(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "keep me"}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    hard = tmp_path / "hard.jsonl"
    os.link(source, hard)
    for output in (source, link, hard, tmp_path / "." / "in.jsonl"):
        with pytest.raises(ConfigError, match="is the input file"):
            check_output(output, source)
    check_output(tmp_path / "other.jsonl", source)
    check_output("-", source)
    check_output(source, "-")


def test_check_output_refuses_a_directory_and_an_unusable_parent(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="(?i)not a directory"):
        check_output(blocker / "sub" / "out.jsonl")
    with pytest.raises(ConfigError, match="the folder .*new/deeper does not exist"):  # as cp and curl -o
        check_output(tmp_path / "new" / "deeper" / "out.jsonl")
    assert not (tmp_path / "new").exists(), "checking creates nothing"


def test_write_atomically_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    link = tmp_path / "link.jsonl"
    link.symlink_to("real.jsonl")
    write_atomically(link, [b"new\n"])
    assert link.is_symlink() and os.readlink(link) == "real.jsonl"
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640, "a replaced file keeps its mode"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]


def test_write_atomically_to_a_dangling_link_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "sub" / "made.jsonl")
    with pytest.raises(ConfigError, match="sub does not exist"):  # its folder is not made
        check_output(link)
    (tmp_path / "sub").mkdir()
    check_output(link)
    write_atomically(link, [b"x\n"])
    assert link.is_symlink()
    assert (tmp_path / "sub" / "made.jsonl").read_text() == "x\n"
    assert stat.S_IMODE((tmp_path / "sub" / "made.jsonl").stat().st_mode) == default_mode()


def test_a_failure_while_writing_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")

    def chunks() -> Iterator[bytes]:
        yield b"partial\n"
        raise ConfigError("item 3 has no result yet")

    with pytest.raises(ConfigError):
        write_atomically(out, chunks())
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_devices_and_descriptors_are_written_in_place(tmp_path: Path) -> None:
    assert resolve("/dev/null").kind is Kind.SPECIAL
    assert resolve("-").kind is Kind.DESCRIPTOR and resolve("-").fd == 1
    assert resolve("/dev/stdout").fd == 1
    assert resolve(f"/proc/self/fd/{2}").fd == 2
    write_atomically("/dev/null", [b"gone\n"])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert resolve(fifo).kind is Kind.SPECIAL
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with open_output(fifo) as stream:
            stream.write(b"through the fifo\n")
        assert os.read(reader, 100) == b"through the fifo\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_batch(redis_url: str, workers: object, stub: StubServer,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """A finished batch of three ok items, submitted and awaited with the real commands."""
    source = tmp_path_factory.mktemp("out-batch") / "in.jsonl"
    source.write_text("".join(json.dumps({"id": f"o{i}", "prompt": f"out {i}"}) + "\n" for i in range(3)))
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    submitted = cli("submit", str(source), "--base-url", stub.base_url, env=env)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    first = source.parent / "first.jsonl"
    waited = cli("collect", batch_id, "-o", str(first), "--wait", env=env)
    assert waited.returncode == 0, waited.stderr
    return batch_id, first.read_text().splitlines()


@pytest.mark.integration
def test_collect_through_a_symlink_writes_its_target_and_keeps_the_link(
        finished_batch: tuple[str, list[str]], redis_url: str, tmp_path: Path) -> None:
    batch_id, lines = finished_batch
    target = tmp_path / "results" / "real.jsonl"
    target.parent.mkdir()
    target.write_text("stale\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    proc = cli("collect", batch_id, "-o", str(link), env={"AIVVM_BATCH_REDIS_URL": redis_url})
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink(), "the link was replaced by a regular file"
    assert target.read_text().splitlines() == lines


@pytest.mark.integration
def test_collect_dash_writes_standard_output_and_reports_on_stderr(
        finished_batch: tuple[str, list[str]], redis_url: str, tmp_path: Path) -> None:
    batch_id, lines = finished_batch
    proc = cli("collect", batch_id, "-o", "-", env={"AIVVM_BATCH_REDIS_URL": redis_url}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == lines
    assert "standard output: 3/3 done (3 ok)" in proc.stderr
    assert not (tmp_path / "-").exists()
    followed = cli("collect", batch_id, "-o", "-", "--follow", env={"AIVVM_BATCH_REDIS_URL": redis_url},
                   cwd=tmp_path)
    assert followed.returncode == 0, followed.stderr
    assert sorted(followed.stdout.splitlines()) == sorted(lines)


@pytest.mark.integration
def test_collect_to_dev_stdout_writes_the_descriptor_and_keeps_the_device(
        finished_batch: tuple[str, list[str]], redis_url: str, tmp_path: Path) -> None:
    """As root this replaced the /dev/stdout symlink with a regular file; a >> redirect is kept."""
    batch_id, lines = finished_batch
    before = os.lstat("/dev/stdout")
    appended = tmp_path / "appended.jsonl"
    appended.write_text("kept line\n")
    try:
        with open(appended, "a") as stdout:
            proc = cli("collect", batch_id, "-o", "/dev/stdout", env={"AIVVM_BATCH_REDIS_URL": redis_url},
                       stdout=stdout)
        after = os.lstat("/dev/stdout")
    finally:
        _repair_dev_stdout(before)
    assert proc.returncode == 0, proc.stderr
    assert appended.read_text().splitlines() == ["kept line", *lines]
    assert stat.S_ISLNK(after.st_mode) and (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)
    piped = cli("collect", batch_id, "-o", "/dev/stdout", env={"AIVVM_BATCH_REDIS_URL": redis_url})
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == lines


def _repair_dev_stdout(before: os.stat_result) -> None:
    """A regression (as root) replaces the machine's /dev/stdout link: put the link back."""
    if stat.S_ISLNK(before.st_mode) and not os.path.islink("/dev/stdout"):
        os.unlink("/dev/stdout")
        os.symlink("/proc/self/fd/1", "/dev/stdout")


@pytest.mark.integration
def test_result_files_have_the_umask_mode_from_collect_and_follow(
        finished_batch: tuple[str, list[str]], redis_url: str, tmp_path: Path) -> None:
    batch_id, _ = finished_batch
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    whole, followed = tmp_path / "whole.jsonl", tmp_path / "followed.jsonl"
    assert cli("collect", batch_id, "-o", str(whole), env=env, umask=0o027).returncode == 0
    assert cli("collect", batch_id, "-o", str(followed), "--follow", env=env, umask=0o027).returncode == 0
    assert stat.S_IMODE(whole.stat().st_mode) == 0o640
    assert stat.S_IMODE(followed.stat().st_mode) == 0o640


@pytest.mark.integration
def test_collect_with_a_mistyped_batch_or_redis_down_leaves_the_output_alone(
        redis_url: str, tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious results\n" * 1000)
    size = keep.stat().st_size
    for args, needle in [
        (["--follow"], "not found"),
        (["--wait"], "not found"),
        ([], "not found"),
    ]:
        proc = cli("collect", "bmistyped000000", "-o", str(keep), *args,
                   env={"AIVVM_BATCH_REDIS_URL": redis_url})
        assert_clean_error(proc, needle)
        assert keep.stat().st_size == size, args
    down = cli("collect", "b0123456789abcd", "-o", str(keep), "--follow",
               env={"AIVVM_BATCH_REDIS_URL": "redis://127.0.0.1:9/0"})
    assert_clean_error(down, "Redis is unreachable")
    assert keep.stat().st_size == size


@pytest.mark.integration
def test_collect_refuses_an_output_it_cannot_write_before_waiting(
        finished_batch: tuple[str, list[str]], redis_url: str, tmp_path: Path) -> None:
    batch_id, _ = finished_batch
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = cli("collect", batch_id, "-o", str(blocker / "out.jsonl"), "--follow",
               env={"AIVVM_BATCH_REDIS_URL": redis_url})
    assert_clean_error(proc, "ot a directory")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_run_refuses_its_input_file_as_output(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    content = '{"id": "a", "prompt": "keep me"}\n'
    source.write_text(content)
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    for output in (source, link):
        proc = cli("run", str(source), "-o", str(output), "--stub", "--state-dir", str(tmp_path / "state"),
                   env={"AIVVM_BATCH_REDIS_URL": ""})
        assert_clean_error(proc, "is the input file")
        assert source.read_text() == content
    assert link.is_symlink()
