"""Quotas per key on ``serve``: active batches, queued items, bytes stored, uploads under way; over
one, a 429 in OpenAI's form that makes nothing. No worker reads this server's Redis database, so
its batches stay active."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
import requests
from openai import OpenAI

from aivvm_batch.serve.auth import KeyRing, owner_of
from aivvm_batch.serve.quotas import Quota, with_words
from jobs.errors import ConfigError
from jobs.keys import api_batch
from tests.serve_helpers import Served, request_line, serving, wait_for, with_db, write_jsonl

SMALL, LARGE, MANY, RACE = "sk-small-quota-key", "sk-default-quota-key", "sk-many-batches-key", "sk-race-key"


def test_a_keys_entry_gives_it_quotas_of_its_own() -> None:
    ring = KeyRing.of_entries([("env, entry 1", f"{SMALL} batches=2 items=1k bytes=2Ki uploads=1"),
                               ("env, entry 2", LARGE)])
    assert ring.owner(f"Bearer {SMALL}") == owner_of(SMALL) and ring.owner(f"Bearer {LARGE}") == owner_of(LARGE)
    [(owner, words, where)] = ring.quota_words
    assert owner == owner_of(SMALL) and where == "env, entry 1"
    assert with_words(Quota(), words, where) == Quota(active_batches=2, queued_items=1000, stored_bytes=2048,
                                                      uploads=1)
    for word in ("batch=2", "items=0", "items=-1", "bytes=2T", "items", LARGE, f"{LARGE}=1"):
        with pytest.raises(ConfigError) as raised:
            with_words(Quota(), ["batches=1", word], "keys.txt, line 3")
        said = str(raised.value)
        assert said.startswith("keys.txt, line 3, word 3 ") and LARGE not in said and "=-1" not in said, said


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    keys = f"{SMALL} batches=2 items=5 bytes=2600,{LARGE},{MANY} batches=300,{RACE} batches=3 bytes=20000"
    with serving("--redis-url", with_db(redis_url, 3), "--provider", "openai", "--base-url",
                 "http://127.0.0.1:9/v1", env={"AIVVM_BATCH_API_KEYS": keys},
                 log_dir=tmp_path_factory.mktemp("serve-quotas")) as served:
        yield served


def _upload(api: OpenAI, path: Path) -> str:
    return api.files.create(file=path.open("rb"), purpose="batch").id


def _create(api: OpenAI, file_id: str, **extra: object) -> str:
    return api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                              **extra).id  # type: ignore[arg-type]


@pytest.mark.integration
def test_over_a_quota_a_key_gets_a_429_that_makes_nothing(server: Served, tmp_path: Path) -> None:
    small = OpenAI(base_url=server.api, api_key=SMALL, max_retries=0, timeout=30)
    three = write_jsonl(tmp_path / "three.jsonl", [request_line(f"r{i}", "hello") for i in range(3)])
    two = write_jsonl(tmp_path / "two.jsonl", [request_line(f"s{i}", "hello") for i in range(2)])
    first_file = _upload(small, three)
    first = _create(small, first_file, extra_headers={"Idempotency-Key": "first"})
    # queued items: 3 waiting, 3 more would be 6 > 5
    with pytest.raises(openai.RateLimitError) as refused:
        _create(small, _upload(small, three))
    assert refused.value.code == "quota_exceeded" and "5 queued items" in refused.value.message
    # a retry of the first is its batch, not a new one (its quota was counted when it was made)
    assert _create(small, first_file, extra_headers={"Idempotency-Key": "first"}) == first
    second = _create(small, _upload(small, two))
    # active batches: 2 of 2
    with pytest.raises(openai.RateLimitError) as refused:
        _create(small, _upload(small, write_jsonl(tmp_path / "one.jsonl", [request_line("t", "hi")])))
    assert refused.value.code == "quota_exceeded" and "2 batches under way" in refused.value.message
    assert sorted(b.id for b in small.batches.list()) == sorted([first, second])
    # bytes stored: the files so far hold about 1,000 of 2,600 bytes; 2,500 more are refused unread
    with pytest.raises(openai.RateLimitError) as refused:
        _upload(small, write_jsonl(tmp_path / "big.jsonl", [request_line(f"b{i}", "x" * 200) for i in range(8)]))
    assert refused.value.code == "quota_exceeded" and "bytes" in refused.value.message
    # another key has the server's own quotas
    large = OpenAI(base_url=server.api, api_key=LARGE, max_retries=0, timeout=30)
    assert _create(large, _upload(large, three))
    # cancelling frees the quota it held
    small.batches.cancel(second)
    assert wait_for(small, second).status == "cancelled"
    assert _create(small, _upload(small, write_jsonl(tmp_path / "one.jsonl", [request_line("t", "hi")])))


@pytest.mark.integration
def test_the_sdks_pager_lists_250_batches_page_by_page(server: Served, tmp_path: Path) -> None:
    api = OpenAI(base_url=server.api, api_key=MANY, max_retries=0, timeout=30)
    file_id = _upload(api, write_jsonl(tmp_path / "one.jsonl", [request_line("p", "hello")]))
    made = [_create(api, file_id) for _ in range(250)]
    page = api.batches.list(limit=100)
    assert len(page.data) == 100 and page.has_more
    listed = [b.id for b in api.batches.list(limit=100)]  # the SDK follows `after` while has_more
    assert listed == made[::-1]
    oldest_first = [b.id for b in api.batches.list(limit=100, extra_query={"order": "asc"})]
    assert oldest_first == made


@pytest.mark.integration
def test_cancel_is_for_a_batch_not_yet_finalizing(server: Served, redis_url: str, tmp_path: Path) -> None:
    """OpenAI cancels an in-progress batch; one finalizing (its results being written) or ended is
    answered 400 and goes on; cancelling twice is the same cancel."""
    api = OpenAI(base_url=server.api, api_key=LARGE, max_retries=0, timeout=30)
    batch_id = _create(api, _upload(api, write_jsonl(tmp_path / "f.jsonl", [request_line("f", "hello")])))
    wait_for(api, batch_id, statuses=("in_progress",))
    records = redis.Redis.from_url(with_db(redis_url, 3))
    records.hset(api_batch(batch_id), "status", "finalizing")
    with pytest.raises(openai.BadRequestError) as refused:
        api.batches.cancel(batch_id)
    assert refused.value.code == "invalid_status" and "'finalizing'" in refused.value.message
    assert api.batches.retrieve(batch_id).status == "finalizing"
    records.hset(api_batch(batch_id), "status", "in_progress")
    assert api.batches.cancel(batch_id).status == "cancelling"
    assert api.batches.cancel(batch_id).status in ("cancelling", "cancelled")
    assert wait_for(api, batch_id).status == "cancelled"


@pytest.mark.integration
def test_concurrent_creates_take_a_quota_s_slots_once_and_an_unannounced_upload_is_held_to_it(
        server: Served, tmp_path: Path) -> None:
    api = OpenAI(base_url=server.api, api_key=RACE, max_retries=0, timeout=30)
    file_id = _upload(api, write_jsonl(tmp_path / "r.jsonl", [request_line("r", "hello")]))
    outcomes: list[str] = []

    def create() -> None:
        try:
            outcomes.append(_create(api, file_id))
        except openai.RateLimitError as exc:
            outcomes.append(str(exc.code))

    threads = [threading.Thread(target=create) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o for o in outcomes if o == "quota_exceeded") == ["quota_exceeded"] * 9, outcomes
    assert len(list(api.batches.list())) == 3
    # chunked, with no Content-Length: refused as it is read, nothing kept
    form = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\nContent-Disposition: "
            b"form-data; name=\"file\"; filename=\"big.jsonl\"\r\n\r\n" + b"{}\n" * 10_000 + b"\r\n--b--\r\n")
    answer = requests.post(server.api + "/files", data=iter([form[i:i + 4096] for i in range(0, len(form), 4096)]),
                           headers={"Authorization": f"Bearer {RACE}",
                                    "Content-Type": "multipart/form-data; boundary=b"}, timeout=30)
    assert answer.status_code == 429 and answer.json()["error"]["code"] == "quota_exceeded", answer.text
    assert [f.filename for f in api.files.list()] == ["r.jsonl"]
