"""Pure protocol logic of the providers, with literal bytes and strings: no I/O.

The bounded body decoder, the bounded event-stream reader, base-URL checks and normal
forms, which key a call carries, redaction, and how errors become results.
"""

from __future__ import annotations

import gzip
import json
import logging
import ssl
import time
import tracemalloc
import zlib

import pytest
import requests

from jobs.records import ChatMessage, ItemRequest
from worker.attempt import Attempt
from worker.decision import to_result
from worker.errors import (
    EmptyReply,
    IncompleteReply,
    MalformedReply,
    ProviderError,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderTransportError,
    RedirectError,
    ReplyTooLarge,
    TLSError,
)
from worker.providers import PROVIDERS, Aivvm, OpenAI, check_base_url
from worker.providers.checks import normal_form
from worker.providers.credentials import KeyChooser, choose_key, is_allowed, redact
from worker.providers.decoding import RATIO_FLOOR, STEP, BodyDecoder
from worker.providers.aivvm import AivvmReply
from worker.providers.call import CompletionCall, Item, StreamEnd
from worker.providers.exchange import (
    ERROR_BODY_LIMIT,
    ErrorBody,
    Head,
    connection_error,
    http_error,
    one_line,
    read_timeout,
    redirect_error,
)
from worker.providers.openai import sse_data
from worker.providers.reply import TRAILING_LIMIT, ReplyReader

MiB = 1024 * 1024


def feed_all(decoder: BodyDecoder, chunks: list[bytes]) -> bytes:
    out = b"".join(decoder.feed(c) for c in chunks)
    return out + decoder.finish()


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("text,expected", [
    ("req_8f2c-41", "req_8f2c-41"),  # printable, single spaces: as it is
    ("a b", "a b"),
    ("  a\tb\r\n  c  ", "a b c"),
    ("x\x1b[31my\u00a0z", "x [31my z"),
    ("", ""),
])
def test_server_text_becomes_one_line(text: str, expected: str) -> None:
    assert one_line(text) == expected


# --------------------------------------------------------------------------
# BodyDecoder: plain bodies
# --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_plain_body_passes_through(encoding: str | None) -> None:
    decoder = BodyDecoder(encoding, 100, 100.0)
    assert feed_all(decoder, [b"caf\xc3", b"\xa9 ok"]) == b"caf\xc3\xa9 ok"
    assert decoder.error is None


def test_plain_body_of_exactly_the_cap_is_whole() -> None:
    decoder = BodyDecoder(None, 10, 100.0)
    assert feed_all(decoder, [b"01234", b"56789"]) == b"0123456789"
    assert decoder.error is None


def test_plain_body_past_the_cap_keeps_the_cap_then_stops() -> None:
    decoder = BodyDecoder(None, 10, 100.0)
    assert decoder.feed(b"01234") == b"01234"
    assert decoder.feed(b"56789X") == b"56789"
    assert isinstance(decoder.error, ReplyTooLarge)
    assert decoder.error.kind == "reply_too_large" and decoder.error.transient is False
    assert "10 bytes" in str(decoder.error)
    assert decoder.feed(b"more") == b""
    assert decoder.finish() == b""


# --------------------------------------------------------------------------
# BodyDecoder: gzip and deflate
# --------------------------------------------------------------------------

TEXT = ("Stand-in reply: héllo wörld — 日本語 ✓ 🎉 " * 50).encode()


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP"])
@pytest.mark.parametrize("size", [1, 7, 4096])
def test_gzip_body_fed_in_pieces(encoding: str, size: int) -> None:
    decoder = BodyDecoder(encoding, MiB, 100.0)
    assert feed_all(decoder, split_every(gzip.compress(TEXT), size)) == TEXT


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib-wrapped", "raw"])
@pytest.mark.parametrize("size", [1, 2, 5000])
def test_deflate_body_in_either_form(wbits: int, size: int) -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = compressor.compress(TEXT) + compressor.flush()
    assert feed_all(BodyDecoder("deflate", MiB, 100.0), split_every(data, size)) == TEXT


def test_gzip_members_one_after_another() -> None:
    data = gzip.compress(b"first ") + gzip.compress(b"second")
    assert feed_all(BodyDecoder("gzip", MiB, 100.0), split_every(data, 3)) == b"first second"


def test_gzip_cut_before_its_end_is_incomplete() -> None:
    data = gzip.compress(TEXT)
    decoder = BodyDecoder("gzip", MiB, 100.0)
    decoder.feed(data[: len(data) // 2])
    with pytest.raises(IncompleteReply):
        decoder.finish()


def test_gzip_that_is_not_gzip_is_malformed() -> None:
    with pytest.raises(MalformedReply) as caught:
        BodyDecoder("gzip", MiB, 100.0).feed(b"this is plain text, whatever the header says")
    assert caught.value.transient is False


def test_empty_gzip_body_is_no_error() -> None:
    assert BodyDecoder("gzip", MiB, 100.0).finish() == b""


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "deflate, gzip"])
def test_encodings_never_asked_for_are_malformed(encoding: str) -> None:
    with pytest.raises(MalformedReply) as caught:
        BodyDecoder(encoding, MiB, 100.0)
    assert "gzip" in str(caught.value)


def zeros_gzip(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = bytes(MiB)
    return b"".join(compressor.compress(block) for _ in range(size // MiB)) + compressor.flush()


BOMB = zeros_gzip(64 * MiB)  # about 64 KB


def test_a_gzip_bomb_stops_at_the_cap_with_flat_memory() -> None:
    decoder = BodyDecoder("gzip", MiB, 1e9)  # no ratio limit: the cap alone
    tracemalloc.start()
    try:
        out = b"".join(decoder.feed(c) for c in split_every(BOMB, 65536))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == bytes(MiB)
    assert isinstance(decoder.error, ReplyTooLarge)
    assert peak < 4 * MiB


def test_a_gzip_bomb_stops_at_the_ratio_long_before_the_cap() -> None:
    decoder = BodyDecoder("gzip", 1024 * MiB, 100.0)
    out = b"".join(decoder.feed(c) for c in split_every(BOMB, 65536))
    assert isinstance(decoder.error, ReplyTooLarge)
    assert "100 times" in str(decoder.error) and "bomb" in str(decoder.error)
    assert RATIO_FLOOR < len(out) <= RATIO_FLOOR + STEP


def test_a_well_compressed_small_reply_is_not_a_bomb() -> None:
    """Below RATIO_FLOOR decoded bytes the ratio is not judged: short repetitive replies pass."""
    text = b"ha" * (RATIO_FLOOR // 2)
    assert feed_all(BodyDecoder("gzip", MiB, 100.0), [gzip.compress(text)]) == text


# --------------------------------------------------------------------------
# Event stream: bounded lines
# --------------------------------------------------------------------------


def test_an_event_line_that_never_ends_is_too_large() -> None:
    texts = iter(["data: "] + ["a" * 1000] * 100)
    with pytest.raises(ReplyTooLarge):
        list(sse_data(texts, max_chars=10_000))


def test_many_data_lines_in_one_event_are_too_large() -> None:
    texts = iter(["data: aaaa\n"] * 10_000)
    with pytest.raises(ReplyTooLarge):
        list(sse_data(texts, max_chars=10_000))


def test_events_under_the_limit_pass() -> None:
    texts = iter(["data: " + "a" * 500, "0\n\n", "data: b\n\n"])
    assert list(sse_data(texts, max_chars=1000)) == ["a" * 500 + "0", "b"]


# --------------------------------------------------------------------------
# Base URLs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://chat.example.com", "http://localhost:8000/v1",
                                 "HTTP://Example.com/", "http://[::1]:8080"])
@pytest.mark.parametrize("provider", ["aivvm", "openai"])
def test_good_base_urls(provider: str, url: str) -> None:
    assert check_base_url(provider, url) is None


@pytest.mark.parametrize(("url", "reason"), [
    ("127.0.0.1:8000", "no scheme: write http://127.0.0.1:8000 or https://127.0.0.1:8000"),
    ("localhost/v1", "no scheme: write http://localhost/v1 or https://localhost/v1"),
    ("localhost:8000", "no scheme: write http://localhost:8000 or https://localhost:8000"),
    ("ftp://example.com", "the scheme ftp:// is not supported: use http:// or https://"),
    ("file:///etc/passwd", "the scheme file:// is not supported: use http:// or https://"),
    ("http://", "no host: write it as http://host:port"),
    ("http://example.com:99999", "the port is not a number from 0 to 65535"),
    ("http://example.com/v1?x=1", "a base URL has no query (?...) or fragment (#...)"),
])
def test_bad_base_urls_are_one_line_value_errors(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_base_url("aivvm", url)
    assert str(caught.value) == reason


@pytest.mark.parametrize(("provider", "url", "warning"), [
    ("aivvm", "http://host:3000/api/chat",
     "the base URL ends in /api/chat, which aivvm-batch appends itself; use http://host:3000"),
    ("aivvm", "http://host:3000/api/chat/",
     "the base URL ends in /api/chat, which aivvm-batch appends itself; use http://host:3000"),
    ("openai", "http://localhost:8000/v1/chat/completions",
     "the base URL ends in /chat/completions, which aivvm-batch appends itself; use http://localhost:8000/v1"),
])
def test_a_base_url_ending_in_the_protocol_path_is_a_warning(provider: str, url: str, warning: str) -> None:
    assert check_base_url(provider, url) == warning


def test_an_unknown_provider_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_base_url("gemini", "http://x")


@pytest.mark.parametrize(("a", "b"), [
    ("http://Example.COM", "http://example.com:80/"),
    ("HTTPS://example.com/v1/", "https://example.com:443/v1"),
    ("http://127.0.0.1:8000/v1", " http://127.0.0.1:8000/v1// "),
])
def test_normal_forms_equal(a: str, b: str) -> None:
    assert normal_form(a) is not None and normal_form(a) == normal_form(b)


@pytest.mark.parametrize("other", [
    "https://good.example:8000",  # scheme
    "http://good.example:8001",  # port
    "http://good.example:8000/v1",  # path
    "http://good.example:8000.evil.example",  # a longer host
    "http://good.example:8000@evil.example",  # userinfo, then another host
    "http://evil.example/http://good.example:8000",  # the allowed URL as a path
    "http://good.example.:8000",  # a trailing dot is another name
])
def test_a_base_url_must_equal_an_allowed_one(other: str) -> None:
    env = {"OPENAI_API_KEY": "sk-k"}
    assert is_allowed(OpenAI, "http://good.example:8000", "http://good.example:8000", env)
    assert not is_allowed(OpenAI, other, "http://good.example:8000", env)
    assert choose_key(OpenAI, other, "http://good.example:8000", env).key is None


# --------------------------------------------------------------------------
# Which key a call carries
# --------------------------------------------------------------------------


def test_each_provider_names_its_variables() -> None:
    assert {(p.base_url_variable, p.api_key_variable) for p in PROVIDERS.values()} == {
        ("AIVVM_BASE_URL", "AIVVM_API_KEY"), ("OPENAI_BASE_URL", "OPENAI_API_KEY")}


def test_the_registry_names_each_provider_by_its_class_and_its_path_is_the_requests() -> None:
    assert all(name == cls.name for name, cls in PROVIDERS.items())
    for cls in PROVIDERS.values():
        request = cls.http_request(CompletionCall("gpt-4", ({"role": "user", "content": "x"},),
                                                  base_url="http://h:1/base/"))
        assert request.url == "http://h:1/base" + cls.path
        assert check_base_url(cls.name, "http://h:1" + cls.path) is not None  # the path is warned about


def test_the_default_url_and_the_base_url_variable_are_allowed() -> None:
    env = {"AIVVM_API_KEY": "k1", "AIVVM_BASE_URL": "http://mine:3000/"}
    assert choose_key(Aivvm, Aivvm.url, "", env).key == "k1"
    assert choose_key(Aivvm, "http://mine:3000", "", env).key == "k1"
    assert choose_key(Aivvm, "http://other:3000", "", env).key is None


def test_a_worker_decides_each_provider_and_base_url_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVVM_API_KEY", "k1")
    monkeypatch.delenv("AIVVM_BASE_URL", raising=False)
    keys = KeyChooser("http://mine:3000")
    assert keys(Aivvm, "http://mine:3000") == choose_key(Aivvm, "http://mine:3000", "http://mine:3000")
    assert keys(Aivvm, "http://mine:3000").key == "k1"
    withheld = keys(Aivvm, "http://other:3000")
    assert withheld.key is None and withheld.withheld == "AIVVM_API_KEY"
    monkeypatch.setenv("AIVVM_API_KEY", "k2")  # the environment a worker started with is the one it keeps
    assert keys(Aivvm, "http://mine:3000").key == "k1"
    assert KeyChooser("http://mine:3000")(Aivvm, "http://mine:3000").key == "k2"


def test_allowed_urls_are_comma_separated() -> None:
    env = {"OPENAI_API_KEY": "sk-k"}
    extra = " http://a:1/v1 ,, https://b.example/v1/ "
    assert choose_key(OpenAI, "http://a:1/v1", extra, env).key == "sk-k"
    assert choose_key(OpenAI, "https://B.example:443/v1", extra, env).key == "sk-k"
    assert choose_key(OpenAI, "http://c:1/v1", extra, env).key is None


def test_no_key_configured_withholds_nothing() -> None:
    choice = choose_key(OpenAI, "http://anywhere", "", {})
    assert choice.key is None and choice.withheld is None and choice.hint is None


def test_a_withheld_key_is_named_once_per_base_url_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    env = {"OPENAI_API_KEY": "sk-never-logged"}
    with caplog.at_level(logging.WARNING, logger="worker.providers.credentials"):
        for _ in range(3):
            choice = choose_key(OpenAI, "http://warned-once.example/v1", "", env)
        choose_key(OpenAI, "http://warned-twice.example/v1", "", env)
    assert choice.key is None and choice.withheld == "OPENAI_API_KEY"
    assert choice.hint is not None and "AIVVM_BATCH_ALLOWED_BASE_URLS" in choice.hint
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "http://warned-once.example/v1 is not an allowed base URL" in messages[0]
    assert not any("sk-never-logged" in m for m in messages)


@pytest.mark.parametrize(("text", "expected"), [
    ("bad key sk-123456 given", "bad key [redacted] given"),
    ('{"auth": "Bearer abc.def-ghi"}', '{"auth": "Bearer [redacted]"}'),
    ("authorization: bearer xyz, more", "authorization: bearer [redacted], more"),
    ("nothing secret", "nothing secret"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text, ["sk-123456", None]) == expected


# --------------------------------------------------------------------------
# Errors: classification and results
# --------------------------------------------------------------------------


def test_new_error_kinds_are_permanent() -> None:
    redirect = RedirectError(302, "https://elsewhere.example/login")
    assert (redirect.kind, redirect.status, redirect.transient) == ("redirect", 302, False)
    assert isinstance(redirect, ProviderHTTPError)
    assert "https://elsewhere.example/login" in str(redirect)
    assert (TLSError("x").kind, TLSError("x").transient) == ("tls_error", False)
    assert (ReplyTooLarge("x").kind, ReplyTooLarge("x").transient) == ("reply_too_large", False)
    assert ProviderTransportError("x").transient is True


def request() -> ItemRequest:
    return ItemRequest(id="q", line=1, messages=(ChatMessage("user", "hi"),))


def outcome(error: Exception | None, text: str = "") -> Attempt:
    return Attempt("openai", "gpt-4", text, error, 10, None)  # type: ignore[arg-type]


def test_a_result_carries_the_http_status() -> None:
    result = to_result(request(), outcome(ProviderHTTPError(503, "busy")), 3)
    assert result.error is not None and result.error.http_status == 503
    assert result.to_dict()["error"]["http_status"] == 503


def test_a_result_without_http_has_no_status() -> None:
    result = to_result(request(), outcome(ReplyTooLarge("too big"), "abc"), 1)
    assert result.error is not None and result.error.http_status is None
    assert result.output == "abc"
    assert "http_status" not in result.to_dict()["error"]


# --------------------------------------------------------------------------
# The reply readers (shared by the synchronous and asynchronous paths)
# --------------------------------------------------------------------------


def aivvm_reader(max_bytes: int = MiB) -> ReplyReader:
    return ReplyReader(CompletionCall("gpt-4", (), max_reply_bytes=max_bytes), AivvmReply(), Aivvm.check_type)


def openai_reader(max_bytes: int = MiB, api_key: str | None = None) -> ReplyReader:
    call = CompletionCall("gpt-4", (), max_reply_bytes=max_bytes, api_key=api_key)
    return ReplyReader(call, OpenAI.reply_parser(call), OpenAI.check_type)


def read_all(reader: ReplyReader, chunks: list[bytes]) -> tuple[list[Item], Exception | None]:
    """Drive a reader as the transports do: what it yielded, and what it raised."""
    items: list[Item] = []
    try:
        for chunk in chunks:
            for item in reader.feed(chunk):
                items.append(item)
            if reader.stopped:
                break
        items.extend(reader.finish())
    except ProviderError as exc:
        return items, exc
    return items, None


def event(text: str | None, finish: str | None = None, index: int = 0) -> bytes:
    delta = {} if text is None else {"content": text}
    return b"data: %b\n\n" % json.dumps({"choices": [{"index": index, "delta": delta,
                                                      "finish_reason": finish}]}).encode()


def test_aivvm_reader_keeps_characters_whole() -> None:
    reader = aivvm_reader()
    reader.start(Head(200, content_type="text/plain; charset=utf-8"))
    items, error = read_all(reader, [b"caf\xc3", b"\xa9 \xf0\x9f", b"\x8e\x89"])
    assert error is None
    assert items == ["caf", "é ", "🎉"]


def test_aivvm_reader_decodes_gzip_fed_byte_by_byte() -> None:
    reader = aivvm_reader()
    reader.start(Head(200, content_encoding="gzip"))
    items, error = read_all(reader, split_every(gzip.compress(TEXT), 1))
    assert error is None
    assert "".join(map(str, items)).encode() == TEXT


def test_aivvm_reader_empty_body_is_an_empty_reply() -> None:
    reader = aivvm_reader()
    reader.start(Head(200))
    items, error = read_all(reader, [])
    assert items == [] and isinstance(error, EmptyReply)


def test_aivvm_reader_past_the_cap_hands_out_the_cap_then_fails() -> None:
    reader = aivvm_reader(max_bytes=10)
    reader.start(Head(200))
    items, error = read_all(reader, [b"0123456", b"789abc", b"more"])
    assert "".join(map(str, items)) == "0123456789"
    assert isinstance(error, ReplyTooLarge)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/xhtml+xml"])
def test_aivvm_reader_refuses_a_web_page(content_type: str) -> None:
    with pytest.raises(MalformedReply):
        aivvm_reader().start(Head(200, content_type=content_type))


@pytest.mark.parametrize("content_type", ["application/json", "text/html"])
def test_openai_reader_refuses_what_is_no_event_stream(content_type: str) -> None:
    with pytest.raises(MalformedReply):
        openai_reader().start(Head(200, content_type=content_type))


def test_openai_reader_events_cut_anywhere() -> None:
    data = event("Hel") + event("lo ✓") + event(None, "stop") + b"data: [DONE]\n\n"
    for size in (1, 2, 3, 7, len(data)):
        reader = openai_reader()
        reader.start(Head(200, content_type="text/event-stream"))
        items, error = read_all(reader, split_every(data, size))
        assert error is None, (size, error)
        assert items[-1] == StreamEnd("stop")
        assert all(isinstance(i, str) for i in items[:-1])
        assert "".join(i for i in items if isinstance(i, str)) == "Hello ✓"


def test_openai_reader_text_before_an_error_event_is_handed_out_first() -> None:
    reader = openai_reader(api_key="sk-secret")
    reader.start(Head(200))
    error_event = b'data: {"error": {"message": "boom sk-secret", "type": "overloaded"}}\n\n'
    items, error = read_all(reader, [event("partial") + error_event])
    assert items == ["partial"]
    assert isinstance(error, ProviderHTTPError) and error.kind == "overloaded"
    assert "sk-secret" not in str(error)


def test_openai_reader_ignores_what_follows_done_and_stops_a_server_that_keeps_sending() -> None:
    reader = openai_reader(max_bytes=1000)
    reader.start(Head(200))
    tail = [b"x" * 4096] * (TRAILING_LIMIT // 4096 + 2)
    items, error = read_all(reader, [event("ok", "stop") + b"data: [DONE]\n\n", *tail, b"never read"])
    assert error is None  # past the cap, but after the reply was complete
    assert items == ["ok", StreamEnd("stop")]
    assert reader.stopped


def test_openai_reader_without_done_or_finish_is_incomplete() -> None:
    reader = openai_reader()
    reader.start(Head(200))
    items, error = read_all(reader, [event("par")])
    assert items == ["par"] and isinstance(error, IncompleteReply)


def test_openai_reader_last_event_without_blank_line() -> None:
    reader = openai_reader()
    reader.start(Head(200))
    items, error = read_all(reader, [event("a"), event(None, "length")[:-2]])
    assert error is None and items == ["a", StreamEnd("length")]


# --------------------------------------------------------------------------
# The head of an answer, error bodies, failures to connect
# --------------------------------------------------------------------------


def test_head_from_any_case_insensitive_mapping() -> None:
    headers = requests.structures.CaseInsensitiveDict({"Content-Type": "Text/HTML; charset=x",
                                                       "Content-Encoding": "gzip", "Retry-After": "3"})
    head = Head.of(429, None, headers)
    assert head.media_type == "text/html" and head.content_encoding == "gzip" and head.retry_after == "3"
    assert head.reason == ""


def test_an_error_body_is_read_to_a_bound_and_made_one_line_for_its_message() -> None:
    body = ErrorBody(Head(500, content_encoding="gzip"), CompletionCall("m", ()))
    data = gzip.compress(b"line one\r\nline\ttwo\x00 " + b"e" * ERROR_BODY_LIMIT * 4)
    for chunk in split_every(data, 100):
        if body.done:
            break
        body.feed(chunk)
    assert body.done
    assert body.text().startswith("line one\r\nline\ttwo\x00 e")  # kept as sent, for OpenAI's form
    assert len(body.text()) <= ERROR_BODY_LIMIT
    error = http_error(Head(500), body.text(), CompletionCall("m", ()), OpenAI.parse_error)
    assert str(error).startswith("HTTP 500: line one line two e")


def test_an_error_body_in_an_unknown_encoding_is_skipped() -> None:
    body = ErrorBody(Head(500, content_encoding="br"), CompletionCall("m", ()))
    assert body.done and body.text() == ""


def test_an_http_error_names_a_withheld_key_and_hides_the_sent_one() -> None:
    call = CompletionCall("m", (), api_key="sk-sent", key_withheld="OPENAI_API_KEY")
    error = http_error(Head(401, "Unauthorized"), "bad key sk-sent", call, OpenAI.parse_error)
    assert "sk-sent" not in str(error)
    assert "OPENAI_API_KEY was not sent" in str(error)
    assert http_error(Head(502, "Bad Gateway"), "", call, Aivvm.parse_error).args == ("HTTP 502: Bad Gateway",)


def test_a_redirect_names_its_location_on_one_line_without_the_key() -> None:
    call = CompletionCall("m", (), api_key="sk-sent")
    error = redirect_error(Head(302, location="https://elsewhere/login?k=sk-sent\r\nX: y"), call)
    assert error.kind == "redirect" and error.status == 302
    assert "sk-sent" not in str(error) and "\n" not in str(error)


def test_a_passed_deadline_sends_nothing() -> None:
    with pytest.raises(ProviderTimeout):
        read_timeout(CompletionCall("m", (), deadline=time.monotonic() - 1))
    assert read_timeout(CompletionCall("m", (), read_timeout=60.0, deadline=time.monotonic() + 5)) <= 5


class WrappedCertificateError(ssl.SSLCertVerificationError):
    """As aiohttp wraps the ssl module's error: a subclass, the original inside."""


@pytest.mark.parametrize("cause", [
    ssl.SSLCertVerificationError(1, "certificate verify failed"),
    ssl.SSLError(1, "wrong version number"),
])
def test_a_tls_failure_anywhere_under_the_error_is_permanent(cause: ssl.SSLError) -> None:
    outer = ConnectionError("connect failed")
    outer.__cause__ = cause
    error = connection_error("https://h", outer)
    assert isinstance(error, TLSError) and error.transient is False
    wrapped = WrappedCertificateError("key", cause)
    assert isinstance(connection_error("https://h", wrapped, tls=True), TLSError)


def test_a_tls_eof_is_a_transient_connection_error() -> None:
    outer = ConnectionError("reset")
    outer.__context__ = ssl.SSLEOFError(8, "EOF occurred")
    error = connection_error("https://h", outer)
    assert isinstance(error, ProviderTransportError) and error.transient is True
