"""Assemble signed ``Authorization`` header values: RSA-SHA256 for the LST request, HMAC-SHA256 for the rest.

This module only composes :mod:`basestring`, :mod:`signatures` and :mod:`header`; nonce, timestamp and keys
are arguments, so the same inputs always give the same header. :class:`RequestSigner` holds what stays fixed
under one live session token and takes its nonces and clock as functions, which the shell supplies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.errors import OAuthError
from gateway.oauth.basestring import QueryRule, signature_base_string
from gateway.oauth.header import authorization_header
from gateway.oauth.signatures import hmac_sha256_signature, rsa_sha256_signature
from gateway.redact import Secret

__all__ = [
    "HMAC_SHA256",
    "RSA_SHA256",
    "OAuthIdentity",
    "RequestSigner",
    "expected_realm",
    "lst_request_authorization",
    "lst_request_params",
    "request_authorization",
    "request_params",
]

RSA_SHA256 = "RSA-SHA256"
HMAC_SHA256 = "HMAC-SHA256"

_NONCE = re.compile(r"[A-Za-z0-9._~-]+")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_MIN_TIMESTAMP = 1_000_000_000
_MAX_TIMESTAMP = 9_999_999_999


@dataclass(frozen=True)
class OAuthIdentity:
    """Who signs: the consumer key, the access token (sent as ``oauth_token``) and the header realm.

    ``realm`` is ``limited_poa`` for real consumers and ``test_realm`` for ``TESTCONS`` (docs/protocol.md §2).

    Raises:
        OAuthError: any of the three is empty.
    """

    consumer_key: str
    access_token: str
    realm: str

    def __post_init__(self) -> None:
        for name in ("consumer_key", "access_token", "realm"):
            if not getattr(self, name):
                raise OAuthError(f"OAuth identity: {name} must not be empty")


def expected_realm(consumer_key: str) -> str:
    """The realm IBKR expects with ``consumer_key``: ``test_realm`` for its public ``TESTCONS``, else
    ``limited_poa``."""
    return "test_realm" if consumer_key == "TESTCONS" else "limited_poa"


def _base_params(identity: OAuthIdentity, method: str, nonce: str, timestamp: int) -> dict[str, str]:
    if not _NONCE.fullmatch(nonce):
        raise OAuthError("oauth_nonce must be one or more unreserved characters (A-Z a-z 0-9 - . _ ~)")
    if isinstance(timestamp, bool) or not _MIN_TIMESTAMP <= timestamp <= _MAX_TIMESTAMP:
        raise OAuthError("oauth_timestamp must be Unix time in whole seconds (10 digits)")
    return {
        "oauth_consumer_key": identity.consumer_key,
        "oauth_nonce": nonce,
        "oauth_signature_method": method,
        "oauth_timestamp": str(timestamp),
        "oauth_token": identity.access_token,
    }


def lst_request_params(identity: OAuthIdentity, *, challenge_hex: str, nonce: str, timestamp: int) -> dict[str, str]:
    """Return the signed parameters of the live-session-token request (docs/protocol.md §6.1 step 4).

    Raises:
        OAuthError: the nonce is not unreserved characters, the timestamp is not 10-digit Unix seconds, or the
            challenge is not hex.
    """
    if not _HEX.fullmatch(challenge_hex):
        raise OAuthError("diffie_hellman_challenge must be a hex number")
    params = _base_params(identity, RSA_SHA256, nonce, timestamp)
    params["diffie_hellman_challenge"] = challenge_hex
    return params


def request_params(identity: OAuthIdentity, *, nonce: str, timestamp: int) -> dict[str, str]:
    """Return the signed ``oauth_*`` parameters of an ordinary HMAC-SHA256 request (docs/protocol.md §5 step 1).

    Raises:
        OAuthError: the nonce is not unreserved characters or the timestamp is not 10-digit Unix seconds.
    """
    return _base_params(identity, HMAC_SHA256, nonce, timestamp)


def lst_request_authorization(
    identity: OAuthIdentity,
    *,
    url: str,
    prepend_hex: str,
    challenge_hex: str,
    signature_key: RSAPrivateKey,
    nonce: str,
    timestamp: int,
) -> str:
    """Return the ``Authorization`` value for ``POST .../oauth/live_session_token`` (docs/protocol.md §6.1).

    The base string is ``prepend + "POST&" + ...`` over the parameters of :func:`lst_request_params`, signed
    with RSASSA-PKCS1-v1_5 / SHA-256; ``diffie_hellman_challenge`` travels in the header. ``prepend_hex`` (hex
    of the decrypted access-token secret) is lower-cased before use. The request itself is sent with no body.

    Raises:
        OAuthError: ``prepend_hex`` is not an even-length hex string; or any problem reported by
            :func:`lst_request_params`, :func:`~gateway.oauth.basestring.signature_base_string` or
            :func:`~gateway.oauth.header.authorization_header`.
    """
    if len(prepend_hex) % 2 or not _HEX.fullmatch(prepend_hex):
        raise OAuthError("prepend must be a non-empty, even-length hex string")
    params = lst_request_params(identity, challenge_hex=challenge_hex, nonce=nonce, timestamp=timestamp)
    base = signature_base_string("POST", url, params, prepend=prepend_hex.lower())
    return authorization_header(params, rsa_sha256_signature(signature_key, base), identity.realm)


def request_authorization(
    identity: OAuthIdentity,
    *,
    method: str,
    url: str,
    live_session_token: bytes,
    nonce: str,
    timestamp: int,
    query_rule: QueryRule = QueryRule.INCLUDE,
    form_params: Sequence[tuple[str, str]] = (),
) -> str:
    """Return the ``Authorization`` value for an ordinary request, HMAC-SHA256-signed with the LST.

    Args:
        method, url: exactly what is sent (see :func:`~gateway.oauth.basestring.signature_base_string`).
        live_session_token: the 20 raw token bytes.
        query_rule: how the URL's query enters the base string (docs/protocol.md §8.1).
        form_params: decoded fields of an ``application/x-www-form-urlencoded`` body; leave empty for JSON.

    Raises:
        OAuthError: a bad nonce, timestamp, method, URL or token length, or an unrenderable header value.
    """
    params = request_params(identity, nonce=nonce, timestamp=timestamp)
    base = signature_base_string(method, url, params, query_rule=query_rule, form_params=form_params)
    return authorization_header(params, hmac_sha256_signature(live_session_token, base), identity.realm)


class RequestSigner:
    """Signs ordinary requests with HMAC-SHA256 under one live session token: a fresh nonce and timestamp per call,
    drawn from ``nonce`` and ``clock`` (Unix seconds), which the caller supplies (this package reads no clock and
    draws no randomness)."""

    __slots__ = ("_clock", "_identity", "_lst", "_nonce", "_query_rule")

    def __init__(
        self,
        identity: OAuthIdentity,
        live_session_token: Secret[bytes],
        query_rule: QueryRule = QueryRule.INCLUDE,
        *,
        nonce: Callable[[], str],
        clock: Callable[[], int],
    ) -> None:
        self._identity = identity
        self._lst = live_session_token
        self._query_rule = query_rule
        self._nonce = nonce
        self._clock = clock

    def authorization(self, method: str, url: str) -> str:
        """The ``Authorization`` header value for ``method url`` (its query signed by the signer's query rule)."""
        return request_authorization(
            self._identity,
            method=method,
            url=url,
            live_session_token=self._lst.reveal(),
            nonce=self._nonce(),
            timestamp=self._clock(),
            query_rule=self._query_rule,
        )
