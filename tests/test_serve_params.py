"""The checks of what a client sends (serve/params.py): a number of any length is refused, not a 500."""

from __future__ import annotations

import pytest

from aivvm_batch.serve.errors import BadRequest
from aivvm_batch.serve.params import declared_over, digits_value, int_param, output_ttl, shown
from aivvm_batch.serve.upload import expires_after


def test_digits_are_read_whatever_their_count() -> None:
    assert digits_value("10", 100) == 10
    assert digits_value("0" * 5000 + "7", 100) == 7
    assert digits_value("9" * 5000, 100) == 101  # past int()'s 4,300 digits: over, not a ValueError
    assert digits_value("0", 100) == 0
    for raw in ("", "-1", "1.0", " 10", "\uff11\uff10", "1_0", "\u00b2"):
        assert digits_value(raw, 100) is None, raw


def test_int_param_refuses_a_number_of_any_length_in_a_short_message() -> None:
    assert int_param("0042", "limit", 1, 100, 20) == 42
    assert int_param("", "limit", 1, 100, 20) == 20
    with pytest.raises(BadRequest) as refused:
        int_param("1" * 5000, "limit", 1, 100, 20)
    assert refused.value.param == "limit" and len(refused.value.message) < 200


def test_a_declared_length_is_compared_without_parsing_thousands_of_digits() -> None:
    assert declared_over("2" + "0" * 5000, 1024)
    assert not declared_over("0" * 5000 + "2", 1024)
    assert not declared_over(None, 1024) and not declared_over("abc", 1024)


def test_expires_after_seconds_of_any_length_is_a_400() -> None:
    assert expires_after({"expires_after[anchor]": "created_at", "expires_after[seconds]": "0" * 5000 + "3600"}) == 3600
    for seconds in ("9" * 5000, "1" * 4301):
        with pytest.raises(BadRequest) as refused:
            expires_after({"expires_after[anchor]": "created_at", "expires_after[seconds]": seconds})
        assert refused.value.param == "expires_after.seconds" and len(refused.value.message) < 200


def test_shown_quotes_the_start_of_a_long_value() -> None:
    assert shown("24h") == "'24h'"
    assert shown("x" * 10_000).endswith("(10002 characters)") and len(shown("x" * 10_000)) < 100


def test_output_expires_after_takes_a_whole_number_written_as_a_float() -> None:
    assert output_ttl({"anchor": "created_at", "seconds": 7200.0}) == 7200
    for seconds in (7200.5, float("inf"), float("nan"), True, "7200"):
        with pytest.raises(BadRequest):
            output_ttl({"anchor": "created_at", "seconds": seconds})
