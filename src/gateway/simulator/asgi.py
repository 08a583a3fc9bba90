"""Minimal ASGI plumbing: request facts from a scope, bounded body reads, JSON and streamed responses."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_CONTENT_TYPE = "application/json; charset=utf-8"


class BodyTooLarge(Exception):
    """The request body exceeded the route's limit."""


class ClientGone(Exception):
    """The client disconnected before the request body was complete."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What arrived, undecoded: method, raw path, raw query, headers in received order and case."""

    method: str
    scheme: str
    raw_path: str
    raw_query: str
    headers: tuple[tuple[str, str], ...]
    client_host: str | None

    @classmethod
    def from_scope(cls, scope: Scope) -> RequestInfo:
        """Build from an ASGI http/websocket scope (bytes decoded as latin-1 so nothing can fail)."""
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("latin-1", "replace")
        headers = tuple(
            (bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in scope.get("headers", ())
        )
        client = scope.get("client")
        scheme = str(scope.get("scheme", "http"))
        return cls(
            method=str(scope.get("method", "GET")).upper(),
            scheme={"ws": "http", "wss": "https"}.get(scheme, scheme),
            raw_path=bytes(raw_path).decode("latin-1"),
            raw_query=bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers=headers,
            client_host=str(client[0]) if client else None,
        )

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]

    @property
    def client_is_loopback(self) -> bool:
        """True when the peer address is a loopback address (127.0.0.0/8, ::1, ::ffff:127.x)."""
        if self.client_host is None:
            return False
        try:
            address = ipaddress.ip_address(self.client_host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body; raise BodyTooLarge past ``limit`` bytes, ClientGone on disconnect."""
    chunks: list[bytes] = []
    size = 0

    def keep(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)

    await consume_body(receive, keep)
    return b"".join(chunks)


async def consume_body(receive: Receive, on_chunk: Callable[[bytes], None]) -> None:
    """Feed request body chunks to ``on_chunk`` as they arrive (backpressure: one ASGI message at a time);
    raise ClientGone if the client disconnects first. Exceptions from ``on_chunk`` propagate."""
    while True:
        message = await receive()
        kind = message.get("type")
        if kind == "http.disconnect":
            raise ClientGone
        if kind != "http.request":
            continue
        body = message.get("body", b"")
        if body:
            on_chunk(bytes(body))
        if not message.get("more_body", False):
            return


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def send_json(send: Send, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
    """Send a complete JSON response with Content-Length."""
    body = encode_json(obj)
    raw_headers = [
        (b"content-type", JSON_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
