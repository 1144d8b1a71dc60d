"""Pure unit tests of jobs.lines: read_lines, parse_line and RawLine (no Redis, no network)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jobs.errors import BatchError, InvalidLine
from jobs.lines import DEFAULT_MAX_LINE_BYTES, RawLine, lines_expected, nesting_depth, parse_line, read_lines
from jobs.records import ChatMessage, ItemRequest, RequestDefaults

# -- helpers -----------------------------------------------------------------


def line(obj: Any, number: int = 1) -> RawLine:
    """A RawLine holding ``obj`` as one JSON line, the way read_lines hands it over."""
    return RawLine(number, json.dumps(obj).encode("utf-8") + b"\n")


def parse(obj: Any, number: int = 1) -> ItemRequest:
    return parse_line(line(obj, number))


def invalid(data: Any, number: int = 1) -> InvalidLine:
    """Parse ``data`` (an object to dump, or raw bytes) and return the InvalidLine raised."""
    raw = RawLine(number, data) if isinstance(data, bytes) else line(data, number)
    with pytest.raises(InvalidLine) as info:
        parse_line(raw)
    return info.value


def read_all(data: bytes, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[RawLine]:
    return list(read_lines(io.BytesIO(data), max_line_bytes))


USER_HI = [{"role": "user", "content": "Hi"}]


# -- simple form ---------------------------------------------------------------


def test_prompt_is_one_user_message() -> None:
    req = parse({"id": "q2", "prompt": "Write a haiku about queues"})
    assert req.id == "q2"
    assert req.line == 1
    assert req.messages == (ChatMessage("user", "Write a haiku about queues"),)
    assert req.model is None
    assert req.temperature is None
    assert req.system_message is None
    assert req.params == ()


def test_messages_kept_as_written_with_leading_system() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Again"},
    ]
    req = parse({"id": "q1", "messages": messages, "model": "gpt-4", "temperature": 0.2})
    assert req.messages == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Hi!"),
        ChatMessage("user", "Again"),
    )
    assert req.system_message is None
    assert req.model == "gpt-4"
    assert req.temperature == 0.2


def test_system_message_field() -> None:
    req = parse({"prompt": "Hello", "system_message": "You are terse."})
    assert req.system_message == "You are terse."
    assert req.messages == (ChatMessage("user", "Hello"),)


def test_id_defaults_to_line_number() -> None:
    req = parse({"prompt": "Hello"}, number=17)
    assert req.id == "line-17"
    assert req.line == 17


def test_null_id_defaults_to_line_number() -> None:
    assert parse({"id": None, "prompt": "Hello"}, number=5).id == "line-5"


def test_a_default_id_cannot_equal_a_given_numeric_id() -> None:
    """Line 3 with no id must not collide with an earlier line whose custom_id is "3"."""
    given = parse_line(RawLine(1, json.dumps(batch(custom_id="3")).encode()))
    defaulted = parse({"prompt": "no id"}, number=3)
    assert given.id == "3"
    assert defaulted.id == "line-3"


def test_numeric_id_kept_as_its_string() -> None:
    req = parse({"id": 42, "prompt": "Hello"}, number=3)
    assert req.id == "42"
    assert isinstance(req.id, str)
    assert req.line == 3


def test_model_and_integer_temperature() -> None:
    req = parse({"prompt": "Hello", "model": "gpt-3.5-turbo", "temperature": 1})
    assert req.model == "gpt-3.5-turbo"
    assert req.temperature == 1.0
    assert isinstance(req.temperature, float)


@pytest.mark.parametrize("temperature", [0, 0.0, 2, 2.0, 1.5])
def test_temperature_bounds_accepted(temperature: float) -> None:
    assert parse({"prompt": "x", "temperature": temperature}).temperature == float(temperature)


def test_passthrough_params_land_in_params() -> None:
    req = parse({"prompt": "Hello", "max_tokens": 50, "top_p": 0.9, "stop": ["\n"], "seed": None})
    assert req.params == (("max_tokens", 50), ("stop", ["\n"]), ("top_p", 0.9))


def test_developer_role_accepted() -> None:
    req = parse({"messages": [{"role": "developer", "content": "rules"}, {"role": "user", "content": "q"}]})
    assert [m.role for m in req.messages] == ["developer", "user"]


def test_request_round_trips_through_json() -> None:
    req = parse({"id": "a", "prompt": "Hello", "model": "m", "temperature": 0.5, "max_tokens": 9})
    assert ItemRequest.from_json(req.to_json()) == req


# -- OpenAI Batch form -----------------------------------------------------------


def batch(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-3.5-turbo", "messages": USER_HI, "temperature": 0.7, "max_tokens": 100},
    }
    data.update(overrides)
    return data


def test_batch_form_fields() -> None:
    req = parse(batch(), number=8)
    assert req.id == "r1"
    assert req.line == 8
    assert req.messages == (ChatMessage("user", "Hi"),)
    assert req.model == "gpt-3.5-turbo"
    assert req.temperature == 0.7
    assert req.params == (("max_tokens", 100),)
    assert req.system_message is None


def test_batch_form_short_url_accepted() -> None:
    assert parse(batch(url="/chat/completions")).id == "r1"


def test_batch_form_wrong_method() -> None:
    exc = invalid(batch(method="GET"), number=4)
    assert str(exc) == "line 4, field 'method': must be \"POST\", got 'GET'"
    assert (exc.line, exc.field, exc.item_id) == (4, "method", "r1")


def test_batch_form_wrong_url() -> None:
    exc = invalid(batch(url="/v1/images/generations"), number=2)
    assert str(exc) == ("line 2, field 'url': must be one of /v1/chat/completions, /v1/embeddings, "
                        "/v1/responses, /v1/completions, got \"/v1/images/generations\"")
    assert exc.field == "url"
    assert exc.item_id == "r1"


@pytest.mark.parametrize(("url", "shown"), [(["/v1/chat/completions"], '["/v1/chat/completions"]'),
                                            ({"path": "/v1"}, '{"path": "/v1"}'), (7, "7")])
def test_batch_form_url_not_a_string(url: Any, shown: str) -> None:
    # A list or object url must be an InvalidLine, not a TypeError from `url in frozenset`.
    exc = invalid(batch(url=url), number=2)
    assert str(exc).startswith("line 2, field 'url': must be one of /v1/chat/completions")
    assert str(exc).endswith(f"got {shown}")
    assert exc.item_id == "r1"


def test_batch_form_missing_custom_id() -> None:
    data = batch()
    del data["custom_id"]
    exc = invalid(data, number=6)
    assert str(exc) == "line 6, field 'custom_id': missing (required in the OpenAI Batch form)"
    assert exc.item_id is None


def test_batch_form_null_custom_id() -> None:
    exc = invalid(batch(custom_id=None))
    assert str(exc) == "line 1, field 'custom_id': must not be null"


@pytest.mark.parametrize(("body", "kind"), [([1, 2], "a list"), ("text", "a string"), (None, "null")])
def test_batch_form_body_not_an_object(body: Any, kind: str) -> None:
    exc = invalid(batch(body=body), number=3)
    assert str(exc) == f"line 3, field 'body': must be an object, got {kind}"
    assert exc.item_id == "r1"


def test_batch_form_missing_body_messages() -> None:
    exc = invalid(batch(body={"model": "m"}))
    assert exc.field == "body.messages"
    assert "missing" in str(exc)


def test_batch_form_bad_body_temperature_prefixed() -> None:
    exc = invalid(batch(body={"messages": USER_HI, "temperature": "hot"}))
    assert str(exc) == "line 1, field 'body.temperature': must be a number from 0 to 2, got 'hot'"


def test_batch_form_unknown_top_level_field() -> None:
    exc = invalid(batch(bodyy={}))
    assert exc.field == "bodyy"
    assert "unknown field" in str(exc)
    assert exc.item_id == "r1"


def test_batch_form_stream_must_be_bool() -> None:
    exc = invalid(batch(body={"messages": USER_HI, "stream": "yes"}))
    assert str(exc) == "line 1, field 'body.stream': must be a boolean"


# -- invalid lines ------------------------------------------------------------------


def test_not_json() -> None:
    exc = invalid(b"{not json\n", number=4)
    assert str(exc).startswith("line 4: not valid JSON: ")
    assert "(column 2)" in str(exc)
    assert exc.field is None
    assert exc.item_id is None


def test_truncated_json() -> None:
    exc = invalid(b'{"prompt": "hi"\n', number=2)
    assert str(exc).startswith("line 2: not valid JSON")


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"[1, 2]\n", "a list"), (b'"hello"\n', "a string"), (b"12\n", "a number"),
     (b"3.5\n", "a number"), (b"null\n", "null"), (b"true\n", "a boolean")],
)
def test_json_but_not_an_object(data: bytes, kind: str) -> None:
    exc = invalid(data, number=9)
    assert str(exc) == f"line 9: expected a JSON object, got {kind}"


def test_messages_not_a_list() -> None:
    exc = invalid({"messages": "Hello"}, number=12)
    assert str(exc) == "line 12, field 'messages': must be a non-empty list, got a string"
    assert exc.field == "messages"


def test_message_not_an_object() -> None:
    exc = invalid({"messages": ["Hello"]})
    assert str(exc) == ("line 1, field 'messages[0]': must be an object with 'role' and 'content', "
                        "got a string")


def test_content_not_a_string() -> None:
    exc = invalid({"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": 5}]})
    assert str(exc) == "line 1, field 'messages[1].content': must be a string or a list of parts, got a number"


def test_content_missing() -> None:
    exc = invalid({"messages": [{"role": "user"}]})
    assert str(exc) == ("line 1, field 'messages[0].content': must be a string or a list of parts "
                        "(null only on an assistant turn with tool_calls)")


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b'{"prompt": "x", "temperature": "0.5"}', "'0.5'"),
        (b'{"prompt": "x", "temperature": true}', "True"),
        (b'{"prompt": "x", "temperature": 3}', "3"),
        (b'{"prompt": "x", "temperature": -0.1}', "-0.1"),
        (b'{"prompt": "x", "temperature": [1]}', "[1]"),
    ],
)
def test_bad_temperature(data: bytes, shown: str) -> None:
    exc = invalid(data, number=7)
    assert str(exc) == f"line 7, field 'temperature': must be a number from 0 to 2, got {shown}"
    assert exc.field == "temperature"


def test_huge_integer_temperature_is_invalid_line() -> None:
    # A 400-digit integer is valid JSON; math.isfinite() on it raises OverflowError.
    data = b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}"
    exc = invalid(data, number=2)
    assert exc.line == 2
    assert exc.field == "temperature"


def test_integer_beyond_int_max_str_digits_is_invalid_line() -> None:
    # Python refuses to convert integers of more than 4300 digits: json.loads raises a
    # plain ValueError (not JSONDecodeError) for such a line.
    data = b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"
    exc = invalid(data, number=3)
    assert exc.line == 3
    assert str(exc).startswith("line 3")


def test_bad_model_type() -> None:
    exc = invalid({"prompt": "x", "model": 4})
    assert str(exc) == "line 1, field 'model': must be a string, got a number"


def test_bad_system_message_type() -> None:
    exc = invalid({"prompt": "x", "system_message": ["a"]})
    assert str(exc) == "line 1, field 'system_message': must be a string, got a list"


def test_missing_messages() -> None:
    exc = invalid({"id": "q3", "model": "gpt-4"}, number=5)
    assert str(exc) == "line 5, field 'messages': missing: give 'messages' (a list) or 'prompt' (a string)"
    assert exc.item_id == "q3"


def test_empty_messages_list() -> None:
    exc = invalid({"messages": []}, number=12)
    assert str(exc) == "line 12, field 'messages': must be a non-empty list"


def test_null_messages() -> None:
    exc = invalid({"messages": None})
    assert exc.field == "messages"
    assert "non-empty list" in str(exc)


@pytest.mark.parametrize("prompt", ["", "   ", None, 3])
def test_blank_or_non_string_prompt(prompt: Any) -> None:
    exc = invalid({"prompt": prompt})
    assert str(exc) == "line 1, field 'prompt': must be a non-empty string"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_only_a_system_message_is_the_aivvm_providers_to_refuse(role: str) -> None:
    data = {"messages": [{"role": role, "content": "Be brief."}]}
    assert parse_line(line(data, 2)).messages[0].role == role  # the chat API takes it
    with pytest.raises(InvalidLine) as info:
        parse_line(line(data, 2), providers=("aivvm",))
    assert str(info.value) == ("line 2, field 'messages': has only a system message: the aivvm provider "
                               "needs a user message; add one")


def test_only_a_system_message_in_batch_form() -> None:
    data = batch(body={"messages": [{"role": "system", "content": "Be brief."}]})
    assert parse_line(line(data)).messages[0].role == "system"
    with pytest.raises(InvalidLine) as info:
        parse_line(line(data), providers=("aivvm", "aivvm"))
    assert info.value.field == "body.messages"


@pytest.mark.parametrize("role", ["robot", "tools", "User", None, 1])
def test_unknown_role(role: Any) -> None:
    exc = invalid({"messages": [{"role": role, "content": "Hello"}]}, number=3)
    assert str(exc).startswith(f"line 3, field 'messages[0].role': unknown role {role!r}")
    assert "assistant, developer, function, system, tool, user" in str(exc)


def test_unknown_top_level_field_typo() -> None:
    exc = invalid({"id": "q1", "prompt": "Hello", "temprature": 0.2}, number=4)
    assert str(exc).startswith("line 4, field 'temprature': unknown field")
    assert exc.field == "temprature"
    assert exc.item_id == "q1"


def test_both_prompt_and_messages() -> None:
    exc = invalid({"prompt": "a", "messages": USER_HI})
    assert str(exc) == "line 1, field 'prompt': give either 'messages' or 'prompt', not both"


@pytest.mark.parametrize("item_id", ["", "   ", "\t"])
def test_empty_id(item_id: str) -> None:
    exc = invalid({"id": item_id, "prompt": "Hello"}, number=8)
    assert str(exc) == "line 8, field 'id': must not be empty"
    assert exc.item_id is None


@pytest.mark.parametrize(("item_id", "kind"), [(True, "a boolean"), (False, "a boolean"),
                                               (1.5, "a number"), ([1], "a list"), ({}, "an object")])
def test_bad_id_type(item_id: Any, kind: str) -> None:
    exc = invalid({"id": item_id, "prompt": "Hello"})
    assert str(exc) == f"line 1, field 'id': must be a string or an integer, got {kind}"
    assert exc.item_id is None


def test_id_too_long() -> None:
    exc = invalid({"id": "x" * 513, "prompt": "Hello"})
    assert str(exc) == "line 1, field 'id': is longer than 512 characters"
    assert exc.item_id == "x" * 512
    assert parse({"id": "y" * 512, "prompt": "Hello"}).id == "y" * 512


def test_non_utf8_bytes() -> None:
    exc = invalid(b'{"prompt": "\xff"}\n', number=6)
    assert str(exc) == "line 6: not valid UTF-8 (byte 13 of the line)"
    assert exc.field is None


def test_lone_surrogate_escape_is_not_accepted_as_text() -> None:
    # "\ud800" is valid JSON syntax but no Unicode character: an accepted request holding it
    # can never be encoded as UTF-8 (ItemRequest.to_json() is stored in Redis as UTF-8).
    raw = RawLine(1, b'{"id": "s1", "prompt": "hi \\ud800"}\n')
    try:
        req = parse_line(raw)
    except InvalidLine as exc:
        assert exc.line == 1
    else:
        req.to_json().encode("utf-8")  # raises UnicodeEncodeError if the surrogate was kept


@pytest.mark.parametrize(("opener", "closer"), [(b"[", b"]"), (b'{"a":', b"}")])
def test_deep_nesting_is_invalid_line_not_recursion_error(opener: bytes, closer: bytes) -> None:
    depth = 100_000
    exc = invalid(opener * depth + closer * depth, number=11)
    assert str(exc) == "line 11: JSON nested too deeply (over 512 levels)"


def test_nesting_is_judged_the_same_whatever_the_stack_beneath() -> None:
    """serve checks a file on one thread and submits it on another: json.loads's own limit is the
    recursion limit less the frames beneath it, and a line 980 levels deep passed one and not the other."""
    line = b'{"id": "d", "prompt": "x", "metadata": {"k": ' + b"[" * 980 + b"]" * 980 + b"}}"

    def beneath(frames: int) -> str:
        return beneath(frames - 1) if frames else str(invalid(line))

    assert beneath(0) == beneath(300) == "line 1: JSON nested too deeply (over 512 levels)"
    assert nesting_depth('{"a": "[[{{", "b": [[{}]], "c": "\\"}') == 4


def test_deep_nesting_inside_messages() -> None:
    exc = invalid(b'{"id": "d", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert exc.line == 1
    assert "nested too deeply" in str(exc)


def test_oversized_rawline_message() -> None:
    exc = parse_line_error(RawLine(5, b'{"prompt": "abc', oversized=True), 10)
    assert str(exc) == ("line 5: line is longer than the limit of 10 bytes "
                        "(AIVVM_BATCH_MAX_LINE_BYTES)")
    assert exc.item_id is None


def parse_line_error(raw: RawLine, max_line_bytes: int = 1 << 20,
                     providers: tuple[str, ...] = ()) -> InvalidLine:
    with pytest.raises(InvalidLine) as info:
        parse_line(raw, max_line_bytes, providers=providers)
    return info.value


def test_invalid_line_is_a_batch_error() -> None:
    assert isinstance(invalid(b"nope"), BatchError)


# -- item_id of InvalidLine -----------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"id": "q7", "prompt": "x", "temperature": 9}, "q7"),
        ({"id": 42, "messages": []}, "42"),
        ({"prompt": "x", "temperature": 9}, None),
        ({"id": None, "prompt": ""}, None),
        ({"id": True, "prompt": "x"}, None),
        ({"id": "  ", "prompt": "x"}, None),
        (batch(custom_id="c9", body={"messages": "no"}), "c9"),
        (batch(custom_id=7, url="/v1/x"), "7"),
    ],
)
def test_item_id_set_when_line_has_usable_id(data: dict[str, Any], expected: str | None) -> None:
    assert invalid(data).item_id == expected


def test_item_id_absent_when_not_json() -> None:
    assert invalid(b'{"id": "q1", "prompt": }').item_id is None


# -- read_lines ----------------------------------------------------------------------------


def test_read_lines_numbers_and_data() -> None:
    lines = read_all(b'{"prompt":"a"}\n{"prompt":"b"}\n')
    assert lines == [RawLine(1, b'{"prompt":"a"}\n'), RawLine(2, b'{"prompt":"b"}\n')]


def test_blank_and_whitespace_lines_skipped_but_counted() -> None:
    data = b'\n{"prompt":"a"}\n   \n\t\r\n\n{"prompt":"b"}\n\n'
    lines = read_all(data)
    assert [r.number for r in lines] == [2, 6]
    assert [parse_line(r).id for r in lines] == ["line-2", "line-6"]


def test_empty_file_yields_nothing() -> None:
    assert read_all(b"") == []


def test_only_blank_lines_yields_nothing() -> None:
    assert read_all(b"\n\n  \n\r\n") == []


def test_last_line_without_trailing_newline() -> None:
    lines = read_all(b'{"prompt":"a"}\n{"prompt":"b"}')
    assert lines[-1] == RawLine(2, b'{"prompt":"b"}')
    assert parse_line(lines[-1]).messages == (ChatMessage("user", "b"),)


def test_utf8_bom_at_start_is_dropped() -> None:
    lines = read_all(b'\xef\xbb\xbf{"prompt":"hi"}\n{"prompt":"yo"}\n')
    assert lines[0] == RawLine(1, b'{"prompt":"hi"}\n')
    assert parse_line(lines[0]).id == "line-1"
    assert parse_line(lines[1]).id == "line-2"


def test_bom_alone_on_first_line_is_blank() -> None:
    lines = read_all(b'\xef\xbb\xbf\n{"prompt":"hi"}\n')
    assert [r.number for r in lines] == [2]


def test_crlf_line_endings() -> None:
    lines = read_all(b'{"prompt":"a"}\r\n\r\n{"id":"x","prompt":"b"}\r\n')
    assert [r.number for r in lines] == [1, 3]
    reqs = [parse_line(r) for r in lines]
    assert [(q.id, q.messages[0].content) for q in reqs] == [("line-1", "a"), ("x", "b")]


def test_small_limit_oversized_line_then_next_line() -> None:
    lines = read_all(b"12345678901234567890\nshort\n", max_line_bytes=10)
    assert lines == [RawLine(1, b"123456789012", oversized=True), RawLine(2, b"short\n")]
    exc = parse_line_error(lines[0], 10)
    assert str(exc).startswith("line 1: line is longer than the limit of 10 bytes")


def test_small_limit_boundaries() -> None:
    data = b"0123456789\n01234567890\n\n0123456789"
    lines = read_all(data, max_line_bytes=10)
    assert [(r.number, r.oversized) for r in lines] == [(1, False), (2, True), (4, False)]
    assert lines[0].data == b"0123456789\n"
    assert lines[2].data == b"0123456789"


def test_small_limit_oversized_last_line_without_newline() -> None:
    lines = read_all(b'{"prompt":"a"}\n' + b"x" * 50, max_line_bytes=20)
    assert [(r.number, r.oversized) for r in lines] == [(1, False), (2, True)]


def test_ten_megabyte_line_with_default_limit() -> None:
    big = b'{"prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}\n'
    stream = io.BytesIO(big + b"\n" + b'{"id": "after", "prompt": "next"}\n')
    lines = list(read_lines(stream))
    assert len(lines) == 2
    first, second = lines
    assert first.number == 1
    assert first.oversized is True
    assert len(first.data) == DEFAULT_MAX_LINE_BYTES + 2
    assert second == RawLine(3, b'{"id": "after", "prompt": "next"}\n')
    exc = parse_line_error(first, DEFAULT_MAX_LINE_BYTES)
    assert str(exc).startswith(f"line 1: line is longer than the limit of {DEFAULT_MAX_LINE_BYTES} bytes")
    req = parse_line(second)
    assert (req.id, req.line) == ("after", 3)


def test_mixed_forms_in_one_file() -> None:
    data = (json.dumps({"id": "s", "prompt": "a"}) + "\n" + json.dumps(batch()) + "\n"
            + "not json\n").encode()
    outcome: list[str] = []
    for raw in read_all(data):
        try:
            outcome.append(f"{raw.number}:{parse_line(raw).id}")
        except InvalidLine as exc:
            outcome.append(f"{raw.number}:invalid:{exc.line}")
    assert outcome == ["1:s", "2:r1", "3:invalid:3"]


# -- Hypothesis fuzzing -----------------------------------------------------------------------


def parse_or_invalid(raw: RawLine) -> ItemRequest | InvalidLine:
    try:
        result = parse_line(raw)
    except InvalidLine as exc:
        assert exc.line == raw.number
        assert str(exc).startswith(f"line {raw.number}")
        return exc
    assert isinstance(result, ItemRequest)
    assert result.line == raw.number
    return result


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), number=st.integers(min_value=1, max_value=10**6))
def test_fuzz_arbitrary_bytes(data: bytes, number: int) -> None:
    assert isinstance(parse_or_invalid(RawLine(number, data)), (ItemRequest, InvalidLine))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)

# Values placed under the field names the parser knows, so the fuzzing reaches its checks.
known_keys = st.sampled_from(["id", "prompt", "messages", "model", "temperature", "system_message",
                              "max_tokens", "custom_id", "method", "url", "body", "role", "content"])
field_dicts = st.recursive(
    st.dictionaries(known_keys, json_values, max_size=6),
    lambda children: st.dictionaries(known_keys, children | st.lists(children, max_size=3), max_size=6),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values | field_dicts)
@example(value={"url": [], "custom_id": 0})  # found by this test: unhashable url
def test_fuzz_json_values(value: Any) -> None:
    raw = RawLine(1, json.dumps(value).encode("utf-8") + b"\n")
    assert isinstance(parse_or_invalid(raw), (ItemRequest, InvalidLine))


non_blank_text = st.text(min_size=1).filter(lambda s: bool(s.strip()))


@settings(max_examples=300, deadline=None)
@given(
    item_id=non_blank_text.filter(lambda s: len(s) <= 512),
    prompt=non_blank_text,
    number=st.integers(min_value=1, max_value=10**6),
    ensure_ascii=st.booleans(),
    crlf=st.booleans(),
)
def test_fuzz_valid_simple_form(item_id: str, prompt: str, number: int, ensure_ascii: bool,
                                crlf: bool) -> None:
    text = json.dumps({"id": item_id, "prompt": prompt}, ensure_ascii=ensure_ascii)
    raw = RawLine(number, text.encode("utf-8") + (b"\r\n" if crlf else b"\n"))
    req = parse_line(raw)
    assert req.id == item_id
    assert req.line == number
    assert req.messages == (ChatMessage("user", prompt),)
    assert ItemRequest.from_json(req.to_json()) == req


@pytest.mark.parametrize("literal", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_non_finite_numbers_are_not_json(literal: bytes) -> None:
    exc = parse_line_error(RawLine(7, b'{"prompt": "x", "temperature": ' + literal + b"}"), 1000)
    assert str(exc).startswith("line 7: not valid JSON")


# -- n, token limits, metadata, unknown fields --------------------------------------------------


@pytest.mark.parametrize("form", ["simple", "batch"])
@pytest.mark.parametrize("n", [0, 129, 1.0, "1", True])
def test_n_must_be_a_count_of_choices(form: str, n: Any) -> None:
    data = {"prompt": "x", "n": n} if form == "simple" else batch(body={"messages": USER_HI, "n": n})
    exc = invalid(data, number=4)
    assert exc.field == ("n" if form == "simple" else "body.n")
    assert "must be an integer from 1 to 128" in str(exc)


def test_n_above_1_is_for_providers_that_return_choices() -> None:
    assert parse({"prompt": "x", "n": 3}).params == (("n", 3),)
    exc = parse_line_error(line({"prompt": "x", "n": 3}), providers=("aivvm",))
    assert "the aivvm provider cannot send n > 1" in str(exc)


def test_n_equal_to_1_is_fine() -> None:
    assert parse({"prompt": "x", "n": 1}).params == (("n", 1),)
    assert parse(batch(body={"messages": USER_HI, "n": 1})).params == (("n", 1),)


@pytest.mark.parametrize("value", [0, -5, "100", 1.5, True, [1]])
def test_max_tokens_must_be_a_positive_integer(value: Any) -> None:
    exc = invalid({"prompt": "x", "max_tokens": value})
    assert exc.field == "max_tokens"
    assert "positive integer" in str(exc)


def test_metadata_is_kept_and_not_a_parameter() -> None:
    req = parse({"id": "m", "prompt": "x", "metadata": {"team": "red", "n": "2"}})
    assert req.metadata == (("n", "2"), ("team", "red"))
    assert req.params == ()
    assert ItemRequest.from_json(req.to_json()) == req
    body = parse(batch(body={"messages": USER_HI, "max_tokens": 5, "metadata": {"k": "v"}}))
    assert body.metadata == (("k", "v"),)
    assert body.params == (("max_tokens", 5),)


def test_metadata_must_be_an_object_of_strings() -> None:
    assert invalid({"prompt": "x", "metadata": "tag"}).field == "metadata"
    exc = invalid({"prompt": "x", "metadata": {"n": 2}})
    assert exc.field == "metadata" and "values must be strings" in str(exc)


def test_every_unknown_field_of_a_simple_line_is_named() -> None:
    exc = invalid({"id": "u", "prompt": "x", "colour": 1, "size": 2, "temprature": 0.1}, number=2)
    assert exc.field is None
    assert "unknown fields 'colour', 'size', 'temprature'" in str(exc)


def test_a_batch_body_passes_every_field_through() -> None:
    body = {"messages": USER_HI, "tools": [{"type": "function", "function": {"name": "f"}}],
            "logprobs": True, "top_logprobs": 2, "grammar": "root ::= \"a\"", "x_vendor": {"k": 1}}
    req = parse(batch(body=body))
    assert dict(req.params) == {k: v for k, v in body.items() if k != "messages"}
    assert ItemRequest.from_json(req.to_json()) == req


# -- defaults ------------------------------------------------------------------------------------

DEFAULTS = RequestDefaults(model="gpt-4", temperature=0.3, max_tokens=77, system_message="Be terse.")


def with_defaults(obj: Any, defaults: RequestDefaults = DEFAULTS) -> ItemRequest:
    return parse_line(line(obj), defaults=defaults)


@pytest.mark.parametrize("form", ["simple", "batch"])
def test_defaults_fill_what_a_line_lacks(form: str) -> None:
    data = {"prompt": "x"} if form == "simple" else batch(body={"messages": USER_HI})
    req = with_defaults(data)
    assert (req.model, req.temperature, req.system_message) == ("gpt-4", 0.3, "Be terse.")
    assert req.params == (("max_tokens", 77),)


@pytest.mark.parametrize("form", ["simple", "batch"])
def test_a_lines_own_values_win_over_defaults(form: str) -> None:
    own = {"model": "gpt-3.5-turbo", "temperature": 0.0, "max_tokens": 5, "system_message": "Mine."}
    data = {"prompt": "x", **own} if form == "simple" else batch(body={"messages": USER_HI, **own})
    req = with_defaults(data)
    assert (req.model, req.temperature, req.system_message) == ("gpt-3.5-turbo", 0.0, "Mine.")
    assert req.params == (("max_tokens", 5),)


def test_default_system_only_when_the_line_has_no_system_message() -> None:
    led = with_defaults({"messages": [{"role": "system", "content": "Own."}, *USER_HI]})
    assert led.system_message is None
    dev = with_defaults({"messages": [{"role": "developer", "content": "Own."}, *USER_HI]})
    assert dev.system_message is None


def test_default_max_tokens_does_not_add_to_max_completion_tokens() -> None:
    req = with_defaults({"prompt": "x", "max_completion_tokens": 9})
    assert req.params == (("max_completion_tokens", 9),)


def test_no_defaults_leave_the_line_as_written() -> None:
    req = parse_line(line({"prompt": "x"}), defaults=RequestDefaults())
    assert (req.model, req.temperature, req.system_message, req.params) == (None, None, None, ())


# -- lines_expected: how messages are sized from the start -------------------------


@pytest.mark.parametrize("data, expected", [
    (b"", 0), (b"{}\n", 1), (b"{}", 1), (b"{}\n{}\n{}", 3), (b"{}\n\n{}\n", 3), (b"\xef\xbb\xbf{}\r\n{}\r\n", 2),
])
def test_lines_expected_counts_a_regular_file(tmp_path: Path, data: bytes, expected: int) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as stream:
        assert lines_expected(stream) == expected
        assert stream.tell() == 0  # the reading that follows starts where it was
        assert stream.read() == data


def test_lines_expected_extrapolates_past_its_scan_and_keeps_the_position(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * 9 + b"\n" + b"abcdefghi\n" * 999)  # 1,000 lines of 10 bytes
    with open(path, "rb") as stream:
        assert lines_expected(stream, count_limit=100) == 1000  # 10 newlines in 100 bytes, times 100
        stream.readline()
        assert lines_expected(stream, count_limit=100) == 999  # from where the reader stands
        assert stream.readline() == b"abcdefghi\n"


def test_lines_expected_of_a_pipe_is_unknown() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"{}\n{}\n")
    os.close(write_end)
    with open(read_end, "rb") as stream:
        assert lines_expected(stream) is None
        assert stream.read() == b"{}\n{}\n"  # nothing was consumed
    assert lines_expected(io.BytesIO(b"{}\n")) is None  # no file behind it
