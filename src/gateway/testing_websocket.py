"""A trio-websocket client for test suites that owns its TCP/TLS stream, so the socket is always closed, whoever
closes first (``TestGateway.websocket`` uses it; the gateway's own tests use it directly).

trio-websocket 0.12.2's ``open_websocket_url`` leaves its socket open when the *server* closes first (its reader
stops at EOF, and ``aclose`` returns early because a close reason is already set) or refuses the handshake; over a
long-running gateway that is one leaked file descriptor per upstream-initiated close. Here the stream is opened by
us, handed to ``wrap_client_stream``, and closed in a shielded, bounded ``finally``. A second 0.12.2 quirk — a Ping
arriving after our Close makes its reader task die with wsproto's ``LocalProtocolError`` — is absorbed here, since
the connection is closing anyway.

Contract: :func:`open_websocket` yields an open :class:`trio_websocket.WebSocketConnection`; on exit the WebSocket
is closed (code 1000 unless already closed) and the stream is closed. Errors raised while connecting or inside the
body propagate as themselves, not wrapped in an exception group.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket
import wsproto.utilities

_CLOSE_TIMEOUT_S = 2.0


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one non-cancellation exception in ``group`` (flattened), or ``None`` if there is not exactly one."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def open_websocket(
    url: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: Iterable[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    max_message_size: int = 1 << 20,
    message_queue_size: int = 16,
    connect_timeout_s: float = 10.0,
    connect_to: tuple[str, int] | None = None,
    local_address: str | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """Connect to ``url`` (``ws://`` or ``wss://``); see the module contract.

    ``connect_to`` is the TCP address to connect to instead of the URL's host and port (the URL still gives the
    ``Host`` header and the TLS server name, as for a name that resolves elsewhere); ``local_address`` the source
    address of the connection."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("WebSocket URL must be ws:// or wss:// with a host")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    connection: trio_websocket.WebSocketConnection | None = None
    try:
        async with trio.open_nursery() as nursery:
            stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
            with trio.fail_after(connect_timeout_s):
                stream = await trio.open_tcp_stream(
                    *(connect_to or (parts.hostname, port)), local_address=local_address
                )
                if secure:
                    context = ssl_context or ssl.create_default_context()
                    stream = trio.SSLStream(stream, context, server_hostname=parts.hostname, https_compatible=True)
            try:
                with trio.fail_after(connect_timeout_s):
                    connection = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        subprotocols=subprotocols,
                        extra_headers=extra_headers,
                        message_queue_size=message_queue_size,
                        max_message_size=max_message_size,
                    )
                try:
                    yield connection
                finally:
                    with trio.move_on_after(_CLOSE_TIMEOUT_S) as closing:
                        closing.shield = True
                        await connection.aclose()
            finally:
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as closing:
                    closing.shield = True
                    await stream.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        remaining: BaseExceptionGroup[BaseException] | None = group
        if connection is not None and connection.closed is not None:
            # trio-websocket answers a Ping that arrives after our Close with a Pong, which wsproto refuses; the
            # reader task dies with LocalProtocolError during an orderly close. Nothing is lost: drop it.
            _, remaining = group.split(wsproto.utilities.LocalProtocolError)
        if remaining is None:
            return
        single = _single(remaining)
        if single is None:
            raise
        raise single from None
