"""Scripted raw HTTP/1.1 servers on loopback for client tests: every byte received is recorded, every byte sent is
written by the test, so framing cases are exact.

A handler gets one :class:`RawConnection` per accepted connection (numbered from 0 in accept order) and drives it
with :meth:`RawConnection.read_request` and :meth:`RawConnection.send`. A peer that goes away (EOF, reset, failed TLS
handshake) reads as ``None``; sends to a peer that is gone are ignored.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress

import trio

Handler = Callable[["RawConnection"], Awaitable[None]]


class RawConnection:
    """One accepted connection: the raw bytes received, the requests parsed from them, and a way to answer."""

    def __init__(self, stream: trio.abc.Stream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.received = bytearray()  # every byte received, in order
        self.requests: list[bytes] = []  # every complete request (head and body), raw
        self.eof = trio.Event()  # the peer closed (EOF or reset), seen by a read
        self.closed = trio.Event()  # this side closed the connection
        self._buffer = bytearray()

    async def _fill(self) -> bool:
        if self.eof.is_set():
            return False
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof.set()
            return False
        self.received += data
        self._buffer += data
        return True

    async def _read_until(self, marker: bytes) -> bytes | None:
        while (position := self._buffer.find(marker)) < 0:
            if not await self._fill():
                return None
        end = position + len(marker)
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        return data

    async def _read_exact(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not await self._fill():
                return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_head(self) -> bytes | None:
        """Only the next request head (its body, if any, stays unread), or ``None`` if the peer went away."""
        return await self._read_until(b"\r\n\r\n")

    async def read_request(self) -> bytes | None:
        """The next whole request (framed by ``content-length`` or chunked), or ``None`` if the peer went away."""
        head = await self._read_until(b"\r\n\r\n")
        if head is None:
            return None
        parts = [head]
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size_line = await self._read_until(b"\r\n")
                if size_line is None:
                    return None
                size = int(size_line[:-2].split(b";")[0], 16)
                data = await self._read_exact(size + 2)  # the chunk and its CRLF (the last one: the final CRLF)
                if data is None:
                    return None
                parts += [size_line, data]
                if size == 0:
                    break
        elif length:
            body = await self._read_exact(length)
            if body is None:
                return None
            parts.append(body)
        request = b"".join(parts)
        self.requests.append(request)
        return request

    async def drain(self) -> None:
        """Read (and record) until the peer goes away."""
        while await self._fill():
            pass

    async def send(self, data: bytes) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(data)

    async def send_pieces(self, pieces: Sequence[bytes], delay: float) -> None:
        """Each piece in its own write, ``delay`` seconds apart (so the client reads them separately)."""
        for number, piece in enumerate(pieces):
            if number:
                await trio.sleep(delay)
            await self.send(piece)

    async def close(self) -> None:
        """Close at once (TCP FIN; no TLS close_notify)."""
        await trio.aclose_forcefully(self.stream)
        self.closed.set()


class RawServer:
    """The listening side: where it listens and every connection it accepted."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections: list[RawConnection] = []
        self.accepted = trio.Condition()

    @property
    def accepts(self) -> int:
        return len(self.connections)

    @property
    def requests(self) -> list[bytes]:
        """Every complete request received, over all connections, in accept order."""
        return [request for connection in self.connections for request in connection.requests]

    async def wait_accepts(self, count: int) -> None:
        async with self.accepted:
            while self.accepts < count:
                await self.accepted.wait()

    def _serve(self, handler: Handler) -> Callable[[trio.abc.Stream], Awaitable[None]]:
        async def serve(stream: trio.abc.Stream) -> None:
            connection = RawConnection(stream, len(self.connections))
            self.connections.append(connection)
            async with self.accepted:
                self.accepted.notify_all()
            try:
                await handler(connection)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(stream)
                connection.closed.set()

        return serve


@asynccontextmanager
async def open_raw_server(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    """A server on ``127.0.0.1`` (any free port) running ``handler`` per connection; stopped on exit."""
    async with trio.open_nursery() as nursery:
        tcp_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server = RawServer(tcp_listeners[0].socket.getsockname()[1])
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp_listeners)
        if tls is not None:
            listeners = [trio.SSLListener(listener, tls) for listener in tcp_listeners]
        await nursery.start(trio.serve_listeners, server._serve(handler), listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
