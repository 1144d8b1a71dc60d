"""Input files: sniffing what is plainly not JSON Lines, standard input and pipes, dry runs, defaults.

``sniff`` is pure and tested with literal bytes; the commands run as a user types them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from aivvm_batch.stub import StubServer
from jobs import keys
from jobs.errors import InputFileError
from jobs.inputs import CSV, GZIP, JSON_ARRAY, PLAIN_TEXT, PRETTY_JSON, TSV, UTF16, check_input, sniff, \
    spool, spooled
from jobs.records import ItemRequest

ROOT = Path(__file__).resolve().parent.parent
AIVVM_BATCH = str(Path(sys.executable).parent / "aivvm-batch")
UNREACHABLE = {"AIVVM_BATCH_REDIS_URL": "redis://127.0.0.1:9/0"}


def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([AIVVM_BATCH, *args], input=stdin, capture_output=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def jsonl(*objects: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


# -- sniff ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "hint"), [
    (b'[{"prompt": "a"}, {"prompt": "b"}]\n', JSON_ARRAY),
    (b'[\n  {"prompt": "a"},\n  {"prompt": "b"}\n]\n', JSON_ARRAY),
    (b'[\n{"prompt": "a"}\n]', JSON_ARRAY),
    (b'\xef\xbb\xbf  \n[{"prompt": "a"}]', JSON_ARRAY),
    (b'{\n  "id": "q1",\n  "prompt": "a"\n}\n', PRETTY_JSON),
    (b'{"id": "q1",\n "messages": [\n  {"role": "user", "content": "hi"}\n ]\n}\n', PRETTY_JSON),
    (b"id,prompt\nq1,hello\nq2,\"a, b\"\n", CSV),
    (b"id;prompt\nq1;hello\n", CSV),
    (b"id\tprompt\nq1\thello\n", TSV),
    (b"Write a haiku about queues\nName a colour\n", PLAIN_TEXT),
    ("\ufeff{\"prompt\": \"a\"}\n".encode("utf-16-le"), UTF16),
    ('{"prompt": "a"}\n'.encode("utf-16"), UTF16),
    (gzip.compress(b'{"prompt": "a"}\n'), GZIP),
])
def test_sniff_names_what_is_plainly_not_json_lines(data: bytes, hint: str) -> None:
    assert sniff(data) == hint


@pytest.mark.parametrize("data", [
    b"",
    b"\n\n  \r\n",
    b"\xef\xbb\xbf",
    jsonl({"prompt": "a"}, {"prompt": "b"}),
    b'\xef\xbb\xbf{"prompt": "a"}\r\n',
    # JSON Lines with bad lines: each gets its own invalid result, the file is not refused
    b'{"id": "bad-json", "prompt": "missing the closing brace"\n{"prompt": "fine"}\n',
    b'[1, 2, 3]\n{"prompt": "fine"}\n',
    b'not json\n{"prompt": "fine"}\n',
    b'"a string"\n',
    b"42\n",
    # a first line longer than the sample: nothing to judge it by
    b'{"prompt": "' + b"a" * 70_000,
])
def test_sniff_leaves_json_lines_alone(data: bytes) -> None:
    assert sniff(data) is None


def test_check_input_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_bytes(b'[{"prompt": "a"}]')
    with pytest.raises(InputFileError, match=r"^.*prompts\.json: this looks like a JSON array.*jq -c '\.\[\]'"):
        check_input(path)


# -- spool ----------------------------------------------------------------------------------------


def test_spool_returns_a_regular_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jsonl({"prompt": "a"}))
    assert spool(path, tmp_path / "spool") == path
    assert not (tmp_path / "spool").exists()


def test_spool_copies_a_fifo_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = jsonl(*({"prompt": f"p{i}"} for i in range(1000)))
    writer = threading.Thread(target=fifo.write_bytes, args=(data,))
    writer.start()
    copy = spool(fifo, tmp_path / "spool")
    writer.join(10)
    assert copy.parent == tmp_path / "spool"
    assert copy.read_bytes() == data
    assert copy.read_bytes() == data, "the copy can be read again"


def test_spool_reads_standard_input_for_a_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl({"prompt": "from stdin"})
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    with spooled("-") as path:
        assert path.read_bytes() == data
        kept = path
    assert not kept.exists(), "the copy is removed afterwards"


def test_spool_refuses_a_directory_and_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="Is a directory"):
        spool(tmp_path, tmp_path / "spool")
    with pytest.raises(InputFileError, match="missing.jsonl"):
        spool(tmp_path / "missing.jsonl", tmp_path / "spool")


# -- the commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "needle"), [
    (b'[\n  {"prompt": "a"},\n  {"prompt": "b"}\n]\n', "jq -c '.[]'"),
    (b"id,prompt\nq1,hello\n", "looks like CSV"),
    (b'{\n  "prompt": "a"\n}\n', "pretty-printed JSON"),
])
def test_submit_refuses_what_is_not_json_lines_before_touching_redis(content: bytes, needle: str,
                                                                     tmp_path: Path) -> None:
    path = tmp_path / "prompts.json"
    path.write_bytes(content)
    for args in (["submit", str(path)], ["submit", "-"], ["submit", "--dry-run", str(path)],
                 ["validate", str(path)]):
        proc = cli(*args, env=UNREACHABLE, stdin=content)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert needle in proc.stderr and "unreachable" not in proc.stderr, proc.stderr


MIXED = (jsonl({"id": "a", "prompt": "fine"}) + b'{"id": "b", "prompt": \n'
         + jsonl({"id": "c", "prompt": "x", "n": 2}, {"id": "a", "prompt": "again"},
                 {"prompt": "y", "colour": 1, "size": 2}, {"prompt": "ok"}))


@pytest.mark.parametrize("command", [["submit", "--dry-run"], ["validate"]])
def test_a_dry_run_reports_every_problem_and_needs_no_redis(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(MIXED)
    proc = cli(*command, str(path), env=UNREACHABLE)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == f"{path}: 6 lines, 2 valid, 4 invalid"
    assert out[1].startswith("line 2: not valid JSON")
    assert out[2] == "line 3, field 'n': the aivvm provider cannot send n > 1 (one reply a request); use --provider openai"
    assert out[3] == "line 4: duplicate id 'a' (first used on line 1)"
    assert out[4].startswith("line 5: unknown fields 'colour', 'size'")
    assert len(out) == 5
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl({"prompt": "a"}, {"prompt": "b"}))
    clean = cli(*command, str(good), env=UNREACHABLE)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout == f"{good}: 2 lines, 2 valid, 0 invalid\n"
    piped = cli(*command, "-", env=UNREACHABLE, stdin=MIXED)
    assert piped.returncode == 1 and piped.stdout.startswith("standard input: 6 lines, 2 valid, 4 invalid")


@pytest.mark.integration
@pytest.mark.usefixtures("workers")
def test_submit_reads_standard_input_and_collect_writes_standard_output(
        redis_url: str, stub: StubServer, tmp_path: Path) -> None:
    env = {"AIVVM_BATCH_REDIS_URL": redis_url}
    data = jsonl({"id": "s1", "prompt": "piped one"}, {"id": "s2", "prompt": "piped two"})
    for source in ("-", "/dev/stdin"):
        submitted = cli("submit", source, "--base-url", stub.base_url, env=env, stdin=data)
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.strip()
        collected = cli("collect", batch_id, "-o", "-", "--wait", env=env)
        assert collected.returncode == 0, collected.stderr
        results = [json.loads(line) for line in collected.stdout.splitlines()]
        assert [(r["id"], r["status"], r["output"]) for r in results] == [
            ("s1", "ok", "Stand-in reply to: piped one"), ("s2", "ok", "Stand-in reply to: piped two")]
        assert "standard output: 2/2 done (2 ok)" in collected.stderr
    assert not list(Path(ROOT).glob("stdin.*")), "the copy of standard input is not left behind"


@pytest.mark.integration
def test_defaults_from_options_and_environment_reach_the_stored_requests(
        redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "defaults.jsonl"
    path.write_bytes(jsonl(
        {"id": "bare", "prompt": "no settings"},
        {"id": "own", "prompt": "own settings", "model": "gpt-3.5-turbo", "temperature": 1.5,
         "max_tokens": 9, "system_message": "Own system."},
        {"id": "sys", "messages": [{"role": "system", "content": "Led."}, {"role": "user", "content": "q"}]},
        {"custom_id": "batch", "body": {"messages": [{"role": "user", "content": "b"}],
                                        "metadata": {"team": "red"}}},
    ))
    by_option = cli("submit", str(path), "--model", "gpt-4", "--temperature", "0.2", "--max-tokens", "64",
                    "--system", "Be brief.", env={"AIVVM_BATCH_REDIS_URL": redis_url})
    by_env = cli("submit", str(path), env={"AIVVM_BATCH_REDIS_URL": redis_url, "AIVVM_BATCH_MODEL": "gpt-4",
                                           "AIVVM_BATCH_TEMPERATURE": "0.2", "AIVVM_BATCH_MAX_TOKENS": "64",
                                           "AIVVM_BATCH_SYSTEM": "Be brief."})
    client = redis.Redis.from_url(redis_url)
    for proc in (by_option, by_env):
        assert proc.returncode == 0, proc.stderr
        batch_id = proc.stdout.strip()
        stored = client.hgetall(keys.requests(batch_id))
        requests = {r.id: r for r in (ItemRequest.from_json(v) for v in stored.values())}
        bare, own, led, batch = requests["bare"], requests["own"], requests["sys"], requests["batch"]
        assert (bare.model, bare.temperature, bare.system_message, bare.params) == (
            "gpt-4", 0.2, "Be brief.", (("max_tokens", 64),))
        assert (own.model, own.temperature, own.system_message, own.params) == (
            "gpt-3.5-turbo", 1.5, "Own system.", (("max_tokens", 9),))
        assert led.system_message is None, "a line with its own system message keeps it"
        assert (batch.model, batch.metadata) == ("gpt-4", (("team", "red"),))
        client.delete(*[k for k in client.scan_iter(f"*{batch_id}*")])
    bad = cli("submit", str(path), "--temperature", "3", env={"AIVVM_BATCH_REDIS_URL": redis_url})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
