"""End-to-end signing: LST request and ordinary requests, against the published and synthetic vectors."""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from gateway.errors import OAuthError
from gateway.oauth import (
    DHParams,
    OAuthIdentity,
    QueryRule,
    RequestSigner,
    decode_live_session_token,
    derive_live_session_token,
    dh_challenge,
    dh_shared_secret,
    load_rsa_private_key,
    lst_request_authorization,
    lst_request_params,
    percent_decode,
    request_authorization,
    request_params,
    signature_base_string,
    validate_live_session_token,
)
from gateway.redact import Secret

VECTORS: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).parent.parent / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
PUBLISHED = VECTORS["published"]
RSA_HEADER = PUBLISHED["rsa_authorization_header"]
HMAC = VECTORS["synthetic_hmac"]
SYNTHETIC_1 = VECTORS["synthetic_lst"]["cases"][1]
SIGNING_KEY = load_rsa_private_key(RSA_HEADER["private_key_pem"].encode("ascii"), what="signature key")
LST_URL = "https://api.ibkr.com/v1/api/oauth/live_session_token"

# The synthetic HMAC vectors' inputs, as stated in their "about" text (and docs/protocol.md §11.1).
HMAC_IDENTITY = OAuthIdentity(consumer_key="TESTKEY01", access_token="0123456789abcdef0123", realm="limited_poa")
HMAC_NONCE = "abcdef0123456789"
HMAC_TIMESTAMP = 1700000000


def _header_params(header: str) -> dict[str, str]:
    items = [item.partition("=") for item in header.removeprefix("OAuth ").split(", ")]
    return {name: value.strip('"') for name, _, value in items}


def test_published_lst_request_header() -> None:
    params = RSA_HEADER["params"]
    identity = OAuthIdentity(params["oauth_consumer_key"], params["oauth_token"], RSA_HEADER["realm"])
    header = lst_request_authorization(
        identity,
        url=RSA_HEADER["url"],
        prepend_hex=RSA_HEADER["prepend_hex"],
        challenge_hex=params["diffie_hellman_challenge"],
        signature_key=SIGNING_KEY,
        nonce=params["oauth_nonce"],
        timestamp=int(params["oauth_timestamp"]),
    )
    assert header == RSA_HEADER["authorization"]


def test_published_lst_request_params_match_the_vector() -> None:
    params = PUBLISHED["lst_request_base_string"]["params"]
    identity = OAuthIdentity(params["oauth_consumer_key"], params["oauth_token"], "limited_poa")
    built = lst_request_params(
        identity,
        challenge_hex=params["diffie_hellman_challenge"],
        nonce=params["oauth_nonce"],
        timestamp=int(params["oauth_timestamp"]),
    )
    assert built == params


def test_prepend_case_does_not_change_the_lst_header() -> None:
    params = RSA_HEADER["params"]
    identity = OAuthIdentity(params["oauth_consumer_key"], params["oauth_token"], RSA_HEADER["realm"])
    header = lst_request_authorization(
        identity,
        url=RSA_HEADER["url"],
        prepend_hex=RSA_HEADER["prepend_hex"].upper(),
        challenge_hex=params["diffie_hellman_challenge"],
        signature_key=SIGNING_KEY,
        nonce=params["oauth_nonce"],
        timestamp=int(params["oauth_timestamp"]),
    )
    assert header == RSA_HEADER["authorization"]


def test_synthetic_lst_request_known_answer() -> None:
    # docs/protocol.md §11.2 (these three values are not in the JSON): the LST request for synthetic case
    # i=1 signed with the published 1024-bit key has an 847-character base string with this SHA-256 and this
    # signature.
    header = lst_request_authorization(
        HMAC_IDENTITY,
        url=LST_URL,
        prepend_hex=SYNTHETIC_1["prepend_hex"],
        challenge_hex=SYNTHETIC_1["challenge_hex"],
        signature_key=SIGNING_KEY,
        nonce=HMAC_NONCE,
        timestamp=HMAC_TIMESTAMP,
    )
    params = lst_request_params(
        HMAC_IDENTITY, challenge_hex=SYNTHETIC_1["challenge_hex"], nonce=HMAC_NONCE, timestamp=HMAC_TIMESTAMP
    )
    base = signature_base_string("POST", LST_URL, params, prepend=SYNTHETIC_1["prepend_hex"])
    assert len(base) == 847
    assert hashlib.sha256(base.encode()).hexdigest() == (
        "0b2c2dae22fde8f2b7dc417ff5ee980b5c9e7d20ff56f2b1627a7d1a2328e19a"
    )
    signature = percent_decode(_header_params(header)["oauth_signature"])
    assert signature == (
        "SXMZya06eeQHtf4pGAlttQ4Fw8luHggzmtcYO9c3PSml05AAF8XWPMR3bR0HftUjbaR1ZLRbAyZMfrWtVlPp+Xx9gE94JCcybuXDoH3mx8PP"
        "d0haxBKweo5gSjYkq9tUig9ApzkQ60PtPbwo+TFmiI6P54N3TFnXqt7Bs9Fe0oA="
    )
    SIGNING_KEY.public_key().verify(base64.b64decode(signature), base.encode(), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("case", HMAC["cases"], ids=lambda c: str(c["method"]))
def test_synthetic_hmac_request_headers(case: dict[str, str]) -> None:
    header = request_authorization(
        HMAC_IDENTITY,
        method=case["method"],
        url=case["url"],
        live_session_token=decode_live_session_token(HMAC["live_session_token"]),
        nonce=HMAC_NONCE,
        timestamp=HMAC_TIMESTAMP,
    )
    fields = _header_params(header)
    assert percent_decode(fields.pop("oauth_signature")) == case["signature"]
    assert fields.pop("realm") == "limited_poa"
    assert fields == request_params(HMAC_IDENTITY, nonce=HMAC_NONCE, timestamp=HMAC_TIMESTAMP)
    assert header.startswith('OAuth realm="limited_poa", oauth_consumer_key="TESTKEY01", ')


# docs/protocol.md §11.2: signatures of the GET snapshot vector under the other two query rules.
# They are not in the JSON, and are the only ground truth for OMIT and IN_URL.
GET_SIGNATURE_PER_QUERY_RULE = {
    QueryRule.INCLUDE: "lzYy+7K8yqMHsfLiFDHdIL6KzmX/LVPGtsuqGuvDcE4=",
    QueryRule.OMIT: "l6FRiXjXVZQIFfK720LX0OhVQin7Gl//YOY5ughDEmE=",
    QueryRule.IN_URL: "h2HZlRKWudLnIQPVS0Wb2BBE0ZWq0ec1NHw9jYK3pN4=",
}


@pytest.mark.parametrize("rule", list(QueryRule))
def test_get_signature_under_each_query_rule(rule: QueryRule) -> None:
    case = HMAC["cases"][1]
    assert case["method"] == "GET"
    header = request_authorization(
        HMAC_IDENTITY,
        method="GET",
        url=case["url"],
        live_session_token=decode_live_session_token(HMAC["live_session_token"]),
        nonce=HMAC_NONCE,
        timestamp=HMAC_TIMESTAMP,
        query_rule=rule,
    )
    assert percent_decode(_header_params(header)["oauth_signature"]) == GET_SIGNATURE_PER_QUERY_RULE[rule]
    if rule is QueryRule.INCLUDE:
        assert GET_SIGNATURE_PER_QUERY_RULE[rule] == case["signature"]


@pytest.mark.parametrize("rule", list(QueryRule))
def test_request_signer_draws_a_nonce_and_time_per_request(rule: QueryRule) -> None:
    """The signer takes its nonces and clock from the caller (the package reads neither) and signs like
    :func:`request_authorization` with them, under its query rule."""
    case = HMAC["cases"][1]
    nonces = iter([HMAC_NONCE, "second0nce"])
    token = Secret(decode_live_session_token(HMAC["live_session_token"]))
    signer = RequestSigner(HMAC_IDENTITY, token, rule, nonce=lambda: next(nonces), clock=lambda: HMAC_TIMESTAMP)
    first, second = signer.authorization("GET", case["url"]), signer.authorization("GET", case["url"])
    assert percent_decode(_header_params(first)["oauth_signature"]) == GET_SIGNATURE_PER_QUERY_RULE[rule]
    assert _header_params(second)["oauth_nonce"] == "second0nce"


def test_form_params_change_the_signature() -> None:
    lst = decode_live_session_token(HMAC["live_session_token"])
    kwargs: dict[str, Any] = {
        "method": "POST",
        "url": HMAC["cases"][0]["url"],
        "live_session_token": lst,
        "nonce": HMAC_NONCE,
        "timestamp": HMAC_TIMESTAMP,
    }
    plain = request_authorization(HMAC_IDENTITY, **kwargs)
    form = request_authorization(HMAC_IDENTITY, form_params=[("publish", "true")], **kwargs)
    assert plain != form
    assert "publish" not in form  # form params are signed, not sent in the header


def test_full_handshake_with_synthetic_case() -> None:
    # The whole client side of docs/protocol.md §6 on synthetic case i=1, ending in a signed request.
    params = DHParams(p=int(SYNTHETIC_1["prime_hex"], 16), g=SYNTHETIC_1["generator"])
    a = int(SYNTHETIC_1["a_hex"], 16)
    assert dh_challenge(params, a) == SYNTHETIC_1["challenge_hex"]
    lst = derive_live_session_token(
        dh_shared_secret(params, SYNTHETIC_1["response_hex"], a), SYNTHETIC_1["prepend_hex"]
    )
    validate_live_session_token(lst, SYNTHETIC_1["consumer_key"], SYNTHETIC_1["live_session_token_signature"])
    assert lst == decode_live_session_token(HMAC["live_session_token"])


@pytest.mark.parametrize("timestamp", [0, 999_999_999, 1_700_000_000_000, -1700000000, True])
def test_non_second_timestamps_are_rejected(timestamp: int) -> None:
    with pytest.raises(OAuthError, match="10 digits"):
        request_params(HMAC_IDENTITY, nonce=HMAC_NONCE, timestamp=timestamp)


@pytest.mark.parametrize("nonce", ["", "a b", "a,b", 'a"', "ä", "a/b"])
def test_bad_nonces_are_rejected(nonce: str) -> None:
    with pytest.raises(OAuthError, match="nonce"):
        request_params(HMAC_IDENTITY, nonce=nonce, timestamp=HMAC_TIMESTAMP)


@pytest.mark.parametrize("challenge", ["", "0x12", "12 34", "xyz"])
def test_bad_challenges_are_rejected(challenge: str) -> None:
    with pytest.raises(OAuthError):
        lst_request_params(HMAC_IDENTITY, challenge_hex=challenge, nonce=HMAC_NONCE, timestamp=HMAC_TIMESTAMP)


@pytest.mark.parametrize("prepend", ["", "abc", "zz" * 32])
def test_bad_prepends_are_rejected(prepend: str) -> None:
    with pytest.raises(OAuthError, match="prepend"):
        lst_request_authorization(
            HMAC_IDENTITY,
            url=LST_URL,
            prepend_hex=prepend,
            challenge_hex="abc",
            signature_key=SIGNING_KEY,
            nonce=HMAC_NONCE,
            timestamp=HMAC_TIMESTAMP,
        )


@pytest.mark.parametrize("field", ["consumer_key", "access_token", "realm"])
def test_identity_fields_must_not_be_empty(field: str) -> None:
    values = {"consumer_key": "K", "access_token": "T", "realm": "limited_poa", field: ""}
    with pytest.raises(OAuthError, match=field):
        OAuthIdentity(**values)


def test_identity_with_header_breaking_realm_is_rejected_at_signing() -> None:
    identity = OAuthIdentity("K", "T", 'limited_poa", evil="1')
    with pytest.raises(OAuthError):
        request_authorization(
            identity,
            method="GET",
            url="https://api.ibkr.com/v1/api/tickle",
            live_session_token=b"\x00" * 20,
            nonce=HMAC_NONCE,
            timestamp=HMAC_TIMESTAMP,
        )
