"""Operating ``serve``: webhooks at a batch's end (per key, signed, verified by the spec's package and
the openai SDK) and /metrics, scraped by a real Prometheus (Debian's) where one is installed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import standardwebhooks
from openai import OpenAI
from openai.types.webhooks import BatchCompletedWebhookEvent, BatchFailedWebhookEvent

from aivvm_batch.private_redis import free_port
from aivvm_batch.serve.metrics_api import may_scrape
from aivvm_batch.stub import StubServer
from aivvm_batch.workers import WorkerProcesses
from tests.serve_helpers import Served, request_line, serving, wait_for, webhook_receiver, write_jsonl

pytestmark = pytest.mark.integration

ALICE, BOB = "sk-alice-ops-key", "sk-bob-ops-key"
METRICS_TOKEN = "metrics-ops-token"
SECRET = "whsec_" + base64.b64encode(b"ops-webhook-secret-0123456789").decode()


@pytest.fixture(scope="module")
def hook() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    with webhook_receiver() as (url, handler):
        yield url, handler.seen


@pytest.fixture(scope="module")
def server(redis_url: str, stub: StubServer, workers: WorkerProcesses, hook: tuple[str, list[object]],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve with two keys, a webhook for ALICE only; the shared worker runs its items."""
    folder = tmp_path_factory.mktemp("serve-ops")
    hooks = folder / "webhooks"
    hooks.write_text(f"# the server owner's\n{ALICE} {hook[0]} {SECRET}\n")
    with serving("--redis-url", redis_url, "--provider", "openai", "--base-url", stub.base_url + "/v1",
                 "--webhooks-file", str(hooks),
                 env={"AIVVM_BATCH_API_KEYS": f"{ALICE},{BOB}", "AIVVM_BATCH_METRICS_TOKEN": METRICS_TOKEN},
                 log_dir=folder) as served:
        yield served


def _batch(served: Served, key: str, path: Path) -> str:
    api = OpenAI(base_url=served.api, api_key=key, max_retries=0, timeout=30)
    file_id = api.files.create(file=path.open("rb"), purpose="batch").id
    batch = api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    return wait_for(api, batch.id).id


def test_a_batchs_end_is_told_to_its_owners_webhook_signed_and_no_one_elses(
        server: Served, hook: tuple[str, list[tuple[dict[str, str], bytes]]], tmp_path: Path) -> None:
    _, received = hook
    done = _batch(server, ALICE, write_jsonl(tmp_path / "a.jsonl", [request_line("a1", "hello")]))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    failed = _batch(server, ALICE, empty)
    _batch(server, BOB, write_jsonl(tmp_path / "b.jsonl", [request_line("b1", "hello")]))
    deadline = time.monotonic() + 20
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a third event (BOB's) would have come by now
    assert len(received) == 2, received
    sdk = OpenAI(api_key="unused", webhook_secret=SECRET)
    events = {}
    for headers, body in received:
        assert standardwebhooks.Webhook(SECRET).verify(body, headers)["object"] == "event"
        event = sdk.webhooks.unwrap(body, headers)
        events[event.data.id] = event
    assert isinstance(events[done], BatchCompletedWebhookEvent)
    ended = OpenAI(base_url=server.api, api_key=ALICE, max_retries=0).batches.retrieve(done)
    assert ended.model == "gpt-3.5-turbo" and ended.usage is not None
    assert ended.usage.input_tokens_details.cached_tokens == 0 and ended.usage.output_tokens > 0
    assert isinstance(events[failed], BatchFailedWebhookEvent)


def test_metrics_need_the_metrics_token_on_a_server_with_keys(server: Served, tmp_path: Path) -> None:
    batch_id = _batch(server, BOB, write_jsonl(tmp_path / "m.jsonl", [request_line("m1", "hello")]))
    assert requests.get(server.base + "/metrics", timeout=10).status_code == 403  # loopback may be a proxy
    assert requests.get(server.base + "/metrics", headers={"Authorization": f"Bearer {ALICE}"},
                        timeout=10).status_code == 403
    scraped = requests.get(server.base + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                           timeout=10)
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert "aivvm_batch_redis_up 1.0" in scraped.text and 'status="ok"' in scraped.text
    assert batch_id not in scraped.text  # the API's batch ids are the tenants'; the store's are shown
    # a server without keys listens on loopback only: there, loopback is enough
    assert may_scrape("127.0.0.1", None, None, keyed=False) and may_scrape("::1", None, "t", keyed=False)
    assert not may_scrape("127.0.0.1", None, None, keyed=True)
    assert not may_scrape("10.1.2.3", None, None, keyed=False)
    assert not may_scrape("10.1.2.3", "Bearer wrong", "right", keyed=True)
    assert not may_scrape("10.1.2.3", f"Bearer {ALICE}", "right", keyed=True)
    assert may_scrape("10.1.2.3", "Bearer right", "right", keyed=True)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus package")
def test_a_real_prometheus_scrapes_metrics(server: Served, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "aivvm-batch", "authorization": {"credentials": METRICS_TOKEN},
                            "static_configs": [
            {"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'db'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        value = None
        deadline = time.monotonic() + 60
        while value is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/api/v1/query",
                                      params={"query": "aivvm_batch_redis_up"}, timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            found = answer.get("data", {}).get("result", [])
            value = found[0]["value"][1] if found else None
        assert value == "1", (tmp_path / "prometheus.log").read_text()[-2000:]
        targets = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5).json()
        assert [t["health"] for t in targets["data"]["activeTargets"]] == ["up"]
    finally:
        process.terminate()
        process.wait(30)
        log.close()
