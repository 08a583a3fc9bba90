"""The top-level ASGI app: checks every request, then hands it to the proxy, the relay or the internal pages.

Order of checks (first failure answers): canonical path (400) → internal pages → allow-listed route (404 JSON
otherwise, never forwarded) → method (405) → framing (400) → query (400) → CORS/Origin → proxy or relay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send, send_error
from gateway.config.model import IPNetwork, RouteConfig
from gateway.proxy import transforms

INTERNAL_PATHS = frozenset({"/", "/health", "/session"})


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Routes and the CORS/Origin allow-list."""

    routes: tuple[RouteConfig, ...]
    allowed_origins: frozenset[str]
    trusted_proxies: tuple[IPNetwork, ...] = ()


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


class Dispatcher:
    """The ASGI entry point; see the module docstring for the order of checks."""

    def __init__(self, *, settings: DispatchSettings, pages: ASGIApp, http_proxy: ASGIApp, relay: ASGIApp) -> None:
        self._settings = settings
        self._pages = pages
        self._http = http_proxy
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._pages(scope, receive, send)
        elif kind == "http":
            await self._http_request(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    def _route(self, path: str) -> RouteConfig | None:
        return transforms.match_route(self._settings.routes, path)

    def _origin_ok(self, scope: Scope, headers: Sequence[tuple[bytes, bytes]], origin: bytes | None) -> bool:
        """``origin_allowed`` with the scheme the browser used: ``X-Forwarded-Proto`` from a trusted proxy
        (nginx terminating TLS) wins over the scheme of the hop to the gateway."""
        client = scope.get("client")
        peer = client[0] if client else None
        _, forwarded_proto = transforms.client_address(peer, headers, self._settings.trusted_proxies)
        scheme = forwarded_proto or scope["scheme"]
        host = transforms.header_value(headers, b"host")
        return origin_allowed(origin, host, scheme, self._settings.allowed_origins)

    async def _http_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        raw_path = raw_path.split(b"?", 1)[0]
        problem = transforms.path_problem(raw_path)
        if problem is not None:
            await send_error(send, 400, "bad_path", f"{problem}; request not forwarded")
            return
        path = raw_path.decode("ascii")
        method: str = scope["method"]
        if path in INTERNAL_PATHS and method in ("GET", "HEAD"):
            await self._pages(scope, receive, send)
            return
        route = self._route(path)
        if route is None:
            await send_error(send, 404, "not_routed", f"{path} is not an allow-listed route of this gateway")
            return
        headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        origin = transforms.header_value(headers, b"origin")
        allowed = self._origin_ok(scope, headers, origin)
        if (
            method == "OPTIONS"
            and origin is not None
            and transforms.header_value(headers, b"access-control-request-method")
        ):
            await self._preflight(send, route, origin if allowed else None, headers)
            return
        if route.methods is not None and method not in route.methods:
            allow = ", ".join(route.methods).encode()
            await send_error(
                send, 405, "method_not_allowed", f"{method} is not allowed on {path}", headers=[(b"allow", allow)]
            )
            return
        framing = self._framing_problem(headers)
        if framing is not None:
            await send_error(send, 400, "bad_framing", framing, headers=[(b"connection", b"close")])
            return
        query_problem = transforms.query_problem(scope.get("query_string", b""))
        if query_problem is not None:
            await send_error(send, 400, "bad_query", f"{query_problem}; request not forwarded")
            return
        if origin is not None and allowed:
            await self._http(scope, receive, _with_headers(send, _cors_headers(origin)))
        elif origin is not None:
            await send_error(send, 403, "origin_not_allowed", "this Origin is not in server.allowed_origins")
        else:
            await self._http(scope, receive, send)

    @staticmethod
    def _framing_problem(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        lengths = transforms.header_values(headers, b"content-length")
        has_te = transforms.header_value(headers, b"transfer-encoding") is not None
        if lengths and has_te:
            return "request has both Content-Length and Transfer-Encoding"
        if len(lengths) > 1:
            return "request has more than one Content-Length"
        if lengths and not lengths[0].strip().isdigit():
            return "Content-Length is not a number"
        return None

    async def _preflight(
        self, send: Send, route: RouteConfig, origin: bytes | None, headers: Sequence[tuple[bytes, bytes]]
    ) -> None:
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

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        raw_path = raw_path.split(b"?", 1)[0]
        headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        reject = transforms.path_problem(raw_path) is not None
        route = None if reject else self._route(raw_path.decode("ascii"))
        origin = transforms.header_value(headers, b"origin")
        if (
            route is None
            or transforms.query_problem(scope.get("query_string", b"")) is not None
            or not self._origin_ok(scope, headers, origin)
        ):
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await self._relay(scope, receive, send)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """A ``send`` that adds ``extra`` headers to the response start."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return wrapped
