"""Signature base string: the published and synthetic vectors, the three query rules, and properties."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import OAuthError
from gateway.oauth.basestring import QueryRule, normalized_url, parse_query, signature_base_string
from gateway.oauth.encoding import percent_decode, percent_encode

VECTORS: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).parent.parent / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
PUBLISHED = VECTORS["published"]
HMAC_CASES = VECTORS["synthetic_hmac"]["cases"]

# The synthetic HMAC vectors' oauth parameters, spelled out in their "about" text.
HMAC_ABOUT_PARAMS = {
    "oauth_consumer_key": "TESTKEY01",
    "oauth_nonce": "abcdef0123456789",
    "oauth_signature_method": "HMAC-SHA256",
    "oauth_timestamp": "1700000000",
    "oauth_token": "0123456789abcdef0123",
}
URL = "https://api.ibkr.com/v1/api/iserver/marketdata/snapshot"


def test_published_lst_request_base_string() -> None:
    vector = PUBLISHED["lst_request_base_string"]
    base = signature_base_string(vector["method"], vector["url"], vector["params"], prepend=vector["prepend_hex"])
    assert base == vector["base_string"]


def test_published_get_with_query_base_string_include_rule() -> None:
    vector = PUBLISHED["get_with_query_base_string"]
    base = signature_base_string(vector["method"], vector["url"], vector["params"], query_rule=QueryRule.INCLUDE)
    assert base == vector["base_string"]


def test_include_is_the_default_rule() -> None:
    vector = PUBLISHED["get_with_query_base_string"]
    assert signature_base_string(vector["method"], vector["url"], vector["params"]) == vector["base_string"]


@pytest.mark.parametrize("case", HMAC_CASES, ids=lambda c: f"{c['method']}")
def test_synthetic_hmac_base_strings(case: dict[str, str]) -> None:
    assert signature_base_string(case["method"], case["url"], HMAC_ABOUT_PARAMS) == case["base_string"]


def test_omit_rule_drops_the_query() -> None:
    case = HMAC_CASES[1]
    omitted = signature_base_string(case["method"], case["url"], HMAC_ABOUT_PARAMS, query_rule=QueryRule.OMIT)
    no_query = signature_base_string(case["method"], case["url"].split("?")[0], HMAC_ABOUT_PARAMS)
    assert omitted == no_query
    assert "conids" not in omitted


def test_in_url_rule_keeps_raw_query_in_url_part() -> None:
    case = HMAC_CASES[1]
    base = signature_base_string(case["method"], case["url"], HMAC_ABOUT_PARAMS, query_rule=QueryRule.IN_URL)
    method, url_part, param_part = base.split("&")
    assert method == "GET"
    assert percent_decode(url_part) == case["url"]
    assert "conids" not in param_part


def test_query_rule_accepts_its_string_value() -> None:
    case = HMAC_CASES[1]
    as_enum = signature_base_string("GET", case["url"], HMAC_ABOUT_PARAMS, query_rule=QueryRule.OMIT)
    assert signature_base_string("GET", case["url"], HMAC_ABOUT_PARAMS, query_rule="omit") == as_enum  # type: ignore[arg-type]


def test_unknown_query_rule_is_rejected() -> None:
    with pytest.raises(OAuthError):
        signature_base_string("GET", URL, {}, query_rule="sometimes")  # type: ignore[arg-type]


def test_repeated_query_keys_are_kept_and_sorted_by_value() -> None:
    base = signature_base_string("GET", URL + "?b=2&a=z&a=y", {"oauth_nonce": "n"})
    assert base.endswith("&" + "a%3Dy%26a%3Dz%26b%3D2%26oauth_nonce%3Dn")


def test_form_params_are_merged_and_sorted() -> None:
    base = signature_base_string(
        "POST", URL, {"oauth_nonce": "n"}, form_params=[("publish", "true"), ("compete", "false")]
    )
    assert base.endswith("&compete%3Dfalse%26oauth_nonce%3Dn%26publish%3Dtrue")


def test_prepend_is_concatenated_without_separator() -> None:
    assert signature_base_string("POST", URL, {}, prepend="ab01").startswith("ab01POST&https%3A")


def test_method_is_upper_cased_and_scheme_host_lower_cased() -> None:
    base = signature_base_string("get", "HTTPS://API.IBKR.COM/V1/Api", {})
    assert base == "GET&https%3A%2F%2Fapi.ibkr.com%2FV1%2FApi&"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.ibkr.com:443/v1", "https://api.ibkr.com/v1"),
        ("http://127.0.0.1:80/x", "http://127.0.0.1/x"),
        ("http://127.0.0.1:8443/x", "http://127.0.0.1:8443/x"),
        ("https://api.ibkr.com", "https://api.ibkr.com/"),
        ("http://[::1]:8080/a%2Fb", "http://[::1]:8080/a%2Fb"),
        ("https://api.ibkr.com/v1?x=1", "https://api.ibkr.com/v1"),
    ],
)
def test_normalized_url(url: str, expected: str) -> None:
    assert normalized_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "/v1/api/tickle",
        "ftp://api.ibkr.com/x",
        "https://user:pw@api.ibkr.com/x",
        "https://api.ibkr.com/x#frag",
        "https://api.ibkr.com/a b",
        "https://api.ibkr.com/é",
        "https://api.ibkr.com:99999/x",
        "https://api.ibkr.com/x?a=%zz",
        "",
    ],
)
def test_unusable_urls_are_rejected(url: str) -> None:
    with pytest.raises(OAuthError):
        signature_base_string("GET", url, {})


@pytest.mark.parametrize("name", ["oauth_signature", "realm"])
def test_header_only_params_are_rejected(name: str) -> None:
    with pytest.raises(OAuthError, match=name):
        signature_base_string("GET", URL, {name: "x"})


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", "PÖST"])
def test_bad_methods_are_rejected(method: str) -> None:
    with pytest.raises(OAuthError):
        signature_base_string(method, URL, {})


def test_parse_query_form_semantics() -> None:
    assert parse_query("a=1&&b&c=x+y%2B&d=%2C=") == [("a", "1"), ("b", ""), ("c", "x y+"), ("d", ",=")]


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(
    lambda name: name not in ("oauth_signature", "realm")
)
_values = st.text(max_size=12)


@settings(max_examples=50)
@given(st.lists(st.tuples(_names, _values), max_size=8), st.randoms(use_true_random=False))
def test_parameter_order_is_irrelevant(pairs: list[tuple[str, str]], rnd: Any) -> None:
    shuffled = list(pairs)
    rnd.shuffle(shuffled)
    assert signature_base_string("POST", URL, {}, form_params=pairs) == signature_base_string(
        "POST", URL, {}, form_params=shuffled
    )


@settings(max_examples=50)
@given(st.dictionaries(_names, _values, max_size=8), st.randoms(use_true_random=False))
def test_oauth_param_insertion_order_is_irrelevant(params: dict[str, str], rnd: Any) -> None:
    items = list(params.items())
    rnd.shuffle(items)
    assert signature_base_string("GET", URL, params) == signature_base_string("GET", URL, dict(items))


@settings(max_examples=50)
@given(st.lists(st.tuples(_names, _values), min_size=1, max_size=6))
def test_query_and_form_params_agree(pairs: list[tuple[str, str]]) -> None:
    # A query string built with the RFC 3986 encoder decodes back to the same parameters.
    query = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in pairs)
    assert signature_base_string("GET", f"{URL}?{query}", {}) == signature_base_string(
        "GET", URL, {}, form_params=pairs
    )
