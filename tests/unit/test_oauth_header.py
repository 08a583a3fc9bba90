"""Signatures and the Authorization header: the byte-exact published header, HMAC vectors, rejections."""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import OAuthError
from gateway.oauth.basestring import signature_base_string
from gateway.oauth.dh import decode_live_session_token
from gateway.oauth.encoding import percent_decode
from gateway.oauth.header import authorization_header
from gateway.oauth.keys import load_rsa_private_key
from gateway.oauth.signatures import hmac_sha256_signature, rsa_sha256_signature

VECTORS: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).parent.parent / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
RSA_HEADER = VECTORS["published"]["rsa_authorization_header"]
HMAC = VECTORS["synthetic_hmac"]
SIGNING_KEY = load_rsa_private_key(RSA_HEADER["private_key_pem"].encode("ascii"), what="signature key")


def _published_signature() -> str:
    base = signature_base_string(
        RSA_HEADER["method"], RSA_HEADER["url"], RSA_HEADER["params"], prepend=RSA_HEADER["prepend_hex"]
    )
    return rsa_sha256_signature(SIGNING_KEY, base)


def test_published_rsa_authorization_header_is_byte_exact() -> None:
    header = authorization_header(RSA_HEADER["params"], _published_signature(), RSA_HEADER["realm"])
    assert header == RSA_HEADER["authorization"]


def test_rsa_signature_is_one_line_base64_that_verifies() -> None:
    signature = _published_signature()
    assert "\n" not in signature
    base = signature_base_string(
        RSA_HEADER["method"], RSA_HEADER["url"], RSA_HEADER["params"], prepend=RSA_HEADER["prepend_hex"]
    )
    SIGNING_KEY.public_key().verify(base64.b64decode(signature), base.encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("case", HMAC["cases"], ids=lambda c: str(c["method"]))
def test_synthetic_hmac_signatures(case: dict[str, str]) -> None:
    lst = decode_live_session_token(HMAC["live_session_token"])
    signature = hmac_sha256_signature(lst, case["base_string"])
    assert signature == case["signature"]
    assert len(base64.b64decode(signature)) == 32


@pytest.mark.parametrize("key", [b"", b"x" * 19, b"x" * 21, b"U0Xx4BFt3WHeUTX0Y43PSfN+znI="])
def test_hmac_requires_the_20_raw_token_bytes(key: bytes) -> None:
    with pytest.raises(OAuthError, match="20 raw bytes"):
        hmac_sha256_signature(key, "GET&x&y")


def test_signature_is_percent_encoded_once_and_others_are_raw() -> None:
    header = authorization_header({"oauth_nonce": "a-b.c_d~e", "oauth_token": "t"}, "ab+/c=", "limited_poa")
    assert header == (
        'OAuth realm="limited_poa", oauth_nonce="a-b.c_d~e", oauth_signature="ab%2B%2Fc%3D", oauth_token="t"'
    )


def test_realm_is_first_even_when_params_sort_before_it() -> None:
    header = authorization_header({"a": "1", "z": "2"}, "s", "r")
    assert header == 'OAuth realm="r", a="1", oauth_signature="s", z="2"'


@pytest.mark.parametrize("value", ['a"b', "a,b", "a\\b", "a\r\nX: y", "a\x00", "é", "\x7f"])
def test_unsafe_values_are_rejected(value: str) -> None:
    with pytest.raises(OAuthError):
        authorization_header({"oauth_nonce": value}, "sig", "limited_poa")
    with pytest.raises(OAuthError):
        authorization_header({"oauth_nonce": "n"}, "sig", value)


@pytest.mark.parametrize("name", ["", "a b", 'x"', "a=b", "a,b", "ä"])
def test_unsafe_names_are_rejected(name: str) -> None:
    with pytest.raises(OAuthError):
        authorization_header({name: "v"}, "sig", "limited_poa")


@pytest.mark.parametrize("name", ["oauth_signature", "realm"])
def test_reserved_names_are_rejected(name: str) -> None:
    with pytest.raises(OAuthError, match=name):
        authorization_header({name: "v"}, "sig", "limited_poa")


def test_empty_signature_is_rejected() -> None:
    with pytest.raises(OAuthError):
        authorization_header({"oauth_nonce": "n"}, "", "limited_poa")


_safe_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='",\\'))
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda n: n not in ("oauth_signature", "realm")
)


@given(st.dictionaries(_names, _safe_values, max_size=6), st.binary(min_size=1, max_size=64), _safe_values)
def test_header_parses_back(params: dict[str, str], raw_signature: bytes, realm: str) -> None:
    signature = base64.b64encode(raw_signature).decode()
    header = authorization_header(params, signature, realm)
    assert header.startswith("OAuth ")
    parsed: list[tuple[str, str]] = []
    for item in header.removeprefix("OAuth ").split(", "):
        name, _, quoted = item.partition("=")
        assert quoted.startswith('"')
        assert quoted.endswith('"')
        parsed.append((name, quoted[1:-1]))
    assert parsed[0] == ("realm", realm)
    names = [name for name, _ in parsed[1:]]
    assert names == sorted(names)
    rebuilt = dict(parsed[1:])
    assert percent_decode(rebuilt.pop("oauth_signature")) == signature
    assert rebuilt == params
