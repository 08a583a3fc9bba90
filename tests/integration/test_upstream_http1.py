"""The proxy's own HTTP/1.1 client (:mod:`gateway.upstream.http1`) against scripted raw loopback servers.

Every server here records exactly the bytes it receives and answers with bytes written in the test, so request
framing, response framing, keep-alive decisions, retries, deadlines and pool slots are checked byte for byte.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStale,
    UpstreamTimeout,
)
from gateway.upstream.http1 import MAX_HEAD_BYTES, READ_SIZE, Headers, Http1Pool, UpstreamResponse
from gateway.upstream.transport import Timeouts
from tests.certs import self_signed
from tests.rawserver import Handler, RawConnection, RawServer, open_raw_server

TIMEOUTS = Timeouts(connect_s=2.0, read_s=2.0, write_s=2.0, pool_s=2.0)
CEILING = 5.0  # no single test step may take longer than this
SECRET = b"s3cr3t-T0KEN-value"  # a request header value that must never appear in an error message
SECRET_HEADERS = [(b"authorization", b"Bearer " + SECRET)]


# --- helpers --------------------------------------------------------------------------------------------


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A complete keep-alive response framed by Content-Length."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%b\r\n%b" % (len(body), extra, body)


def chunked(*chunks: bytes) -> bytes:
    """A chunked body (each chunk as given, then the last chunk)."""
    return b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def split(data: bytes, size: int) -> list[bytes]:
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


Responder = Callable[[RawConnection, bytes], Awaitable[None]]


def answering(respond: Responder) -> Handler:
    """A handler that reads requests until the peer goes away and answers each with ``respond``."""

    async def handler(connection: RawConnection) -> None:
        while (request := await connection.read_request()) is not None:
            await respond(connection, request)

    return handler


def answer_ok(body: bytes = b"ok") -> Handler:
    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(ok(body))

    return answering(respond)


async def answer_with_connection_index(connection: RawConnection, request: bytes) -> None:
    """Name the connection in the body (``c0``, ``c1``, …) so the client can tell which one it was given."""
    if request.startswith(b"HEAD "):
        await connection.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    else:
        await connection.send(ok(b"c%d" % connection.index))


class TrackedPool(Http1Pool):
    """An :class:`Http1Pool` that remembers its responses, so a test that fails half-way leaks no socket."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[UpstreamResponse] = []

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
        response = await super().send(
            method, target, headers, body, where, authorize=authorize, resend_stale=resend_stale
        )
        self.responses.append(response)
        return response

    def close_all(self) -> None:
        for response in self.responses:
            response.close()
        self.close()


class Pools:
    """Makes pools for a test and closes all of them (and their responses) afterwards."""

    def __init__(self) -> None:
        self.made: list[TrackedPool] = []

    def __call__(
        self,
        origin: RawServer | str,
        timeouts: Timeouts = TIMEOUTS,
        *,
        scheme: str = "http",
        tls: ssl.SSLContext | None = None,
        max_connections: int = 100,
        max_idle: int = 20,
        idle_expiry_s: float = 30.0,
    ) -> TrackedPool:
        base_url = origin if isinstance(origin, str) else f"{scheme}://127.0.0.1:{origin.port}"
        pool = TrackedPool(
            base_url,
            timeouts,
            tls=tls,
            max_connections=max_connections,
            max_idle=max_idle,
            idle_expiry_s=idle_expiry_s,
        )
        self.made.append(pool)
        return pool


@pytest.fixture
async def pools() -> AsyncIterator[Pools]:
    made = Pools()
    yield made
    for pool in made.made:
        pool.close_all()


async def read_body(response: UpstreamResponse) -> bytes:
    """The whole body through repeated ``receive()``; ``done`` must come exactly once, at the end."""
    pieces: list[bytes] = []
    while True:
        data, done = await response.receive()
        pieces.append(data)
        if done:
            return b"".join(pieces)


async def get(pool: Http1Pool, target: bytes = b"/", where: str = "GET /") -> bytes:
    with trio.fail_after(CEILING):
        response = await pool.send(b"GET", target, [], None, where)
        assert response.status == 200
        return await read_body(response)


async def wait_eof(connection: RawConnection) -> None:
    """The client closed this connection (the server read EOF)."""
    with trio.fail_after(CEILING):
        await connection.eof.wait()


class BodyBroke(Exception):
    """Raised by a request body iterator (the gateway's client went away, say)."""


class Body:
    """A request body: ``pieces`` in order, optionally after ``ready`` is set, optionally ending in ``fail``."""

    def __init__(
        self, pieces: Sequence[bytes], *, fail: BaseException | None = None, ready: trio.Event | None = None
    ) -> None:
        self._pieces = list(pieces)
        self._fail = fail
        self._ready = ready
        self.yielded = 0

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        if self._ready is not None:
            await self._ready.wait()
            self._ready = None
        if self.yielded < len(self._pieces):
            self.yielded += 1
            return self._pieces[self.yielded - 1]
        if self._fail is not None:
            raise self._fail
        raise StopAsyncIteration


class EndlessBody:
    """A request body of the same 1 MiB piece, ``count`` times."""

    def __init__(self, count: int) -> None:
        self._piece = b"x" * (1 << 20)
        self._left = count

    def __aiter__(self) -> EndlessBody:
        return self

    async def __anext__(self) -> bytes:
        if not self._left:
            raise StopAsyncIteration
        self._left -= 1
        await trio.lowlevel.checkpoint()
        return self._piece


def assert_names_where(exc: UpstreamError, where: str) -> None:
    """The message names the exchange, no request header value, and hides the low-level cause."""
    message = str(exc)
    assert message.startswith(where + ": "), message
    assert SECRET.decode() not in message
    assert exc.__cause__ is None


# --- a plain exchange -----------------------------------------------------------------------------------


async def test_get_wire_bytes_status_headers_and_body(pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: Yes\r\nSet-Cookie: a=1\r\n\r\nhello")

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        headers = [(b"accept", b"application/json"), (b"x-trace", b"abc def"), (b"user-agent", b"t/1")]
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/p?q=1", headers, None, "GET /p")
            assert response.status == 200
            assert response.headers == [(b"content-length", b"5"), (b"x-thing", b"Yes"), (b"set-cookie", b"a=1")]
            assert response.header(b"x-thing") == b"Yes"
            assert response.header(b"nope") is None
            assert await response.receive() == (b"hello", True)
            assert await response.receive() == (b"", True)
        assert server.requests == [
            b"GET /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\naccept: application/json\r\nx-trace: abc def\r\n"
            b"user-agent: t/1\r\n\r\n" % server.port
        ]
        assert bytes(server.connections[0].received) == server.requests[0]
        assert pool.idle_connections == 1


async def test_get_without_headers_is_request_line_and_host_only(pools: Pools) -> None:
    async with open_raw_server(answer_ok()) as server:
        pool = pools(server)
        assert await get(pool) == b"ok"
        assert server.requests == [b"GET / HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n\r\n" % server.port]


async def test_base_url_validation() -> None:
    for bad in ("ftp://127.0.0.1", "127.0.0.1:80", "http://", "http:///path"):
        with pytest.raises(ValueError, match="base URL"):
            Http1Pool(bad, TIMEOUTS, tls=None)


# --- keep-alive -----------------------------------------------------------------------------------------


async def test_keep_alive_three_requests_one_connection(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server)
        for number in range(3):
            assert await get(pool, b"/n%d" % number) == b"c0"
            assert pool.idle_connections == 1
        assert server.accepts == 1
        assert [request.split(b" ")[1] for request in server.connections[0].requests] == [b"/n0", b"/n1", b"/n2"]


async def test_lifo_most_recently_released_connection_is_used_next(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            first = await pool.send(b"GET", b"/a", [], None, "GET /a")
            second = await pool.send(b"GET", b"/b", [], None, "GET /b")  # the first is busy: a second connection
            assert server.accepts == 2
            assert await read_body(first) == b"c0"  # c0 released first …
            assert await read_body(second) == b"c1"  # … c1 last: the warm one
            assert pool.idle_connections == 2
            assert await get(pool) == b"c1"
            assert await get(pool) == b"c1"
            held = await pool.send(b"GET", b"/c", [], None, "GET /c")  # takes c1 …
            assert await get(pool) == b"c0"  # … so the next one gets c0
            assert await read_body(held) == b"c1"
        assert server.accepts == 2
        assert pool.idle_connections == 2


async def test_max_idle_closes_the_oldest_idle_connection(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_idle=1)
        with trio.fail_after(CEILING):
            first = await pool.send(b"GET", b"/a", [], None, "GET /a")
            second = await pool.send(b"GET", b"/b", [], None, "GET /b")
            assert await read_body(first) == b"c0"
            assert await read_body(second) == b"c1"
        assert pool.idle_connections == 1
        await wait_eof(server.connections[0])
        assert not server.connections[1].eof.is_set()
        assert await get(pool) == b"c1"


NOT_REUSABLE = {
    "connection-close": ok(extra=b"Connection: close\r\n"),
    "connection-keep-alive-close": ok(extra=b"Connection: keep-alive, Close\r\n"),
    "http-1.0": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "http-1.0-keep-alive": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    "bytes-after-body": ok() + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
    "chunked-connection-close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    + chunked(b"o", b"k"),
    "bodiless-204-then-bytes": b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
}


@pytest.mark.parametrize("first_response", list(NOT_REUSABLE.values()), ids=list(NOT_REUSABLE))
async def test_connection_not_reused_after(first_response: bytes, pools: Pools) -> None:
    """The server keeps its side open: only the client's own judgement keeps the connection out of the pool."""

    async def respond(connection: RawConnection, request: bytes) -> None:
        first = connection.index == 0 and len(connection.requests) == 1
        await connection.send(first_response if first else ok(b"fresh"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            assert response.status in (200, 204)
            assert await read_body(response) == (b"" if response.status == 204 else b"ok")
        assert pool.idle_connections == 0
        await wait_eof(server.connections[0])
        assert await get(pool) == b"fresh"
        assert server.accepts == 2


async def test_bytes_arriving_after_a_complete_body_make_the_idle_connection_unusable(pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0:
            await connection.send(ok())
            await trio.sleep(0.05)
            await connection.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
        else:
            await connection.send(ok(b"fresh"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        assert await get(pool) == b"ok"
        assert pool.idle_connections == 1
        await trio.sleep(0.1)
        assert await get(pool) == b"fresh"
        assert server.accepts == 2
        await wait_eof(server.connections[0])


async def test_chunked_response_with_bytes_after_it_is_not_reused(pools: Pools) -> None:
    """Bytes after the last chunk in the same read: nothing was asked for, so the connection must not be reused
    (else the next request is answered with them)."""

    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0 and len(connection.requests) == 1:
            await connection.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunked(b"ok")
                + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"
            )
        else:
            await connection.send(ok(b"good"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        assert await get(pool) == b"ok"
        assert await get(pool) == b"good"  # not the unasked-for "evil"
        assert server.accepts == 2


# --- response framing -----------------------------------------------------------------------------------


async def test_chunked_response_split_across_writes_is_reassembled_and_reused(pools: Pools) -> None:
    body_chunks = [b"hello", b" world", b"0123456789abcdef" * 3, b"\r\n-inside-\r\n", b"z"]
    wire = chunked(*body_chunks)

    async def respond(connection: RawConnection, request: bytes) -> None:
        if len(connection.requests) == 1:
            await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n")
            await connection.send_pieces(split(wire, 7), delay=0.002)
        else:
            await connection.send(ok(b"again"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/stream", [], None, "GET /stream")
            assert response.status == 200
            assert response.header(b"transfer-encoding") == b"chunked"
            pieces: list[tuple[bytes, bool]] = []
            while not pieces or not pieces[-1][1]:
                pieces.append(await response.receive())
        assert b"".join(data for data, _ in pieces) == b"".join(body_chunks)
        assert [done for _, done in pieces] == [False] * (len(pieces) - 1) + [True]
        assert len(pieces) > 2  # it was streamed, not collected
        assert pool.idle_connections == 1
        assert await get(pool) == b"again"
        assert server.accepts == 1


def close_delimited(version: bytes, body: bytes) -> Handler:
    """Connection 0 answers with a body delimited by closing the connection; the others answer ``fresh``."""

    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0:
            await connection.send(b"HTTP/%b 200 OK\r\nContent-Type: text/plain\r\n\r\n" % version)
            await connection.send_pieces(split(body, 500), delay=0.002)
            await connection.close()
        else:
            await connection.send(ok(b"fresh"))

    return answering(respond)


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_close_delimited_response(version: bytes, pools: Pools) -> None:
    body = b"no length here, " * 100 + b"the end"
    async with open_raw_server(close_delimited(version, body)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            assert await read_body(response) == body
        assert await get(pool) == b"fresh"
        assert server.accepts == 2


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_close_delimited_response_does_not_put_the_closed_connection_in_the_pool(
    version: bytes, pools: Pools
) -> None:
    """The server ended the body by closing: that connection is dead and must not be counted (or kept) as idle
    (a dead idle connection takes a ``max_idle`` place and can push a live one out)."""
    async with open_raw_server(close_delimited(version, b"abc")) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            assert await read_body(response) == b"abc"
        assert pool.idle_connections == 0


@pytest.mark.parametrize(
    ("method", "head"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"DELETE", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
        (b"GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\nETag: "x"\r\n\r\n'),
    ],
    ids=["head-length", "head-chunked", "204", "204-length-0", "304-length"],
)
async def test_bodiless_responses_are_done_at_once_and_reused(method: bytes, head: bytes, pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(head if len(connection.requests) == 1 else ok(b"next"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(method, b"/x", [], None, "X /x")
            assert await response.receive() == (b"", True)
        assert pool.idle_connections == 1
        assert await get(pool) == b"next"
        assert server.accepts == 1


@pytest.mark.parametrize("in_one_write", [True, False], ids=["one-write", "separate-writes"])
async def test_informational_responses_are_skipped(in_one_write: bool, pools: Pools) -> None:
    informational = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"]
    final = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade"

    async def respond(connection: RawConnection, request: bytes) -> None:
        if in_one_write:
            await connection.send(b"".join([*informational, final]))
        else:
            await connection.send_pieces([*informational, final], delay=0.01)

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"POST", b"/make", [(b"content-length", b"3")], Body([b"abc"]), "POST /make")
            assert response.status == 201
            assert response.headers == [(b"content-length", b"4")]
            assert await response.receive() == (b"made", True)
        assert pool.idle_connections == 1


async def test_large_body_streamed_in_bounded_pieces(pools: Pools) -> None:
    size = 20 << 20
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * 20).hexdigest()

    async def respond(connection: RawConnection, request: bytes) -> None:
        if len(connection.requests) == 1:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(20):
                await connection.send(block)
        else:
            await connection.send(ok(b"after"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        digest = hashlib.sha256()
        total = 0
        largest = 0
        calls = 0
        with trio.fail_after(CEILING * 2):
            response = await pool.send(b"GET", b"/big", [], None, "GET /big")
            assert response.header(b"content-length") == b"%d" % size
            while True:
                data, done = await response.receive()
                calls += 1
                digest.update(data)
                total += len(data)
                largest = max(largest, len(data))
                if done:
                    break
                assert data  # no empty pieces before the end
        assert total == size
        assert digest.hexdigest() == expected
        assert largest <= READ_SIZE == 256 * 1024
        assert calls >= size // READ_SIZE
        assert pool.idle_connections == 1
        assert await get(pool) == b"after"
        assert server.accepts == 1


async def test_content_length_zero_body(pools: Pools) -> None:
    async with open_raw_server(answer_ok(b"")) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            assert await response.receive() == (b"", True)
        assert pool.idle_connections == 1


# --- broken response bodies -----------------------------------------------------------------------------


async def receive_until_failure(pool: Http1Pool, path: str) -> tuple[bytes, UpstreamClosed]:
    """GET ``path`` and read its body until the pool reports the upstream broke off (the error names the GET)."""
    received = b""
    with trio.fail_after(CEILING), pytest.raises(UpstreamClosed) as caught:
        response = await pool.send(b"GET", path.encode(), SECRET_HEADERS, None, f"GET {path}")
        while True:
            data, done = await response.receive()
            assert not done
            received += data
    assert_names_where(caught.value, f"GET {path}")
    return received, caught.value


async def test_truncated_content_length_body(pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await trio.sleep(0.02)
            await connection.send(b"abcdefghij")
            await connection.close()
        else:
            await connection.send(ok(b"fresh"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server, max_connections=1)
        received, error = await receive_until_failure(pool, "/t")
        assert received == b"0123456789abcdefghij"
        assert "80 body bytes missing" in str(error)
        assert pool.idle_connections == 0
        assert await get(pool) == b"fresh"  # the slot came back, on a new connection
        assert server.accepts == 2


TRUNCATED_CHUNKED = {  # what the server sends of the body before closing, and what the client gets of it
    "no-chunk-at-all": (b"", b""),
    "inside-chunk-data": (b"5\r\nhello\r\n5\r\nwor", b"hellowor"),
    "inside-chunk-size-line": (b"5\r\nhello\r\n1", b"hello"),
    "after-chunk-crlf": (b"5\r\nhello\r\n", b"hello"),
    "before-chunk-crlf": (b"5\r\nhello", b"hello"),
    "no-final-crlf": (b"5\r\nhello\r\n0\r\n", b"hello"),
}


@pytest.mark.parametrize(("body", "expected"), list(TRUNCATED_CHUNKED.values()), ids=list(TRUNCATED_CHUNKED))
async def test_truncated_chunked_body(body: bytes, expected: bytes, pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0:
            await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await connection.send_pieces(split(body, 4), delay=0.002)
            await connection.close()
        else:
            await connection.send(ok(b"fresh"))

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server, max_connections=1)
        received, _ = await receive_until_failure(pool, "/c")
        assert received == expected
        assert await get(pool) == b"fresh"
        assert server.accepts == 2


# --- request bodies -------------------------------------------------------------------------------------


async def test_request_body_with_content_length_is_sent_raw(pools: Pools) -> None:
    async with open_raw_server(answer_ok(b"got")) as server:
        pool = pools(server)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"14")]
        with trio.fail_after(CEILING):
            response = await pool.send(b"POST", b"/o", headers, Body([b'{"a":', b"", b" 1,", b'"b":2}']), "POST /o")
            assert await read_body(response) == b"got"
        assert server.requests == [
            b"POST /o HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n"
            b'{"a": 1,"b":2}' % server.port
        ]
        assert pool.idle_connections == 1


async def test_request_body_without_length_is_sent_chunked(pools: Pools) -> None:
    pieces = [b"abc", b"", b"0123456789abcdefXYZ", b"\r\n"]
    async with open_raw_server(answer_ok(b"got")) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"PUT", b"/u", [(b"x-a", b"1")], Body(pieces), "PUT /u")
            assert await read_body(response) == b"got"
        assert server.requests == [
            b"PUT /u HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n13\r\n0123456789abcdefXYZ\r\n2\r\n\r\n\r\n0\r\n\r\n" % server.port
        ]
        assert pool.idle_connections == 1


async def test_empty_body_iterator_without_length_sends_only_the_last_chunk(pools: Pools) -> None:
    async with open_raw_server(answer_ok()) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            response = await pool.send(b"POST", b"/e", [], Body([]), "POST /e")
            assert await read_body(response) == b"ok"
        assert server.requests == [
            b"POST /e HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" % server.port
        ]


@pytest.mark.parametrize(
    ("declared", "pieces", "sent_body"),
    [(10, [b"abcd"], b"abcd"), (4, [b"0123456789"], b""), (6, [b"abc", b"defg"], b"abc")],
    ids=["short", "long-first-piece", "long-second-piece"],
)
async def test_request_body_not_matching_its_declared_length(
    declared: int, pieces: list[bytes], sent_body: bytes, pools: Pools
) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_connections=1)
        headers = [(b"content-length", b"%d" % declared), *SECRET_HEADERS]
        with trio.fail_after(CEILING), pytest.raises(UpstreamError) as caught:
            await pool.send(b"POST", b"/b", headers, Body(pieces), "POST /b")
        assert_names_where(caught.value, "POST /b")
        assert f"not the declared {declared}" in str(caught.value)
        first = server.connections[0]
        await wait_eof(first)  # that connection was closed, never reused
        assert first.requests == []
        head_end = first.received.index(b"\r\n\r\n") + 4
        assert bytes(first.received[head_end:]) == sent_body  # never more than declared
        assert await get(pool) == b"c1"


async def test_exception_from_the_body_iterator_propagates_unchanged(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_connections=1)
        failure = BodyBroke("client went away")
        with trio.fail_after(CEILING), pytest.raises(BodyBroke) as caught:
            await pool.send(b"POST", b"/b", [], Body([b"abc"], fail=failure), "POST /b")
        assert caught.value is failure
        assert caught.value.__cause__ is None
        await wait_eof(server.connections[0])
        assert bytes(server.connections[0].received).endswith(b"\r\n\r\n3\r\nabc\r\n")
        assert await get(pool) == b"c1"
        assert server.accepts == 2


async def test_exception_from_the_body_iterator_with_declared_length(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_connections=1)
        headers = [(b"content-length", b"10")]
        with trio.fail_after(CEILING), pytest.raises(BodyBroke):
            await pool.send(b"POST", b"/b", headers, Body([b"abc"], fail=BodyBroke("too large")), "POST /b")
        await wait_eof(server.connections[0])
        assert await get(pool) == b"c1"


# --- stale keep-alive connections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [(b"GET", None), (b"POST", None), (b"POST", [b"abc"])],
    ids=["GET", "POST", "POST-with-body"],
)
async def test_idle_connection_closed_by_the_server_is_replaced(
    method: bytes, body: list[bytes] | None, pools: Pools
) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(ok(b"c%d" % connection.index))
        if connection.index == 0:
            await connection.close()

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server)
        assert await get(pool) == b"c0"
        assert pool.idle_connections == 1
        with trio.fail_after(CEILING):
            await server.connections[0].closed.wait()
        await trio.sleep(0.01)  # the FIN arrives
        with trio.fail_after(CEILING):
            response = await pool.send(method, b"/", [], None if body is None else Body(body), "X /")
            assert await read_body(response) == b"c1"
        assert server.accepts == 2
        assert len(server.requests) == 2


def closes_on_second_request(answer_head: bytes = b"") -> Handler:
    """Connection 0 answers its first request, then reads the second and closes having answered ``answer_head``
    (nothing by default); other connections answer everything."""

    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0 and len(connection.requests) == 2:
            await connection.send(answer_head)
            await connection.close()
        else:
            await answer_with_connection_index(connection, request)

    return answering(respond)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS"])
async def test_reused_connection_closed_without_answer_retries_idempotent_request(method: bytes, pools: Pools) -> None:
    async with open_raw_server(closes_on_second_request()) as server:
        pool = pools(server, max_connections=1)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING):
            response = await pool.send(method, b"/again", [], None, "X /again")
            assert response.status == 200
            assert await read_body(response) == (b"" if method == b"HEAD" else b"c1")
        assert server.accepts == 2
        assert len(server.connections[0].requests) == 2  # written once on the stale connection …
        assert len(server.connections[1].requests) == 1  # … and once more on a fresh one
        assert pool.idle_connections == 1


async def test_stale_connection_left_to_the_caller_when_asked(pools: Pools) -> None:
    """``resend_stale=False``: the pool does not write the request again itself; the caller gets UpstreamStale (and
    may send it again after a pacing turn of its own); the slot and a fresh connection are there for that."""
    async with open_raw_server(closes_on_second_request()) as server:
        pool = pools(server, max_connections=1)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING), pytest.raises(UpstreamStale) as caught:
            await pool.send(b"GET", b"/again", [], None, "GET /again", resend_stale=False)
        assert_names_where(caught.value, "GET /again")
        assert server.accepts == 1 and len(server.requests) == 2  # written once, on the stale connection
        assert await get(pool) == b"c1"  # the slot came back


async def test_the_stale_connection_retry_is_signed_afresh(pools: Pools) -> None:
    """The retry writes the request again with a new Authorization (a new OAuth nonce): if the server did see the
    first write before closing, the second is not a replay of it."""
    issued = iter([b"OAuth nonce-1", b"OAuth nonce-2", b"OAuth nonce-3"])
    async with open_raw_server(closes_on_second_request()) as server:
        pool = pools(server, max_connections=1)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/again", [], None, "GET /again", authorize=lambda: next(issued))
            assert await read_body(response) == b"c1"
        stale, fresh = server.connections[0].requests[1], server.connections[1].requests[0]
        assert b"\r\nauthorization: OAuth nonce-1\r\n" in stale
        assert b"\r\nauthorization: OAuth nonce-2\r\n" in fresh


@pytest.mark.parametrize(
    ("method", "body"),
    [(b"POST", None), (b"DELETE", None), (b"PUT", None), (b"PATCH", None), (b"GET", [b"abc"])],
    ids=["POST", "DELETE", "PUT", "PATCH", "GET-with-body"],
)
async def test_reused_connection_closed_without_answer_does_not_retry_others(
    method: bytes, body: list[bytes] | None, pools: Pools
) -> None:
    async with open_raw_server(closes_on_second_request()) as server:
        pool = pools(server, max_connections=1)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed) as caught:
            await pool.send(method, b"/once", SECRET_HEADERS, None if body is None else Body(body), "X /once")
        assert_names_where(caught.value, "X /once")
        assert server.accepts == 1
        assert len(server.requests) == 2  # the request reached the server exactly once
        assert pool.idle_connections == 0
        assert await get(pool) == b"c1"  # the slot came back


async def test_reused_connection_failing_after_response_bytes_is_not_retried(pools: Pools) -> None:
    """The module contract: a stale connection is retried only if it failed before any response byte arrived.
    Here the server answered part of a status line, so the GET reached it and must not be written again."""
    async with open_raw_server(closes_on_second_request(b"HTTP/1.1 200 O")) as server:
        pool = pools(server)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed) as caught:
            await pool.send(b"GET", b"/once", [], None, "GET /once")
        assert_names_where(caught.value, "GET /once")
        assert len(server.requests) == 2


async def test_retry_on_a_fresh_connection_that_fails_too_reports_the_error(pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0 and len(connection.requests) == 1:
            await connection.send(ok(b"c0"))
        else:
            await connection.close()

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server, max_connections=1)
        assert await get(pool) == b"c0"
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed) as caught:
            await pool.send(b"GET", b"/", [], None, "GET /twice")
        assert_names_where(caught.value, "GET /twice")
        assert server.accepts == 2
        assert len(server.requests) == 3  # one retry, not more
        assert pool.idle_connections == 0


# --- deadlines ------------------------------------------------------------------------------------------

FAST = Timeouts(connect_s=0.2, read_s=0.2, write_s=0.2, pool_s=0.2)


def hangs_on_first_connection(first: Responder) -> Handler:
    """Connection 0 is scripted by ``first``; every other connection answers with its index."""

    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0:
            await first(connection, request)
        else:
            await answer_with_connection_index(connection, request)

    return answering(respond)


async def never_answer(connection: RawConnection, request: bytes) -> None:
    await connection.drain()


async def test_read_timeout_waiting_for_the_response_head(pools: Pools) -> None:
    async with open_raw_server(hangs_on_first_connection(never_answer)) as server:
        pool = pools(server, FAST, max_connections=1)
        started = trio.current_time()
        with trio.fail_after(CEILING), pytest.raises(UpstreamTimeout) as caught:
            await pool.send(b"GET", b"/slow", SECRET_HEADERS, None, "GET /slow")
        elapsed = trio.current_time() - started
        assert 0.18 <= elapsed < 1.0
        assert_names_where(caught.value, "GET /slow")
        assert "read timeout" in str(caught.value)
        assert caught.value.status == 504
        await wait_eof(server.connections[0])
        assert await get(pool) == b"c1"


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nabc",
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
async def test_read_timeout_in_the_middle_of_the_body(partial: bytes, pools: Pools) -> None:
    async def stall(connection: RawConnection, request: bytes) -> None:
        await connection.send(partial)
        await connection.drain()

    async with open_raw_server(hangs_on_first_connection(stall)) as server:
        pool = pools(server, FAST, max_connections=1)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/slow", [], None, "GET /slow")
            assert await response.receive() == (b"abc", False)
            started = trio.current_time()
            with pytest.raises(UpstreamTimeout) as caught:
                await response.receive()
        assert 0.18 <= trio.current_time() - started < 1.0
        assert_names_where(caught.value, "GET /slow")
        await wait_eof(server.connections[0])
        assert await get(pool) == b"c1"


async def test_connect_to_a_closed_port(pools: Pools) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    pool = pools(f"http://127.0.0.1:{port}", FAST, max_connections=1)
    for _ in range(2):  # the slot is returned after a failed connect
        with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError) as caught:
            await pool.send(b"GET", b"/", SECRET_HEADERS, None, "GET /closed")
        assert_names_where(caught.value, "GET /closed")
        assert "cannot connect" in str(caught.value)
        assert caught.value.status == 502


async def test_tls_handshake_that_never_completes_is_a_connect_timeout(pools: Pools) -> None:
    async with open_raw_server(never_answer_at_all) as server:
        pool = pools(server, FAST, scheme="https", max_connections=1)
        started = trio.current_time()
        with trio.fail_after(CEILING), pytest.raises(UpstreamTimeout) as caught:
            await pool.send(b"GET", b"/", [], None, "GET /tls")
        assert 0.18 <= trio.current_time() - started < 1.0
        assert_names_where(caught.value, "GET /tls")
        assert "connect timeout" in str(caught.value)


async def never_answer_at_all(connection: RawConnection) -> None:
    await connection.drain()


async def test_write_timeout_when_the_server_does_not_read(pools: Pools) -> None:
    async def sleep_forever(connection: RawConnection) -> None:
        await trio.sleep_forever()

    async with open_raw_server(sleep_forever) as server:
        pool = pools(server, FAST, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(UpstreamTimeout) as caught:
            await pool.send(b"POST", b"/up", [], EndlessBody(1024), "POST /up")
        assert_names_where(caught.value, "POST /up")
        assert "write timeout" in str(caught.value)


async def test_pool_timeout_and_the_slot_coming_back(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, Timeouts(connect_s=2, read_s=2, write_s=2, pool_s=0.2), max_connections=1)
        with trio.fail_after(CEILING):
            held = await pool.send(b"GET", b"/held", [], None, "GET /held")
            started = trio.current_time()
            with pytest.raises(UpstreamTimeout) as caught:
                await pool.send(b"GET", b"/waits", SECRET_HEADERS, None, "GET /waits")
            assert 0.18 <= trio.current_time() - started < 1.0
            assert_names_where(caught.value, "GET /waits")
            assert "pool timeout" in str(caught.value)
            assert server.accepts == 1  # the waiting request never went anywhere
            assert await read_body(held) == b"c0"
            assert await get(pool) == b"c0"  # slot and connection back
            held = await pool.send(b"GET", b"/held", [], None, "GET /held")
            held.close()
            assert await get(pool) == b"c1"  # slot back after close(); the connection was not
        assert server.accepts == 2


async def test_a_waiting_send_gets_the_slot_when_it_is_released(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_connections=1)
        results: list[bytes] = []
        with trio.fail_after(CEILING):
            held = await pool.send(b"GET", b"/held", [], None, "GET /held")
            async with trio.open_nursery() as nursery:

                async def waiter() -> None:
                    results.append(await get(pool))

                nursery.start_soon(waiter)
                await trio.sleep(0.05)
                assert results == []
                assert await read_body(held) == b"c0"
        assert results == [b"c0"]
        assert server.accepts == 1


async def test_cancelled_send_returns_the_slot_and_closes_the_connection(pools: Pools) -> None:
    async with open_raw_server(hangs_on_first_connection(never_answer)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING):
            with trio.move_on_after(0.1) as scope:
                await pool.send(b"GET", b"/", [], None, "GET /")
            assert scope.cancelled_caught
            await wait_eof(server.connections[0])
            assert pool.idle_connections == 0
            assert await get(pool) == b"c1"


async def test_cancelled_send_while_waiting_for_a_slot_takes_none(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING):
            held = await pool.send(b"GET", b"/held", [], None, "GET /held")
            with trio.move_on_after(0.05) as scope:
                await pool.send(b"GET", b"/", [], None, "GET /")
            assert scope.cancelled_caught
            assert await read_body(held) == b"c0"
            assert await get(pool) == b"c0"
            assert await get(pool) == b"c0"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_cancelled_receive_returns_the_slot_and_closes_the_connection(pools: Pools, head: bytes) -> None:
    async def stall(connection: RawConnection, request: bytes) -> None:
        await connection.send(head)
        await connection.drain()

    async with open_raw_server(hangs_on_first_connection(stall)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            assert await response.receive() == (b"abc", False)
            with trio.move_on_after(0.1) as scope:
                await response.receive()
            assert scope.cancelled_caught
            await wait_eof(server.connections[0])
            assert pool.idle_connections == 0
            assert await get(pool) == b"c1"


# --- idle expiry and closing ----------------------------------------------------------------------------


async def test_idle_connection_older_than_the_expiry_is_not_reused(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server, idle_expiry_s=0.1)
        assert await get(pool) == b"c0"
        assert await get(pool) == b"c0"  # young: reused
        await trio.sleep(0.15)
        assert await get(pool) == b"c1"  # expired: a new one
        await wait_eof(server.connections[0])  # and the expired one was closed
        assert server.accepts == 2
        assert pool.idle_connections == 1


async def test_closing_a_response_before_its_body_closes_the_connection(pools: Pools) -> None:
    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")

    async with open_raw_server(answering(respond)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/", [], None, "GET /")
            response.close()
            response.close()  # idempotent
        await wait_eof(server.connections[0])
        assert pool.idle_connections == 0
        with trio.fail_after(CEILING):
            other = await pool.send(b"GET", b"/", [], None, "GET /")  # the slot came back
            other.close()
        assert server.accepts == 2


async def test_pool_close_closes_idle_connections_and_those_in_use_when_done(pools: Pools) -> None:
    async with open_raw_server(answering(answer_with_connection_index)) as server:
        pool = pools(server)
        with trio.fail_after(CEILING):
            first = await pool.send(b"GET", b"/", [], None, "GET /")
            second = await pool.send(b"GET", b"/", [], None, "GET /")
            third = await pool.send(b"GET", b"/", [], None, "GET /")
            assert await read_body(first) == b"c0"
            assert await read_body(second) == b"c1"
            assert pool.idle_connections == 2
            pool.close()
            assert pool.idle_connections == 0
            await wait_eof(server.connections[0])
            await wait_eof(server.connections[1])
            assert not server.connections[2].eof.is_set()
            assert await read_body(third) == b"c2"
            await wait_eof(server.connections[2])
        assert pool.idle_connections == 0


# --- malformed responses --------------------------------------------------------------------------------

MALFORMED = {
    "garbage-status-line": b"FOO BAR BAZ\r\n\r\n",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n",
    "bad-status-code": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "http-2-status-line": b"HTTP/2 200\r\n\r\n",
    "invalid-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "negative-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "conflicting-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    "unknown-transfer-encoding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    "closed-inside-the-head": b"HTTP/1.1 200 OK\r\nContent-Le",
}


CUT_SHORT = {"not-http", "closed-inside-the-head"}  # no complete head before the close: that is what is reported


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_response_head(name: str, pools: Pools) -> None:
    async def answer_garbage(connection: RawConnection, request: bytes) -> None:
        await connection.send(MALFORMED[name])
        await connection.close()

    expected = UpstreamClosed if name in CUT_SHORT else UpstreamProtocolError
    async with open_raw_server(hangs_on_first_connection(answer_garbage)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(expected) as caught:
            await pool.send(b"GET", b"/m", SECRET_HEADERS, None, "GET /m")
        assert_names_where(caught.value, "GET /m")
        assert pool.idle_connections == 0
        assert await get(pool) == b"c1"


async def test_invalid_chunk_size_in_the_body(pools: Pools) -> None:
    async def answer_garbage(connection: RawConnection, request: bytes) -> None:
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        await connection.drain()

    async with open_raw_server(hangs_on_first_connection(answer_garbage)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(UpstreamProtocolError) as caught:
            response = await pool.send(b"GET", b"/m", [], None, "GET /m")
            await read_body(response)
        assert_names_where(caught.value, "GET /m")
        await wait_eof(server.connections[0])
        assert await get(pool) == b"c1"


async def test_response_head_larger_than_the_limit_arriving_in_pieces(pools: Pools) -> None:
    lines = b"".join(b"x-filler-%04d: %b\r\n" % (number, b"v" * 1000) for number in range(80))
    assert len(lines) > MAX_HEAD_BYTES

    async def answer_huge(connection: RawConnection, request: bytes) -> None:
        await connection.send_pieces([b"HTTP/1.1 200 OK\r\n", *split(lines, 8192)], delay=0.001)
        await trio.sleep(0.05)
        await connection.send(b"Content-Length: 0\r\n\r\n")
        await connection.drain()

    async with open_raw_server(hangs_on_first_connection(answer_huge)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(UpstreamProtocolError) as caught:
            await pool.send(b"GET", b"/h", SECRET_HEADERS, None, "GET /h")
        assert_names_where(caught.value, "GET /h")
        await wait_eof(server.connections[0])
        assert await get(pool) == b"c1"


async def test_complete_response_head_larger_than_the_limit_in_one_read_is_refused(pools: Pools) -> None:
    """``MAX_HEAD_BYTES`` is documented as the largest upstream response head accepted. Here the whole (complete)
    80 KiB head is already waiting in the socket when the client starts reading: the server answers while the
    client is still sending the request body."""
    lines = b"".join(b"x-filler-%04d: %b\r\n" % (number, b"v" * 1000) for number in range(80))
    head = b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 2\r\n\r\nok"
    assert len(head) > MAX_HEAD_BYTES
    answered = trio.Event()

    async def answer_early(connection: RawConnection) -> None:
        await connection.read_head()  # the request body comes only once the answer is out
        await connection.send(head)
        await trio.sleep(0.05)
        answered.set()
        await connection.drain()

    async with open_raw_server(answer_early) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(UpstreamProtocolError) as caught:
            response = await pool.send(
                b"POST", b"/h", [(b"content-length", b"3")], Body([b"abc"], ready=answered), "POST /h"
            )
            response.close()
        assert_names_where(caught.value, "POST /h")


BAD_COOKIE_LINES = {
    "nul-in-value": b"Set-Cookie: session=" + SECRET + b"\x00x",
    "space-before-colon": b"Set-Cookie : session=" + SECRET,
}


@pytest.mark.parametrize("line", list(BAD_COOKIE_LINES.values()), ids=list(BAD_COOKIE_LINES))
async def test_error_message_never_contains_an_upstream_header_value(line: bytes, pools: Pools) -> None:
    """A response header line the parser refuses must not be quoted in the error message: the message goes into
    the logs and into the 502 body sent to the gateway's client, and this value is a session cookie."""

    async def answer_bad_cookie(connection: RawConnection, request: bytes) -> None:
        await connection.send(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")
        await connection.drain()

    async with open_raw_server(hangs_on_first_connection(answer_bad_cookie)) as server:
        pool = pools(server, max_connections=1)
        with trio.fail_after(CEILING), pytest.raises(UpstreamProtocolError) as caught:
            await pool.send(b"GET", b"/cookie", [], None, "GET /cookie")
        assert_names_where(caught.value, "GET /cookie")  # no SECRET in it
        assert await get(pool) == b"c1"


# --- TLS ------------------------------------------------------------------------------------------------


async def test_tls_get_and_keep_alive(tmp_path: Path, pools: Pools) -> None:
    server_context, client_context = self_signed(tmp_path)
    async with open_raw_server(answering(answer_with_connection_index), tls=server_context) as server:
        pool = pools(server, scheme="https", tls=client_context)
        with trio.fail_after(CEILING):
            response = await pool.send(b"GET", b"/p?q=1", [(b"accept", b"*/*")], None, "GET /p")
            assert response.status == 200
            assert await response.receive() == (b"c0", True)
        assert pool.idle_connections == 1
        assert await get(pool) == b"c0"
        assert await get(pool) == b"c0"
        assert server.accepts == 1
        assert server.requests[0] == b"GET /p?q=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\naccept: */*\r\n\r\n" % server.port
        pool.close()
        await wait_eof(server.connections[0])


async def test_tls_chunked_response(tmp_path: Path, pools: Pools) -> None:
    server_context, client_context = self_signed(tmp_path)

    async def respond(connection: RawConnection, request: bytes) -> None:
        await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await connection.send_pieces(split(chunked(b"secure ", b"stream"), 5), delay=0.002)

    async with open_raw_server(answering(respond), tls=server_context) as server:
        pool = pools(server, scheme="https", tls=client_context)
        assert await get(pool) == b"secure stream"
        assert await get(pool) == b"secure stream"
        assert server.accepts == 1


async def test_tls_untrusted_certificate(tmp_path: Path, pools: Pools) -> None:
    server_context, _ = self_signed(tmp_path)
    async with open_raw_server(answer_ok(), tls=server_context) as server:
        pool = pools(server, scheme="https", max_connections=1)
        for _ in range(2):
            with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError) as caught:
                await pool.send(b"GET", b"/", SECRET_HEADERS, None, "GET /tls")
            assert_names_where(caught.value, "GET /tls")
            assert "cannot connect" in str(caught.value)
        assert server.requests == []


async def test_tls_bytes_after_a_content_length_body_are_not_reused(tmp_path: Path, pools: Pools) -> None:
    """Over TLS the unasked-for bytes after a body can sit decrypted in the TLS layer while the socket itself
    has nothing left to read: the connection must still not be reused."""
    server_context, client_context = self_signed(tmp_path)

    async def respond(connection: RawConnection, request: bytes) -> None:
        if connection.index == 0 and len(connection.requests) == 1:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            await trio.sleep(0.05)  # the body and what follows it in a later TLS record
            await connection.send(b"okHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
        else:
            await connection.send(ok(b"good"))

    async with open_raw_server(answering(respond), tls=server_context) as server:
        pool = pools(server, scheme="https", tls=client_context)
        assert await get(pool) == b"ok"
        await trio.sleep(0.02)
        assert await get(pool) == b"good"  # not the unasked-for "evil"
