"""The IBKR paths of the session's own calls, and which of them no client may reach through the gateway (pure).

The gateway owns the brokerage session: it alone mints live session tokens, opens and re-opens the brokerage
session, keeps it alive and ends it. A client reaching one of these endpoints could end or replace the session
under every other client (a ``logout``, an ``ssodh/init`` with other parameters, a new LST that makes IBKR reject
the gateway's), so they are never forwarded, whatever the route allow-list says:

- ``/v1/api/oauth/…`` — the OAuth handshake (request/access token, live session token);
- ``/v1/api/iserver/auth/ssodh/…`` — opening the brokerage session (``init``);
- ``/v1/api/iserver/reauthenticate`` — re-opening it;
- ``/v1/api/logout`` — ending it.

``/v1/api/tickle`` is the session's keep-alive. Clients written for IBKR's Client Portal Gateway call it too (some
read the ``session`` value it returns before opening a WebSocket), so the gateway answers a client's tickle itself,
from its own session state, and never forwards it: IBKR's answer carries the session cookie.
Read-only session endpoints (``/v1/api/iserver/auth/status``, ``/v1/api/sso/validate``) are ordinary routes.
WebSocket upgrades are relayed to :data:`WEBSOCKET_PATH` only.
"""

from __future__ import annotations

from urllib.parse import quote

LST_PATH = "/v1/api/oauth/live_session_token"
SSODH_INIT_PATH = "/v1/api/iserver/auth/ssodh/init"
TICKLE_PATH = "/v1/api/tickle"
LOGOUT_PATH = "/v1/api/logout"
REAUTHENTICATE_PATH = "/v1/api/iserver/reauthenticate"
WEBSOCKET_PATH = "/v1/api/ws"
ISERVER_ACCOUNTS_PATH = "/v1/api/iserver/accounts"  # read by the warm-up of every brokerage session
PORTFOLIO_ACCOUNTS_PATH = "/v1/api/portfolio/accounts"
"""IBKR's one WebSocket endpoint. Upgrades are relayed here only: the relay presents the session's cookie, which
must never reach another endpoint (a wildcard route would otherwise let ``GET /v1/api/logout`` carry it)."""


def websocket_request(
    ws_base_url: str, *, access_token: str, cookie: str, user_agent: str, query: bytes = b""
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """URL and headers that open IBKR's WebSocket: ``?oauth_token=<access token>`` (then ``query``, already encoded),
    ``Cookie: api=<session from tickle>`` and the User-Agent; no Authorization header. ``ws_base_url`` is ``ws://``
    or ``wss://`` plus the host. The headers hold the session cookie: never log them."""
    url = ws_base_url + WEBSOCKET_PATH + "?oauth_token=" + quote(access_token, safe="")
    if query:
        url += "&" + query.decode("ascii")
    headers = [(b"cookie", b"api=" + cookie.encode("ascii")), (b"user-agent", user_agent.encode("ascii"))]
    return url, headers


_OWNED_EXACT = frozenset({LOGOUT_PATH, REAUTHENTICATE_PATH})
_OWNED_PREFIXES = ("/v1/api/oauth/", "/v1/api/iserver/auth/ssodh/")


def session_owned(path: str) -> bool:
    """Whether ``path`` (a canonical request path) is a session-control endpoint no client may reach."""
    if path in _OWNED_EXACT or (path + "/") in _OWNED_PREFIXES:
        return True
    return path.startswith(_OWNED_PREFIXES)


def route_claims_session(route_path: str) -> bool:
    """Whether an allow-list entry names session-control endpoints *only* (a config error): an exact owned path
    (``/v1/api/logout``) or a prefix inside an owned one (``/v1/api/oauth/*``). A wider prefix that merely covers
    them (``/v1/api/iserver/*``) is an ordinary route; the owned paths below it are refused per request."""
    if route_path.endswith("/*"):
        prefix = route_path[:-1]  # "/x/*" -> "/x/"
        return prefix in _OWNED_PREFIXES or prefix.startswith(_OWNED_PREFIXES)
    return session_owned(route_path)
