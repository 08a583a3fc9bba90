"""Retry-After values: delay-seconds, HTTP-dates against an explicit wall clock, and junk that must be ignored."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing.retry_after import parse_retry_after

NOW = float(calendar.timegm((2015, 10, 21, 7, 27, 0)))  # Wed, 21 Oct 2015 07:27:00 GMT


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # already past
        ("Wed, 21 Oct 2015 08:28:00 +0100", 60.0),
        (None, None),
        ("", None),
        ("-5", None),
        ("inf", None),
        ("nan", None),
        ("1e3", None),
        ("soon", None),
        ("12 seconds", None),
        ("Wed, 21 Oct 2015 07:28:00", 60.0),  # HTTP-dates are GMT
        ("9" * 400, None),
        ("Wed, 21 Oct 2015 07:28:00 GMT" * 5, None),
    ],
)
def test_known_values(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_never_raises_and_never_negative(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or seconds >= 0.0
