"""The provider's pace, learned from its answers: the headers (literal), the stand-in's token
bucket, the learning (AIMD), a 429 that is a wait and not an attempt, and ``run`` against a
rate-limited stand-in (real Redis, real workers, real HTTP)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import redis
import requests

from aivvm_batch.stub import RateLimit, StubServer
from aivvm_batch.stub.ratelimit import Limiter, go_duration
from jobs import keys
from jobs.config import Settings
from jobs.records import ChatMessage, ItemRequest, Status
from worker.attempt import Attempt
from worker.errors import ProviderHTTPError
from worker.decision import MAX_RATE_WAITS, ItemState, decide
from worker.provider_pace import FIRST_CALLS, ProviderPace
from worker.providers.exchange import Head
from worker.providers.ratelimits import Limit, RateHeaders, parse_duration, parse_rate_headers
from worker.ratelimit import RateLimiter
from tests.test_run import prompts, results, run

NOW = 1_800_000_000.0


# -- the headers ------------------------------------------------------------------------------


def test_openai_headers_are_read_with_their_go_durations() -> None:
    headers = {"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "1199",
               "x-ratelimit-reset-requests": "50ms", "x-ratelimit-limit-tokens": "40000",
               "x-ratelimit-remaining-tokens": "39000", "x-ratelimit-reset-tokens": "1m30.5s"}
    assert parse_rate_headers(headers, NOW) == RateHeaders(Limit(1200, 1199, 0.05), Limit(40000, 39000, 90.5))


def test_anthropic_and_ietf_headers_are_read() -> None:
    anthropic = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
                 "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:02Z"}
    found = parse_rate_headers(anthropic, 1_800_000_000.0)
    assert found is not None and found.requests.per_minute == 50 and found.requests.remaining == 0
    ietf = {"ratelimit-limit": "10", "ratelimit-remaining": "3", "ratelimit-reset": "4",
            "ratelimit-policy": "10;w=1"}
    assert parse_rate_headers(ietf, NOW) == RateHeaders(Limit(600, 3, 4))  # 10 a second is 600 a minute


@pytest.mark.parametrize("value, seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1.5s", 1.5),
                                            ("2", 2.0), ("1h", 3600.0), ("9h", 3600.0), ("", None),
                                            ("soon", None), ("1s2", None), ("-1s", None), ("nan", None)])
def test_durations(value: str, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


def test_headers_that_say_nothing_or_nonsense_are_nothing() -> None:
    assert parse_rate_headers({"content-type": "application/json"}, NOW) is None
    assert parse_rate_headers({"x-ratelimit-limit-requests": "lots", "x-ratelimit-reset-requests": "-3"}, NOW) is None


def test_a_429_without_retry_after_waits_for_the_exhausted_resource() -> None:
    head = Head.of(429, "Too Many Requests", {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s",
                                              "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7s"})
    assert head.wait() == 7.0
    both = Head.of(429, "", {"retry-after": "3", "retry-after-ms": "250"})
    assert both.wait() == 0.25  # OpenAI's milliseconds win
    assert Head.of(200, "", {"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0"}).wait() is None


# -- the stand-in's bucket --------------------------------------------------------------------


def test_the_stand_in_admits_its_burst_then_one_request_per_interval() -> None:
    now = [100.0]
    limiter = Limiter(RateLimit(rpm=600, burst=3), clock=lambda: now[0])
    assert [limiter.take(1)[0] for _ in range(3)] == [0.0, 0.0, 0.0]
    wait, headers = limiter.take(1)
    assert wait == pytest.approx(0.1) and ("retry-after-ms", "100") in headers
    assert ("x-ratelimit-remaining-requests", "0") in headers and ("x-ratelimit-limit-requests", "600") in headers
    now[0] += 0.1
    assert limiter.take(1)[0] == 0.0 and limiter.refused == 1


def test_the_stand_in_refuses_beyond_its_tokens_a_minute() -> None:
    now = [0.0]
    limiter = Limiter(RateLimit(rpm=6000, burst=100, tpm=600), clock=lambda: now[0])  # 10 tokens a second
    assert limiter.take(10)[0] == 0.0
    wait, headers = limiter.take(5)
    assert wait == pytest.approx(0.5) and ("x-ratelimit-remaining-tokens", "0") in headers


def test_go_durations_as_openai_writes_them() -> None:
    assert [go_duration(s) for s in (0.05, 1.5, 360.0)] == ["50ms", "1.5s", "6m0s"]
    assert parse_duration(go_duration(95.25)) == pytest.approx(95.25, abs=0.01)


# -- learning ---------------------------------------------------------------------------------


def stated(rpm: float, remaining: float | None = None) -> RateHeaders:
    return RateHeaders(Limit(rpm, remaining, 1.0))


def test_the_stated_limit_is_the_pace_under_the_users_ceiling() -> None:
    pace = ProviderPace()
    assert not pace.limits("p").any  # nothing learned: no pace of its own
    pace.learn("p", 200, stated(1200, remaining=100))
    assert pace.limits("p").rpm == 1200 and pace.limits("p", rpm=600).rpm == 600
    assert pace.limits("p").burst == 20  # a second's worth at most
    pace.learn("p", 200, stated(1200, remaining=6))
    assert pace.limits("p").burst == 5  # what remains but one
    assert pace.describe("p") == "pace 20.0/s, limited by the provider"


def test_a_429_cuts_the_pace_once_a_second_and_answers_bring_it_back() -> None:
    now = [0.0]
    pace = ProviderPace(clock=lambda: now[0])
    pace.learn("p", 200, stated(1000))
    now[0] = 5.0
    pace.learn("p", 429, stated(1000))
    pace.learn("p", 429, stated(1000))  # the same second: one cut
    assert pace.limits("p").rpm == pytest.approx(850) and pace.limits("p").burst == 0
    now[0] = 6.5
    pace.learn("p", 429, None)
    assert pace.limits("p").rpm == pytest.approx(722.5)
    for _ in range(10):
        pace.learn("p", 200, None)
    assert pace.limits("p").rpm == pytest.approx(722.5 + 10 * 3)  # 0.3% of what was stated an answer
    for _ in range(200):
        pace.learn("p", 200, None)
    assert pace.limits("p").rpm == 1000  # never past it


def test_a_429_for_tokens_scales_the_token_estimate_not_the_requests_pace() -> None:
    pace = ProviderPace()
    limits = RateHeaders(Limit(1200, 30, 1.0), Limit(6000, 0, 2.0))
    pace.learn("p", 200, RateHeaders(Limit(1200, 30, 1.0), Limit(6000, 500, 2.0)))
    pace.learn("p", 429, limits)
    assert pace.limits("p").rpm == 1200 and pace.limits("p").tpm == pytest.approx(6000 / 1.1)
    for _ in range(100):
        pace.learn("p", 200, None)
    assert pace.limits("p").tpm == pytest.approx(6000 / 1.05)  # eased back by the answers admitted


def test_a_limit_too_small_to_mean_anything_is_not_believed() -> None:
    pace = ProviderPace()
    pace.learn("p", 200, RateHeaders(Limit(1e-320, 5, 1.0), Limit(1e-9)))
    assert not pace.limits("p").any  # not a wait of forever
    assert parse_rate_headers({"ratelimit-limit": "5", "ratelimit-reset": "99999999999"}, NOW) == \
        RateHeaders(Limit(5, None, 3600.0))  # a reset past an hour is not believed either


def test_a_few_calls_go_before_the_first_answer_and_the_rest_wait_for_it() -> None:
    async def scenario() -> tuple[int, int]:
        pace = ProviderPace()
        calls = [asyncio.ensure_future(pace.first("p")) for _ in range(FIRST_CALLS + 3)]
        await asyncio.sleep(0.05)
        gone = sum(call.done() for call in calls)
        pace.learn("p", 200, None)
        await asyncio.sleep(0.01)
        return gone, sum(call.done() for call in calls)

    assert asyncio.run(scenario()) == (FIRST_CALLS, FIRST_CALLS + 3)


# -- a 429 that says when ---------------------------------------------------------------------


def refused(retry_after: float | None) -> Attempt:
    error = ProviderHTTPError(429, "rate_limit_exceeded: slow down", retry_after=retry_after)
    return Attempt("openai", "m", "", error, 5, None)


def test_a_429_that_says_when_is_waited_out_without_spending_an_attempt() -> None:
    request = ItemRequest(id="a", line=1, messages=(ChatMessage("user", "hi"),))
    settings = Settings.from_env({})
    decision = decide(request, refused(0.5), ItemState(attempt=2), settings, now=NOW)
    assert decision.again is not None and decision.pause == 0.5
    state = decision.again.state
    assert (state.attempt, state.waits) == (2, 1) and NOW + 0.5 <= state.not_before <= NOW + 0.6
    assert ItemState.from_kwargs(**state.to_kwargs()) == state  # carried by the retry message
    spent = decide(request, refused(0.5), ItemState(attempt=2, waits=MAX_RATE_WAITS), settings, now=NOW)
    assert spent.again is not None and spent.again.state.attempt == 3  # a provider that never lets go
    unsaid = decide(request, refused(None), ItemState(), settings, now=NOW)  # a backoff of its own, not counted
    assert unsaid.again is not None and (unsaid.again.state.attempt, unsaid.again.state.waits) == (1, 1)
    for_the_day = decide(request, refused(3600.0), ItemState(), settings, now=NOW)
    assert for_the_day.again is not None and for_the_day.again.state.attempt == 2  # past the backoff's cap


# -- against Redis and a rate-limited stand-in -----------------------------------------------


@pytest.mark.integration
def test_a_burst_may_go_ahead_of_the_even_spacing(redis_client: redis.Redis) -> None:
    limiter = RateLimiter(redis_client, max_wait=30.0)
    scope = f"test|{uuid.uuid4().hex}"
    waits = [limiter.reserve(scope, rpm=600, burst=3) for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0] and 0.0 < waits[3] < waits[4] < waits[5]
    redis_client.delete(*keys.rate_keys(scope))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_run_keeps_to_the_pace_the_provider_states_and_no_item_fails_on_a_429(tmp_path: Path) -> None:
    """600 a minute with a burst of 5: the defaults (two worker processes, 128 in flight) learn
    the limit from the first answers; the few 429s of the start are waited out, none fails."""
    with StubServer(rate_limit=RateLimit(rpm=600, burst=5)) as stub:
        path = prompts(tmp_path / "in.jsonl", [f"paced {i}" for i in range(80)])
        out = tmp_path / "out.jsonl"
        proc = run(str(path), "-o", str(out), "--provider", "openai", "--base-url", f"{stub.base_url}/v1",
                   state=tmp_path / "state", env={"AIVVM_BATCH_MAX_RETRIES": "1"})
        stats = stub.stats()
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in results(out)] == [Status.OK.value] * 80
    assert stats["rate_limited"] <= 8, stats["rate_limited"]  # of at least 80 requests
    assert len(stats["by_prompt"]) == 80


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_without_the_pace_the_same_run_would_have_failed_items(tmp_path: Path) -> None:
    """The counterpart of the test above: a raw burst against the same stand-in draws 429s, so
    the limit is a real one (the test above is not passing for want of refusals)."""
    with StubServer(rate_limit=RateLimit(rpm=600, burst=5)) as stub:
        codes = [requests.post(f"{stub.base_url}/v1/chat/completions", timeout=10,
                               json={"model": "m", "messages": [{"role": "user", "content": f"raw {i}"}]}).status_code
                 for i in range(20)]
    assert codes.count(429) >= 10, codes


def test_the_heartbeat_says_the_pace_learned_beside_the_breakers_note() -> None:
    from types import SimpleNamespace

    from worker.breaker import Breaker
    from worker.sweeper import what_to_say

    pace = ProviderPace()
    runtime = SimpleNamespace(leases=[1, 2], breaker=Breaker(), provider_pace=pace)
    assert what_to_say(runtime) == (2, "")  # type: ignore[arg-type]
    pace.learn("openai|http://p/v1", 200, stated(1200))
    assert what_to_say(runtime) == (2, "pace 20.0/s, limited by the provider")  # type: ignore[arg-type]


def test_a_provider_that_states_no_limit_costs_no_gate_once_it_answered() -> None:
    pace = ProviderPace()
    assert pace.watching("p")  # not heard from yet: its first calls are counted
    pace.learn("p", 200, None)
    assert not pace.watching("p")
    pace.learn("q", 200, stated(600))
    assert pace.watching("q")
