"""ASGI type aliases and the gateway's one JSON error shape, shared by the proxy and the internal endpoints.

Error bodies have IBKR's own shape plus two fields, so a client handles gateway and IBKR errors alike::

    {"error": "<what failed and where>", "statusCode": 503, "source": "gateway", "code": "session_not_ready"}
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

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
