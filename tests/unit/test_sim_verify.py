"""The simulator's server-side verification (verify.py) against the vectors, header layouts and fuzz."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.simulator.verify import (
    LENIENT_RULES,
    STRICT_RULES,
    Expected,
    OAuthHeader,
    ReceivedRequest,
    Rejection,
    base_string,
    candidate_base_strings,
    check_oauth_params,
    parse_authorization,
    parse_query,
    pct_decode,
    pct_encode,
    request_base_url,
    verify_hmac_signature,
    verify_rsa_signature,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
PUB = VECTORS["published"]
SYN = VECTORS["synthetic_lst"]["cases"]
HMAC = VECTORS["synthetic_hmac"]
HMAC_LST = base64.b64decode(HMAC["live_session_token"])
OMIT_SIG = "l6FRiXjXVZQIFfK720LX0OhVQin7Gl//YOY5ughDEmE="  # docs/protocol.md §11.2, query omitted
IN_URL_SIG = "h2HZlRKWudLnIQPVS0Wb2BBE0ZWq0ec1NHw9jYK3pN4="  # docs/protocol.md §11.2, query in the URL part


def _received(method: str, url: str, form: tuple[tuple[str, str], ...] = ()) -> ReceivedRequest:
    scheme, rest = url.split("://", 1)
    host, _, target = rest.partition("/")
    path, _, query = ("/" + target).partition("?")
    return ReceivedRequest(method, scheme, host, path, query, form)


def _header(params: dict[str, str], signature: str | None, realm: str = "limited_poa") -> OAuthHeader:
    return OAuthHeader(params=tuple(params.items()), realm=realm, signature=signature)


def _hmac_params(method: str = "HMAC-SHA256") -> dict[str, str]:
    return {
        "oauth_consumer_key": "TESTKEY01",
        "oauth_nonce": "abcdef0123456789",
        "oauth_signature_method": method,
        "oauth_timestamp": "1700000000",
        "oauth_token": "0123456789abcdef0123",
    }


# ------------------------------------------------------------------------------------------- encoding


def test_pct_encode_alphabet() -> None:
    assert pct_encode("AZaz09-._~") == "AZaz09-._~"
    assert pct_encode("a b/c:d,e=f&g+h%") == "a%20b%2Fc%3Ad%2Ce%3Df%26g%2Bh%25"
    assert pct_encode("é") == "%C3%A9"


@pytest.mark.parametrize(
    ("text", "plus", "expected"),
    [("a%2Cb", False, "a,b"), ("a+b", False, "a+b"), ("a+b", True, "a b"), ("%zz", False, None), ("%4", False, None),
     ("%C3%A9", False, "é"), ("%FF", False, None), ("%2b", False, "+")],
)  # fmt: skip
def test_pct_decode(text: str, plus: bool, expected: str | None) -> None:
    assert pct_decode(text, plus_is_space=plus) == expected


@given(st.text())
def test_pct_roundtrip(text: str) -> None:
    encoded = pct_encode(text)
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%")
    assert pct_decode(encoded) == text


def test_parse_query() -> None:
    assert parse_query("conids=1%2C2&fields=31,84&flag&&x=a+b") == [
        ("conids", "1,2"),
        ("fields", "31,84"),
        ("flag", ""),
        ("x", "a b"),
    ]
    assert parse_query("") == []
    assert parse_query("a=%G1") is None


def test_request_base_url_normalises_scheme_host_and_default_port() -> None:
    assert request_base_url("HTTPS", "API.IBKR.com:443", "/v1/api/x") == "https://api.ibkr.com/v1/api/x"
    assert request_base_url("http", "127.0.0.1:5100", "/v1/api/a%2Fb") == "http://127.0.0.1:5100/v1/api/a%2Fb"
    assert request_base_url("http", "[::1]:80", "/") == "http://[::1]/"


# ------------------------------------------------------------------------------------------- base strings


def test_rebuilds_lst_request_base_string_vector() -> None:
    v = PUB["lst_request_base_string"]
    params = dict(v["params"])
    header = _header(params, "x")
    candidates = candidate_base_strings(_received("POST", v["url"]), header, STRICT_RULES, v["prepend_hex"])
    assert candidates == [("guide", v["base_string"])]
    assert base_string("POST", v["url"], params.items(), v["prepend_hex"]) == v["base_string"]


def test_rebuilds_get_with_query_base_string_vector() -> None:
    """The query arrives percent-encoded (%2C); the server decodes it, merges, sorts and encodes once."""
    v = PUB["get_with_query_base_string"]
    candidates = candidate_base_strings(_received("GET", v["url"]), _header(v["params"], "x"), STRICT_RULES)
    assert candidates == [("guide", v["base_string"])]


@pytest.mark.parametrize("case", HMAC["cases"], ids=["post-init", "get-snapshot"])
def test_rebuilds_and_verifies_synthetic_hmac_cases(case: dict[str, Any]) -> None:
    request = _received(case["method"], case["url"])
    header = _header(_hmac_params(), case["signature"])
    candidates = candidate_base_strings(request, header, STRICT_RULES)
    assert candidates == [("guide", case["base_string"])]
    assert verify_hmac_signature(request, header, HMAC_LST) == "guide"
    assert verify_hmac_signature(request, header, HMAC_LST, LENIENT_RULES) == "guide"


@pytest.mark.parametrize(("signature", "rule"), [(OMIT_SIG, "omit"), (IN_URL_SIG, "in_url")])
def test_other_query_rules_only_in_lenient_mode(signature: str, rule: str) -> None:
    request = _received("GET", HMAC["cases"][1]["url"])
    header = _header(_hmac_params(), signature)
    assert verify_hmac_signature(request, header, HMAC_LST) == Rejection("invalid signature")
    assert verify_hmac_signature(request, header, HMAC_LST, LENIENT_RULES) == rule


def test_hmac_rejects_wrong_key_method_and_bad_base64() -> None:
    case = HMAC["cases"][0]
    request = _received("POST", case["url"])
    good = _header(_hmac_params(), case["signature"])
    assert isinstance(verify_hmac_signature(request, good, b"\x00" * 20), Rejection)
    assert isinstance(verify_hmac_signature(_received("GET", case["url"]), good, HMAC_LST), Rejection)
    assert verify_hmac_signature(request, _header(_hmac_params(), "not base64!"), HMAC_LST) == Rejection(
        "invalid signature"
    )


def test_form_body_params_are_signed() -> None:
    request = _received("POST", "https://api.ibkr.com/v1/api/x", form=(("publish", "true"),))
    candidates = candidate_base_strings(request, _header(_hmac_params(), "x"), STRICT_RULES)
    assert isinstance(candidates, list)
    assert "publish%3Dtrue" in candidates[0][1]


# ------------------------------------------------------------------------------------------- RSA


def _vector_public_key() -> rsa.RSAPublicKey:
    key = serialization.load_pem_private_key(PUB["rsa_authorization_header"]["private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key()


def test_verifies_published_rsa_header_with_public_half() -> None:
    v = PUB["rsa_authorization_header"]
    header = parse_authorization(v["authorization"])
    assert isinstance(header, OAuthHeader)
    assert header.realm == "realm"
    assert dict(header.params) == v["params"]
    request = _received("POST", v["url"])
    assert verify_rsa_signature(request, header, _vector_public_key(), v["prepend_hex"]) == "guide"
    wrong_prepend = "00" + v["prepend_hex"][2:]
    assert verify_rsa_signature(request, header, _vector_public_key(), wrong_prepend) == Rejection("invalid signature")
    other_host = _received("POST", v["url"].replace("api.ibkr.com", "1.api.ibkr.com"))
    assert isinstance(verify_rsa_signature(other_host, header, _vector_public_key(), v["prepend_hex"]), Rejection)


def test_verifies_synthetic_lst_request_vector() -> None:
    """docs/protocol.md §11.2: the i=1 challenge signed with the deno test key; base string 847 chars."""
    params = {**_hmac_params("RSA-SHA256"), "diffie_hellman_challenge": SYN[1]["challenge_hex"]}
    signature = (
        "SXMZya06eeQHtf4pGAlttQ4Fw8luHggzmtcYO9c3PSml05AAF8XWPMR3bR0HftUjbaR1ZLRbAyZMfrWtVlPp+Xx9gE94JCcybuXDoH3mx8P"
        "Pd0haxBKweo5gSjYkq9tUig9ApzkQ60PtPbwo+TFmiI6P54N3TFnXqt7Bs9Fe0oA="
    )
    request = _received("POST", "https://api.ibkr.com/v1/api/oauth/live_session_token")
    header = _header(params, signature)
    candidates = candidate_base_strings(request, header, STRICT_RULES, SYN[1]["prepend_hex"])
    assert isinstance(candidates, list)
    base = candidates[0][1]
    assert len(base) == 847
    assert (
        hashlib.sha256(base.encode()).hexdigest() == "0b2c2dae22fde8f2b7dc417ff5ee980b5c9e7d20ff56f2b1627a7d1a2328e19a"
    )
    assert verify_rsa_signature(request, header, _vector_public_key(), SYN[1]["prepend_hex"]) == "guide"


# ------------------------------------------------------------------------------------------- parameter checks

EXPECTED = Expected("TESTKEY01", "0123456789abcdef0123", "limited_poa")


def _check(params: dict[str, str], *, realm: str | None = "limited_poa", seen: frozenset[str] = frozenset(),
           signature: str | None = "sig", now: float = 1700000000) -> Rejection | None:  # fmt: skip
    header = OAuthHeader(tuple(params.items()), realm, signature)
    return check_oauth_params(
        header, EXPECTED, signature_method="HMAC-SHA256", now_s=now, window_s=300, seen_nonces=seen
    )


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"oauth_consumer_key": "OTHERKEY1"}, "invalid consumer"),
        ({"oauth_consumer_key": None}, "missing consumer key"),
        ({"oauth_token": "ffffffffffffffffffff"}, "invalid token"),
        ({"oauth_token": None}, "missing token"),
        ({"oauth_signature_method": "RSA-SHA256"}, "invalid signature method"),
        ({"oauth_signature_method": None}, "invalid signature method"),
        ({"oauth_timestamp": "1700000000000"}, "invalid timestamp"),
        ({"oauth_timestamp": "17000x0000"}, "invalid timestamp"),
        ({"oauth_timestamp": None}, "missing timestamp"),
        ({"oauth_timestamp": "1699999699"}, "timestamp out of range"),
        ({"oauth_timestamp": "1700000301"}, "timestamp out of range"),
        ({"oauth_nonce": ""}, "missing nonce"),
        ({"oauth_nonce": None}, "missing nonce"),
        ({"oauth_nonce": "n" * 300}, "invalid nonce"),
    ],
)
def test_each_deviation_has_its_own_reason(change: dict[str, str | None], reason: str) -> None:
    params = {**_hmac_params(), **change}
    clean = {k: v for k, v in params.items() if v is not None}
    assert _check(clean) == Rejection(reason)


def test_realm_nonce_signature_and_window_edges() -> None:
    assert _check(_hmac_params()) is None
    assert _check(_hmac_params(), realm="test_realm") == Rejection("invalid realm")
    assert _check(_hmac_params(), realm=None) == Rejection("missing realm")
    assert _check(_hmac_params(), seen=frozenset({"abcdef0123456789"})) == Rejection("nonce reused")
    assert _check(_hmac_params(), signature=None) == Rejection("missing signature")
    assert _check({**_hmac_params(), "oauth_timestamp": "1699999700"}) is None


# ------------------------------------------------------------------------------------------- header parser

_P = _hmac_params()
LAYOUTS = {
    "ibind: realm first, sorted, comma-space": 'OAuth realm="limited_poa", oauth_consumer_key="TESTKEY01", '
    'oauth_nonce="abcdef0123456789", oauth_signature="ab%2Bc%2F%3D", oauth_signature_method="HMAC-SHA256", '
    'oauth_timestamp="1700000000", oauth_token="0123456789abcdef0123"',
    "ib-py: all sorted, realm last": 'OAuth oauth_consumer_key="TESTKEY01", oauth_nonce="abcdef0123456789", '
    'oauth_signature="ab%2Bc%2F%3D", oauth_signature_method="HMAC-SHA256", oauth_timestamp="1700000000", '
    'oauth_token="0123456789abcdef0123", realm="limited_poa"',
    "ib-cs: insertion order, comma only": 'OAuth oauth_consumer_key="TESTKEY01",oauth_token="0123456789abcdef0123",'
    'oauth_signature_method="HMAC-SHA256",oauth_timestamp="1700000000",oauth_nonce="abcdef0123456789",'
    'oauth_signature="ab%2Bc%2F%3D",realm="limited_poa"',
    "demo: every value percent-encoded": 'OAuth realm="limited_poa", oauth_consumer_key="TESTKEY01", '
    'oauth_nonce="abcdef0123456789", oauth_signature="ab%2Bc%2F%3D", oauth_signature_method="HMAC%2DSHA256", '
    'oauth_timestamp="1700000000", oauth_token="0123456789abcdef0123"',
    "lower-case scheme, tabs, trailing comma": 'oauth\trealm = "limited_poa" ,oauth_consumer_key="TESTKEY01",'
    ' oauth_nonce="abcdef0123456789",oauth_signature="ab%2Bc%2F%3D" , oauth_signature_method="HMAC-SHA256",'
    'oauth_timestamp=1700000000,oauth_token="0123456789abcdef0123",',
}


@pytest.mark.parametrize("value", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_header_layouts(value: str) -> None:
    header = parse_authorization(value)
    assert isinstance(header, OAuthHeader)
    assert header.realm == "limited_poa"
    assert header.signature == "ab+c/="
    assert dict(header.params) == _P


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing authorization header"),
        ("", "authorization scheme is not OAuth"),
        ('Bearer realm="x"', "authorization scheme is not OAuth"),
        ('OAuth realm="x', "malformed authorization header"),
        ("OAuth realm", "malformed authorization header"),
        ('OAuth realm="x" oauth_nonce="y"', "malformed authorization header"),
        ("OAuth =x", "malformed authorization header"),
        ('OAuth a="%zz"', "malformed authorization header"),
        ('OAuth a="1", a="2"', "duplicate parameter a"),
        ("OAuth " + "a" * 9000, "authorization header too long"),
    ],
)
def test_header_rejections(value: str | None, reason: str) -> None:
    assert parse_authorization(value) == Rejection(reason)


def test_header_quoted_pair_and_empty_list() -> None:
    header = parse_authorization(r'OAuth realm="a\"b", x=""')
    assert header == OAuthHeader(params=(("x", ""),), realm='a"b', signature=None)
    assert parse_authorization("OAuth") == OAuthHeader(params=(), realm=None, signature=None)


@settings(max_examples=500)
@given(st.text())
def test_header_fuzz_never_raises(value: str) -> None:
    result = parse_authorization(value)
    assert isinstance(result, OAuthHeader | Rejection)


@settings(max_examples=300)
@given(st.text(alphabet='OAuth realm=",\\ %2Bx\t'))
def test_header_fuzz_near_grammar(value: str) -> None:
    assert isinstance(parse_authorization(value), OAuthHeader | Rejection)


_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20)


@settings(max_examples=200)
@given(
    params=st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _VALUE, max_size=6),
    sep=st.sampled_from([",", ", ", " ,\t"]),
    realm_first=st.booleans(),
)
def test_header_roundtrip_any_layout(params: dict[str, str], sep: str, realm_first: bool) -> None:
    params.pop("realm", None)
    params.pop("oauth_signature", None)
    pairs = [f'{k}="{pct_encode(v)}"' for k, v in params.items()]
    realm = 'realm="limited_poa"'
    items = [realm, *pairs] if realm_first else [*pairs, realm]
    header = parse_authorization("OAuth " + sep.join(items))
    assert header == OAuthHeader(params=tuple(params.items()), realm="limited_poa", signature=None)


@settings(max_examples=200)
@given(method=st.sampled_from(["GET", "POST"]), query=st.lists(st.tuples(_VALUE, _VALUE), max_size=4))
def test_base_string_is_order_independent(method: str, query: list[tuple[str, str]]) -> None:
    params = list(_hmac_params().items()) + query
    assert base_string(method, "https://h/p", params) == base_string(method, "https://h/p", list(reversed(params)))
