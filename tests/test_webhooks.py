"""Webhooks at a batch's end: signed as Standard Webhooks says (checked by its own package and by
the openai SDK's verifier), tried again with the same id until a 2xx, configured per key."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import standardwebhooks
from openai import OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent

from aivvm_batch.serve.auth import ANONYMOUS, owner_of
from aivvm_batch.serve.records import ApiStatus
from aivvm_batch.serve.webhooks import (Webhooks, batch_event, load_hooks, parse_hooks, secret_key,
                                        signed_headers)
from jobs.errors import ConfigError
from tests.serve_helpers import WebhookReceiver, webhook_receiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_an_event_is_openais_and_its_signature_verifies_with_the_spec_package_and_the_sdk() -> None:
    event = batch_event("batch_abc", ApiStatus.COMPLETED, now=1_700_000_000)
    assert event is not None
    body = event.body()
    headers = signed_headers(event, body, secret_key(SECRET), now=time.time())
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == {
        "id": event.id, "object": "event", "created_at": 1_700_000_000, "type": "batch.completed",
        "data": {"id": "batch_abc"}}
    unwrapped = OpenAI(api_key="unused", webhook_secret=SECRET).webhooks.unwrap(body, headers)
    assert isinstance(unwrapped, BatchCompletedWebhookEvent)
    assert unwrapped.data.id == "batch_abc"
    forged = dict(headers, **{"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()})
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body, forged)


def test_every_end_has_its_event_type_and_nothing_else_does() -> None:
    kinds = {status: getattr(batch_event("b", status, 0), "type", None) for status in ApiStatus}
    assert kinds == {ApiStatus.COMPLETED: "batch.completed", ApiStatus.FAILED: "batch.failed",
                     ApiStatus.EXPIRED: "batch.expired", ApiStatus.CANCELLED: "batch.cancelled",
                     ApiStatus.VALIDATING: None, ApiStatus.IN_PROGRESS: None,
                     ApiStatus.FINALIZING: None, ApiStatus.CANCELLING: None}


def test_hooks_are_read_per_key_and_a_bad_line_is_named_without_its_key(tmp_path: Path) -> None:
    file = tmp_path / "hooks"
    file.write_text(f"# owner's hooks\nsk-alice https://hooks.example/a {SECRET}\n\n"
                    f"- http://127.0.0.1:9/local {SECRET}\n")
    hooks = load_hooks(file)
    assert set(hooks) == {owner_of("sk-alice"), ANONYMOUS}
    assert hooks[owner_of("sk-alice")].url == "https://hooks.example/a"
    for line, said in ((f"sk-bob https://x {SECRET} extra", "three words"),
                       (f"sk-bob ftp://x/a {SECRET}", "http:// or https://"),
                       ("sk-bob https://x/a not-base64!", "base64"),
                       ("sk-bob https://x/a whsec_c2hvcnQ=", "16 bytes")):
        with pytest.raises(ConfigError) as raised:
            parse_hooks(["", line], "hooks.txt")
        assert str(raised.value).startswith("hooks.txt, line 2: ") and said in str(raised.value)
        assert "sk-bob" not in str(raised.value)


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[WebhookReceiver]]]:
    with webhook_receiver() as (url, handler):
        yield url, handler


def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def test_a_refused_delivery_is_tried_again_with_the_same_id_and_a_redirect_is_not_followed(
        receiver: tuple[str, type[WebhookReceiver]]) -> None:
    url, handler = receiver
    handler.answers = [500, 302, 200]
    hooks = parse_hooks([f"sk-alice {url} {SECRET}"], "hooks")
    webhooks = Webhooks(hooks, delays=(0.05, 0.05, 0.05))
    webhooks.batch_ended(owner_of("sk-alice"), "batch_1", ApiStatus.FAILED)
    webhooks.batch_ended(owner_of("sk-bob"), "batch_2", ApiStatus.COMPLETED)
    _wait_for(lambda: len(handler.seen) >= 3 and webhooks.pending() == 0)
    time.sleep(0.2)
    webhooks.stop()
    assert len(handler.seen) == 3
    ids = {headers["webhook-id"] for headers, _ in handler.seen}
    assert len(ids) == 1
    for headers, body in handler.seen:
        assert standardwebhooks.Webhook(SECRET).verify(body, headers)["type"] == "batch.failed"


def test_a_hook_that_never_answers_2xx_is_given_up_after_its_tries(
        receiver: tuple[str, type[WebhookReceiver]], caplog: pytest.LogCaptureFixture) -> None:
    url, handler = receiver
    handler.answers = [503] * 10
    webhooks = Webhooks(parse_hooks([f"- {url} {SECRET}"], "hooks"), delays=(0.02, 0.02))
    webhooks.batch_ended(ANONYMOUS, "batch_9", ApiStatus.EXPIRED)
    _wait_for(lambda: len(handler.seen) >= 3 and webhooks.pending() == 0)
    time.sleep(0.2)
    webhooks.stop()
    assert len(handler.seen) == 3
    assert json.loads(handler.seen[0][1])["type"] == "batch.expired"
    assert any("given up after 3 tries: HTTP 503" in r.getMessage() for r in caplog.records)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """A receiver that answers a byte every half second, without end."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["content-length"]))
        try:
            for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_receiver_that_hangs_holds_only_its_own_events(receiver: tuple[str, type[WebhookReceiver]],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    url, handler = receiver
    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    try:
        hooks = parse_hooks([f"sk-slow http://127.0.0.1:{slow.server_address[1]}/ {SECRET}",
                             f"sk-fast {url} {SECRET}"], "hooks")
        webhooks = Webhooks(hooks, delays=(), try_seconds=2)
        webhooks.batch_ended(owner_of("sk-slow"), "batch_slow", ApiStatus.COMPLETED)
        time.sleep(0.2)
        webhooks.batch_ended(owner_of("sk-fast"), "batch_fast", ApiStatus.COMPLETED)
        _wait_for(lambda: len(handler.seen) >= 1, timeout=1.5)  # well before the slow try's end
        assert [json.loads(body)["data"]["id"] for _, body in handler.seen] == ["batch_fast"]
        _wait_for(lambda: webhooks.pending() == 0, timeout=10)
        assert webhooks.pending() == 0
        assert any("given up after 1 tries: no answer within 2 s" in r.getMessage() for r in caplog.records)
        webhooks.stop()
    finally:
        slow.shutdown()
        slow.server_close()


def test_a_url_that_cannot_be_one_and_a_key_given_twice_are_refused_in_one_line() -> None:
    for lines, said in (([f"sk-a http://[::1 {SECRET}"], "must be http"),
                        ([f"sk-a http://h:99999/ {SECRET}"], "port"),
                        ([f"sk-a http://h/ {SECRET}", f"sk-a http://g/ {SECRET}"], "a second line")):
        with pytest.raises(ConfigError) as raised:
            parse_hooks(lines, "hooks")
        assert said in str(raised.value) and "sk-a" not in str(raised.value)
