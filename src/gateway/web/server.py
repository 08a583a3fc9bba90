"""The gateway's HTTP server: hypercorn's HTTP/1.1 and WebSocket protocol code on the gateway's own accept loop.

Why not ``hypercorn.trio.serve`` as it comes (each point was reproduced against hypercorn 0.18.0 and has a test):

- **A connection's failure is that connection's problem.** hypercorn runs every connection in one handler
  nursery and catches only ``OSError`` around it, so any other exception from its protocol code (one was a
  ``KeyError`` in its HTTP/2 stream table, reachable by any client) ended the whole server — and with it the
  gateway. Here each connection runs under :class:`Connection`, which logs such an exception as one line and
  closes that connection; nothing a client sends can end the process.
- **HTTP/1.1 only.** IBKR and every client of the gateway speak HTTP/1.1, and nginx in front terminates HTTP/2.
  hypercorn switched to HTTP/2 on an ``Upgrade: h2c`` header (answering 101) or on the prior-knowledge preface,
  doubling the protocol surface for nothing. Here the ``Upgrade: h2c`` header is ignored (RFC 9110 §7.8 lets a
  server do that; the request is answered over HTTP/1.1), and the prior-knowledge preface ``PRI * HTTP/2.0`` is
  answered 505 (JSON) and the connection closed, before anything reaches the app. Any other HTTP version h11
  accepts (``HTTP/1.2``…) reaches the app, and the dispatcher answers 505 too.
- **A closed connection is closed at once.** hypercorn closes a connection from inside the app's ``send`` call;
  when the app's own disconnect watcher had cancelled that task meanwhile, the close was cut short by the
  cancellation and the socket stayed open until ``read_timeout`` (30 s after a ``Connection: close`` answer).
  The close is shielded and bounded here.
- **A client that stops reading is let go.** hypercorn writes to the client shielded and with no deadline, so a
  client that reads nothing held its connection (and whatever waited on that write) until it closed its socket.
  Each write here has a deadline — ``websocket_ping_interval`` on a WebSocket, ``read_timeout`` otherwise — after
  which the connection is closed; a connection closed here is not read any further. When the server itself is
  going away (its connection tasks are cancelled at the end of the drain), a write still in flight ends at once.
- **A WebSocket protocol violation is answered with a Close frame.** wsproto reports a frame it cannot accept
  (bad UTF-8, an unmasked client frame, reserved bits) as a ``CloseConnection`` event while the connection is still
  open; hypercorn then dropped TCP without the Close frame (1002/1007) that RFC 6455 §7.1.7 asks for.

Contract: :func:`serve` binds ``config.bind`` (plain TCP; the gateway terminates no TLS), reports the bound URLs
through ``task_status`` (``["http://127.0.0.1:PORT"]``), serves until ``shutdown`` is set, then stops accepting and
closes idle keep-alive connections; connections still busy are given ``config.graceful_timeout`` before they are
cancelled. Lifespan events reach the app as with hypercorn. Everything else about a connection — header and read
deadlines, keep-alive, WebSocket pings, message limits — is hypercorn's, configured by ``config``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, FrameTooLargeError, WSStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, ConnectionState, LifespanState
from hypercorn.typing import Scope as HypercornScope
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app
from wsproto.connection import ConnectionState as WebSocketState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

from gateway.asgi import ASGIApp, error_body
from gateway.errors import ListenError

log = logging.getLogger("gateway.server")

CLOSE_TIMEOUT_S = 2.0
"""Longest a connection's close waits for a write in flight before it closes the socket (shielded from
cancellation)."""
HTTP2_REFUSAL = "HTTP/2 is not spoken here: the gateway serves HTTP/1.1 (put nginx in front for HTTP/2)"


class _WebSocketStream(WSStream):
    """hypercorn's WebSocket stream, except that a protocol violation is answered with a Close frame."""

    async def _handle_events(self) -> None:
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                    break
                if event.message_finished:
                    assert self.app_put is not None  # set when the handshake was accepted
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state is WebSocketState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())  # the peer closed: echo its Close
                elif self.connection.state is WebSocketState.OPEN:
                    # No Close frame arrived: wsproto refused a frame (event.code is 1002 or 1007). Fail the
                    # connection as RFC 6455 §7.1.7 says: our Close frame with that code, then TCP goes.
                    await self._send_wsproto_event(CloseConnection(code=event.code, reason=event.reason))
                await self.send(StreamClosed(stream_id=self.stream_id))
                break


class FrameWriter:
    """Pre-built WebSocket frames written to one client's connection without hypercorn's per-message path.

    The shared WebSocket mode sends the same frame to many clients: it builds the bytes once
    (:func:`text_frame`) and writes them with :meth:`try_write` (now, without waiting, when no other write to that
    client is in flight) or :meth:`write` (the connection's usual write: its send lock and write deadline). Frames
    are written only while the WebSocket is open in both directions — never after a Close was sent or received —
    so they cannot break the protocol state hypercorn's wsproto keeps; the Close itself still goes through ASGI.
    Unmasked, unfragmented, uncompressed frames are valid whatever extensions were negotiated.
    """

    __slots__ = ("_connection", "_stream")

    def __init__(self, connection: Connection, stream: WSStream) -> None:
        self._connection = connection
        self._stream = stream

    @property
    def open(self) -> bool:
        """True while frames may be written (handshake done, no Close either way, the connection not failed)."""
        stream, connection = self._stream, self._connection
        return (
            stream.state is ASGIWebsocketState.CONNECTED
            and not stream.closed
            and stream.connection.state is WebSocketState.OPEN
            and not connection._gone
            and not connection._reading.cancel_called
        )

    def try_write(self, frame: bytes) -> int:
        """Write ``frame`` now if nothing else is being written to this client: the number of bytes the socket took,
        or ``-1`` when the connection is closing or failed (nothing more goes to it). ``0``: none, the caller queues
        the frame for :meth:`write`. Between 0 and ``len(frame)``: the rest is kept by the connection and goes out
        ahead of the next write of any kind (a pong included), so no frame is ever cut by another; the caller then
        queues an empty :meth:`write` to flush it."""
        if not self.open:
            return -1
        connection = self._connection
        if connection.send_lock.locked() or connection._frame_rest:
            return 0
        try:
            written = os.write(connection.stream.socket.fileno(), frame)
        except BlockingIOError:
            return 0
        except OSError:
            connection._gone = True
            return -1
        connection._frame_rest = frame[written:]
        return written

    async def write(self, data: bytes) -> bool:
        """Write ``data`` (whole frames; ``b""`` flushes what :meth:`try_write` left) as every write to this client
        is written: after any write in flight, under the write deadline. False when the connection is closing."""
        if not self.open:
            return False
        await self._connection.protocol_send(RawData(data=data))
        return not self._connection._gone


def frame_writer(send: object) -> FrameWriter | None:
    """The :class:`FrameWriter` behind an ASGI ``send`` of a WebSocket this server accepted, else ``None``."""
    writer = getattr(getattr(send, "__self__", None), "gateway_frames", None)
    return writer if isinstance(writer, FrameWriter) else None


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked server-to-client text frame carrying ``payload`` (UTF-8) — RFC 6455 §5.2."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class HTTP11(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, never switching to HTTP/2, with the WebSocket stream above."""

    _refused = False
    gateway_connection: Connection | None = None  # set by the Connection that runs this protocol

    async def _check_protocol(self, event: h11.Request) -> None:
        """No protocol switch: ``Upgrade: h2c`` is ignored; the HTTP/2 preface is answered 505 and the connection
        closed (it is not a request: nothing reaches the app)."""
        if event.method == b"PRI" and event.target == b"*":
            self._refused = True
            body = error_body(505, "http_version_not_supported", HTTP2_REFUSAL)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *self.config.response_headers("h11"),
            ]
            await self._send_h11_event(h11.Response(status_code=505, headers=headers))
            await self._send_h11_event(h11.Data(data=body))
            await self._send_h11_event(h11.EndOfMessage())
            await self.send(Closed())

    async def stream_send(self, event: StreamEvent) -> None:
        """hypercorn's, except that an answer started while the request body is still arriving says
        ``Connection: close``: the connection closes after it (what is left of the body would be read as the next
        request), and a client that managed to write its whole body must not send its next request there."""
        if isinstance(event, Response) and event.status_code >= 200 and self._body_incoming():
            event = Response(
                stream_id=event.stream_id,
                status_code=event.status_code,
                headers=[*event.headers, (b"connection", b"close")],
            )
        await super().stream_send(event)

    def _body_incoming(self) -> bool:
        connection = self.connection
        if not isinstance(connection, h11.Connection) or connection.their_state is not h11.SEND_BODY:
            return False
        return self._request_has_body

    _request_has_body = False

    async def _create_stream(self, request: h11.Request) -> None:
        if self._refused:
            return
        self._request_has_body = any(
            (name == b"content-length" and value.strip() not in (b"", b"0")) or name == b"transfer-encoding"
            for name, value in request.headers
        )
        await super()._create_stream(request)
        if type(self.stream) is WSStream:
            # hypercorn builds the stream and hands it the request in one method; frames arrive only after the
            # handshake, so the subclass is in place before its _handle_events can run.
            self.stream.__class__ = _WebSocketStream
            if self.gateway_connection is not None:
                self.stream.gateway_frames = FrameWriter(self.gateway_connection, self.stream)  # type: ignore[attr-defined]


class _TaskGroup(TaskGroup):
    """hypercorn's, except that telling an HTTP app its stream closed never waits for room in the app's queue.

    hypercorn queues what a client sends for the app (at most ``max_app_queue_size`` messages) and, when the
    stream closes, puts ``http.disconnect`` on the same queue, waiting for room. When the app answered before
    reading the request body (no session in time, pacing, an unreachable upstream), the queue is full of body
    chunks it will never read, and the close is signalled from inside the app's own send of its last response
    message: both waited for the other for ever — the exchange never ended and the connection stayed open. Here
    the oldest unread messages make room instead: the stream is closed, so the rest of its body can no longer
    arrive, and the app learns of the close as it would of a client that left mid-body.
    """

    async def spawn_app(
        self,
        app: AppWrapper,
        config: Config,
        scope: HypercornScope,
        send: Callable[[ASGISendEvent | None], Awaitable[None]],
    ) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
        to_app, queued = trio.open_memory_channel[ASGIReceiveEvent](config.max_app_queue_size)
        assert self._nursery is not None
        self._nursery.start_soon(
            _handle, app, config, scope, queued.receive, send, trio.to_thread.run_sync, trio.from_thread.run
        )

        async def put(message: ASGIReceiveEvent) -> None:
            if message["type"] != "http.disconnect":
                await to_app.send(message)
                return
            # Checkpoints as MemorySendChannel.send has them: nothing may raise once the message is queued. The close
            # is often signalled from inside the app's own last send, and the disconnect wakes the app's watcher that
            # cancels that very send's scope: a Cancelled here would cut hypercorn's keep-alive recycling short.
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    to_app.send_nowait(message)
                except trio.WouldBlock:
                    try:
                        queued.receive_nowait()  # an unread request-body chunk of a stream that is closed
                    except trio.WouldBlock:  # an unbuffered queue: nothing to drop, wait as hypercorn does
                        await to_app.send(message)
                        return
                else:
                    break
            await trio.lowlevel.cancel_shielded_checkpoint()

        return put


class Connection(TCPServer):
    """One client connection: hypercorn's TCP handling with :attr:`protocol_class`, failures contained, every write
    under a deadline, close shielded and bounded."""

    protocol_class: type[HTTP11] = HTTP11

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = trio.CancelScope()
        self._gone = False  # the peer broke the connection (a write failed)
        self._frame_rest = b""  # the unwritten end of a frame FrameWriter.try_write began: written before anything
        self._peer: tuple[str, int] | None = None
        self._writing: trio.CancelScope | None = None  # the shielded scope of the write in flight, if any

    async def run(self) -> None:
        """Serve the connection until it closes; never raises (except cancellation)."""
        served = trio.Event()
        try:
            async with trio.open_nursery() as guard:
                guard.start_soon(self._abandon_write_if_cancelled, served)
                try:
                    await self._serve()
                finally:
                    served.set()
        except* OSError:
            pass  # the peer went away: nothing to report
        except* Exception as group:
            _log_failure(self._peer, group)
        finally:
            await self._close()

    async def _serve(self) -> None:
        sock = self.stream.socket
        peer = self._peer = parse_socket_addr(sock.family, sock.getpeername())
        local = parse_socket_addr(sock.family, sock.getsockname())
        async with _TaskGroup() as task_group:
            self._task_group = task_group
            protocol = self.protocol_class(
                self.app,
                self.config,
                self.context,
                task_group,
                ConnectionState(self.state),
                False,
                peer,
                local,
                self.protocol_send,
            )
            protocol.gateway_connection = self  # its WebSocket streams write frames through this connection
            self.protocol = protocol  # type: ignore[assignment]  # TCPServer declares ProtocolWrapper
            await self.protocol.initiate()
            await self.idle_task.restart(task_group, self._idle_timeout)
            with self._reading:  # cancelled by _close: a closed connection is not read any further
                await self._read_data()

    async def _abandon_write_if_cancelled(self, served: trio.Event) -> None:
        """Beside the connection until it is served; if the connection is cancelled first (the server is going
        away), end a write in flight at once. The connection's own tasks cannot: the write is shielded, and they
        wait for it before they see the cancellation."""
        try:
            await served.wait()
        except trio.Cancelled:
            self._abandon_write()
            raise

    def _abandon_write(self) -> None:
        """End a write in flight now instead of at its deadline: once the server is going away (the gateway's drain
        is over), a client that reads nothing must not hold the process for a whole ping interval."""
        if self._writing is not None:
            self._gone = True  # no warning: the connection is closed because the server stops, not for the client
            self._writing.cancel()

    async def _close(self) -> None:
        """Send EOF after any write in flight, then close the socket and stop reading; shielded (the caller may be a
        cancelled app task) and bounded (a write stuck on a client that does not read is ended by the close)."""
        with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            async with self.send_lock:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self.stream.send_eof()
        with trio.CancelScope(shield=True):
            await self.stream.aclose()
        # The reader may be waiting to hand a finished app a message (a full queue nobody takes from any more):
        # it would never reach EOF, and the connection's task would outlive its socket.
        self._reading.cancel()

    async def protocol_send(self, event: Event) -> None:
        """hypercorn's, except that writes have a deadline and a close is the bounded one above.

        h11 and wsproto count bytes as sent the moment they produce them, so those bytes must reach the socket even if
        the task sending them is cancelled meanwhile: hypercorn waited for the send lock cancellably, and a relay
        cancelled as it accepted lost its 101 but not the "accepted" state — its Close frame then went out with no
        handshake answer in front of it. Here waiting for the lock (that is, for a write in flight to the same
        client) and the write itself are shielded together, under the write deadline.
        """
        if isinstance(event, RawData):
            with trio.CancelScope(shield=True) as writing, trio.move_on_after(self._write_deadline_s()) as deadline:
                self._writing = writing
                async with self.send_lock:
                    data, self._frame_rest = self._frame_rest + event.data, b""
                    try:
                        await self.stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._gone = True
                        deadline.cancel()  # gone: closed like a missed deadline, without the warning
            self._writing = None
            if writing.cancelled_caught:  # abandoned: the server is going away and closes every connection itself
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
                return
            if deadline.cancelled_caught:
                if not self._reading.cancel_called and not self._gone:
                    log.warning(
                        "connection from %s closed: the client took none of our bytes for %g s",
                        _where(self._peer),
                        self._write_deadline_s(),
                    )
                await self._closed_by_peer_or_deadline()
        elif isinstance(event, Closed):
            await self._closed_by_peer_or_deadline()
        else:
            await super().protocol_send(event)

    def _write_deadline_s(self) -> float:
        """How long a client may take to accept one write: a WebSocket client that took nothing for a ping
        interval cannot have answered the ping either; an HTTP client gets ``read_timeout``, as for its silence."""
        websocket = isinstance(getattr(self.protocol, "stream", None), WSStream)
        limit = self.config.websocket_ping_interval if websocket else self.config.read_timeout
        return float(limit) if limit else math.inf

    async def _closed_by_peer_or_deadline(self) -> None:
        await self._close()
        # Tell the protocol (and through it the app); bounded, as it hands the app a message and a finished app
        # takes none.
        with trio.move_on_after(CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            await self.protocol.handle(Closed())


def _where(peer: tuple[str, int] | None) -> str:
    return f"{peer[0]}:{peer[1]}" if peer else "-"


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    """The exceptions in ``group``, nested groups flattened (the connection's guard nursery adds a level)."""
    found: list[Exception] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _log_failure(peer: tuple[str, int] | None, group: BaseExceptionGroup[Exception]) -> None:
    # One line per failure: the type and hypercorn's message (no request data: its exceptions carry stream ids and
    # states). The traceback is for developers, at debug level.
    where = _where(peer)
    for exc in _leaves(group):
        log.warning(
            "connection from %s closed after an error in the HTTP server: %s: %s", where, type(exc).__name__, exc
        )
    log.debug("connection error detail", exc_info=group)


async def serve(
    app: ASGIApp,
    config: Config,
    shutdown: trio.Event,
    *,
    connection_class: type[Connection] = Connection,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP/1.1 and WebSocket on ``config.bind`` until ``shutdown``; see the module contract.

    ``connection_class`` runs each connection (tests pass a subclass whose protocol fails on purpose)."""
    wrapped: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    try:
        sockets = config.create_sockets()
    except OSError as exc:  # the one error map of the listening boundary: taken port, foreign address, no rights
        raise ListenError(", ".join(config.bind), exc.strerror or str(exc)) from None
    listeners = []
    urls = []
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
        urls.append("http://" + repr_socket_addr(sock.family, sock.getsockname()))
    connection: Callable[[trio.SocketStream], Awaitable[None]] = partial(
        connection_class, wrapped, config, context, ConnectionState(lifespan_state)
    )
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(partial(trio.serve_listeners, connection, listeners, handler_nursery=connections))
                task_status.started(urls)
                await shutdown.wait()
                accepting.cancel_scope.cancel()  # stop accepting; the listening sockets close
            await context.terminated.set()  # idle keep-alive connections close; busy ones finish their exchange
            connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
