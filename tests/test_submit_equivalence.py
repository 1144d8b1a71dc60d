"""Submit's shortcuts give exactly what the general paths give.

``lines._parse_usual`` skips the general checks for the usual line, and
``ItemRequest.to_json`` writes its JSON field by field; both must agree, character for
character, with the general path (``lines._parse_any``) and with ``json.dumps``.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from jobs.errors import InvalidLine
from jobs.lines import RawLine, _parse_any, _parse_usual, parse_data
from jobs.records import ChatMessage, ItemRequest, RequestDefaults

texts = st.text(max_size=12) | st.sampled_from(["", " ", "\u00e9t\u00e9", "\U0001f600", "a\"b\\c", "\x00\n"])
odd_values = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) \
    | texts | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
roles = st.sampled_from(["user", "assistant", "system", "developer", "tool", "User", ""])
messages = st.lists(
    st.fixed_dictionaries({"role": roles | odd_values, "content": texts | odd_values},
                          optional={"name": texts}) | odd_values,
    max_size=3) | odd_values
fields = st.fixed_dictionaries({}, optional={
    "id": texts | st.integers(-10**6, 10**6) | odd_values | st.just("x" * 513),
    "prompt": texts | odd_values,
    "messages": messages,
    "model": texts | odd_values,
    "temperature": st.floats(-1, 3, allow_nan=False) | st.integers(-1, 3) | odd_values,
    "system_message": texts | odd_values,
    "metadata": st.dictionaries(st.text(max_size=3), texts, max_size=2) | odd_values,
    "max_tokens": st.integers(-1, 5) | odd_values,
    "custom_id": texts,
})
# mostly lines the shortcut takes, each field now and then odd
good_texts = st.text(min_size=1, max_size=8).filter(str.strip)
usual_fields = st.fixed_dictionaries({}, optional={
    "id": good_texts | st.integers(-10**6, 10**6) | odd_values,
    "model": good_texts | st.none() | odd_values,
    "temperature": st.floats(-0.5, 2.5, allow_nan=False) | st.integers(-1, 3) | st.none(),
    "system_message": good_texts | st.none() | odd_values,
}).flatmap(lambda rest: st.one_of(
    st.fixed_dictionaries({"prompt": good_texts | odd_values}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer"]) | roles, "content": texts}),
        min_size=1, max_size=3) | messages}),
).map(lambda text: {**rest, **text}))
defaults = st.builds(RequestDefaults, model=st.none() | st.just("m"), temperature=st.none() | st.just(0.5),
                     system_message=st.none() | st.just("be brief"), max_tokens=st.none() | st.just(7))


def _line(data: dict[str, Any], ascii_only: bool, spaced: bool, end: str) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    return (json.dumps(data, ensure_ascii=ascii_only, separators=separators) + end).encode("utf-8", "surrogatepass")


def _outcome(function: Any, *args: Any) -> ItemRequest | str:
    try:
        return function(*args)  # type: ignore[no-any-return]
    except InvalidLine as exc:
        return f"invalid: {exc}"


@settings(max_examples=600, deadline=None)
@given(fields | usual_fields, st.booleans(), st.booleans(), st.sampled_from(["", "\n", "\r\n", " \n", " x\n"]), defaults)
@example({"id": 3, "prompt": "hi"}, False, False, "\n", RequestDefaults())
@example({"messages": [{"role": "system", "content": "s"}]}, False, False, "\n", RequestDefaults())
@example({"prompt": "\ud800"}, True, False, "\n", RequestDefaults())
@example({"prompt": "x", "temperature": True}, False, False, "\n", RequestDefaults())
def test_the_usual_line_shortcut_gives_what_every_check_gives(data: dict[str, Any], ascii_only: bool, spaced: bool,
                                                               end: str, given_defaults: RequestDefaults) -> None:
    line = _line(data, ascii_only, spaced, end)
    general = _outcome(_parse_any, RawLine(4, line), 1024 * 1024, given_defaults)
    usual = _parse_usual(4, line, given_defaults)
    if usual is not None:
        assert usual == general
        assert repr(usual) == repr(general) and hash(usual) == hash(general)
    assert _outcome(parse_data, 4, line, False, 1024 * 1024, given_defaults) == general


@settings(max_examples=50, deadline=None)
@given(st.fixed_dictionaries({"prompt": good_texts}, optional={
    "id": good_texts, "model": st.none(), "temperature": st.none(), "system_message": st.none()}))
def test_the_shortcut_takes_lines_with_a_prompt(data: dict[str, Any]) -> None:
    assert _parse_usual(2, _line(data, False, False, "\n"), RequestDefaults()) is not None


def test_the_shortcut_takes_the_usual_lines() -> None:
    """Were it to give up on every line, the test above would pass and submit be slow."""
    for line in (b'{"id":"a","prompt":"hi"}\n', b'{"messages":[{"role":"user","content":"x"}],"temperature":1}\r\n',
                 '{"prompt":"\u00e9t\u00e9","model":"gpt-4"}'.encode()):
        assert _parse_usual(1, line, RequestDefaults()) is not None
    for line in (b' {"prompt":"hi"}', b'{"prompt":"hi","max_tokens":3}', b'{"prompt":"hi"} x', b'{"prompt":NaN}'):
        assert _parse_usual(1, line, RequestDefaults()) is None


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=2)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=4)
requests = st.builds(
    ItemRequest,
    id=st.text(max_size=8),
    line=st.integers(1, 10**7),
    messages=st.lists(st.builds(ChatMessage, role=st.sampled_from(["user", "system"]), content=st.text(max_size=8)),
                      min_size=1, max_size=3).map(tuple),
    model=st.none() | st.text(max_size=5),
    temperature=st.none() | st.floats(0, 2),
    system_message=st.none() | st.text(max_size=5),
    params=st.dictionaries(st.sampled_from(["max_tokens", "stop", "seed", "logit_bias"]), json_values,
                           max_size=3).map(lambda d: tuple(sorted(d.items()))),
    metadata=st.dictionaries(st.text(max_size=3), st.text(max_size=4), max_size=2).map(lambda d: tuple(sorted(d.items()))),
)


@settings(max_examples=400, deadline=None)
@given(requests)
@example(ItemRequest("\u2028\"\\", 1, (ChatMessage("user", "\x00\ud7ff\U0001f600"),), temperature=1e-300))
def test_a_request_is_written_as_json_dumps_writes_it(request: ItemRequest) -> None:
    data: dict[str, Any] = {"id": request.id, "line": request.line, "messages": [m.to_dict() for m in request.messages]}
    for name in ("model", "temperature", "system_message"):
        if getattr(request, name) is not None:
            data[name] = getattr(request, name)
    if request.params:
        data["params"] = dict(request.params)
    if request.metadata:
        data["metadata"] = dict(request.metadata)
    assert request.to_json() == json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    assert ItemRequest.from_json(request.to_json()) == request
