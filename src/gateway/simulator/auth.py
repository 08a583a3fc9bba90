"""Decide whether one received request is authentic: the thin shell around the pure checks in ``verify``.

It supplies what the pure code must not fetch itself - the clock, the nonce cache and the current live
session token - and remembers the nonce of every accepted request.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.simulator.asgi import RequestInfo
from gateway.simulator.core import SimCore
from gateway.simulator.verify import (
    OAuthHeader,
    QueryRule,
    ReceivedRequest,
    Rejection,
    check_oauth_params,
    parse_authorization,
    verify_hmac_signature,
    verify_rsa_signature,
)


@dataclass(frozen=True, slots=True)
class Authentic:
    """A request that passed: its parsed header and the query rule its signature matched."""

    header: OAuthHeader
    rule: QueryRule


def received(request: RequestInfo, form_params: tuple[tuple[str, str], ...]) -> ReceivedRequest | Rejection:
    """The signature-relevant view of ``request`` (needs exactly one Host header)."""
    hosts = request.header_values("host")
    if len(hosts) != 1 or not hosts[0].strip():
        return Rejection("missing or repeated host header", 400)
    return ReceivedRequest(
        method=request.method,
        scheme=request.scheme,
        host=hosts[0],
        raw_path=request.raw_path,
        raw_query=request.raw_query,
        form_params=form_params,
    )


def authenticate(
    core: SimCore, request: RequestInfo, form_params: tuple[tuple[str, str], ...], *, lst_request: bool
) -> Authentic | Rejection:
    """Run every check for a live-session-token request (RSA-SHA256 over prepend + base string) or an ordinary
    request (HMAC-SHA256 under the current LST). On success the nonce is remembered."""
    target = received(request, form_params)
    if isinstance(target, Rejection):
        return target
    values = request.header_values("authorization")
    if len(values) > 1:
        return Rejection("repeated authorization header")
    header = parse_authorization(values[0] if values else None)
    if isinstance(header, Rejection):
        return header
    if not core.config.consumer_active:  # unknown to IBKR, or registered but not activated yet
        return Rejection("invalid consumer")
    now_s = core.now_s()
    core.nonces.prune(now_s)
    problem = check_oauth_params(
        header,
        core.expected,
        signature_method="RSA-SHA256" if lst_request else "HMAC-SHA256",
        now_s=now_s,
        window_s=core.config.timestamp_window_s,
        seen_nonces=core.nonces,
    )
    if problem is not None:
        return problem
    rules = core.config.query_rules
    verdict: QueryRule | Rejection
    if lst_request:
        if header.get("diffie_hellman_challenge") is None:
            return Rejection("missing diffie_hellman_challenge")
        verdict = verify_rsa_signature(target, header, core.view.signature_public_key, core.view.prepend.hex(), rules)
    else:
        state = core.state
        expired = state.lst_rejection(core.now_ms())
        if expired is not None:
            return expired
        assert state.lst is not None
        verdict = verify_hmac_signature(target, header, state.lst, rules)
        if (
            isinstance(verdict, Rejection)
            and state.previous_lst is not None
            and not isinstance(verify_hmac_signature(target, header, state.previous_lst, rules), Rejection)
        ):
            return Rejection("live session token superseded")
    if isinstance(verdict, Rejection):
        return verdict
    nonce = header.get("oauth_nonce")
    assert nonce is not None
    core.nonces.remember(nonce, now_s)
    return Authentic(header=header, rule=verdict)
