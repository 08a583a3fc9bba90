"""The simulator's server-side DH/LST maths against the vectors (docs/protocol.md §6.3, §11)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.simulator.dh import (
    GENERATOR,
    RFC3526_GROUP14_PRIME,
    answer_challenge,
    challenge_in_range,
    java_bytes,
    live_session_token,
    lst_signature,
    parse_hex_int,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
SYNTHETIC = VECTORS["synthetic_lst"]["cases"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, [0]), (0x7F, [127]), (0xFF, [0, 255]), (15, [15]), (0x80, [0, 128]), (256, [1, 0]), (65535, [0, 255, 255])],
)
def test_java_bytes_examples(value: int, expected: list[int]) -> None:
    assert list(java_bytes(value)) == expected


def test_java_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        java_bytes(-1)


def test_group14_prime_matches_vectors() -> None:
    assert format(RFC3526_GROUP14_PRIME, "x") == SYNTHETIC[0]["prime_hex"]
    assert RFC3526_GROUP14_PRIME.bit_length() == 2048
    assert GENERATOR == 2


def _server_b(name: str) -> int:
    i = name.rsplit("-", 1)[1]
    return int(hashlib.sha256(f"server-b-{i}".encode()).hexdigest(), 16)


@pytest.mark.parametrize("case", SYNTHETIC, ids=[c["name"] for c in SYNTHETIC])
def test_server_side_reproduces_synthetic_case(case: dict[str, Any]) -> None:
    """Server computes B = g^b and K = A^b with the recipe's b; B, LST and its signature match the vector."""
    prime = int(case["prime_hex"], 16)
    challenge = int(case["challenge_hex"], 16)
    assert challenge_in_range(challenge, prime)
    grant = answer_challenge(
        challenge,
        _server_b(case["name"]),
        prime=prime,
        generator=case["generator"],
        prepend=bytes.fromhex(case["prepend_hex"]),
        consumer_key=case["consumer_key"],
    )
    assert grant.response_hex == case["response_hex"]
    assert base64.b64encode(grant.lst).decode() == case["live_session_token"]
    assert grant.signature_hex == case["live_session_token_signature"]
    k = pow(challenge, _server_b(case["name"]), prime)
    assert k.bit_length() == case["shared_secret_bits"]
    assert len(java_bytes(k)) == case["shared_secret_bytes_len"]


def test_published_lst_chain_from_shared_secret() -> None:
    """deno-ibkr chain: b is unknown, but K is given; LST, signature, and the wrong no-sign-byte LST."""
    v = VECTORS["published"]["lst_chain"]
    k = int(v["shared_secret_hex"], 16)
    prime = int(v["prime_hex"], 16)
    assert pow(v["generator"], int(v["a_hex"], 16), prime) == int(v["challenge_hex"], 16)
    lst = live_session_token(k, bytes.fromhex(v["prepend_hex"]))
    assert base64.b64encode(lst).decode() == v["live_session_token"]
    assert lst_signature(lst, v["consumer_key"]) == v["live_session_token_signature"]
    assert java_bytes(k)[:2] == b"\x00\x8d"
    assert len(java_bytes(k)) == 33


def test_guide_validation_vector() -> None:
    lst = base64.b64decode("YBWbLw+9RYP2nWrPQHxHZkBb1aM=")
    assert lst_signature(lst, "TESTCONS") == "543c55477d6cbb0e792d1e4f8111cec7305ba3f4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("ff", 255), ("0ff", 255), ("FF", 255), ("7d04de3", 0x7D04DE3), ("", None), ("0x1f", None), ("g1", None),
     ("-1", None), (" 1", None), ("１", None)],
)  # fmt: skip
def test_parse_hex_int(text: str, expected: int | None) -> None:
    assert parse_hex_int(text) == expected


def test_parse_hex_int_length_cap() -> None:
    assert parse_hex_int("f" * 1025) is None
    assert parse_hex_int("f" * 512) == RFC3526_GROUP14_PRIME | (1 << 2048) - 1


@pytest.mark.parametrize(
    ("value", "ok"), [(0, False), (1, False), (2, True), (RFC3526_GROUP14_PRIME - 2, True),
                      (RFC3526_GROUP14_PRIME - 1, False), (RFC3526_GROUP14_PRIME, False)],
)  # fmt: skip
def test_challenge_range(value: int, ok: bool) -> None:
    assert challenge_in_range(value, RFC3526_GROUP14_PRIME) is ok


@settings(max_examples=20, deadline=None)
@given(a=st.integers(min_value=2, max_value=2**256), b=st.integers(min_value=2, max_value=2**256))
def test_both_sides_agree(a: int, b: int) -> None:
    p = RFC3526_GROUP14_PRIME
    prepend = b"\x01" * 32
    grant = answer_challenge(pow(2, a, p), b, prime=p, generator=2, prepend=prepend, consumer_key="ABCDEFGHI")
    client_k = pow(int(grant.response_hex, 16), a, p)
    assert live_session_token(client_k, prepend) == grant.lst
    assert "redacted" in repr(grant)
