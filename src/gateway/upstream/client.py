"""The session's upstream HTTP client (httpx): login, live session token, ssodh/init, tickle, logout.

The proxy's requests go through :mod:`gateway.upstream.http1` and the WebSocket through
:mod:`gateway.upstream.wsclient`; this client serves the session's own calls, where convenience matters more than
microseconds.

Contract: the client built here has deadlines, no cookie jar, no redirects and no proxies from the environment;
the session's calls (:mod:`gateway.session.calls`) turn every httpx exception that escapes a call into the same
:class:`~gateway.errors.UpstreamError` family the other upstream clients raise, through the one map
(:func:`gateway.upstream.transport.upstream_error`), whose message names the operation and the upstream path but
never a header, token or signature.
"""

from __future__ import annotations

import http.cookiejar
import ssl

import httpx

from gateway.upstream.transport import Timeouts


class _RefuseAllCookies(http.cookiejar.DefaultCookiePolicy):
    """A policy under which the jar stores nothing, so one client's cookies never ride on another's request."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


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
