"""The page at ``/`` in a real headless Chromium (Debian's ``chromium`` package).

The page's scripts run before the DOM is dumped (``--virtual-time-budget``); the
screenshot is decoded here (a small PNG decoder, no imaging library) and checked
for size and content. Skipped where no Chromium is installed (``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
from openai import OpenAI

from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from tests.serve_helpers import Served, request_line, serving, wait_for, write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install -y chromium)")]

ALICE, BOB = "sk-page-alice", "sk-page-bob"
WIDTH, HEIGHT = 1280, 720


@pytest.fixture(scope="module")
def server(redis_url: str, stub: StubServer, workers: WorkerProcesses,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", stub.base_url + "/v1",
                 env={"AIVVM_BATCH_API_KEYS": f"{ALICE},{BOB}"},
                 log_dir=tmp_path_factory.mktemp("serve-page")) as served:
        yield served


def chromium(tmp_path: Path, *args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", f"--virtual-time-budget={budget_ms}",
         *args], capture_output=True, text=True, timeout=120, check=True)


class Rows(HTMLParser):
    """The batch rows of the dumped DOM: id -> attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, object]] = {}
        self.current: dict[str, object] | None = None
        self.body: dict[str, str | None] = {}
        self.forms: dict[str, bool] = {}
        self.workers: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "form":
            self.forms[a.get("id") or ""] = "hidden" in a
        if tag == "p" and a.get("id") == "workers":
            self.workers = a
        if tag == "tr" and (a.get("id") or "").startswith("batch-"):
            self.current = {"status": a.get("data-status"), "text": [], "links": [], "bar": None}
            self.rows[(a["id"] or "")[len("batch-"):]] = self.current
        elif self.current is not None:
            if a.get("role") == "progressbar":
                self.current["bar"] = (int(a["aria-valuenow"] or 0), int(a["aria-valuemax"] or 0))
            if tag == "a":
                self.current["links"].append(a.get("data-file"))  # type: ignore[attr-defined]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.current is not None and data.strip():
            self.current["text"].append(data.strip())  # type: ignore[attr-defined]


def dump(tmp_path: Path, url: str, budget_ms: int = 5000) -> Rows:
    parser = Rows()
    parser.feed(chromium(tmp_path, "--dump-dom", url, budget_ms=budget_ms).stdout)
    return parser


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered RGB(A) rows of an 8-bit, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + chunk) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - bpp] if x >= bpp else 0
            up, corner = previous[x], (previous[x - bpp] if x >= bpp else 0)
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line[i] for i in range(stride) if i % bpp < 3))
        previous = line
    return width, height, rows


def test_page_shows_progress_counts_errors_and_downloads(server: Served, tmp_path: Path) -> None:
    api = OpenAI(base_url=server.api, api_key=ALICE, max_retries=0)
    finished_lines: list[Any] = [request_line(f"f{i}", f"fast {i}") for i in range(6)]
    finished_lines += [b"not json", request_line("flaky", "[[stub fault=status code=503 times=1]] flaky")]
    finished = api.batches.create(
        input_file_id=api.files.create(file=write_jsonl(tmp_path / "f.jsonl", finished_lines).open("rb"),
                                       purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    finished = wait_for(api, finished.id)
    assert finished.status == "completed"
    slow_lines = [request_line(f"s{i}", f"[[stub latency=1]] slow {i}") for i in range(200)]
    running = api.batches.create(
        input_file_id=api.files.create(file=write_jsonl(tmp_path / "s.jsonl", slow_lines).open("rb"),
                                       purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(api, running.id, ("in_progress",), timeout=30)
    try:
        page = dump(tmp_path, f"{server.base}/#key={ALICE}")
        assert int(page.body.get("data-refreshes") or 0) >= 2, "the page polls while a batch runs"
        assert int(page.workers.get("data-live") or 0) >= 1 and "hidden" not in page.workers, page.workers
        row = page.rows[running.id]
        assert row["status"] == "in_progress"
        bar: Any = row["bar"]
        done, total = bar
        assert total == 200 and 0 <= done < 200
        assert re.search(rf"{done} / 200 \(\d+%\)", " ".join(row["text"]))  # type: ignore[arg-type]
        assert row["links"] == [running.input_file_id]

        row = page.rows[finished.id]
        text = " ".join(row["text"])  # type: ignore[arg-type]
        assert row["status"] == "completed" and row["bar"] == (8, 8)
        assert "ok: 7" in text and "invalid: 1" in text
        assert row["links"] == [finished.input_file_id, finished.output_file_id, finished.error_file_id]
        shown = requests.get(server.base + "/ui/batches", headers={"Authorization": f"Bearer {ALICE}"},
                             timeout=10).json()
        errors = next(r["errors"] for r in shown["batches"] if r["batch"]["id"] == finished.id)
        assert errors, "the retried 503 is counted among the batch's errors"
        for error in errors:
            noun = "attempt" if error["count"] == 1 else "attempts"
            assert f"{error['count']} {noun}: {error['text']}" in text  # attempts, beside counts of items

        shot = tmp_path / "page.png"
        chromium(tmp_path, f"--screenshot={shot}", f"{server.base}/#key={ALICE}")
        width, height, rows = decode_png(shot.read_bytes())
        assert (width, height) == (WIDTH, HEIGHT)
        pixels = Counter(row[x:x + 3] for row in rows[::4] for x in range(0, len(row), 12))
        background, count = pixels.most_common(1)[0]
        assert count < 0.97 * sum(pixels.values()) and len(pixels) > 20, "the screenshot is blank"
        blue = sum(n for rgb, n in pixels.items() if rgb[2] > 180 and rgb[0] < 90)
        assert blue > 0, "no progress bar fill in the screenshot"
    finally:
        api.batches.cancel(running.id)
    assert wait_for(api, running.id).status == "cancelled"
    again = dump(tmp_path, f"{server.base}/#key={ALICE}", budget_ms=2000)
    assert again.rows[running.id]["status"] == "cancelled"


def test_page_without_a_key_asks_for_one_and_a_key_sees_only_its_batches(server: Served, tmp_path: Path) -> None:
    alice = OpenAI(base_url=server.api, api_key=ALICE, max_retries=0)
    batch = alice.batches.create(
        input_file_id=alice.files.create(file=write_jsonl(tmp_path / "a.jsonl", [request_line("a", "hi")]).open("rb"),
                                         purpose="batch").id,
        endpoint="/v1/chat/completions", completion_window="24h")
    anonymous = dump(tmp_path, server.base + "/", budget_ms=2000)
    assert anonymous.forms.get("login") is False and not anonymous.rows
    bob = dump(tmp_path, f"{server.base}/#key={BOB}", budget_ms=2000)
    assert batch.id not in bob.rows and bob.forms.get("login") is True
    page = requests.get(server.base + "/", timeout=10)
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert ALICE not in json.dumps(dict(page.headers))
    wait_for(alice, batch.id)
