"""RFC 3986 percent-encoding: known answers, strict decoding and round-trip properties."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import OAuthError
from gateway.oauth.encoding import UNRESERVED, percent_decode, percent_encode

_ENCODED = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})*")


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("", ""),
        ("AZaz09-._~", "AZaz09-._~"),
        (" ", "%20"),
        ("+/=", "%2B%2F%3D"),
        ("a,b&c=d", "a%2Cb%26c%3Dd"),
        ("https://api.ibkr.com/v1", "https%3A%2F%2Fapi.ibkr.com%2Fv1"),
        ("é", "%C3%A9"),
        ("\u20ac", "%E2%82%AC"),
        ("%", "%25"),
        ("*!'()", "%2A%21%27%28%29"),
    ],
)
def test_percent_encode_known_answers(raw: str, encoded: str) -> None:
    assert percent_encode(raw) == encoded
    assert percent_decode(encoded) == raw


def test_percent_decode_accepts_lower_case_hex_and_keeps_plus() -> None:
    assert percent_decode("%2b%2F+a") == "+/+a"


def test_percent_decode_passes_through_unescaped_reserved_characters() -> None:
    assert percent_decode("265598,8314") == "265598,8314"


@pytest.mark.parametrize("bad", ["%", "%2", "a%zz", "%%41", "%C3", "%FF", "%C3%28"])
def test_percent_decode_rejects_malformed_input(bad: str) -> None:
    with pytest.raises(OAuthError):
        percent_decode(bad)


def test_percent_encode_rejects_lone_surrogate() -> None:
    with pytest.raises(OAuthError):
        percent_encode("a\ud800b")


@given(st.text())
def test_round_trip(text: str) -> None:
    assert percent_decode(percent_encode(text)) == text


@given(st.text())
def test_output_alphabet_is_unreserved_or_escape(text: str) -> None:
    encoded = percent_encode(text)
    assert _ENCODED.fullmatch(encoded)


@given(st.text(alphabet=sorted(UNRESERVED)))
def test_unreserved_text_is_unchanged(text: str) -> None:
    assert percent_encode(text) == text


@given(st.text())
def test_decode_either_decodes_or_raises_oauth_error(text: str) -> None:
    with contextlib.suppress(OAuthError):
        percent_decode(text)
