"""The upstream WebSocket client (the relay's, the shared hub's, the doctor's): wsproto over an upstream stream, with
no task or queue of its own.

Why not trio-websocket here: a relay already has a task reading each direction. trio-websocket adds a reader task
and a message queue per connection and a send lock plus a system call per message; profiled, that leg cost more
CPU per relayed message than hypercorn's whole client leg, and about a third of the memory of an idle relay. Here
the relay's upstream→client task reads frames itself (:meth:`UpstreamWebSocket.receive`), the client→upstream
task writes (:meth:`UpstreamWebSocket.send_many` coalesces what is ready into one write).

Contract:
- :func:`connect_websocket` opens TCP (+TLS, the handshake included) on an
  :class:`~gateway.upstream.transport.UpstreamStream` within ``connect_timeout_s``, then performs the opening
  handshake within ``connect_timeout_s`` more, and yields an :class:`UpstreamWebSocket`. Every failure to open is an
  :class:`~gateway.errors.UpstreamError` named ``GET <path>`` (never the query: it carries the access token):
  :class:`~gateway.errors.WebSocketRejected` (with IBKR's HTTP status) for a refusal, ``UpstreamConnectError``,
  ``UpstreamClosed`` (closed during the handshake), ``UpstreamProtocolError`` (an answer that is neither an
  acceptance nor a refusal) or ``UpstreamTimeout`` (``connect timeout``, ``handshake timeout``).
- :meth:`~UpstreamWebSocket.receive` returns whole messages (``str`` for text, ``bytes`` for binary), answers
  pings, and raises :class:`WebSocketClosed` with the peer's code once the peer closes (the close is answered)
  or the connection breaks (code 1006). A message over ``max_message_bytes`` closes the connection with 1009.
- On exit the connection is closed: a Close frame (code 1000 unless :meth:`~UpstreamWebSocket.start_close` chose
  one) if none was sent, a wait for the peer's Close (unless the connection already failed), both bounded together
  by ``_CLOSE_TIMEOUT_S``, then the stream is closed — whoever closed first.
- A write that did not complete (cancelled, e.g. by the relay's write deadline, or failed) may have left part of a
  frame on the wire: nothing more is written after it (no Close frame either) and nothing is waited for on exit.
  :meth:`~UpstreamWebSocket.abort` gives up on the closing handshake the same way, for a caller that cannot wait.
  Nothing here logs or raises the handshake headers (they carry the session cookie).
"""

from __future__ import annotations

import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from gateway.errors import UpstreamClosed, UpstreamError, UpstreamProtocolError, UpstreamTimeout, WebSocketRejected
from gateway.upstream.transport import UpstreamStream

_SEND_FAILURES = (LocalProtocolError, UpstreamError)
_CLOSE_TIMEOUT_S = 2.0
_READ_SIZE = 65536
_ABNORMAL = 1006


class WebSocketClosed(Exception):
    """The upstream closed the WebSocket (``code``; 1006 when the connection broke without a Close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code}")
        self.code = code
        self.reason = reason


class UpstreamWebSocket:
    """An open client WebSocket; one task may :meth:`receive` while another sends."""

    def __init__(self, stream: UpstreamStream, ws: WSConnection, max_message_bytes: int, where: str) -> None:
        self._stream = stream
        self._where = where
        self._ws = ws
        self._max = max_message_bytes
        self._send_lock = trio.StrictFIFOLock()
        self._events: deque[Event] = deque()  # parsed, not yet handed out (a read may carry many frames)
        self._parts: list[str | bytes] = []
        self._size = 0
        self.close_sent = False
        self.closed: WebSocketClosed | None = None  # set once the peer's Close (or a break) was seen
        self.write_failed = False  # a write did not complete: the byte stream may end mid-frame, write no more

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            if self.write_failed:
                raise UpstreamClosed.at(self._where, "an earlier write did not complete")
            written = False
            try:
                await self._stream.send_all(data, self._where)
                written = True
            finally:
                if not written:
                    self.write_failed = True

    async def send_many(self, payloads: Sequence[str | bytes]) -> None:
        """Send ``payloads`` as text (``str``) or binary (``bytes``) messages in one write.

        Raises :class:`WebSocketClosed` if the connection is closing or broken.
        """
        if self.closed is not None or self.close_sent or self.write_failed:
            raise WebSocketClosed(self.closed.code if self.closed else _ABNORMAL if self.write_failed else 1000)
        ws = self._ws
        try:
            data = b"".join(
                ws.send(TextMessage(data=p) if isinstance(p, str) else BytesMessage(data=p)) for p in payloads
            )
            await self._write(data)
        except _SEND_FAILURES:
            raise WebSocketClosed(_ABNORMAL) from None

    async def start_close(self, code: int, reason: str = "") -> None:
        """Send our Close frame now (once); the rest of the close happens when the connection's block exits."""
        if self.close_sent or self.closed is not None or self.write_failed:
            return
        self.close_sent = True
        await self._answer(CloseConnection(code=code, reason=reason or None))

    async def wait_closed(self) -> None:
        """Read (answering pings, dropping messages) until the peer's Close or a break; at once if the peer already
        closed or if no Close of ours went out (none sent, a failed write, :meth:`abort`). Unbounded: the caller
        bounds it, and calls it only when no other task is receiving."""
        while self.closed is None and self.close_sent and not self.write_failed:
            try:
                await self.receive()
            except WebSocketClosed:
                return

    def abort(self) -> None:
        """Give up on the closing handshake: nothing more is written, and leaving the ``connect_websocket`` block
        closes the socket at once instead of waiting for the peer (for a caller that cannot wait, e.g. because
        another task may still be receiving)."""
        self.close_sent = True
        self.write_failed = True

    async def receive(self) -> str | bytes:
        """The next whole message; see the module contract."""
        while True:
            while not self._events:
                if self.closed is not None:
                    raise self.closed
                await self._read()
            event = self._events.popleft()
            if isinstance(event, TextMessage | BytesMessage):
                data = event.data
                if isinstance(data, str):
                    self._parts.append(data)
                    # The limit is in bytes: a character is 1-4 UTF-8 bytes; encode only when it could matter.
                    size = len(data) if self._size + 4 * len(data) <= self._max else len(data.encode("utf-8"))
                else:
                    self._parts.append(bytes(data))
                    size = len(data)
                self._size += size
                if self._size > self._max:
                    await self.start_close(1009, "message too big")
                    self.closed = WebSocketClosed(1009, "message too big")
                    raise self.closed
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if len(parts) == 1:
                        return parts[0]
                    return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]
            elif isinstance(event, Ping):
                await self._answer(event.response())
            elif isinstance(event, CloseConnection):
                self.closed = WebSocketClosed(event.code, event.reason or "")  # known even if the answer is cancelled
                if not self.close_sent:
                    self.close_sent = True
                    await self._answer(event.response())
                raise self.closed

    async def _answer(self, event: Event) -> None:
        """Send a control frame; if the peer is gone the read side sees the break, so a failure is dropped."""
        with contextlib.suppress(*_SEND_FAILURES):
            await self._write(self._ws.send(event))

    async def _read(self) -> None:
        try:
            data = await self._stream.receive_some(_READ_SIZE, self._where)
        except UpstreamError:
            data = b""  # a broken connection ends like one closed without a Close frame: 1006
        try:
            self._ws.receive_data(bytes(data) if data else None)
            self._events.extend(self._ws.events())
        except RemoteProtocolError:
            self._events.clear()
            self.closed = WebSocketClosed(1002, "protocol error")
            return
        if not data and not self._events:
            self.closed = WebSocketClosed(_ABNORMAL)

    async def _finish(self) -> None:
        """Close frame if none was sent, then wait for the peer's Close — both within ``_CLOSE_TIMEOUT_S``, since a
        peer that stops reading can block the write too. The caller closes the stream."""
        with trio.move_on_after(_CLOSE_TIMEOUT_S):
            await self.start_close(1000)
            await self.wait_closed()


@asynccontextmanager
async def connect_websocket(
    url: str,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
    subprotocols: Iterable[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    max_message_bytes: int = 1 << 20,
    connect_timeout_s: float = 10.0,
) -> AsyncIterator[UpstreamWebSocket]:
    """Connect to ``url`` (``ws://`` or ``wss://``); see the module contract."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("WebSocket URL must be ws:// or wss:// with a host")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query else "")
    where = f"GET {path}"  # in every error: the path, never the query (it carries the access token)
    tls = (ssl_context or ssl.create_default_context()) if secure else None
    stream = await UpstreamStream.open(parts.hostname, port, tls=tls, connect_s=connect_timeout_s, where=where)
    try:
        with trio.move_on_after(connect_timeout_s) as handshake:
            host = parts.netloc.rsplit("@", 1)[-1]  # never user information in the Host header
            connection = await _handshake(stream, host, target, where, extra_headers, subprotocols, max_message_bytes)
        if handshake.cancelled_caught:
            raise UpstreamTimeout.at(where, "handshake timeout")
        try:
            yield connection
        finally:
            with trio.CancelScope(shield=True):
                await connection._finish()
    finally:
        await stream.aclose(_CLOSE_TIMEOUT_S)  # a TLS close_notify that cannot be sent in time: closed anyway


async def _handshake(
    stream: UpstreamStream,
    host: str,
    target: str,
    where: str,
    extra_headers: Iterable[tuple[bytes, bytes]],
    subprotocols: Iterable[str],
    max_message_bytes: int,
) -> UpstreamWebSocket:
    """The opening handshake; the caller bounds it (the stream's own deadlines are infinite)."""
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host=host, target=target, extra_headers=list(extra_headers), subprotocols=list(subprotocols))
    await stream.send_all(ws.send(request), where)
    status: int | None = None
    while True:
        data = await stream.receive_some(_READ_SIZE, where)
        if not data and status is None:
            raise UpstreamClosed.at(where, "closed during the WebSocket handshake")
        try:
            ws.receive_data(data or None)  # None: EOF, which may end a refusal's body
            events = list(ws.events())
        except RemoteProtocolError as exc:
            # A refusal is an event, not an error; an error means the answer was not a WebSocket handshake at all
            # (wsproto then hints a RejectConnection with its own default status, 400).
            hint = exc.event_hint
            if isinstance(hint, RejectConnection) and hint.status_code != 400:
                raise WebSocketRejected.status_of(where, hint.status_code) from None
            raise UpstreamProtocolError.at(where, "not a WebSocket handshake answer") from None
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                connection = UpstreamWebSocket(stream, ws, max_message_bytes, where)
                connection._events.extend(events[index + 1 :])  # frames that came with the handshake answer
                return connection
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    raise WebSocketRejected.status_of(where, status)
            elif isinstance(event, RejectData) and event.body_finished:
                raise WebSocketRejected.status_of(where, status or 502)
        if not data:
            raise WebSocketRejected.status_of(where, status or 502)  # the refusal's body ended with the connection
