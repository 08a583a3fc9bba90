"""The one upstream HTTP client: deadlines, no cookie jar, no redirects, and httpx errors mapped once.

Contract: every network call to IBKR goes through the client built here; every httpx exception that escapes
a call is turned into a :class:`~gateway.errors.UpstreamError` subclass by :func:`map_httpx_error`, whose
message names the operation and the upstream path but never a header, token or signature.
"""

from __future__ import annotations

import http.cookiejar
import secrets
import ssl
import time
from dataclasses import dataclass

import httpx

from gateway.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout
from gateway.oauth.basestring import QueryRule
from gateway.oauth.signer import OAuthIdentity, request_authorization
from gateway.redact import Secret


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream deadlines in seconds (reliability.md §1.6)."""

    connect_s: float = 5.0
    read_s: float = 15.0
    write_s: float = 15.0
    pool_s: float = 2.0


class _RefuseAllCookies(http.cookiejar.DefaultCookiePolicy):
    """A policy under which the jar stores nothing, so one client's cookies never ride on another's request."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


def tls_context() -> ssl.SSLContext:
    """The verified TLS context shared by httpx and the WebSocket client (TLS >= 1.2, system trust store)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def build_client(timeouts: Timeouts, *, tls: ssl.SSLContext, max_connections: int = 100) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for IBKR: verified TLS, bounded pool, no redirects, no cookies, no env proxies.

    No keep-alive: the session's calls are a short burst at each handshake and then one tickle a minute, and httpx
    closes an idle connection only when it next sends — so a kept connection that IBKR closed would sit in
    CLOSE-WAIT until the next tickle, and one kept for a minute would be stale anyway.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.write_s, pool=timeouts.pool_s
        ),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
        cookies=http.cookiejar.CookieJar(policy=_RefuseAllCookies()),
        follow_redirects=False,
        trust_env=False,
        verify=tls,
    )


def map_httpx_error(exc: httpx.HTTPError, operation: str) -> UpstreamError:
    """The gateway error for an httpx failure during ``operation`` (e.g. ``"POST /v1/api/tickle"``)."""
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__.replace("Timeout", " timeout").strip().lower()
        return UpstreamTimeout(f"{operation}: upstream did not answer in time ({kind})")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamConnectError(f"{operation}: cannot connect to upstream ({_reason(exc)})")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return UpstreamConnectError(f"{operation}: upstream connection failed ({_reason(exc)})")
    return UpstreamError(f"{operation}: upstream request failed ({type(exc).__name__})")


def _reason(exc: BaseException) -> str:
    """A short reason from an httpx error without echoing request details."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


class RequestSigner:
    """Signs ordinary requests with HMAC-SHA256 under one live session token (fresh nonce and time per call)."""

    __slots__ = ("_identity", "_lst", "_query_rule")

    def __init__(
        self, identity: OAuthIdentity, live_session_token: Secret[bytes], query_rule: QueryRule = QueryRule.INCLUDE
    ) -> None:
        self._identity = identity
        self._lst = live_session_token
        self._query_rule = query_rule

    def authorization(self, method: str, url: str) -> str:
        """The ``Authorization`` header value for ``method url`` (its query signed by the signer's query rule)."""
        return request_authorization(
            self._identity,
            method=method,
            url=url,
            live_session_token=self._lst.reveal(),
            nonce=secrets.token_hex(16),
            timestamp=int(time.time()),
            query_rule=self._query_rule,
        )
