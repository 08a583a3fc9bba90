"""The proxy's upstream HTTP/1.1 client: one origin, a LIFO keep-alive pool, strict framing, deadlines everywhere.

Why not httpx here: profiled under load, httpx + httpcore took about half of the gateway's CPU per proxied request
(its pool polls every pooled socket on every request; several layers of request/response objects). This client
does only what the proxy needs: one origin (IBKR's base URL), raw header lists in and out, streamed bodies both
ways. Request heads are written in one piece; response heads and chunked bodies are parsed by the pure
:mod:`gateway.upstream.wire` (h11 cost about 100 µs per exchange); Content-Length bodies are passed through without
a copy. httpx remains the client for the session's own calls (handshake, tickle), where convenience matters more
than microseconds.

Contract:
- :meth:`Http1Pool.send` writes one request (``Host`` first, then the given headers; a body of unknown length goes
  chunked; a declared length is enforced) and returns an :class:`UpstreamResponse` once the status line and headers
  have arrived. The caller must read the body to its end with :meth:`UpstreamResponse.receive` or call
  :meth:`UpstreamResponse.close`; only a connection whose exchange completed cleanly (whole body read, HTTP/1.1,
  no ``Connection: close``, nothing unasked after the body) goes back to the pool.
- Deadlines (:class:`~gateway.upstream.transport.Timeouts`): ``connect_s`` for TCP + TLS, ``write_s`` for each
  write, ``read_s`` for each read (all kept by :class:`~gateway.upstream.transport.UpstreamStream`), ``pool_s`` to
  wait for one of ``max_connections``. Every failure surfaces as an :class:`~gateway.errors.UpstreamError`:
  ``UpstreamConnectError`` (no connection), ``UpstreamClosed`` (it broke, or ended before the answer did),
  ``UpstreamProtocolError`` (malformed answer), all 502, or ``UpstreamTimeout`` (504); the message names the
  exchange and never a header value. Errors raised by the request body iterator (the client went away, the body is
  too large) propagate unchanged.
- A reused idle connection may have been closed by the server a moment before it was picked: if it fails before any
  response byte arrived and the request is an idempotent one without a body (:data:`REPLAYABLE`), the request is
  written once more on a new connection (or, with ``resend_stale=False``, :class:`~gateway.errors.UpstreamStale`
  tells the caller it may send it again, e.g. after a new pacing turn); anything else gets the error (it may have
  reached the server).
- Idle connections are kept newest-first (the warm one is reused), at most ``max_idle``, and closed after
  ``idle_expiry_s``; one readability check per reuse (a readable idle socket has been closed by the server).
  :meth:`Http1Pool.keep_tidy` (a task of the gateway's root nursery) does the same check every second, so a
  connection the server closed while idle is closed here too instead of sitting in CLOSE-WAIT until the next
  request.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

import trio

from gateway.errors import UpstreamClosed, UpstreamError, UpstreamProtocolError, UpstreamStale, UpstreamTimeout
from gateway.upstream.transport import Timeouts, UpstreamStream
from gateway.upstream.wire import ChunkedDecoder, Head, WireError, parse_head

Headers = Sequence[tuple[bytes, bytes]]

REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
"""Idempotent methods: a request with one of them and no body may be written twice (a stale connection failed
before any answer, a 401 that only raced a token refresh). The proxy decides with this set too."""
_REPLAYABLE = frozenset(method.encode("ascii") for method in REPLAYABLE)
MAX_HEAD_BYTES = 64 * 1024  # an upstream response head larger than this is refused (502)
READ_SIZE = 256 * 1024  # large reads: a 1 GiB stream costs fewer loop turns; small answers arrive in one read anyway


class _Connection:
    """One upstream connection and the bytes received on it but not yet consumed."""

    __slots__ = ("answered", "buffer", "idle_since", "stream")

    def __init__(self, stream: UpstreamStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.idle_since = 0.0
        self.answered = False  # some byte of the current response arrived (a failed request is then not re-sent)

    def holds_unread_bytes(self) -> bool:
        """Whether the idle connection received anything (the server's EOF included): it is not reused then."""
        return self.stream.holds_unread_bytes()

    def close(self) -> None:
        """Close at once, without awaiting (safe in cancelled and cleanup paths; no TLS close_notify)."""
        self.stream.close()

    def take_buffered(self) -> bytes:
        """Everything received and not yet consumed, once."""
        if not self.buffer:
            return b""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class UpstreamResponse:
    """The status and headers of one upstream response, and its body to be read with :meth:`receive`.

    Content-Length bodies (the common case, and every large download) are passed on as read from the socket, with no
    copy; chunked bodies go through :class:`~gateway.upstream.wire.ChunkedDecoder`; a body delimited by the
    connection closing is read to EOF (and the connection is not reused).
    """

    __slots__ = ("_chunks", "_conn", "_keep_alive", "_pool", "_remaining", "_where", "headers", "status")

    def __init__(self, pool: Http1Pool, conn: _Connection, head: Head, where: str) -> None:
        self.status = head.status
        self.headers = head.headers  # names lower-case, values stripped
        self._pool = pool
        self._conn: _Connection | None = conn
        self._where = where
        self._keep_alive = head.keep_alive
        self._remaining: int | None = {"none": 0, "length": head.length}.get(head.framing)  # None: chunked or close
        self._chunks = ChunkedDecoder(MAX_HEAD_BYTES) if head.framing == "chunked" else None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def receive(self) -> tuple[bytes, bool]:
        """The next piece of the body and whether the body is now complete (the connection then goes back to the
        pool). Everything already buffered is returned at once, so a small answer is one piece with ``True``.

        Raises :class:`UpstreamError` if the upstream stalls or breaks off (the body is then incomplete).
        """
        connection = self._conn
        if connection is None:
            return b"", True
        try:
            if self._remaining is not None:
                return await self._receive_sized(connection)
            if self._chunks is not None:
                return await self._receive_chunked(connection, self._chunks)
            return await self._receive_until_close(connection)
        except BaseException:
            self.close()
            raise

    def _finish(self, connection: _Connection, *, reusable: bool) -> None:
        self._conn = None
        self._pool.release(connection, reusable=reusable and self._keep_alive)

    async def _receive_sized(self, connection: _Connection) -> tuple[bytes, bool]:
        remaining = self._remaining
        assert remaining is not None
        data = connection.take_buffered()
        if not data and remaining:
            # Not min(remaining, ...): bytes an upstream sends after the body should show up here and be refused.
            data = await self._pool.read_raw(connection, READ_SIZE, self._where)
            if not data:
                raise UpstreamClosed.at(self._where, f"closed with {remaining} body bytes missing")
        clean = len(data) <= remaining  # bytes after the body: nothing was asked for, so the connection is not reused
        if not clean:
            data = data[:remaining]
        remaining -= len(data)
        self._remaining = remaining
        if remaining:
            return data, False
        self._finish(connection, reusable=clean)
        return data, True

    async def _receive_chunked(self, connection: _Connection, chunks: ChunkedDecoder) -> tuple[bytes, bool]:
        data = connection.take_buffered()
        while True:
            if not data:
                data = await self._pool.read_raw(connection, READ_SIZE, self._where)
                if not data:
                    raise UpstreamClosed.at(self._where, "closed inside a chunked body")
            try:
                pieces = chunks.feed(data)
            except WireError as exc:
                raise UpstreamProtocolError.at(self._where, str(exc)) from None
            data = b""
            if chunks.done:
                self._finish(connection, reusable=not chunks.leftover)
                return b"".join(pieces), True
            if pieces:
                return b"".join(pieces), False

    async def _receive_until_close(self, connection: _Connection) -> tuple[bytes, bool]:
        data = connection.take_buffered() or await self._pool.read_raw(connection, READ_SIZE, self._where)
        if data:
            return data, False
        self._finish(connection, reusable=False)
        return b"", True

    def close(self) -> None:
        """Abandon the rest of the body: the connection is closed, not reused. Idempotent, never awaits."""
        connection, self._conn = self._conn, None
        if connection is not None:
            self._pool.discard(connection)


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one origin (``base_url``: ``http(s)://host[:port]``)."""

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts,
        *,
        tls: ssl.SSLContext | None,
        max_connections: int = 100,
        max_idle: int = 20,
        idle_expiry_s: float = 30.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream base URL must be http(s)://host[:port], not {base_url!r}")
        self._https = parts.scheme == "https"
        self._hostname = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._host_header = parts.netloc.encode("ascii")
        self._tls = (tls if tls is not None else ssl.create_default_context()) if self._https else None
        self._timeouts = timeouts
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []  # oldest first; reuse takes the newest
        self._max_idle = max_idle
        self._idle_expiry_s = idle_expiry_s
        self._closed = False

    # --- the pool -------------------------------------------------------------------------------------

    @property
    def idle_connections(self) -> int:
        """How many connections wait for reuse (for tests and the status page)."""
        return len(self._idle)

    def _take_idle(self) -> _Connection | None:
        now = trio.current_time()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < self._idle_expiry_s and not connection.holds_unread_bytes():
                connection.answered = False
                return connection
            connection.close()  # expired, or the server closed it (EOF is readable) or sent bytes unasked
        return None

    def prune(self) -> int:
        """Close the idle connections that expired or that the server closed (or sent unasked bytes on); returns
        how many were closed."""
        now = trio.current_time()
        kept: list[_Connection] = []
        for connection in self._idle:
            if now - connection.idle_since < self._idle_expiry_s and not connection.holds_unread_bytes():
                kept.append(connection)
            else:
                connection.close()
        closed = len(self._idle) - len(kept)
        self._idle = kept
        return closed

    async def keep_tidy(self, interval_s: float = 1.0) -> None:
        """:meth:`prune` every ``interval_s`` seconds until cancelled."""
        while True:
            await trio.sleep(interval_s)
            self.prune()

    async def _connect(self, where: str) -> _Connection:
        timeouts = self._timeouts
        stream = await UpstreamStream.open(
            self._hostname,
            self._port,
            tls=self._tls,
            connect_s=timeouts.connect_s,
            read_s=timeouts.read_s,
            write_s=timeouts.write_s,
            where=where,
        )
        return _Connection(stream)

    def release(self, connection: _Connection, *, reusable: bool) -> None:
        """Return a connection whose response was read to its exact end; kept only if ``reusable`` (HTTP/1.1, no
        ``Connection: close``, nothing unasked after the body)."""
        self._slots.release()
        if not reusable or self._closed or connection.buffer:
            connection.close()
            return
        connection.idle_since = trio.current_time()
        self._idle.append(connection)
        if len(self._idle) > self._max_idle:
            self._idle.pop(0).close()

    def discard(self, connection: _Connection) -> None:
        """Close a connection whose exchange did not finish cleanly."""
        self._slots.release()
        connection.close()

    def close(self) -> None:
        """Close every idle connection; connections in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    # --- one exchange ---------------------------------------------------------------------------------

    async def send(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        where: str,
        *,
        authorize: Callable[[], bytes] | None = None,
        resend_stale: bool = True,
    ) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (lower-case names, no ``Host``) and ``body``; the response head.

        ``body`` is None for a request without one; otherwise the headers must carry its ``content-length``, or it
        is sent chunked. ``where`` (``"GET /path"``) names the exchange in error messages. ``authorize`` gives the
        ``Authorization`` value, called for each write of the request: the stale-connection retry is signed afresh
        (a new OAuth nonce), so a request the server did see before closing is never replayed byte for byte.
        With ``resend_stale`` false that retry is the caller's: it gets :class:`~gateway.errors.UpstreamStale`.
        """
        try:
            self._slots.acquire_nowait()  # the usual case: no deadline scope and no trip through the scheduler
        except trio.WouldBlock:
            with trio.move_on_after(self._timeouts.pool_s) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise UpstreamTimeout(f"{where}: no free upstream connection in time (pool timeout)") from None
        try:
            length = _content_length(headers)
            chunked = body is not None and length is None

            def head() -> bytes:
                signed = headers if authorize is None else [*headers, (b"authorization", authorize())]
                return _request_head(method, target, self._host_header, signed, chunked=chunked)

            connection = self._take_idle()
            if connection is not None and body is None and method in _REPLAYABLE:
                try:
                    return await self._exchange(connection, method, head(), None, length, where)
                except UpstreamClosed as exc:
                    if connection.answered:
                        raise
                    # A stale keep-alive connection: the server closed it as we picked it; one fresh try.
                    if not resend_stale:
                        raise UpstreamStale(str(exc)) from None
            elif connection is not None:
                return await self._exchange(connection, method, head(), body, length, where)
            connection = await self._connect(where)
            return await self._exchange(connection, method, head(), body, length, where)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self,
        connection: _Connection,
        method: bytes,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        length: int | None,
        where: str,
    ) -> UpstreamResponse:
        """Write the request (head in one write, body chunks as they come), read the response head. On failure the
        connection is closed (the slot is kept)."""
        try:
            if body is None:
                await self._write(connection, head, where)
            else:
                await self._write(connection, head, where)
                sent = 0
                async for chunk in body:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    if length is None:
                        await self._write(connection, b"%x\r\n%b\r\n" % (len(chunk), chunk), where)
                    elif sent <= length:
                        await self._write(connection, chunk, where)
                if length is None:
                    await self._write(connection, b"0\r\n\r\n", where)
                elif sent != length:  # the client's framing was checked upstream of here; never send a short body
                    raise UpstreamError(f"{where}: request body was {sent} bytes, not the declared {length}")
            response_head = await self._read_head(connection, method, where)
        except BaseException:
            connection.close()
            raise
        return UpstreamResponse(self, connection, response_head, where)

    async def _read_head(self, connection: _Connection, method: bytes, where: str) -> Head:
        """The final response head (1xx heads are skipped), reading as needed; the body's start stays buffered."""
        buffer = connection.buffer
        while True:
            try:
                parsed = parse_head(buffer, request_method=method, max_head_bytes=MAX_HEAD_BYTES)
            except WireError as exc:
                raise UpstreamProtocolError.at(where, str(exc)) from None
            if parsed is None:
                data = await self.read_raw(connection, READ_SIZE, where)
                if not data:
                    raise UpstreamClosed.at(
                        where, "closed inside the response head" if buffer else "closed before answering"
                    )
                buffer += data
                continue
            head, size = parsed
            del buffer[:size]
            if head.status >= 200:
                return head
            if head.status == 101:
                raise UpstreamProtocolError.at(where, "unasked protocol switch")

    @staticmethod
    async def _write(connection: _Connection, data: bytes, where: str) -> None:
        await connection.stream.send_all(data, where)

    @staticmethod
    async def read_raw(connection: _Connection, size: int, where: str) -> bytes:
        """One read of at most ``size`` bytes under the read deadline (``b""`` at EOF)."""
        data = await connection.stream.receive_some(size, where)
        if data:
            connection.answered = True
        return data


def _content_length(headers: Headers) -> int | None:
    """The request's declared body length (the dispatcher let through at most one, all digits), or ``None``."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _request_head(method: bytes, target: bytes, host: bytes, headers: Headers, *, chunked: bool) -> bytes:
    """The request line and header block, ``Host`` first, ``Transfer-Encoding: chunked`` when asked.

    Every part was checked before it got here: method and target by the server's parser and the dispatcher, header
    values by the server's parser (no CR, LF or NUL) or built by the gateway from ASCII.
    """
    lines = [method + b" " + target + b" HTTP/1.1", b"host: " + host]
    lines += [name + b": " + value for name, value in headers]
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


__all__ = ["REPLAYABLE", "Http1Pool", "UpstreamResponse"]
