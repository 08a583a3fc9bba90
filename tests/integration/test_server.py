"""The HTTP server layer (gateway.web.server) on its own: a connection's failure stays that connection's problem,
and the drain closes idle connections. A tiny ASGI app stands in for the gateway; sockets are real."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData

from gateway.asgi import Receive, Scope, Send
from gateway.web.server import HTTP11, Connection, serve


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Exploding(HTTP11):
    """A protocol with a bug: a request whose bytes hold ``boom`` raises, as hypercorn's HTTP/2 table once did."""

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData) and b"boom" in event.data:
            raise KeyError(7)
        await super().handle(event)


class ExplodingConnection(Connection):
    protocol_class = Exploding


def _config() -> Config:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    return config


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[tuple[str, int]]:
    shutdown = trio.Event()
    urls = await nursery.start(partial(serve, app, _config(), shutdown, connection_class=ExplodingConnection))
    host, port = urls[0].removeprefix("http://").rsplit(":", 1)
    yield host, int(port)
    shutdown.set()


async def _get(address: tuple[str, int], request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_a_connection_that_fails_in_the_protocol_is_closed_and_the_server_serves_on(
    server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    plain = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    boom = b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
    results: dict[int, bytes] = {}

    async def one(index: int, request: bytes) -> None:
        results[index] = await _get(server, request)

    with caplog.at_level(logging.WARNING, logger="gateway.server"):
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(one, index, boom if index % 2 else plain)
    for index, answer in results.items():
        if index % 2:
            assert answer == b""  # closed, no answer: the failing connection is the only one affected
        else:
            assert answer.startswith(b"HTTP/1.1 200"), answer
    failures = [r for r in caplog.records if r.name == "gateway.server" and r.levelno == logging.WARNING]
    assert len(failures) == 10
    assert all("KeyError" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in failures)
    assert (await _get(server, plain)).startswith(b"HTTP/1.1 200")  # and the server is still up afterwards


async def test_shutdown_stops_accepting_and_closes_idle_keep_alive_connections() -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve, app, _config(), shutdown))
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        idle = await trio.open_tcp_stream(host, int(port))
        await idle.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        with trio.fail_after(2):
            while not answer.endswith(b"ok"):
                answer += await idle.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        shutdown.set()
        with trio.fail_after(2):  # the idle keep-alive connection is closed at once, not after a timeout
            assert await idle.receive_some(65536) == b""
        await idle.aclose()
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(host, int(port))


async def accept_while_cancelled(scope: Scope, receive: Receive, send: Send) -> None:
    """A WebSocket app whose task is cancelled as it accepts (as a relay is when its session ends right then), and
    which then closes the client with 1012 — shielded, as the relay does."""
    if scope["type"] == "lifespan":
        await app(scope, receive, send)
        return
    await receive()  # websocket.connect
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await send({"type": "websocket.accept"})
    with trio.CancelScope(shield=True):
        await send({"type": "websocket.close", "code": 1012})


async def test_an_accept_cut_short_by_cancellation_still_answers_the_handshake_before_any_frame(
    nursery: trio.Nursery,
) -> None:
    """hypercorn moves its WebSocket (and h11) state when it produces the 101, before the write; a cancelled sender
    used to lose the 101 but not the state, so the Close frame that followed went out with no handshake answer in
    front of it — a malformed answer on which a client waits for the 101 forever."""
    shutdown = trio.Event()
    urls = await nursery.start(partial(serve, accept_while_cancelled, _config(), shutdown))
    host, port = urls[0].removeprefix("http://").rsplit(":", 1)
    request = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    answer = await _get((host, int(port)), request)
    shutdown.set()
    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), answer[:80]
    assert frames[:4] == b"\x88\x02\x03\xf4"  # then a Close frame with 1012
