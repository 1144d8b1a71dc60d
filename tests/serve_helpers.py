"""Starting ``aivvm-batch serve`` as a real process for the serve tests."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from aivvm_batch.private_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "expired", "cancelled")


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        self.api = self.base + "/v1"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(*args: str, env: dict[str, str] | None = None, log_dir: Path,
            start_timeout: float = 30.0) -> Iterator[Served]:
    """``python -m aivvm_batch.serve --port <free> ARGS``, until it answers /health; SIGTERM at the end."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "aivvm_batch.serve", "--port", str(port), *args],
                                   cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, start_new_session=True)
    served = Served(process, port, log)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}: {served.log_text()}")
            try:
                if requests.get(served.base + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not answer in {start_timeout}s: {served.log_text()}")
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def with_db(redis_url: str, db: int) -> str:
    parts = urlsplit(redis_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return path


def request_line(custom_id: str, content: str, model: str = "gpt-3.5-turbo") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}]}}


def wait_for(client: Any, batch_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}")
        time.sleep(0.2)


def stalled_upload(port: int, key: str, sent: int) -> socket.socket:
    """An upload whose client sends its headers and ``sent`` bytes of a larger file, then nothing."""
    head = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n")
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
                       + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: "
                       + str(len(head) + 2 * sent).encode() + b"\r\n\r\n" + head + b"{}\n" * (sent // 3))
    return connection


class WebhookReceiver(http.server.BaseHTTPRequestHandler):
    """A webhook's receiver: keeps what it is sent (``seen``) and answers ``answers`` in turn (then 200;
    a 301/302 points elsewhere)."""

    answers: list[int]
    seen: list[tuple[dict[str, str], bytes]]

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status = self.answers.pop(0) if self.answers else 200
        self.send_response(status)
        if status in (301, 302):
            self.send_header("location", "http://127.0.0.1:9/elsewhere")
        else:
            self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, type[WebhookReceiver]]]:
    """A receiver on a free port of loopback: its URL and its handler class (``answers``, ``seen``)."""
    handler = type("Receiver", (WebhookReceiver,), {"answers": [], "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()
