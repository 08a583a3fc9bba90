"""The independent test client (sim_client.py) against the published and synthetic vectors - no sockets.

If this client is right, the simulator agreeing with it over real sockets means the simulator is right too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.integration.sim_client import Client, auth_header, base_string, k_bytes, pct, read_dh_pem, shared_credentials

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
PUB = VECTORS["published"]
SYN = VECTORS["synthetic_lst"]["cases"]
HMAC_CASES = VECTORS["synthetic_hmac"]


def _params(d: dict[str, str]) -> list[tuple[str, str]]:
    return list(d.items())


def test_pct_is_rfc3986() -> None:
    assert pct("a-b_c.d~e f/g,h:i=j&k+") == "a-b_c.d~e%20f%2Fg%2Ch%3Ai%3Dj%26k%2B"


def test_k_bytes_guide_and_ibind_examples() -> None:
    assert k_bytes(0xFF) == b"\x00\xff"
    assert k_bytes(0x7F) == b"\x7f"
    assert list(k_bytes(15)) == [15]
    assert list(k_bytes(256)) == [1, 0]
    assert list(k_bytes(65535)) == [0, 255, 255]
    assert k_bytes(0xFF, "minimal") == b"\xff"


def test_lst_request_base_string_vector() -> None:
    v = PUB["lst_request_base_string"]
    assert base_string(v["method"], v["url"], _params(v["params"]), v["prepend_hex"]) == v["base_string"]


def test_get_with_query_base_string_vector() -> None:
    v = PUB["get_with_query_base_string"]
    url, _, query = v["url"].partition("?")
    decoded = [tuple(part.split("=", 1)) for part in query.split("&")]
    params = [*_params(v["params"]), *[(k, v2.replace("%2C", ",")) for k, v2 in decoded]]
    assert base_string(v["method"], url, params) == v["base_string"]


def test_rsa_authorization_header_vector() -> None:
    v = PUB["rsa_authorization_header"]
    key = serialization.load_pem_private_key(v["private_key_pem"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    base = base_string(v["method"], v["url"], _params(v["params"]), v["prepend_hex"])
    signature = base64.b64encode(key.sign(base.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
    assert auth_header(_params(v["params"]), signature, v["realm"]) == v["authorization"]


@pytest.mark.parametrize("case", SYN, ids=[c["name"] for c in SYN])
def test_synthetic_lst_client_side(case: dict[str, Any]) -> None:
    p = int(case["prime_hex"], 16)
    k = pow(int(case["response_hex"], 16), int(case["a_hex"], 16), p)
    assert k.bit_length() == case["shared_secret_bits"]
    kb = k_bytes(k)
    assert len(kb) == case["shared_secret_bytes_len"]
    lst = hmac.new(kb, bytes.fromhex(case["prepend_hex"]), hashlib.sha1).digest()
    assert base64.b64encode(lst).decode() == case["live_session_token"]
    signature = hmac.new(lst, case["consumer_key"].encode(), hashlib.sha1).hexdigest()
    assert signature == case["live_session_token_signature"]
    wrong = hmac.new(k_bytes(k, "minimal"), bytes.fromhex(case["prepend_hex"]), hashlib.sha1).digest()
    assert (wrong == lst) == (k.bit_length() % 8 != 0)


def test_published_lst_chain_client_side() -> None:
    v = PUB["lst_chain"]
    k = pow(int(v["response_hex"], 16), int(v["a_hex"], 16), int(v["prime_hex"], 16))
    assert format(k, "x") == v["shared_secret_hex"]
    lst = hmac.new(k_bytes(k), bytes.fromhex(v["prepend_hex"]), hashlib.sha1).digest()
    assert base64.b64encode(lst).decode() == v["live_session_token"]


def _vector_client(mode: str) -> Client:
    creds = dataclasses.replace(shared_credentials(), consumer_key="TESTKEY01", access_token="0123456789abcdef0123")
    client = Client(creds, "https://api.ibkr.com", query_mode=mode)  # type: ignore[arg-type]
    client.lst = base64.b64decode(HMAC_CASES["live_session_token"])
    return client


def _signature_of(headers: dict[str, str]) -> str:
    value = headers["Authorization"].split('oauth_signature="', 1)[1].split('"', 1)[0]
    return value.replace("%2B", "+").replace("%2F", "/").replace("%3D", "=")


def test_hmac_vectors_post() -> None:
    client = _vector_client("include")
    _, headers = client.sign(
        "POST", "/v1/api/iserver/auth/ssodh/init", nonce="abcdef0123456789", timestamp="1700000000"
    )
    assert _signature_of(headers) == HMAC_CASES["cases"][0]["signature"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("include", "lzYy+7K8yqMHsfLiFDHdIL6KzmX/LVPGtsuqGuvDcE4="),
        ("omit", "l6FRiXjXVZQIFfK720LX0OhVQin7Gl//YOY5ughDEmE="),
        ("in_url", "h2HZlRKWudLnIQPVS0Wb2BBE0ZWq0ec1NHw9jYK3pN4="),
    ],
)
def test_hmac_vectors_get_query_rules(mode: str, expected: str) -> None:
    client = _vector_client(mode)
    url, headers = client.sign(
        "GET",
        "/v1/api/iserver/marketdata/snapshot",
        [("conids", "265598,8314"), ("fields", "31,84,86")],
        nonce="abcdef0123456789",
        timestamp="1700000000",
        raw_query="conids=265598,8314&fields=31,84,86",
    )
    assert url == HMAC_CASES["cases"][1]["url"]
    assert _signature_of(headers) == expected


def test_lst_request_vector_8_4() -> None:
    key = serialization.load_pem_private_key(PUB["rsa_authorization_header"]["private_key_pem"].encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    params = [
        ("oauth_consumer_key", "TESTKEY01"),
        ("oauth_nonce", "abcdef0123456789"),
        ("oauth_signature_method", "RSA-SHA256"),
        ("oauth_timestamp", "1700000000"),
        ("oauth_token", "0123456789abcdef0123"),
        ("diffie_hellman_challenge", SYN[1]["challenge_hex"]),
    ]
    base = base_string("POST", "https://api.ibkr.com/v1/api/oauth/live_session_token", params, SYN[1]["prepend_hex"])
    assert len(base) == 847
    assert (
        hashlib.sha256(base.encode()).hexdigest() == "0b2c2dae22fde8f2b7dc417ff5ee980b5c9e7d20ff56f2b1627a7d1a2328e19a"
    )
    signature = base64.b64encode(key.sign(base.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()
    assert signature.startswith("SXMZya06eeQHtf4pGAlttQ4Fw8luHggzmtcYO9c3PSml05AAF8XWPMR3bR0HftUjbaR1ZLRbAyZMfrWtVlPp")


def test_read_dh_pem_of_generated_credentials() -> None:
    p, g = read_dh_pem(shared_credentials().dh_param_pem)
    assert g == 2
    assert format(p, "x") == SYN[0]["prime_hex"]
