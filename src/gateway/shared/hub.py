"""Shared WebSocket mode's shell: one IBKR socket per session, every client connection multiplexed on it.

Contract:
- :meth:`SharedHub.run` runs beside the server (like the relay's): it owns the client writers, the timer that runs
  the feed's grace periods and renewals, and the loop that waits for each ready session and starts the *upstream
  task* in that session's nursery — so a session failure cancels IBKR's socket with everything else of the session.
- The upstream task opens ``/v1/api/ws`` with ``?oauth_token=<access token>``, ``Cookie: api=<session>`` and the
  User-Agent, sends ``tic`` at once and every ``upstream_keepalive_s``, and feeds IBKR's messages to the
  :class:`~gateway.shared.feed.Feed`. When it ends for any reason other than the gateway's shutdown, clients stay
  connected and are told (``{"topic":"gateway","state":"restarting"}``); the next ready session opens the next
  socket and the feed re-subscribes. A socket that closes while its session lives is reopened after a back-off.
- The handler (:meth:`SharedHub.__call__`, the server's task for a client) accepts at once — a client may connect
  while the session restarts and hears the notice — and feeds the client's messages to the feed. Only the client's
  writer writes to it after the accept.
- Each client has a bounded outgoing queue of ``client_buffer`` messages. A client whose queue is full when a message
  for it arrives is too slow: it is closed with 1008 and a reason naming ``websocket.client_buffer``, one warning is
  logged, and its subscriptions are released; nobody else waits for it. Every frame the feed encodes once is put
  into each recipient's queue as the same ``str``.
- ``max_clients`` (``server.max_websockets``) caps connected clients; one more is accepted and closed with 1013.
- At shutdown (the session ends with 1001) every client is closed with 1001 and :meth:`wait_all_closed` returns once
  none is left.
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from gateway.asgi import Receive, Scope, Send, refuse_over_limit
from gateway.edge.request import ADMITTED_KEY
from gateway.errors import UpstreamError
from gateway.proxy.websocket import RelayCounters
from gateway.session.paths import websocket_request
from gateway.session.supervisor import LiveSession, SessionManager
from gateway.shared.feed import Action, ClientId, Feed, FeedSettings, ToClients, ToUpstream
from gateway.upstream.wsclient import UpstreamWebSocket, WebSocketClosed, connect_websocket
from gateway.web.server import FrameWriter, frame_writer, text_frame

log = logging.getLogger("gateway.websocket")

__all__ = ["SharedHub", "SharedSettings"]

_CLOSE_TIMEOUT_S = 2.0
_REOPEN_DELAY_S = (0.5, 30.0)  # IBKR's socket closed while the session lives: first and longest wait
_SHUTDOWN = 1001
_TOO_SLOW = 1008
_UPSTREAM_QUEUE = 10_000


@dataclass(frozen=True, slots=True)
class SharedSettings:
    """What the shared mode needs from the config."""

    ws_base_url: str
    access_token: str
    user_agent: str
    tls: ssl.SSLContext | None = None
    max_message_bytes: int = 1 << 20
    max_clients: int = 1000
    client_buffer: int = 1000
    upstream_keepalive_s: float = 45.0
    feed: FeedSettings = field(default_factory=FeedSettings)


@dataclass(eq=False, slots=True)
class _Client:
    """One connected client: its outgoing queue and how it ends."""

    id: ClientId
    send: Send
    queue: trio.MemorySendChannel[str | bytes]  # str: a text for ASGI; bytes: a pre-built frame (or its rest)
    out: trio.MemoryReceiveChannel[str | bytes]
    frames: FrameWriter | None = None  # the server's direct frame writer (None: ASGI sends only)
    writing: bool = False  # the writer holds a message it has not finished writing: nothing may overtake it
    queued: int = 0  # messages in ``queue`` the writer has not taken yet (no statistics object per delivery)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the handler's receive loop
    close_code: int | None = None  # set when the gateway ends the client: the writer's last frame
    close_reason: str = ""
    writer_done: trio.Event = field(default_factory=trio.Event)


class SharedHub:
    """One IBKR WebSocket per session, shared by every client connection (see the module contract)."""

    def __init__(self, *, manager: SessionManager, settings: SharedSettings) -> None:
        self._manager = manager
        self._settings = settings
        self.feed = Feed(settings.feed)
        self.counters = RelayCounters()  # ``open`` counts connected clients here
        self._clients: dict[ClientId, _Client] = {}
        self._ids = itertools.count(1)
        self._upstream_in, self._upstream_out = trio.open_memory_channel[str](_UPSTREAM_QUEUE)
        self._writers: trio.Nursery | None = None
        self._none_left = trio.Event()
        self._none_left.set()
        self._changed = trio.Event()  # the feed's deadlines may have moved
        self.upstream_connected = False
        self.upstream_opened_total = 0

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the client writers, the feed's timer and the per-session upstream loop (see the module contract)."""
        async with trio.open_nursery() as nursery:
            self._writers = nursery
            nursery.start_soon(self._timer)
            nursery.start_soon(self._sessions)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._writers = None

    async def wait_all_closed(self) -> None:
        """Return once no client is connected (used by the graceful drain)."""
        while self._clients:
            await self._none_left.wait()

    def snapshot(self) -> dict[str, object]:
        """``/session``'s ``shared`` section: clients, IBKR's socket, upstream subscriptions, subscribers per topic."""
        return {**self.feed.snapshot(), "upstream_connected": self.upstream_connected}

    # ------------------------------------------------------------------ carrying out the feed's actions

    def _apply(self, actions: Iterable[Action], *, reschedule: bool = True) -> None:
        """Carry out ``actions`` without waiting: upstream texts are queued for IBKR's writer (dropped while no
        socket is open: the feed re-subscribes on the next), client texts go into each recipient's queue.
        ``reschedule`` wakes the timer (the feed's deadlines may have moved; IBKR's ticks never move them)."""
        for action in actions:
            if isinstance(action, ToUpstream):
                if self.upstream_connected:
                    try:
                        self._upstream_in.send_nowait(action.text)
                    except trio.WouldBlock:
                        log.warning("shared WebSocket: IBKR's outgoing queue is full; a message was dropped")
                continue
            assert isinstance(action, ToClients)
            frame: bytes | None = None
            for client_id in action.clients:
                client = self._clients.get(client_id)
                if client is None or client.close_code is not None:
                    continue
                item: str | bytes = action.text
                if client.frames is not None:
                    if frame is None:
                        frame = text_frame(action.text.encode("utf-8"))  # built once, written to every client
                    item = frame
                    if not client.writing and not client.queued:
                        written = client.frames.try_write(frame)  # nothing queued: straight to the socket
                        if written == len(frame):
                            self.counters.messages_down += 1
                            continue
                        if written < 0:
                            continue  # closing: its handler ends it
                        if written:
                            item = b""  # the connection keeps the rest; the writer flushes it
                try:
                    client.queue.send_nowait(item)
                except trio.WouldBlock:
                    self._too_slow(client)
                except trio.ClosedResourceError:
                    pass
                else:
                    client.queued += 1
                    self.counters.messages_down += 1
        if reschedule:
            self._changed.set()

    def _too_slow(self, client: _Client) -> None:
        limit = self._settings.client_buffer
        log.warning(
            "shared WebSocket client %d closed (1008): %d messages waited unread (websocket.client_buffer)",
            client.id,
            limit,
        )
        self._end_client(client, _TOO_SLOW, f"too slow: {limit} messages unread (websocket.client_buffer)")

    def _end_client(self, client: _Client, code: int, reason: str) -> None:
        """Close ``client`` with ``code``: its writer sends what is queued, then the Close; its handler stops
        reading and releases its subscriptions."""
        if client.close_code is not None:
            return
        client.close_code, client.close_reason = code, reason
        client.queue.close()
        client.scope.cancel()

    # ------------------------------------------------------------------ clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI ``websocket`` connection whose path, route and origin were already checked."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        writers = self._writers
        if writers is None:
            raise RuntimeError("SharedHub.run() is not running")
        if len(self._clients) >= self._settings.max_clients:
            await refuse_over_limit(
                send,
                scope[ADMITTED_KEY],
                limit=self._settings.max_clients,
                holders="clients share the WebSocket",
                logger=log,
            )
            return
        queue, out = trio.open_memory_channel[str | bytes](self._settings.client_buffer)
        client = _Client(id=next(self._ids), send=send, queue=queue, out=out, frames=frame_writer(send))
        self._clients[client.id] = client
        self._none_left = trio.Event()
        self.counters.open += 1
        self.counters.opened_total += 1
        try:
            await send({"type": "websocket.accept"})
            writers.start_soon(self._client_writer, client)
            self._apply(self.feed.join(client.id))
            with client.scope:
                await self._read_client(client, receive)
        finally:
            del self._clients[client.id]
            self.counters.open -= 1
            if not self._clients:
                self._none_left.set()
            self._apply(self.feed.leave(client.id, trio.current_time()))
            client.queue.close()
            with trio.move_on_after(_CLOSE_TIMEOUT_S) as waiting:
                waiting.shield = True
                await client.writer_done.wait()

    async def _read_client(self, client: _Client, receive: Receive) -> None:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                client.close_code = client.close_code or 1000  # nothing more goes to a client that left
                return
            if kind != "websocket.receive":
                continue
            text = message.get("text")
            if text is None:
                data = message.get("bytes") or b""
                try:
                    text = bytes(data).decode("utf-8")
                except UnicodeDecodeError:
                    text = "\ufffd"  # the feed answers "unknown or malformed command"
            self.counters.messages_up += 1
            self._apply(self.feed.from_client(client.id, text, trio.current_time()))

    async def _client_writer(self, client: _Client) -> None:
        """Writes ``client``'s queue in order (with :meth:`_apply`'s direct writes, the only writer to it after the
        accept), then the Close if the gateway ends it. ``client.writing`` is set from taking a message until it is
        written, so a direct write never overtakes a queued one."""
        out = client.out
        try:
            async with out:
                async for item in out:
                    client.writing = True
                    client.queued -= 1
                    await self._write(client, item)
                    # What queued up meanwhile goes out without a trip through the scheduler per message
                    # (receive() checkpoints even when a message is waiting; each write has its own checkpoints).
                    while True:
                        try:
                            item = out.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        client.queued -= 1
                        await self._write(client, item)
                    client.writing = False
            if client.close_reason:  # the gateway ends it (a client that left has nothing more coming)
                await client.send({"type": "websocket.close", "code": client.close_code, "reason": client.close_reason})
        except Exception as exc:  # the client may already be gone; nothing left to tell it
            log.debug("shared WebSocket client %d: write ended (%s)", client.id, type(exc).__name__)
        finally:
            client.writer_done.set()

    @staticmethod
    async def _write(client: _Client, item: str | bytes) -> None:
        if isinstance(item, bytes):
            assert client.frames is not None
            await client.frames.write(item)
        else:
            await client.send({"type": "websocket.send", "text": item})

    # ------------------------------------------------------------------ IBKR's socket, one per session

    async def _sessions(self) -> None:
        """For each ready session, the upstream task in its nursery; reopened with back-off while it lives."""
        delay = _REOPEN_DELAY_S[0]
        while True:
            session = self._manager.active
            if session is None:
                await self._manager.wait_changed()
                continue
            done = trio.Event()
            try:
                await session.nursery.start(self._upstream, session, done)
            except RuntimeError:  # the session nursery is closing: wait for the next session
                await trio.lowlevel.checkpoint()
                continue
            opened_before = self.upstream_opened_total
            await done.wait()
            if session.ended.is_set():
                delay = _REOPEN_DELAY_S[0]
                continue
            if self.upstream_opened_total == opened_before:  # did not even open: wait longer each time
                delay = min(delay * 2, _REOPEN_DELAY_S[1])
            else:
                delay = _REOPEN_DELAY_S[0]
            with trio.move_on_after(delay):
                await session.ended.wait()

    async def _upstream(self, session: LiveSession, done: trio.Event, *, task_status: trio.TaskStatus[None]) -> None:
        """IBKR's socket for ``session`` (in the session's nursery): never raises; tells the feed when it ends."""
        task_status.started()
        settings = self._settings
        url, headers = websocket_request(
            settings.ws_base_url,
            access_token=settings.access_token,
            cookie=session.cookie.reveal(),
            user_agent=settings.user_agent,
        )
        connected = False
        try:
            async with connect_websocket(
                url,
                ssl_context=settings.tls,
                extra_headers=headers,
                max_message_bytes=settings.max_message_bytes,
                connect_timeout_s=10,
            ) as upstream:
                connected = True
                self.upstream_connected = True
                self.upstream_opened_total += 1
                self._drain_upstream_queue()
                log.info("shared WebSocket: IBKR's socket is open (generation %d)", session.generation)
                self._apply(self.feed.upstream_opened())
                batching = settings.feed.batch_interval_s > 0  # a first tick starts the batch's timer
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upstream_writer, upstream)
                    while True:
                        payload = await upstream.receive()
                        text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
                        self._apply(self.feed.from_upstream(text, trio.current_time()), reschedule=batching)
        # except*: the reader's or the writer's WebSocketClosed leaves the nursery above inside an exception group.
        except* WebSocketClosed as closed:
            exc = closed.exceptions[0]
            assert isinstance(exc, WebSocketClosed)
            log.info("shared WebSocket: IBKR closed its socket (%d %s)", exc.code, exc.reason)
        except* UpstreamError as failed:  # it did not open: refused, unreachable, broken, too slow
            log.warning("shared WebSocket: IBKR's socket did not open: %s", failed.exceptions[0])
        finally:
            self.upstream_connected = False
            if session.close_code == _SHUTDOWN and session.ended.is_set():
                for client in list(self._clients.values()):
                    self._end_client(client, _SHUTDOWN, "gateway shutting down")
            elif connected or not self.feed.ready:
                self._apply(self.feed.upstream_closed())
            done.set()

    def _drain_upstream_queue(self) -> None:
        """Forget texts queued for an earlier socket (the feed re-subscribes on this one)."""
        while True:
            try:
                self._upstream_out.receive_nowait()
            except trio.WouldBlock:
                return

    async def _upstream_writer(self, upstream: UpstreamWebSocket) -> None:
        """Send the feed's texts to IBKR, and ``tic`` at once and whenever ``upstream_keepalive_s`` passed."""
        keepalive = self._settings.upstream_keepalive_s
        await upstream.send_many(["tic"])
        while True:
            batch: list[str] = []
            with trio.move_on_after(keepalive):
                batch.append(await self._upstream_out.receive())
                while len(batch) < 64:
                    try:
                        batch.append(self._upstream_out.receive_nowait())
                    except trio.WouldBlock:
                        break
            await upstream.send_many(batch or ["tic"])

    async def _timer(self) -> None:
        """Run the feed's grace periods and renewals when they are due."""
        while True:
            self._changed = trio.Event()
            deadline = self.feed.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 3600):
                await self._changed.wait()
            now = trio.current_time()
            deadline = self.feed.next_deadline()
            if deadline is not None and deadline <= now:
                self._apply(self.feed.due(now))
