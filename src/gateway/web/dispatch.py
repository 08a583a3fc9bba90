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

Each request is parsed once, on arrival, into a :class:`~gateway.edge.request.Request` (which raises the 505, 431
and the malformed-path and malformed-query 400s); every later check reads that view. Contract: the proxy and the
relay are handed the scope with an :class:`~gateway.edge.request.Admitted` under
:data:`~gateway.edge.request.ADMITTED_KEY` — the view, the request id, the matched route pattern (the metrics label),
the route's body limit and the query to forward, which never carries ``access_key``.

:attr:`Dispatcher.settings` may be replaced at any time (config reload): a request's checks run without yielding
to other tasks, so each request sees either the old or the new settings, never a mix.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field

import trio

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send, UpgradeRefusal, printable, refuse_upgrade, send_error
from gateway.config.model import IPNetwork, RouteConfig
from gateway.edge import auth
from gateway.edge.request import (
    ADMITTED_KEY,
    Admitted,
    Client,
    Request,
    index_headers,
    match_route,
    reserved_parameter,
    scope_peer,
    scope_raw_path,
)
from gateway.errors import HeadersTooLarge, RequestRejected, UnsupportedHttpVersion
from gateway.logs import REQUEST_ID
from gateway.metrics import UNROUTED, RequestMetrics
from gateway.proxy import transforms
from gateway.session.paths import TICKLE_PATH, WEBSOCKET_PATH, session_owned
from gateway.web import examples
from gateway.web.request_id import HEADER as REQUEST_ID_HEADER
from gateway.web.request_id import choose_request_id, request_id

log = logging.getLogger("gateway.edge")

PUBLIC_PATHS = frozenset({"/health"})
INTERNAL_PATHS = frozenset({"/", "/health", "/session"})
METRICS_PATH = "/metrics"
_WWW_AUTHENTICATE = (b"www-authenticate", b'Bearer realm="ibkr-oauth-gateway"')
_CLOSE = (b"connection", b"close")


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

    def parse(self, scope: Scope) -> Request:
        """The scope's :class:`Request` under these limits and trusted proxies (raises its ``RequestRejected``)."""
        return Request.from_scope(
            scope,
            trusted_proxies=self.trusted_proxies,
            max_header_bytes=self.max_header_bytes,
            max_header_count=self.max_header_count,
        )


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
        # HTTP, the hot path, inline: one view, one id, one closure, one header appended to the response start, one
        # dict increment. Logs written while handling carry the id (REQUEST_ID); the answer is counted by route.
        request: Request | RequestRejected
        try:
            request = self.settings.parse(scope)
        except RequestRejected as exc:
            request = exc
        if isinstance(request, RequestRejected):
            rid = request_id(scope["headers"])
        else:
            rid = choose_request_id(request.header_values(REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        answer = _Answer((REQUEST_ID_HEADER, rid.encode("ascii")))

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                message["headers"] = [*message.get("headers", ()), *answer.headers]
            await send(message)

        try:
            if isinstance(request, RequestRejected):
                await _refuse_malformed(stamped, request)
            else:
                await self._http_request(request, scope, receive, stamped, answer, rid)
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
                await self._websocket(scope, receive, send)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            _connection_lost(exc)

    # --- shared checks --------------------------------------------------------------------------------

    def _origin_ok(self, request: Request) -> bool:
        """``origin_allowed`` with the scheme the browser used: ``X-Forwarded-Proto`` from a trusted proxy
        (nginx terminating TLS) wins over the scheme of the hop to the gateway."""
        if request.origin is None:  # not a browser cross-origin request
            return True
        return origin_allowed(request.origin, request.host, request.client.scheme, self.settings.allowed_origins)

    def _authorized(self, request: Request) -> bool:
        keys = self.settings.api_keys
        if not keys.enabled:
            return True
        return any(keys.check(candidate) for candidate in request.keys_presented)

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _http_request(
        self, request: Request, scope: Scope, receive: Receive, send: Send, answer: _Answer, rid: str
    ) -> None:
        """The checks after parsing, in the order of the module docstring."""
        settings = self.settings
        path = request.path
        method = request.method
        if path in INTERNAL_PATHS and method in ("GET", "HEAD"):
            answer.route = path
            if path not in PUBLIC_PATHS and not self._authorized(request):
                await self._unauthorized(send)
                return
            await self._pages(scope, receive, send)
            return
        if self._examples is not None and examples.is_example_path(path):
            await self._examples(scope, receive, send)
            return
        if path == METRICS_PATH and method in ("GET", "HEAD"):
            answer.route = path
            await self._metrics_endpoint(request, scope, receive, send)
            return
        route = match_route(settings.routes, path)
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
        origin = request.origin
        allowed = self._origin_ok(request)
        if method == "OPTIONS" and origin is not None and request.header(b"access-control-request-method"):
            await self._preflight(send, route, origin if allowed else None, request)
            return
        if not self._authorized(request):
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
        if request.framing is not None:
            await send_error(send, 400, "bad_framing", request.framing, headers=[_CLOSE])
            return
        limit = route.max_body_bytes if route.max_body_bytes is not None else settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            await send_error(
                send,
                413,
                "body_too_large",
                f"request body of {length} bytes exceeds the limit of {limit} for {path}",
                headers=[_CLOSE],
            )
            return
        reserved = reserved_parameter(request.params)
        if reserved is not None:
            await send_error(send, 400, "bad_query", f"{reserved}; request not forwarded")
            return
        if origin:
            answer.headers += _cors_headers(origin)
        if path == TICKLE_PATH:
            await self._tickle(scope, receive, send)
            return
        forwarded = dict(scope)
        forwarded[ADMITTED_KEY] = Admitted(
            request,
            rid,
            transforms.query_without(request.query, request.params, auth.QUERY_PARAMETER),
            route.path,
            limit,
        )
        await self._http(forwarded, receive, send)

    async def _metrics_endpoint(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        """``/metrics`` per ``server.metrics``: ``off`` → 404; ``loopback`` → loopback clients, or anyone with a
        valid API key when keys are configured (403 otherwise); ``api_key`` → a valid API key (401 otherwise)."""
        mode = self.settings.metrics
        if mode == "off" or self._metrics_page is None:
            await send_error(send, 404, "metrics_off", '/metrics is turned off (server.metrics = "off")')
            return
        keyed = self.settings.api_keys.enabled and self._authorized(request)
        if mode == "api_key" and not keyed:
            await self._unauthorized(send)
            return
        # Loopback: the TCP peer, and the client behind it when the peer is a trusted proxy (X-Forwarded-For).
        if mode == "loopback" and not keyed and not (is_loopback(request.peer) and is_loopback(request.client.address)):
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

    async def _preflight(self, send: Send, route: RouteConfig, origin: bytes | None, request: Request) -> None:
        if origin is None:
            await send_error(send, 403, "origin_not_allowed", "this Origin is not in server.allowed_origins")
            return
        methods = ", ".join(route.methods or ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
        requested = request.header(b"access-control-request-headers") or b""
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

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings
        try:
            request = settings.parse(scope)
        except RequestRejected as exc:
            await self._refuse_malformed_upgrade(scope, receive, send, exc)
            return
        rid = choose_request_id(request.header_values(REQUEST_ID_HEADER))
        token = REQUEST_ID.set(rid)
        try:
            refusal = self._upgrade_refusal(request)
            if refusal is not None:
                message = await receive()
                if message["type"] == "websocket.connect":
                    await refuse_upgrade(
                        send,
                        scope,
                        refusal,
                        logger=log,
                        path=request.path,
                        client=request.client,
                        origin=request.origin,
                        request_id=rid,
                    )
                return
            forwarded = dict(scope)
            query = transforms.query_without(request.query, request.params, auth.QUERY_PARAMETER)
            forwarded[ADMITTED_KEY] = Admitted(request, rid, query, WEBSOCKET_PATH)
            await self._relay(forwarded, receive, send)
        finally:
            REQUEST_ID.reset(token)

    async def _refuse_malformed_upgrade(self, scope: Scope, receive: Receive, send: Send, exc: RequestRejected) -> None:
        """Refuse an upgrade whose request could not be parsed (logged at INFO: any scanner sends such requests).

        Its id, client and Origin for the answer and the log line are read from the header list again: only a
        malformed request pays for that."""
        headers, _ = index_headers(scope["headers"])
        rid = choose_request_id(headers.get(REQUEST_ID_HEADER, ()))
        client = Client.resolve(scope_peer(scope), scope.get("scheme", "http"), headers, self.settings.trusted_proxies)
        origin = headers.get(b"origin")
        token = REQUEST_ID.set(rid)
        try:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            if isinstance(exc, UnsupportedHttpVersion):
                text = f"WebSocket over HTTP/{exc.version} is not spoken here: upgrade an HTTP/1.1 request"
            elif isinstance(exc, HeadersTooLarge):
                text = f"{exc} (server.max_header_bytes, server.max_header_count)"
            else:
                text = f"{exc}; upgrade refused"
            await refuse_upgrade(
                send,
                scope,
                UpgradeRefusal(exc.status, exc.code, text, level=logging.INFO),
                logger=log,
                path=scope_raw_path(scope).decode("latin-1"),
                client=client,
                origin=origin[0] if origin else None,
                request_id=rid,
            )
        finally:
            REQUEST_ID.reset(token)

    def _upgrade_refusal(self, request: Request) -> UpgradeRefusal | None:
        """Why the upgrade is refused (the first failing check after parsing, in the HTTP order), or ``None`` to
        relay it.

        Unrouted paths are logged at INFO (any scanner sends them); a missing or wrong key and a foreign Origin at
        WARNING (usually a client or config to fix).
        """
        path = request.path
        if path != WEBSOCKET_PATH:
            message = f"{path} is not a WebSocket endpoint: the gateway relays WebSockets on {WEBSOCKET_PATH} only"
            return UpgradeRefusal(403, "websocket_not_routed", message, level=logging.INFO)
        if match_route(self.settings.routes, WEBSOCKET_PATH) is None:
            message = (
                f"{WEBSOCKET_PATH} is not allow-listed: add a [[routes]] entry with "
                f'path = "{WEBSOCKET_PATH}" to the config'
            )
            return UpgradeRefusal(403, "websocket_not_routed", message, level=logging.INFO)
        reserved = reserved_parameter(request.params)
        if reserved is not None:
            return UpgradeRefusal(400, "bad_query", f"{reserved}; upgrade refused", level=logging.INFO)
        if not self._authorized(request):
            return _key_refusal(request)
        if not self._origin_ok(request):
            assert request.origin is not None  # no Origin always passes
            shown = printable(request.origin.decode("latin-1"))
            message = (
                f"Origin {shown} may not open WebSockets here: add it to server.allowed_origins "
                "(or GATEWAY__SERVER__ALLOWED_ORIGINS)"
            )
            return UpgradeRefusal(403, "origin_not_allowed", message)
        return None


async def _refuse_malformed(send: Send, exc: RequestRejected) -> None:
    """The answer to an HTTP request refused while parsed: 505 and 431 close the connection."""
    if isinstance(exc, UnsupportedHttpVersion):
        message = f"HTTP/{exc.version} is not spoken here: the gateway serves HTTP/1.1 (put nginx in front for HTTP/2)"
        await send_error(send, exc.status, exc.code, message, headers=[_CLOSE])
    elif isinstance(exc, HeadersTooLarge):
        await send_error(send, exc.status, exc.code, str(exc), headers=[_CLOSE])
    else:
        await send_error(send, exc.status, exc.code, f"{exc}; request not forwarded")


def _key_refusal(request: Request) -> UpgradeRefusal:
    """The 401 for an upgrade without a valid API key: says whether one was sent at all, never which."""
    where = (
        f"as the subprotocol {auth.SUBPROTOCOL_PREFIX}<key>, as ?{auth.QUERY_PARAMETER}=<key> "
        "or as Authorization: Bearer <key>"
    )
    if request.keys_presented:
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


def _connection_lost(exc: BaseException) -> None:
    # The client's connection broke (or the server is tearing down a malformed pipelined connection) while we
    # answered; there is no one left to tell, and it is not the gateway's error.
    log.info("client connection lost while answering: %s", type(exc).__name__)
