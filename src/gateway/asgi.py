"""ASGI type aliases and the gateway's one JSON error shape, shared by the proxy and the internal endpoints.

Error bodies have IBKR's own shape plus two fields, so a client handles gateway and IBKR errors alike::

    {"error": "<what failed and where>", "statusCode": 503, "source": "gateway", "code": "session_not_ready"}

A WebSocket upgrade refused before accept gets the same body (:func:`refuse_upgrade`, through ASGI's
``websocket.http.response`` extension) and one log line naming the route, the client, the Origin and the code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotation only: this module stays below the edge, which builds on it
    from gateway.edge.request import Admitted

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(status: int, code: str, message: str) -> bytes:
    """The JSON error body (UTF-8)."""
    return json.dumps({"error": message, "statusCode": status, "source": "gateway", "code": code}).encode()


async def send_json(send: Send, status: int, payload: bytes, *, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON response (``payload`` is already-encoded JSON)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def send_error(
    send: Send, status: int, code: str, message: str, *, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send the gateway's JSON error response."""
    await send_json(send, status, error_body(status, code, message), headers=headers)


_LOGGED_CHARS = 200  # a path or Origin in a log line is cut here (headers may be kilobytes)


@dataclass(frozen=True, slots=True)
class UpgradeRefusal:
    """Why a WebSocket upgrade is turned away: the HTTP answer (``status``, ``code``, a ``message`` naming the fix,
    extra ``headers`` such as ``Retry-After``) and the level of its log line.

    Contract: ``message`` never holds a secret (an API key, the query string, a cookie); it may name the path, the
    Origin and the session's scrubbed last error, which are not secrets.
    """

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    level: int = logging.WARNING


def printable(text: str, limit: int = _LOGGED_CHARS) -> str:
    """``text`` for a log line: control and non-ASCII characters escaped (no forged lines), cut at ``limit``."""
    escaped = ascii(text)[1:-1]
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def log_refusal(
    logger: logging.Logger, code: str, message: str, *, level: int, path: str, client: object, origin: bytes | None
) -> None:
    """The one log line of a refused WebSocket upgrade: code, route (the path, never the query: it may hold a key),
    client address, Origin (``-`` when none) and the message."""
    logger.log(
        level,
        "WebSocket upgrade refused (%s): route=%s client=%s origin=%s: %s",
        code,
        printable(path),
        client,
        "-" if origin is None else printable(origin.decode("latin-1")),
        message,
    )


async def refuse_over_limit(
    send: Send, admitted: Admitted, *, limit: int, holders: str, logger: logging.Logger
) -> None:
    """One upgrade over ``server.max_websockets``: logged, accepted and closed at once with 1013 and a reason naming
    ``websocket_limit`` and the key (at most 123 bytes, as a Close reason must be). It is accepted first because a
    browser learns nothing from a refused handshake but does see a Close's code and reason. ``holders`` says what
    the limit counts (e.g. "relays are open or opening")."""
    message = f"server.max_websockets ({limit}) reached: that many {holders}; try again later"
    request = admitted.request
    log_refusal(
        logger,
        "websocket_limit",
        message,
        level=logging.WARNING,
        path=request.path,
        client=request.client,
        origin=request.origin,
    )
    await send({"type": "websocket.accept"})
    reason = f"websocket_limit: server.max_websockets ({limit}) reached; try again later"
    await send({"type": "websocket.close", "code": 1013, "reason": reason})


async def refuse_upgrade(
    send: Send,
    scope: Scope,
    refusal: UpgradeRefusal,
    *,
    logger: logging.Logger,
    path: str,
    client: object,
    origin: bytes | None,
    request_id: str | None,
) -> None:
    """Log ``refusal`` (:func:`log_refusal`) and answer the upgrade with it before accept, so no relay starts.

    The answer is ``refusal.status`` with the JSON error body, ``X-Request-Id`` and ``refusal.headers`` where the
    server offers the ``websocket.http.response`` extension (hypercorn does); elsewhere a close before accept, which
    the server answers with a bare 403. The caller must have received ``websocket.connect`` and not accepted.
    """
    log_refusal(logger, refusal.code, refusal.message, level=refusal.level, path=path, client=client, origin=origin)
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
        return
    body = error_body(refusal.status, refusal.code, refusal.message)
    response_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *refusal.headers,
    ]
    if request_id:
        response_headers.append((b"x-request-id", request_id.encode("ascii")))
    await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": response_headers})
    await send({"type": "websocket.http.response.body", "body": body})
