"""The hint table: IBKR's terse answers and the gateway's own failure texts map to the key that fixes them."""

from __future__ import annotations

import pytest

from gateway.hints import HINTS, hint_for

LST = "POST /v1/api/oauth/live_session_token: IBKR answered 401: "

CASES = [
    (LST + "id: 39687, error: invalid consumer", "ibkr.consumer_key"),
    (LST + "invalid consumer", "ibkr.consumer_key"),
    (LST + "id: 4711, error: invalid token", "ibkr.access_token"),
    (LST + "id: 4711, error: invalid signature", "ibkr.signature_key"),
    (LST + "Unauthorized", "ibkr.signature_key"),
    (LST + "invalid realm", "ibkr.realm"),
    (LST + "id: 118871, error: LST failed, error: No access secret key found for jdoe", "ibkr.access_token"),
    ("POST /v1/api/oauth/live_session_token: diffie_hellman_response is outside [2, p - 2]", "ibkr.dh_param"),
    (
        "POST /v1/api/oauth/live_session_token: the derived live session token does not match IBKR's signature "
        "(wrong encryption key, access-token secret or DH parameters?)",
        "ibkr.dh_param",
    ),
    ("GET /v1/api/iserver/marketdata/snapshot: IBKR answered 401: id: 1, error: invalid signature", "ibkr.query_rule"),
    ("POST /v1/api/tickle: IBKR answered 403: missing user-agent", "ibkr.user_agent"),
    ("POST /v1/api/tickle: IBKR answered 429: too many requests (penalty box)", "pacing.global_requests_per_s"),
    ("brokerage session still down: competing", "ibkr.compete"),
    (
        "POST /v1/api/oauth/live_session_token: cannot connect to upstream ([Errno 111] Connect call failed)",
        "ibkr.base_url",
    ),
    ("POST /v1/api/tickle: upstream did not answer in time (read timeout)", "upstream.read_timeout_s"),
    (
        "POST /v1/api/oauth/live_session_token: cannot connect to upstream ([SSL: CERTIFICATE_VERIFY_FAILED])",
        "ibkr.base_url",
    ),
]


@pytest.mark.parametrize(("message", "key"), CASES)
def test_each_failure_names_the_key_that_fixes_it(message: str, key: str) -> None:
    hint = hint_for(message)
    assert hint is not None and key in hint.keys, (message, hint)


def test_tls_failure_says_certificate_not_firewall() -> None:
    hint = hint_for("POST /v1/api/tickle: cannot connect to upstream ([SSL: CERTIFICATE_VERIFY_FAILED])")
    assert hint is not None and "certificate" in hint.cause


def test_server_errors_are_maintenance_and_change_nothing() -> None:
    hint = hint_for("POST /v1/api/iserver/auth/ssodh/init: IBKR answered 503: Service Unavailable")
    assert hint is not None and hint.keys == () and "retries" in hint.fix


def test_unknown_text_has_no_hint() -> None:
    assert hint_for("something nobody has seen") is None


def test_every_rule_is_reachable() -> None:
    """No rule is shadowed by an earlier one for the cases above: each hint in the table is used by some case."""
    used = {id(hint_for(message)) for message, _ in CASES} | {id(hint_for("POST /v1/api/tickle: IBKR answered 503: x"))}
    assert all(id(hint) in used for _, hint in HINTS)
