"""The relay's upstream WebSocket client (:mod:`gateway.upstream.wsclient`) against real loopback servers.

Two kinds of server, both written here: a scriptable server built on wsproto's *server* side (it records every
event it receives: the handshake request with its target and headers, messages, pings/pongs, close codes), and
the same connection driven in raw mode, where the test writes the handshake answer and every frame byte by byte
and parses the client's frames itself, for the cases where framing must be exact. Every test runs under a
``trio.fail_after`` ceiling; the ResourceWarning filter of the suite catches a socket left open.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from gateway.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    WebSocketRejected,
)
from gateway.upstream.wsclient import _CLOSE_TIMEOUT_S, UpstreamWebSocket, WebSocketClosed, connect_websocket
from tests.certs import self_signed

CEILING = 5.0  # no single test step may take longer than this
SECRET = b"s3cr3t-SESSION-cookie-value"  # the session cookie: must never appear in an exception's text
HEADERS = [(b"cookie", b"api=" + SECRET), (b"user-agent", b"ibkr-oauth-gateway-test/1.0")]
PATH = "/v1/api/ws?oauth_token=tok%2Ben&extra=1"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# What the relay and the shared hub catch around connect_websocket; anything else is "relay failed".
RELAY_CAUGHT = UpstreamError

E = TypeVar("E", bound=Event)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# --- raw frames -----------------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bytes | None = None) -> bytes:
    """One WebSocket frame, exactly as given (servers do not mask; ``mask`` makes a protocol violation)."""
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask is not None:
        head += mask
        payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return bytes(head) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode("utf-8")


@dataclass(frozen=True)
class Frame:
    """A frame the client sent, unmasked."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


class PeerGone(Exception):
    """The client went away while the raw reader needed more bytes."""


# --- the server -------------------------------------------------------------------------------------------


class WsPeer:
    """One accepted connection, server side.

    wsproto mode (:meth:`next_event`, :meth:`accept`, :meth:`send`): bytes are fed to a server ``WSConnection``
    and every event is recorded in :attr:`events`. Raw mode (:meth:`read_head`, :meth:`raw_handshake`,
    :meth:`read_frame`, :meth:`send_raw`): the test reads and writes bytes itself. :attr:`raw` holds every byte
    received in both modes.
    """

    def __init__(self, stream: trio.abc.Stream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.ws = WSConnection(ConnectionType.SERVER)
        self.raw = bytearray()  # every byte received
        self.events: list[Event] = []  # every wsproto event received (wsproto mode)
        self.frames: list[Frame] = []  # every frame read in raw mode
        self.request: Request | None = None
        self.head = b""  # the raw request head (raw mode)
        self.after_closed = bytearray()  # bytes that arrived after the wsproto connection was closed
        self.eof = trio.Event()  # the client closed TCP (EOF or reset), seen by a read
        self.closed = trio.Event()  # this side closed
        self._buffer = bytearray()
        self._pending: deque[Event] = deque()

    # reading

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
        self.raw += data
        self._buffer += data
        return True

    def _feed(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        try:
            self.ws.receive_data(data)
        except LocalProtocolError:  # the wsproto connection is closed; keep the bytes for the test
            self.after_closed += data
            return
        for event in self.ws.events():
            self.events.append(event)
            self._pending.append(event)
            if isinstance(event, Request):
                self.request = event

    async def next_event(self) -> Event | None:
        """The next wsproto event, or ``None`` once the client closed TCP."""
        while not self._pending:
            if self._buffer:
                self._feed()
                continue
            if not await self._fill():
                return None
        return self._pending.popleft()

    async def expect(self, kind: type[E]) -> E:
        event = await self.next_event()
        assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
        return event

    async def drain(self) -> None:
        """Record everything until the client closes TCP."""
        while await self.next_event() is not None:
            pass

    async def drain_raw(self) -> None:
        """Read (recording :attr:`raw` only) until the client closes TCP."""
        while await self._fill():
            pass

    async def _need(self, size: int) -> bytes:
        while len(self._buffer) < size:
            if not await self._fill():
                raise PeerGone
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_head(self) -> bytes | None:
        while (position := self._buffer.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                return None
        self.head = bytes(self._buffer[: position + 4])
        del self._buffer[: position + 4]
        return self.head

    async def read_frame(self) -> Frame | None:
        """The client's next frame (unmasked), or ``None`` if it closed TCP first."""
        try:
            first, second = await self._need(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self._need(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self._need(8))[0]
            masked = bool(second & 0x80)
            key = await self._need(4) if masked else b"\0\0\0\0"
            payload = bytes(byte ^ key[index % 4] for index, byte in enumerate(await self._need(length)))
        except PeerGone:
            return None
        received = Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, masked, payload)
        self.frames.append(received)
        return received

    # writing

    async def send_raw(self, data: bytes) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(data)

    async def send(self, *events: Event) -> None:
        """Each event through the server ``WSConnection``, all in one write."""
        await self.send_raw(b"".join(self.ws.send(event) for event in events))

    async def accept(self, subprotocol: str | None = None, trailer: Sequence[Event] = ()) -> Request:
        """Read the handshake request and accept it (``trailer`` events go in the same write as the 101)."""
        request = await self.expect(Request)
        await self.send(AcceptConnection(subprotocol=subprotocol), *trailer)
        return request

    async def raw_handshake(self, trailer: bytes = b"", *, accept: bytes | None = None, extra: bytes = b"") -> None:
        """Answer the request head with a 101 written by hand, and ``trailer`` in the same write."""
        head = await self.read_head()
        assert head is not None
        key = next(
            line.partition(b":")[2].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        token = (
            accept if accept is not None else base64.b64encode(hashlib.sha1(key + GUID, usedforsecurity=False).digest())
        )
        await self.send_raw(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + token + b"\r\n" + extra + b"\r\n" + trailer
        )

    # what was received

    @property
    def messages(self) -> list[str | bytes]:
        """Whole messages received (wsproto mode), reassembled from their fragments."""
        whole: list[str | bytes] = []
        text: list[str] = []
        binary: list[bytes] = []
        for event in self.events:
            if isinstance(event, TextMessage):
                text.append(event.data)
                if event.message_finished:
                    whole.append("".join(text))
                    text = []
            elif isinstance(event, BytesMessage):
                binary.append(bytes(event.data))
                if event.message_finished:
                    whole.append(b"".join(binary))
                    binary = []
        return whole

    @property
    def closes(self) -> list[tuple[int, str | None]]:
        return [(int(event.code), event.reason) for event in self.events if isinstance(event, CloseConnection)]

    @property
    def pongs(self) -> list[bytes]:
        return [bytes(event.payload) for event in self.events if isinstance(event, Pong)]

    @property
    def raw_closes(self) -> list[Frame]:
        return [received for received in self.frames if received.opcode == OP_CLOSE]


Script = Callable[[WsPeer], Awaitable[None]]


class WsServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.peers: list[WsPeer] = []
        self.failures: list[Exception] = []  # exceptions raised by the script, any connection

    def url(self, path: str = PATH, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def peer(self) -> WsPeer:
        assert len(self.peers) == 1, f"{len(self.peers)} connections"
        return self.peers[0]


@asynccontextmanager
async def open_ws_server(script: Script, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[WsServer]:
    """A server on 127.0.0.1 (any free port) running ``script`` per connection; the connection is closed when the
    script returns, and the server is stopped on exit. An exception raised by a script fails the test."""
    async with trio.open_nursery() as nursery:
        tcp_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        server = WsServer(tcp_listeners[0].socket.getsockname()[1])
        listeners: list[trio.abc.Listener[trio.abc.Stream]] = list(tcp_listeners)
        if tls is not None:
            listeners = [trio.SSLListener(listener, tls) for listener in tcp_listeners]

        async def handler(stream: trio.abc.Stream) -> None:
            peer = WsPeer(stream, len(server.peers))
            server.peers.append(peer)
            try:
                await script(peer)
            except Exception as exc:
                server.failures.append(exc)
                raise
            finally:
                await trio.aclose_forcefully(stream)
                peer.closed.set()

        await nursery.start(trio.serve_listeners, handler, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
    # A script failing just as the test body ends is replaced by Cancelled on its way out (trio closes the
    # handler's stream in a finally, under the server's cancelled scope): raise it from here.
    if server.failures:
        raise server.failures[0]


# --- scripts and helpers ----------------------------------------------------------------------------------


async def answer_close(peer: WsPeer) -> None:
    """Read (recording) until the client's Close, answer it, then wait for the client to close TCP."""
    while (event := await peer.next_event()) is not None:
        if isinstance(event, CloseConnection):
            await peer.send(event.response())
            await peer.drain()
            return


async def raw_answer_close(peer: WsPeer) -> None:
    """Raw mode: read frames until the client's Close, echo it, then wait for the client to close TCP."""
    while (received := await peer.read_frame()) is not None:
        if received.opcode == OP_CLOSE:
            await peer.send_raw(frame(OP_CLOSE, received.payload))
            await peer.drain_raw()
            return


async def accept_then_answer_close(peer: WsPeer) -> None:
    await peer.accept()
    await answer_close(peer)


async def echo(peer: WsPeer) -> None:
    """Accept, echo every whole message, answer the Close."""
    await peer.accept()
    count = 0
    while (event := await peer.next_event()) is not None:
        if isinstance(event, CloseConnection):
            await peer.send(event.response())
            await peer.drain()
            return
        messages = peer.messages
        for message in messages[count:]:
            await peer.send(TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message))
        count = len(messages)


def connect(
    server: WsServer,
    path: str = PATH,
    *,
    scheme: str = "ws",
    subprotocols: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
    max_message_bytes: int = 1 << 20,
    connect_timeout_s: float = 2.0,
) -> AbstractAsyncContextManager[UpstreamWebSocket]:
    return connect_websocket(
        server.url(path, scheme),
        extra_headers=HEADERS,
        subprotocols=subprotocols,
        ssl_context=ssl_context,
        max_message_bytes=max_message_bytes,
        connect_timeout_s=connect_timeout_s,
    )


async def wait_eof(peer: WsPeer) -> None:
    """The client closed this TCP connection (the server read EOF)."""
    with trio.fail_after(CEILING):
        await peer.eof.wait()


async def receive_all(upstream: UpstreamWebSocket, count: int) -> list[str | bytes]:
    return [await upstream.receive() for _ in range(count)]


def assert_no_secret(exc: BaseException) -> None:
    """Neither the exception nor anything chained to it shows the cookie value."""
    current: BaseException | None = exc
    while current is not None:
        for text in (str(current), repr(current), *(repr(arg) for arg in current.args)):
            assert SECRET.decode() not in text, f"{type(current).__name__} shows the cookie: {text!r}"
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- handshake ----------------------------------------------------------------------------------------------


async def test_handshake_sends_target_with_query_host_and_extra_headers() -> None:
    async with open_ws_server(accept_then_answer_close) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert upstream.closed is None
                assert not upstream.close_sent
            await wait_eof(server.peer)
    request = server.peer.request
    assert request is not None
    assert request.target == PATH
    assert request.host == f"127.0.0.1:{server.port}"
    headers = dict(request.extra_headers)
    assert headers[b"cookie"] == b"api=" + SECRET
    assert headers[b"user-agent"] == b"ibkr-oauth-gateway-test/1.0"
    assert b"authorization" not in headers
    assert request.subprotocols == []
    head = bytes(server.peer.raw).split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == f"GET {PATH} HTTP/1.1".encode()
    assert f"host: 127.0.0.1:{server.port}".encode() in [line.lower() for line in head]
    assert server.peer.closes == [(1000, "")]  # exiting the block closed with 1000


@pytest.mark.parametrize(("path", "target"), [("", "/"), ("?a=1&b=%20", "/?a=1&b=%20"), ("/only/path", "/only/path")])
async def test_request_target_defaults_to_slash_and_keeps_the_query(path: str, target: str) -> None:
    async with open_ws_server(accept_then_answer_close) as server:
        with trio.fail_after(CEILING):
            async with connect(server, path):
                pass
            await wait_eof(server.peer)
    assert server.peer.request is not None
    assert server.peer.request.target == target


async def test_host_header_carries_no_userinfo() -> None:
    """``Host`` is the URL's host[:port] only (RFC 9110 §7.2): never the URL's user:password part."""
    async with open_ws_server(accept_then_answer_close) as server:
        with trio.fail_after(CEILING):
            async with connect_websocket(f"ws://user:password@127.0.0.1:{server.port}/ws"):
                pass
            await wait_eof(server.peer)
    assert server.peer.request is not None
    assert server.peer.request.host == f"127.0.0.1:{server.port}"


async def test_subprotocols_offered_and_negotiated() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept(subprotocol="v2")
        await peer.send(TextMessage(data="on v2"))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server, subprotocols=["v1", "v2"]) as upstream:
                assert await upstream.receive() == "on v2"
            await wait_eof(server.peer)
    assert server.peer.request is not None
    assert server.peer.request.subprotocols == ["v1", "v2"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/ws", "wss:///ws", "ws://", "127.0.0.1:80/ws"])
async def test_url_must_be_ws_or_wss_with_a_host(url: str) -> None:
    with trio.fail_after(CEILING), pytest.raises(ValueError, match="ws:// or wss://"):
        async with connect_websocket(url):
            pass


REJECTIONS = {
    "401-no-body": (b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n", 401),
    "403-body": (b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nforbidden", 403),
    "500-chunked": (
        b"HTTP/1.1 500 Internal Server Error\r\ntransfer-encoding: chunked\r\n\r\n5\r\noops!\r\n3\r\n123\r\n0\r\n\r\n",
        500,
    ),
    "500-length-body-echoing-the-cookie": (
        b"HTTP/1.1 500 Internal Server Error\r\nset-cookie: api=%b\r\ncontent-length: %d\r\n\r\n%b"
        % (SECRET, len(SECRET) + 4, b"api=" + SECRET),
        500,
    ),
    "200-not-an-upgrade": (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 200),
}


@pytest.mark.parametrize("in_pieces", [False, True], ids=["one-write", "in-pieces"])
@pytest.mark.parametrize("name", list(REJECTIONS))
async def test_rejected_handshake_raises_with_the_status(name: str, in_pieces: bool) -> None:
    answer, status = REJECTIONS[name]

    async def script(peer: WsPeer) -> None:
        assert await peer.read_head() is not None
        if in_pieces:
            for offset in range(0, len(answer), 7):
                await peer.send_raw(answer[offset : offset + 7])
                await trio.sleep(0.002)
        else:
            await peer.send_raw(answer)
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with pytest.raises(WebSocketRejected) as caught:
                async with connect(server):
                    pytest.fail("connected")
            await wait_eof(server.peer)
    assert caught.value.upstream_status == status
    assert str(caught.value) == f"GET /v1/api/ws: IBKR refused the WebSocket upgrade: HTTP {status}"
    assert caught.value.status == 502
    assert_no_secret(caught.value)


async def test_rejected_by_a_wsproto_server() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.expect(Request)
        await peer.send(
            RejectConnection(status_code=403, headers=[(b"content-length", b"6")], has_body=True),
            RejectData(data=b"denied"),
        )
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with pytest.raises(WebSocketRejected) as caught:
                async with connect(server):
                    pytest.fail("connected")
            await wait_eof(server.peer)
    assert caught.value.upstream_status == 403


async def test_rejection_with_a_close_delimited_body_keeps_the_status() -> None:
    """An HTTP/1.1 refusal without Content-Length ends its body by closing the connection: still a refusal."""

    async def script(peer: WsPeer) -> None:
        assert await peer.read_head() is not None
        await peer.send_raw(b"HTTP/1.1 403 Forbidden\r\nconnection: close\r\ncontent-type: text/plain\r\n\r\nno")
        # the script returns: the server closes the connection, which ends the body

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING), pytest.raises(WebSocketRejected) as caught:
            async with connect(server):
                pytest.fail("connected")
    assert caught.value.upstream_status == 403


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
        b"sec-websocket-accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n",
    ],
    ids=["garbage", "wrong-accept-token", "no-upgrade-header"],
)
async def test_invalid_handshake_answer_is_a_protocol_error(answer: bytes) -> None:
    async def script(peer: WsPeer) -> None:
        assert await peer.read_head() is not None
        await peer.send_raw(answer)
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with pytest.raises(UpstreamProtocolError, match="malformed response from upstream") as caught:
                async with connect(server):
                    pytest.fail("connected")
            await wait_eof(server.peer)
    assert_no_secret(caught.value)


async def test_subprotocol_not_offered_is_a_protocol_error() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake(extra=b"Sec-WebSocket-Protocol: other\r\n")
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with pytest.raises(UpstreamProtocolError):
                async with connect(server, subprotocols=["v1"]):
                    pytest.fail("connected")
            await wait_eof(server.peer)


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 10", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket"])
async def test_server_closing_during_the_handshake(partial: bytes) -> None:
    async def script(peer: WsPeer) -> None:
        assert await peer.read_head() is not None
        await peer.send_raw(partial)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed, match="during the WebSocket handshake") as caught:
            async with connect(server):
                pytest.fail("connected")
    assert isinstance(caught.value, RELAY_CAUGHT)
    assert_no_secret(caught.value)


async def test_server_that_never_answers_times_out_within_connect_timeout() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            started = trio.current_time()
            with pytest.raises(UpstreamTimeout, match="handshake timeout"):
                async with connect(server, connect_timeout_s=0.4):
                    pytest.fail("connected")
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)  # the socket was closed, not leaked
    assert 0.35 <= elapsed < 1.5
    assert bytes(server.peer.raw).startswith(b"GET ")


async def test_cancelled_while_waiting_for_the_handshake_answer_closes_the_socket() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with trio.move_on_after(0.2) as scope:
                async with connect(server, connect_timeout_s=10):
                    pytest.fail("connected")
            assert scope.cancelled_caught
            await wait_eof(server.peer)


async def test_connection_refused_is_a_connect_error() -> None:
    port = free_port()
    with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError, match="cannot connect") as caught:
        async with connect_websocket(f"ws://127.0.0.1:{port}/ws", extra_headers=HEADERS):
            pytest.fail("connected")
    assert_no_secret(caught.value)


async def test_frames_in_the_same_write_as_the_101_are_not_lost() -> None:
    async def script(peer: WsPeer) -> None:
        trailer = frame(OP_TEXT, b"first") + frame(OP_BINARY, b"\x00second") + frame(OP_PING, b"hs")
        await peer.raw_handshake(trailer + frame(OP_TEXT, b"third"))
        await raw_answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, 3) == ["first", b"\x00second", "third"]
            await wait_eof(server.peer)
    assert [(f.opcode, f.payload) for f in server.peer.frames] == [(OP_PONG, b"hs"), (OP_CLOSE, close_payload(1000))]


async def test_frames_in_the_same_write_as_the_101_from_wsproto() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept(trailer=[TextMessage(data="a"), BytesMessage(data=b"b"), TextMessage(data="c")])
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, 3) == ["a", b"b", "c"]
            await wait_eof(server.peer)


# --- messages ----------------------------------------------------------------------------------------------


async def test_text_and_binary_both_ways() -> None:
    payloads: list[str | bytes] = ["hello", b"\x00\x01\xff", "", b"", "ünïcødé ✓ 𝄞 日本", '{"topic":"smd"}']
    async with open_ws_server(echo) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                for payload in payloads:
                    await upstream.send_many([payload])
                    answer = await upstream.receive()
                    assert answer == payload
                    assert type(answer) is type(payload)
            await wait_eof(server.peer)
    assert server.peer.messages == payloads
    assert server.peer.closes == [(1000, "")]


async def test_large_message_both_ways() -> None:
    big = bytes(range(256)) * 800  # 200 KB
    text = "ü" * 100_000  # 200 KB of UTF-8
    async with open_ws_server(echo) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.send_many([big])
                assert await upstream.receive() == big
                await upstream.send_many([text])
                assert await upstream.receive() == text
            await wait_eof(server.peer)
    assert server.peer.messages == [big, text]


async def test_send_many_sends_exactly_those_messages_in_order() -> None:
    payloads: list[str | bytes] = [f"m{number}" if number % 3 else b"b%d" % number for number in range(50)]

    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        await raw_answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.send_many(payloads[:1])
                await upstream.send_many(payloads[1:])
                await upstream.send_many([])
            await wait_eof(server.peer)
    frames = server.peer.frames
    assert all(f.fin and f.masked and f.rsv == 0 for f in frames)
    sent = [f.payload.decode() if f.opcode == OP_TEXT else f.payload for f in frames[:-1]]
    assert [f.opcode for f in frames[:-1]] == [OP_TEXT if isinstance(p, str) else OP_BINARY for p in payloads]
    assert sent == payloads
    assert frames[-1].opcode == OP_CLOSE
    assert frames[-1].close_code == 1000


async def test_fragmented_messages_are_reassembled() -> None:
    euro = "€".encode()  # 3 bytes, split across frames
    text_frames = (
        frame(OP_TEXT, b"abc" + euro[:1], fin=False)
        + frame(OP_CONT, euro[1:], fin=False)
        + frame(OP_PING, b"mid")  # a control frame between fragments
        + frame(OP_CONT, b"", fin=False)
        + frame(OP_CONT, b"def")
    )
    binary_frames = frame(OP_BINARY, b"\x01\x02", fin=False) + frame(OP_CONT, b"\x03", fin=False) + frame(OP_CONT, b"")

    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        await peer.send_raw(text_frames)
        for offset in range(0, len(binary_frames), 3):  # the second message arrives a few bytes at a time
            await peer.send_raw(binary_frames[offset : offset + 3])
            await trio.sleep(0.002)
        await peer.send_raw(frame(OP_TEXT, b"single"))
        await raw_answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, 3) == ["abc€def", b"\x01\x02\x03", "single"]
            await wait_eof(server.peer)
    assert [f.opcode for f in server.peer.frames] == [OP_PONG, OP_CLOSE]
    assert server.peer.frames[0].payload == b"mid"


async def test_many_small_frames_in_one_write_are_all_delivered_in_order() -> None:
    count = 2000
    burst = b"".join(
        frame(OP_TEXT, b"t%d" % number) if number % 2 else frame(OP_BINARY, b"b%d" % number) for number in range(count)
    )

    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake(burst)  # even in the 101's write
        await peer.send_raw(burst)
        await raw_answer_close(peer)

    expected: list[str | bytes] = [f"t{number}" if number % 2 else b"b%d" % number for number in range(count)]
    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, count) == expected
                assert await receive_all(upstream, count) == expected
            await wait_eof(server.peer)


# --- max_message_bytes ----------------------------------------------------------------------------------------


async def test_message_at_the_limit_is_delivered_and_one_over_closes_with_1009() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(BytesMessage(data=b"x" * 1000))
        await peer.send(BytesMessage(data=b"y" * 1001))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server, max_message_bytes=1000) as upstream:
                assert await upstream.receive() == b"x" * 1000
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1009
                assert upstream.closed is caught.value
                with pytest.raises(WebSocketClosed) as again:
                    await upstream.receive()
                assert again.value.code == 1009
                with pytest.raises(WebSocketClosed):
                    await upstream.send_many(["after"])
            await wait_eof(server.peer)
    assert server.peer.closes == [(1009, "message too big")]
    assert server.peer.messages == []


async def test_fragments_each_under_the_limit_but_over_it_together_close_with_1009() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        await peer.send_raw(frame(OP_BINARY, b"a" * 60, fin=False) + frame(OP_CONT, b"b" * 40))  # exactly 100
        await peer.send_raw(frame(OP_TEXT, b"c" * 60, fin=False) + frame(OP_CONT, b"d" * 41))  # 101
        await raw_answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server, max_message_bytes=100) as upstream:
                assert await upstream.receive() == b"a" * 60 + b"b" * 40
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1009
            await wait_eof(server.peer)
    assert [f.close_code for f in server.peer.raw_closes] == [1009]


async def test_oversized_frame_is_refused_before_it_has_all_arrived() -> None:
    """A frame announcing 16 MiB: the client closes with 1009 once the limit is passed, not after 16 MiB."""
    released = trio.Event()

    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        await peer.send_raw(bytes([0x80 | OP_BINARY, 127]) + struct.pack("!Q", 16 << 20) + b"z" * 200_000)
        received = await peer.read_frame()
        released.set()
        assert received is not None
        assert received.opcode == OP_CLOSE
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server, max_message_bytes=65536) as upstream:
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1009
            await wait_eof(server.peer)
    assert released.is_set()
    assert [f.close_code for f in server.peer.raw_closes] == [1009]


async def test_text_limit_counts_utf8_bytes_not_characters() -> None:
    """``max_message_bytes`` is a byte limit: 8 characters of 3 UTF-8 bytes each (24 bytes) exceed 10 bytes."""

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(TextMessage(data="€" * 3))  # 9 bytes: under the limit
        await peer.send(TextMessage(data="€" * 8))  # 24 bytes: over it
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server, max_message_bytes=10) as upstream:
                assert await upstream.receive() == "€" * 3
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1009
            await wait_eof(server.peer)
    assert server.peer.closes == [(1009, "message too big")]


# --- pings ---------------------------------------------------------------------------------------------------


async def test_pings_are_answered_with_the_same_payload_between_messages() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(
            TextMessage(data="a"),
            Ping(payload=b"p1"),
            TextMessage(data="b"),
            Ping(payload=b""),
            BytesMessage(data=b"c"),
        )
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, 3) == ["a", "b", b"c"]
            await wait_eof(server.peer)
    assert server.peer.pongs == [b"p1", b""]
    kinds = [type(event).__name__ for event in server.peer.events]
    assert kinds == ["Request", "Pong", "Pong", "CloseConnection"]


async def test_ping_is_answered_while_receive_waits_for_data() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        for number in range(3):
            await peer.send(Ping(payload=b"ping-%d" % number))
            pong = await peer.expect(Pong)  # answered although no message has been sent yet
            assert pong.payload == b"ping-%d" % number
        await peer.send(TextMessage(data="after the pongs"))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await upstream.receive() == "after the pongs"
            await wait_eof(server.peer)
    assert server.peer.pongs == [b"ping-0", b"ping-1", b"ping-2"]


async def test_pongs_and_messages_do_not_interleave_while_another_task_sends() -> None:
    payloads: list[str | bytes] = [bytes([number % 256]) * 20_000 for number in range(100)]

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(*(Ping(payload=b"%d" % number) for number in range(50)), TextMessage(data="done"))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream, trio.open_nursery() as nursery:

                async def sender() -> None:
                    for payload in payloads:
                        await upstream.send_many([payload])

                nursery.start_soon(sender)
                assert await upstream.receive() == "done"
            await wait_eof(server.peer)
    assert server.peer.messages == payloads
    assert server.peer.pongs == [b"%d" % number for number in range(50)]


# --- the server closes ----------------------------------------------------------------------------------------


async def test_server_close_with_code_and_reason() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(TextMessage(data="last"), CloseConnection(code=4001, reason="session gone"))
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await upstream.receive() == "last"
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert (caught.value.code, caught.value.reason) == (4001, "session gone")
                assert upstream.closed is caught.value
                assert upstream.close_sent
                with pytest.raises(WebSocketClosed) as again:
                    await upstream.receive()
                assert again.value.code == 4001
                with pytest.raises(WebSocketClosed) as on_send:
                    await upstream.send_many(["too late"])
                assert on_send.value.code == 4001
                await upstream.start_close(1000)  # a no-op now
                started = trio.current_time()
            assert trio.current_time() - started < 1.0  # nothing left to wait for
            await wait_eof(server.peer)
    assert server.peer.closes == [(4001, "session gone")]  # the client's answer, once
    assert bytes(server.peer.after_closed) == b""
    assert server.peer.messages == []


async def test_server_close_without_a_code() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake(frame(OP_CLOSE))
        await peer.drain_raw()
        # read what the client sent after the 101: its answer to the Close
        while await peer.read_frame() is not None:
            pass

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1005
                assert caught.value.reason == ""
                with pytest.raises(WebSocketClosed):
                    await upstream.send_many([b"x"])
            await wait_eof(server.peer)
            with trio.fail_after(CEILING):
                await server.peer.closed.wait()
    closes = server.peer.raw_closes
    assert len(closes) == 1
    assert closes[0].payload == b""  # 1005 is answered with an empty Close, never the code 1005 itself
    assert len(server.peer.frames) == 1


async def test_messages_before_the_close_in_the_same_write_are_delivered_first() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(TextMessage(data="1"), BytesMessage(data=b"2"), CloseConnection(code=1000, reason=""))
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await receive_all(upstream, 2) == ["1", b"2"]
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1000
            await wait_eof(server.peer)
    assert server.peer.closes == [(1000, "")]


# --- the client closes ----------------------------------------------------------------------------------------


async def test_start_close_sends_the_code_and_exit_waits_for_the_answer() -> None:
    async with open_ws_server(accept_then_answer_close) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.start_close(4000, "client going")
                assert upstream.close_sent
                await upstream.start_close(1000, "again")  # once only
                with pytest.raises(WebSocketClosed):
                    await upstream.send_many(["after close"])
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert elapsed < 1.0  # the answer came at once
    assert server.peer.closes == [(4000, "client going")]
    assert server.peer.messages == []
    assert bytes(server.peer.after_closed) == b""


async def test_exit_sends_close_1000_and_closes_tcp_after_the_answer() -> None:
    answered = trio.Event()

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        event = await peer.expect(CloseConnection)
        await trio.sleep(0.3)  # the client must wait for this answer before closing TCP
        assert not peer.eof.is_set()
        await peer.send(event.response())
        answered.set()
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            started = trio.current_time()
            async with connect(server):
                pass
            elapsed = trio.current_time() - started
            assert answered.is_set()
            await wait_eof(server.peer)
    assert 0.25 < elapsed < 1.5
    assert server.peer.closes == [(1000, "")]


async def test_exit_is_bounded_when_the_server_never_answers_the_close() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.drain()  # records the Close, never answers it

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.start_close(4000)
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert _CLOSE_TIMEOUT_S - 0.2 <= elapsed < _CLOSE_TIMEOUT_S + 1.0
    assert server.peer.closes == [(4000, "")]


async def test_messages_arriving_after_start_close_are_still_received() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        received = await peer.read_frame()
        assert received is not None
        assert received.opcode == OP_CLOSE
        await peer.send_raw(frame(OP_TEXT, b"in flight") + frame(OP_CLOSE, received.payload))
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.start_close(4000, "bye")
                assert await upstream.receive() == "in flight"
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert (caught.value.code, caught.value.reason) == (4000, "bye")
            await wait_eof(server.peer)
    assert [(f.close_code, f.close_reason) for f in server.peer.raw_closes] == [(4000, "bye")]


# --- broken connections and protocol errors --------------------------------------------------------------------


@pytest.mark.parametrize("last_bytes", [b"", frame(OP_TEXT, b"cut short")[:5]], ids=["clean", "mid-frame"])
async def test_server_dropping_tcp_without_close_is_1006(last_bytes: bytes) -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake(frame(OP_TEXT, b"before") + last_bytes)
        # returning closes TCP without a Close frame

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await upstream.receive() == "before"
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == 1006
                with pytest.raises(WebSocketClosed) as on_send:
                    await upstream.send_many(["x"])
                assert on_send.value.code == 1006
                started = trio.current_time()
            assert trio.current_time() - started < 1.0
    assert_no_secret(caught.value)


async def test_send_to_a_dropped_connection_raises_websocket_closed() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await server.peers[0].closed.wait()
                with pytest.raises(WebSocketClosed) as caught:
                    for _ in range(200):  # the first writes may still land in the socket buffer
                        await upstream.send_many([b"x" * 1024])
                        await trio.sleep(0.005)
                assert caught.value.code == 1006


PROTOCOL_ERRORS = {
    "masked-server-frame": (frame(OP_TEXT, b"hi", mask=b"abcd"), 1002),
    "reserved-opcode": (frame(0x3, b"hi"), 1002),
    "reserved-control-opcode": (frame(0xB, b""), 1002),
    "rsv-bits-without-extension": (frame(OP_TEXT, b"hi", rsv=0b100), 1002),
    "continuation-without-start": (frame(OP_CONT, b"x"), 1002),
    "new-message-inside-a-fragmented-one": (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    "fragmented-ping": (frame(OP_PING, b"x", fin=False), 1002),
    "oversized-ping": (frame(OP_PING, b"x" * 126), 1002),
    "close-with-one-byte": (frame(OP_CLOSE, b"\x03"), 1002),
    "close-with-invalid-code": (frame(OP_CLOSE, close_payload(999)), 1002),
    "invalid-utf8-text": (frame(OP_TEXT, b"ok \xff\xfe"), 1007),
}


@pytest.mark.parametrize("name", list(PROTOCOL_ERRORS))
async def test_protocol_violation_by_the_server(name: str) -> None:
    violation, code = PROTOCOL_ERRORS[name]

    async def script(peer: WsPeer) -> None:
        await peer.raw_handshake()
        await peer.send_raw(frame(OP_TEXT, b"fine") + violation)
        await raw_answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                assert await upstream.receive() == "fine"
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert caught.value.code == code
                with pytest.raises(WebSocketClosed):
                    await upstream.send_many(["x"])
            await wait_eof(server.peer)
    assert [f.close_code for f in server.peer.raw_closes] == [code]  # the client said why, once
    assert_no_secret(caught.value)


# --- concurrency as the relay uses it -------------------------------------------------------------------------


async def test_relay_style_receive_task_send_close_and_cancel() -> None:
    """One task blocked in receive(), another sends, then start_close() and cancels the receiver (the relay's
    pump): no BusyResourceError, the block exits at once, the server sees the messages then the Close."""
    up: list[str | bytes] = [f"up-{number}" for number in range(20)]
    up += [b"bin", ""]

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(TextMessage(data="down-1"), BytesMessage(data=b"down-2"))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            down: list[str | bytes] = []
            got_two = trio.Event()
            async with connect(server) as upstream:
                async with trio.open_nursery() as pump:

                    async def upstream_to_client() -> None:
                        while True:
                            down.append(await upstream.receive())
                            if len(down) == 2:
                                got_two.set()

                    pump.start_soon(upstream_to_client)
                    await got_two.wait()
                    await trio.sleep(0.05)  # the receiver is blocked in receive() again
                    for payload in up[:10]:
                        await upstream.send_many([payload])
                    await upstream.send_many(up[10:])
                    await upstream.start_close(1001)
                    pump.cancel_scope.cancel()
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert down == ["down-1", b"down-2"]
    assert elapsed < 1.0  # the server's answer to the Close was read on exit
    assert server.peer.messages == up
    assert server.peer.closes == [(1001, "")]
    assert isinstance(server.peer.events[-1], CloseConnection)


async def test_relay_style_server_closes_while_the_sender_is_sending() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.expect(TextMessage)
        await peer.send(CloseConnection(code=4002, reason="bye"))
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            closed: list[int] = []
            async with connect(server) as upstream, trio.open_nursery() as pump:

                async def upstream_to_client() -> None:
                    try:
                        await upstream.receive()
                    except WebSocketClosed as exc:
                        closed.append(exc.code)

                pump.start_soon(upstream_to_client)
                with pytest.raises(WebSocketClosed):
                    for _ in range(500):
                        await upstream.send_many(["tick"])
                        await trio.sleep(0.01)
            await wait_eof(server.peer)
    assert closed == [4002]
    assert server.peer.closes[-1] == (4002, "bye")


# --- cancellation ----------------------------------------------------------------------------------------------


async def test_cancelled_body_still_closes_the_connection() -> None:
    async with open_ws_server(accept_then_answer_close) as server:
        with trio.fail_after(CEILING):
            with trio.move_on_after(0.2) as scope:
                async with connect(server) as upstream:
                    await upstream.receive()
                    pytest.fail("received")
            assert scope.cancelled_caught
            await wait_eof(server.peer)
    assert server.peer.closes == [(1000, "")]


async def test_cancelled_body_is_bounded_when_the_server_never_answers() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            with trio.CancelScope() as scope:
                async with connect(server) as upstream:
                    started = trio.current_time()
                    scope.cancel()
                    await upstream.receive()
                    pytest.fail("received")
            elapsed = trio.current_time() - started
            assert scope.cancelled_caught
            await wait_eof(server.peer)
    assert server.peer.closes == [(1000, "")]
    assert _CLOSE_TIMEOUT_S - 0.2 <= elapsed < _CLOSE_TIMEOUT_S + 1.0


async def test_exit_is_bounded_when_the_server_stops_reading() -> None:
    """The relay is cancelled while upstream does not read (its buffers are full): leaving the block must still
    take about ``_CLOSE_TIMEOUT_S``, not as long as the server keeps not reading."""
    stall_s = 3.5

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await trio.sleep(stall_s)  # reads nothing meanwhile
        await peer.drain_raw()  # frames may be cut by the cancelled write: raw bytes only

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING + stall_s):
            async with connect(server) as upstream:
                with trio.move_on_after(0.5):
                    while True:
                        await upstream.send_many([b"x" * 65536])
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert elapsed < _CLOSE_TIMEOUT_S + 1.0


async def test_after_a_cut_write_nothing_more_is_written_and_the_exit_does_not_wait() -> None:
    """A write cancelled half-way (the relay's write deadline) may end the byte stream mid-frame: no Close frame
    may follow it, sends fail with 1006, and leaving the block closes the socket at once."""
    stall_s = 3.0

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await trio.sleep(stall_s)  # reads nothing meanwhile
        await peer.drain_raw()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING + stall_s):
            async with connect(server) as upstream:
                with trio.move_on_after(0.5) as cut:
                    while True:
                        await upstream.send_many([b"x" * 65536])
                assert cut.cancelled_caught
                assert upstream.write_failed
                with pytest.raises(WebSocketClosed) as closed:
                    await upstream.send_many(["after"])
                assert closed.value.code == 1006
                await upstream.start_close(1000)  # nothing to write it after
                assert not upstream.close_sent
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert elapsed < 0.5


async def test_abort_gives_up_on_the_close_handshake() -> None:
    """For a caller that cannot wait (another task may still be receiving): no Close frame, no wait, the socket is
    closed on exit."""

    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.drain()

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                upstream.abort()
                await upstream.wait_closed()  # returns at once: no Close of ours went out
                with pytest.raises(WebSocketClosed):
                    await upstream.send_many(["after"])
                started = trio.current_time()
            elapsed = trio.current_time() - started
            await wait_eof(server.peer)
    assert elapsed < 0.5
    assert server.peer.closes == []


async def test_wait_closed_reads_until_the_answer_to_our_close() -> None:
    async def script(peer: WsPeer) -> None:
        await peer.accept()
        await peer.send(TextMessage(data="late"))
        await answer_close(peer)

    async with open_ws_server(script) as server:
        with trio.fail_after(CEILING):
            async with connect(server) as upstream:
                await upstream.wait_closed()  # no Close of ours yet: returns at once
                assert upstream.closed is None
                await upstream.start_close(4000)
                await upstream.wait_closed()  # drops "late", returns on the answer
                assert upstream.closed is not None
                assert upstream.closed.code == 4000
            await wait_eof(server.peer)
    assert server.peer.closes == [(4000, "")]


# --- TLS -------------------------------------------------------------------------------------------------------


async def test_wss_messages_both_ways_and_close(tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)
    big = b"\x5a" * 150_000
    async with open_ws_server(echo, tls=server_context) as server:
        with trio.fail_after(CEILING):
            async with connect(server, scheme="wss", ssl_context=client_context) as upstream:
                await upstream.send_many(["secure", big])
                assert await receive_all(upstream, 2) == ["secure", big]
                await upstream.start_close(4000, "tls bye")
                started = trio.current_time()
            assert trio.current_time() - started < 1.0
            await wait_eof(server.peer)
    assert server.peer.request is not None
    assert server.peer.request.target == PATH
    assert dict(server.peer.request.extra_headers)[b"cookie"] == b"api=" + SECRET
    assert server.peer.messages == ["secure", big]
    assert server.peer.closes == [(4000, "tls bye")]


async def test_wss_server_close_is_received(tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)

    async def script(peer: WsPeer) -> None:
        await peer.accept(trailer=[TextMessage(data="hello"), CloseConnection(code=4001, reason="gone")])
        await peer.drain()

    async with open_ws_server(script, tls=server_context) as server:
        with trio.fail_after(CEILING):
            async with connect(server, scheme="wss", ssl_context=client_context) as upstream:
                assert await upstream.receive() == "hello"
                with pytest.raises(WebSocketClosed) as caught:
                    await upstream.receive()
                assert (caught.value.code, caught.value.reason) == (4001, "gone")
            await wait_eof(server.peer)
    assert server.peer.closes == [(4001, "gone")]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["untrusted", "name-mismatch"])
async def test_wss_untrusted_certificate_is_refused(tmp_path: Path, host: str) -> None:
    server_context, client_context = self_signed(tmp_path)

    async def script(peer: WsPeer) -> None:
        await peer.drain()  # the TLS handshake fails: no request arrives

    async with open_ws_server(script, tls=server_context) as server:
        context = ssl.create_default_context() if host == "127.0.0.1" else client_context
        with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            async with connect_websocket(f"wss://{host}:{server.port}/ws", extra_headers=HEADERS, ssl_context=context):
                pytest.fail("connected")
        assert isinstance(caught.value, RELAY_CAUGHT)  # the relay handles it (closes its client with 1011)
        assert_no_secret(caught.value)
        with trio.fail_after(CEILING):
            await wait_eof(server.peer)
    assert server.peer.request is None  # nothing was sent in clear or to the wrong server
