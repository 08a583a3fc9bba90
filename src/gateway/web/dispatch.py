"""The top-level ASGI app: checks every request, then hands it to the proxy, the relay or the internal pages.

Order of checks for HTTP (the first failure answers; nothing refused is ever forwarded):
HTTP version (505: HTTP/1.0 and 1.1 only) → header limits (431) → canonical path (400) → query string parsed once
(400: malformed, or more than one ``access_key``) → ``/metrics`` (its own access rule, ``server.metrics``) →
``/health`` → API key for ``/`` and ``/session`` (401) → internal pages → the dashboard example's static files when
enabled (``/examples/dashboard/…``; no key: they hold no data) → allow-listed route (404) → session-control endpoint
(403, see :mod:`gateway.session.paths`) → CORS preflight → API key (401) → Origin (403) → method (405) → framing
(400) → body size (413) → reserved ``oauth_*`` query parameters (400) → the client's tickle, answered here from the
session → proxy.

WebSocket upgrades go through the same version, header, path, query, route, key and Origin checks, and are relayed
on IBKR's WebSocket endpoint ``/v1/api/ws`` only (the relay carries the session's cookie). A refused upgrade is
answered before accept, so no relay starts, with the gateway's JSON error saying why (505/431/400 malformed, 403
``websocket_not_routed``, 401 ``unauthorized``, 403 ``origin_not_allowed``) and logged in one line naming the
route, client, Origin and code (:func:`gateway.asgi.refuse_upgrade`); a key or the query never appears in either.

Every HTTP answer — proxied, error or internal page — carries ``X-Request-Id`` (the client's when well-formed,
see :mod:`gateway.web.request_id`), and every log line written while handling it carries the same id
(:data:`gateway.logs.REQUEST_ID`). Every answered HTTP request is counted in
:class:`~gateway.metrics.RequestMetrics` by route pattern (not raw path), method and status.

Contract: the request handed to the proxy or relay carries no ``access_key`` query parameter, and its scope holds
``gateway.max_body`` (the route's body limit), ``gateway.route`` (the matched route pattern, the metrics label),
``gateway.request_id``, ``gateway.client`` (a :class:`ClientLabel` for log lines) and, for WebSockets,
``gateway.subprotocol`` (the entry to echo).

:attr:`Dispatcher.settings` may be replaced at any time (config reload): a request's checks run without yielding
to other tasks, so each request sees either the old or the new settings, never a mix.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send, UpgradeRefusal, printable, refuse_upgrade, send_error
from gateway.config.model import IPNetwork, RouteConfig
from gateway.errors import BadQuery
from gateway.logs import REQUEST_ID
from gateway.metrics import UNROUTED, RequestMetrics
from gateway.proxy import transforms
from gateway.session.paths import TICKLE_PATH, WEBSOCKET_PATH, session_owned
from gateway.web import auth, examples
from gateway.web.request_id import HEADER as REQUEST_ID_HEADER
from gateway.web.request_id import request_id

log = logging.getLogger("gateway.edge")

PUBLIC_PATHS = frozenset({"/health"})
INTERNAL_PATHS = frozenset({"/", "/health", "/session"})
METRICS_PATH = "/metrics"
MAX_BODY_KEY = "gateway.max_body"
SUBPROTOCOL_KEY = "gateway.subprotocol"
CLIENT_KEY = "gateway.client"
ROUTE_KEY = "gateway.route"
REQUEST_ID_KEY = "gateway.request_id"
HTTP_VERSIONS = frozenset({"1.0", "1.1"})
_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="ibkr-oauth-gateway"')

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Routes, CORS/Origin allow-list, API keys and request limits."""

    routes: tuple[RouteConfig, ...]
    allowed_origins: frozenset[str]
    trusted_proxies: tuple[IPNetwork, ...] = ()
    api_keys: auth.ApiKeys = field(default_factory=lambda: auth.ApiKeys(()))
    max_body_bytes: int = 65536
    max_header_bytes: int = 16384
    max_header_count: int = 100
    metrics: str = "loopback"  # who may read /metrics: "loopback", "api_key" or "off"


@dataclass(frozen=True, slots=True)
class ClientLabel:
    """The real client address for a log line (``X-Forwarded-For`` believed only from trusted proxies).

    Worked out by ``str()``, i.e. only when a log line is actually written: the hot path pays nothing for it.
    """

    peer: str | None
    headers: Headers
    trusted: tuple[IPNetwork, ...]
    scheme: str = "http"

    def __str__(self) -> str:
        address, _ = transforms.client_address(self.peer, self.headers, self.trusted)
        return address or "-"

    def describe(self) -> dict[str, str]:
        """``{"client": address, "scheme": ...}`` as the client saw it (``X-Forwarded-Proto`` from a trusted proxy)."""
        address, proto = transforms.client_address(self.peer, self.headers, self.trusted)
        return {"client": address or "-", "scheme": proto or self.scheme}


def _peer(scope: Scope) -> str | None:
    """The TCP peer's address (the last hop: nginx when it is in front)."""
    client = scope.get("client")
    return client[0] if client else None


def _client_label(scope: Scope, trusted: tuple[IPNetwork, ...]) -> ClientLabel:
    return ClientLabel(_peer(scope), scope["headers"], trusted, scope.get("scheme", "http"))


def origin_allowed(origin: bytes | None, host: bytes | None, scheme: str, allowed: frozenset[str]) -> bool:
    """Whether a browser ``Origin`` may use the gateway: listed exactly, or the gateway's own origin.

    Requests without an ``Origin`` header (curl, bots) are not browser cross-origin requests and pass.
    """
    if origin is None:
        return True
    text = origin.decode("latin-1").strip().lower()
    if text in allowed:
        return True
    if host is None:
        return False
    own = f"{'https' if scheme in ('https', 'wss') else 'http'}://{host.decode('latin-1').strip().lower()}"
    return text == own


def _cors_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]


def header_limit_problem(headers: Headers, max_bytes: int, max_count: int) -> str | None:
    """Why the header block is too large (431), or ``None``."""
    if len(headers) > max_count:
        return f"request has {len(headers)} header lines; the limit is {max_count}"
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > max_bytes:
        return f"request headers are {size} bytes; the limit is {max_bytes}"
    return None


def framing_problem(headers: Headers, http_version: str = "1.1") -> str | None:
    """Why the request's framing headers are ambiguous (400), or ``None``.

    HTTP/1.0 has no transfer codings: RFC 9112 §6.1 says such a message's framing is faulty.
    """
    lengths = transforms.header_values(headers, b"content-length")
    has_te = transforms.header_value(headers, b"transfer-encoding") is not None
    if has_te and http_version == "1.0":
        return "an HTTP/1.0 request cannot carry Transfer-Encoding"
    if lengths and has_te:
        return "request has both Content-Length and Transfer-Encoding"
    if len(lengths) > 1:
        return "request has more than one Content-Length"
    if lengths and not lengths[0].strip().isdigit():
        return "Content-Length is not a number"
    return None


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` is a loopback IP (``127.0.0.0/8``, ``::1``); names and junk are not."""
    if address is None:
        return False
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _Answer:
    """One HTTP answer as the dispatcher shapes it: its route label and status for the request counter (499: none
    sent), and the headers every response start gets (the request id; CORS headers for an allowed Origin)."""

    __slots__ = ("headers", "route", "status")

    def __init__(self, request_id_header: tuple[bytes, bytes]) -> None:
        self.route = UNROUTED
        self.status = 499
        self.headers = [request_id_header]


class Dispatcher:
    """The ASGI entry point; see the module docstring for the order of checks."""

    def __init__(
        self,
        *,
        settings: DispatchSettings,
        pages: ASGIApp,
        http_proxy: ASGIApp,
        relay: ASGIApp,
        tickle: ASGIApp,
        examples_app: ASGIApp | None = None,
        metrics: RequestMetrics | None = None,
        metrics_page: ASGIApp | None = None,
    ) -> None:
        """``tickle`` answers a client's ``/v1/api/tickle`` (when a route allows it; it is never forwarded).
        ``examples_app`` serves ``/examples/dashboard/…`` when given; without it those paths are unrouted."""
        self.settings = settings
        self._pages = pages
        self._http = http_proxy
        self._relay = relay
        self._examples = examples_app
        self._metrics = metrics
        self._metrics_page = metrics_page
        self._tickle = tickle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            await self._other(kind, scope, receive, send)
            return
        # HTTP, the hot path, inline: one id, one closure, one header appended to the response start, one dict
        # increment. Logs written while handling carry the id (REQUEST_ID); the answer is counted by route.
        rid = request_id(scope["headers"])
        token = REQUEST_ID.set(rid)
        answer = _Answer((REQUEST_ID_HEADER, rid.encode("ascii")))

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                message["headers"] = [*message.get("headers", ()), *answer.headers]
            await send(message)

        try:
            await self._http_request(scope, receive, stamped, answer, rid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            _connection_lost(exc)
        finally:
            REQUEST_ID.reset(token)
            if self._metrics is not None:
                self._metrics.count_request(answer.route, scope["method"], answer.status)

    async def _other(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Lifespan and WebSocket scopes (WebSockets get a request id too)."""
        try:
            if kind == "lifespan":
                await self._pages(scope, receive, send)
            elif kind == "websocket":
                rid = request_id(scope["headers"])
                token = REQUEST_ID.set(rid)
                try:
                    await self._websocket(scope, receive, send, rid)
                finally:
                    REQUEST_ID.reset(token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            _connection_lost(exc)

    # --- shared checks --------------------------------------------------------------------------------

    def _route(self, path: str) -> RouteConfig | None:
        return transforms.match_route(self.settings.routes, path)

    def _origin_ok(self, scope: Scope, headers: Headers, origin: bytes | None) -> bool:
        """``origin_allowed`` with the scheme the browser used: ``X-Forwarded-Proto`` from a trusted proxy
        (nginx terminating TLS) wins over the scheme of the hop to the gateway."""
        if origin is None:  # not a browser cross-origin request; skip the forwarded-header walk on the hot path
            return True
        _, forwarded_proto = transforms.client_address(_peer(scope), headers, self.settings.trusted_proxies)
        scheme = forwarded_proto or scope["scheme"]
        host = transforms.header_value(headers, b"host")
        return origin_allowed(origin, host, scheme, self.settings.allowed_origins)

    def _from_loopback(self, scope: Scope, headers: Headers) -> bool:
        """The TCP peer is loopback and so is the client behind it (a trusted proxy's ``X-Forwarded-For``)."""
        peer = _peer(scope)
        if not is_loopback(peer):
            return False
        address, _ = transforms.client_address(peer, headers, self.settings.trusted_proxies)
        return is_loopback(address)

    def _authorized(self, headers: Headers, query_key: str | None, subprotocol_key: str | None = None) -> bool:
        keys = self.settings.api_keys
        if not keys.enabled:
            return True
        return any(
            keys.check(candidate)
            for candidate in (auth.bearer_key(headers), subprotocol_key, query_key)
            if candidate is not None
        )

    @staticmethod
    def _raw_path(scope: Scope) -> bytes:
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        return raw.split(b"?", 1)[0]

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _http_request(self, scope: Scope, receive: Receive, send: Send, answer: _Answer, rid: str) -> None:
        settings = self.settings
        headers: Headers = scope["headers"]
        version: str = scope.get("http_version", "1.1")
        if version not in HTTP_VERSIONS:
            await send_error(
                send,
                505,
                "http_version_not_supported",
                f"HTTP/{version} is not spoken here: the gateway serves HTTP/1.1 (put nginx in front for HTTP/2)",
                headers=[(b"connection", b"close")],
            )
            return
        too_big = header_limit_problem(headers, settings.max_header_bytes, settings.max_header_count)
        if too_big is not None:
            await send_error(send, 431, "headers_too_large", too_big, headers=[(b"connection", b"close")])
            return
        raw_path = self._raw_path(scope)
        problem = transforms.path_problem(raw_path)
        if problem is not None:
            await send_error(send, 400, "bad_path", f"{problem}; request not forwarded")
            return
        query: bytes = scope.get("query_string", b"")
        try:
            params, query_key = _parse_query(query)
        except BadQuery as exc:
            await send_error(send, exc.status, exc.code, f"{exc}; request not forwarded")
            return
        path = raw_path.decode("ascii")
        method: str = scope["method"]
        if path in INTERNAL_PATHS and method in ("GET", "HEAD"):
            answer.route = path
            if path not in PUBLIC_PATHS and not self._authorized(headers, query_key):
                await self._unauthorized(send)
                return
            await self._pages(scope, receive, send)
            return
        if self._examples is not None and examples.is_example_path(path):
            await self._examples(scope, receive, send)
            return
        if path == METRICS_PATH and method in ("GET", "HEAD"):
            answer.route = path
            await self._metrics_endpoint(scope, receive, send, headers, query_key)
            return
        route = self._route(path)
        if route is None:
            await send_error(send, 404, "not_routed", f"{path} is not an allow-listed route of this gateway")
            return
        answer.route = route.path
        if session_owned(path):
            await send_error(
                send,
                403,
                "session_owned",
                f"{path} controls the IBKR session, which this gateway owns and keeps alive for all its clients; "
                "it is never forwarded",
            )
            return
        origin = transforms.header_value(headers, b"origin")
        allowed = self._origin_ok(scope, headers, origin)
        if (
            method == "OPTIONS"
            and origin is not None
            and transforms.header_value(headers, b"access-control-request-method")
        ):
            await self._preflight(send, route, origin if allowed else None, headers)
            return
        if not self._authorized(headers, query_key):
            await self._unauthorized(send)
            return
        if not allowed:
            await send_error(send, 403, "origin_not_allowed", "this Origin is not in server.allowed_origins")
            return
        if route.methods is not None and method not in route.methods:
            allow = ", ".join(route.methods).encode()
            await send_error(
                send, 405, "method_not_allowed", f"{method} is not allowed on {path}", headers=[(b"allow", allow)]
            )
            return
        framing = framing_problem(headers, version)
        if framing is not None:
            await send_error(send, 400, "bad_framing", framing, headers=[(b"connection", b"close")])
            return
        limit = route.max_body_bytes if route.max_body_bytes is not None else settings.max_body_bytes
        length = transforms.header_value(headers, b"content-length")
        if length is not None and int(length) > limit:
            await send_error(
                send,
                413,
                "body_too_large",
                f"request body of {int(length)} bytes exceeds the limit of {limit} for {path}",
                headers=[(b"connection", b"close")],
            )
            return
        reserved = transforms.reserved_parameter(params)
        if reserved is not None:
            await send_error(send, 400, "bad_query", f"{reserved}; request not forwarded")
            return
        if origin:
            answer.headers += _cors_headers(origin)
        if path == TICKLE_PATH:
            await self._tickle(scope, receive, send)
            return
        forwarded = dict(scope)
        forwarded["query_string"] = transforms.query_without(query, params, auth.QUERY_PARAMETER)
        forwarded[MAX_BODY_KEY] = limit
        forwarded[ROUTE_KEY] = route.path
        forwarded[REQUEST_ID_KEY] = rid
        forwarded[CLIENT_KEY] = _client_label(scope, settings.trusted_proxies)
        await self._http(forwarded, receive, send)

    async def _metrics_endpoint(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, query_key: str | None
    ) -> None:
        """``/metrics`` per ``server.metrics``: ``off`` → 404; ``loopback`` → loopback clients, or anyone with a
        valid API key when keys are configured (403 otherwise); ``api_key`` → a valid API key (401 otherwise)."""
        mode = self.settings.metrics
        if mode == "off" or self._metrics_page is None:
            await send_error(send, 404, "metrics_off", '/metrics is turned off (server.metrics = "off")')
            return
        keyed = self.settings.api_keys.enabled and self._authorized(headers, query_key)
        if mode == "api_key" and not keyed:
            await self._unauthorized(send)
            return
        if mode == "loopback" and not keyed and not self._from_loopback(scope, headers):
            await send_error(
                send,
                403,
                "metrics_forbidden",
                '/metrics is readable only by loopback clients (server.metrics = "loopback")'
                + (" or with an API key" if self.settings.api_keys.enabled else ""),
            )
            return
        await self._metrics_page(scope, receive, send)

    async def _unauthorized(self, send: Send) -> None:
        await send_error(
            send,
            401,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <key>",
            headers=[_WWW_AUTHENTICATE],
        )

    async def _preflight(self, send: Send, route: RouteConfig, origin: bytes | None, headers: Headers) -> None:
        if origin is None:
            await send_error(send, 403, "origin_not_allowed", "this Origin is not in server.allowed_origins")
            return
        methods = ", ".join(route.methods or ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
        requested = transforms.header_value(headers, b"access-control-request-headers") or b""
        response_headers = [
            *_cors_headers(origin),
            (b"access-control-allow-methods", methods.encode()),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        if requested:
            response_headers.append((b"access-control-allow-headers", requested))
        await send({"type": "http.response.start", "status": 204, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # --- WebSocket ------------------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        settings = self.settings
        headers: Headers = scope["headers"]
        raw_path = self._raw_path(scope)
        query: bytes = scope.get("query_string", b"")
        key, entry = auth.subprotocol_key(scope.get("subprotocols") or ())
        bad_query: BadQuery | None = None
        try:
            params, query_key = _parse_query(query)
        except BadQuery as exc:
            params, query_key, bad_query = (), None, exc
        refusal = self._upgrade_refusal(scope, headers, raw_path, params, bad_query, query_key, key)
        if refusal is not None:
            message = await receive()
            if message["type"] == "websocket.connect":
                await refuse_upgrade(
                    send,
                    scope,
                    refusal,
                    logger=log,
                    path=raw_path.decode("latin-1"),
                    client=_client_label(scope, settings.trusted_proxies),
                    request_id=rid,
                )
            return
        forwarded = dict(scope)
        forwarded["query_string"] = transforms.query_without(query, params, auth.QUERY_PARAMETER)
        forwarded[SUBPROTOCOL_KEY] = entry
        forwarded[REQUEST_ID_KEY] = rid
        forwarded[CLIENT_KEY] = _client_label(scope, settings.trusted_proxies)
        await self._relay(forwarded, receive, send)

    def _upgrade_refusal(
        self,
        scope: Scope,
        headers: Headers,
        raw_path: bytes,
        params: Sequence[transforms.QueryParam],
        bad_query: BadQuery | None,
        query_key: str | None,
        subprotocol_key: str | None,
    ) -> UpgradeRefusal | None:
        """Why the upgrade is refused (the first failing check, in the HTTP order), or ``None`` to relay it.

        Malformed requests (version, headers, path, query) and unrouted paths are logged at INFO (any scanner sends
        them); a missing or wrong key and a foreign Origin at WARNING (usually a client or config to fix).
        """
        settings = self.settings
        version = scope.get("http_version", "1.1")
        if version not in HTTP_VERSIONS:
            message = f"WebSocket over HTTP/{version} is not spoken here: upgrade an HTTP/1.1 request"
            return UpgradeRefusal(505, "http_version_not_supported", message, level=logging.INFO)
        too_big = header_limit_problem(headers, settings.max_header_bytes, settings.max_header_count)
        if too_big is not None:
            message = f"{too_big} (server.max_header_bytes, server.max_header_count)"
            return UpgradeRefusal(431, "headers_too_large", message, level=logging.INFO)
        problem = transforms.path_problem(raw_path)
        if problem is not None:
            return UpgradeRefusal(400, "bad_path", f"{problem}; upgrade refused", level=logging.INFO)
        if bad_query is not None:
            return UpgradeRefusal(bad_query.status, bad_query.code, f"{bad_query}; upgrade refused", level=logging.INFO)
        path = raw_path.decode("ascii")
        if path != WEBSOCKET_PATH:
            message = f"{path} is not a WebSocket endpoint: the gateway relays WebSockets on {WEBSOCKET_PATH} only"
            return UpgradeRefusal(403, "websocket_not_routed", message, level=logging.INFO)
        if self._route(WEBSOCKET_PATH) is None:
            message = (
                f"{WEBSOCKET_PATH} is not allow-listed: add a [[routes]] entry with "
                f'path = "{WEBSOCKET_PATH}" to the config'
            )
            return UpgradeRefusal(403, "websocket_not_routed", message, level=logging.INFO)
        reserved = transforms.reserved_parameter(params)
        if reserved is not None:
            return UpgradeRefusal(400, "bad_query", f"{reserved}; upgrade refused", level=logging.INFO)
        if not self._authorized(headers, query_key, subprotocol_key):
            return _key_refusal(headers, query_key, subprotocol_key)
        origin = transforms.header_value(headers, b"origin")
        if not self._origin_ok(scope, headers, origin):
            assert origin is not None  # no Origin always passes
            shown = printable(origin.decode("latin-1"))
            message = (
                f"Origin {shown} may not open WebSockets here: add it to server.allowed_origins "
                "(or GATEWAY__SERVER__ALLOWED_ORIGINS)"
            )
            return UpgradeRefusal(403, "origin_not_allowed", message)
        return None


def _key_refusal(headers: Headers, query_key: str | None, subprotocol_key: str | None) -> UpgradeRefusal:
    """The 401 for an upgrade without a valid API key: says whether one was sent at all, never which."""
    sent = any(key is not None for key in (auth.bearer_key(headers), subprotocol_key, query_key))
    where = (
        f"as the subprotocol {auth.SUBPROTOCOL_PREFIX}<key>, as ?{auth.QUERY_PARAMETER}=<key> "
        "or as Authorization: Bearer <key>"
    )
    if sent:
        message = (
            "wrong API key: the key sent is not one of the gateway's (server.api_keys_file, server.api_keys or "
            f"GATEWAY__SERVER__API_KEYS); send a configured key {where}"
        )
    else:
        message = (
            f"missing API key: send one of the gateway's keys (server.api_keys_file, server.api_keys or "
            f"GATEWAY__SERVER__API_KEYS) {where}"
        )
    return UpgradeRefusal(401, "unauthorized", message, headers=(_WWW_AUTHENTICATE,))


def _parse_query(query: bytes) -> tuple[tuple[transforms.QueryParam, ...], str | None]:
    """The client's query, parsed once, and the API key it carries; raises :class:`BadQuery` for a malformed one
    or one naming ``access_key`` more than once (two keys: which one would be checked, which one stripped?)."""
    params = transforms.parse_query(query)
    keys = auth.query_keys(params)
    if len(keys) > 1:
        raise BadQuery(f"query string carries {len(keys)} access_key parameters; send one")
    return params, keys[0] if keys else None


def _connection_lost(exc: BaseException) -> None:
    # The client's connection broke (or the server is tearing down a malformed pipelined connection) while we
    # answered; there is no one left to tell, and it is not the gateway's error.
    log.info("client connection lost while answering: %s", type(exc).__name__)
