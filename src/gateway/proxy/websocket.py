"""One WebSocket relay between a client and IBKR's ``/v1/api/ws``: a task per direction, and the handler.

Contract:
- The *handler* (the server's task for the client connection, :meth:`WebSocketRelay.__call__`) takes a
  ``max_websockets`` slot, waits for a ready session and starts the *relay task* in that session's nursery. The
  relay task connects upstream, relays client→IBKR and closes IBKR's leg. Once IBKR has accepted, the handler
  accepts the client and starts the *client writer* in the relay's own nursery (:meth:`WebSocketRelay.run`): it
  relays IBKR→client and is the only task that writes to the client after the accept.
- Why three places: the server may hold a write to a client that does not read for as long as that connection stays
  open (hypercorn writes under a shield, with no deadline). Such a write must hold neither the session nursery (a
  session restart, the shutdown drain) nor the server's own task group for the connection (the server closes the
  socket, which is what ends the write, only once that group has ended — at shutdown, by cancelling the handler).
- Upstream is opened with ``?oauth_token=<access token>``, ``Cookie: api=<session from tickle>`` and the
  configured User-Agent; no Authorization header. Text and binary frames pass both ways unchanged.
- Either side closing closes the other with the same code where that code may be sent (1005/1006/1015 and
  reserved codes become 1011 toward the client, 1000 toward IBKR). If the session ends, the session nursery
  cancels the relay task, and the client is told first (1012 restart, 1001 shutdown), then IBKR.
- Keep-alive (IBKR closes a socket on which its client sent nothing for about a minute, and the seed's client sends
  ``tic`` right after the handshake because IBKR closes sockets silent just after it): the relay task writes ``tic``
  to IBKR right after the handshake, before anything the client sends, and again whenever nothing (the client's
  messages or a keep-alive) has gone up for ``upstream_keepalive_s``. Exactly one ``{"topic":"tic",…}`` answer per
  such keep-alive is dropped on its way to the client (it did not ask); an answer that has not come within
  ``upstream_keepalive_s`` is no longer waited for, so a client's own ``tic`` still gets its answer if IBKR stays
  silent. The keep-alive task lives in the relay task's own nursery and ends with it; its write has the same
  deadline as the client's writes to IBKR.
- Write deadlines: a write to the client still pending after ``client_write_timeout_s``, or one to IBKR after
  ``upstream_write_timeout_s``, means that peer has stopped taking our bytes: the relay ends with a warning, the
  client is closed with 1008 (it did not read) or 1011 (IBKR did not), IBKR's socket is closed. A watchdog task
  checks every relay's pending writes about once a second (two integer updates per write, no timer per message),
  so a stalled relay ends within its deadline + 1 s + ``_CLOSE_TIMEOUT_S``.
- The relay task never raises into the session nursery, and every close is shielded and bounded, so it ends within
  ``_CLOSE_TIMEOUT_S`` of being cancelled whatever either peer does; the slot is given back when it ends. A client
  writer stuck in a write to a client that does not read stays until the server closes that connection; by then it
  holds no slot and no upstream socket.
- ``max_relays`` (``server.max_websockets``) caps relays opening or open: the slot is taken before the relay waits
  for a session or connects upstream, so at no instant do more relays hold or open an upstream socket; one more
  upgrade is accepted and closed with 1013 (try again later), the Close's reason naming ``websocket_limit`` and
  the config key (a browser sees the code and reason of a Close, but nothing of a refused handshake).
- Every other upgrade that ends before accept is refused with the gateway's JSON error and one log line
  (:func:`gateway.asgi.refuse_upgrade`): 503 ``session_not_ready`` (no ready session within ``ready_timeout_s``;
  the message carries the session's last error) or ``session_ended`` (the session ended while the relay was
  opening), both with ``Retry-After``; 502 ``upstream_websocket_failed`` when IBKR refused or could not be reached.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gateway.asgi import Message, Receive, Scope, Send, UpgradeRefusal, refuse_over_limit, refuse_upgrade
from gateway.edge.request import ADMITTED_KEY, Admitted
from gateway.errors import SessionNotReady, UpstreamError
from gateway.session.paths import websocket_request
from gateway.session.supervisor import LiveSession, SessionManager
from gateway.upstream.wsclient import UpstreamWebSocket, WebSocketClosed, connect_websocket

log = logging.getLogger("gateway.websocket")

_CLOSE_TIMEOUT_S = 2.0
_MAX_BATCH = 64  # messages sent upstream in one write at most
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})
_CLIENT_TOO_SLOW = 1008  # policy violation: the client stopped reading what it asked for
_UPSTREAM_FAILURE = 1011
# The watchdog looks at most this far apart (and at least four times per deadline), so a stalled write is found
# between its deadline and one period later.
_MAX_WATCH_PERIOD_S = 1.0
_KEEPALIVE: tuple[str] = ("tic",)  # IBKR's session ping; its answer is {"topic":"tic","alive":true,...}
_MAX_TIC_REPLY_CHARS = 1024  # IBKR's answer is about 100 characters: anything longer is something else


def _ready_messages(receive: Receive) -> Callable[[], Message] | None:
    """A non-blocking take of the client's next ASGI message, when the server offers one, else ``None``.

    hypercorn hands the app a trio memory channel's bound ``receive``; its ``receive_nowait`` (raises
    ``trio.WouldBlock`` when nothing is queued) lets a relay send everything a client wrote in one burst upstream
    in one write. With any other server the relay simply sends message by message.
    """
    take = getattr(getattr(receive, "__self__", None), "receive_nowait", None)
    return take if callable(take) else None


def _with_real_session(text: str, session: LiveSession) -> str:
    """``text`` with the session's real cookie value when it is exactly ``{"session": <string>}``."""
    if len(text) > 1024:  # IBKR's session values are 32 hex digits: this is something else
        return text
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if isinstance(parsed, dict) and list(parsed) == ["session"] and isinstance(parsed["session"], str):
        return json.dumps({"session": session.cookie.reveal()})
    return text


def is_tic_reply(payload: str | bytes) -> bool:
    """True when ``payload`` (a text or binary frame) is IBKR's answer to ``tic``: a JSON object whose topic is tic."""
    if len(payload) > _MAX_TIC_REPLY_CHARS:
        return False
    if ('"tic"' not in payload) if isinstance(payload, str) else (b'"tic"' not in payload):
        return False  # cheap test first: a tic answer names its topic
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(parsed, dict) and parsed.get("topic") == "tic"


def relay_close_code(code: int | None, *, default: int = 1011) -> int:
    """A close code that may be sent on the other leg: valid codes pass, the rest become ``default``."""
    if code is None or code in _UNSENDABLE:
        return default
    if 1000 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return default


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """What a relay needs from the config."""

    ws_base_url: str  # ws:// or wss:// + host
    access_token: str
    user_agent: str
    ready_timeout_s: float
    max_message_bytes: int = 1 << 20
    max_relays: int = 1000
    tls: ssl.SSLContext | None = None
    client_write_timeout_s: float = 5.0  # server.websocket_ping_interval_s: the client is gone after this
    upstream_write_timeout_s: float = 15.0  # upstream.write_timeout_s: IBKR is gone after this
    upstream_keepalive_s: float = 45.0  # websocket.upstream_keepalive_s: a tic goes up after this much silence


@dataclass
class RelayCounters:
    """Live numbers for the status page (no secrets).

    ``slots`` is what ``server.max_websockets`` caps: relays *opening* (waiting for a ready session or for IBKR's
    handshake answer) plus relays *open*. A slot is taken before anything else happens to an upgrade and given back
    once, when the relay's upstream socket is closed (or was never opened). ``open`` counts only relays whose
    upstream WebSocket is connected (until its socket is closed), so ``/session`` and ``/metrics`` keep meaning
    "open relays"; ``slots - open`` (``opening`` in ``/session``) are the ones still opening.
    """

    open: int = 0
    slots: int = 0
    opened_total: int = 0
    messages_up: int = 0
    messages_down: int = 0
    clients: dict[int, object] = field(default_factory=dict)  # open relay → its client label (see status.py)


@dataclass(eq=False, slots=True)
class _Relay:
    """State of one relay, shared by the handler, the relay task and the client writer."""

    scope: Scope
    admitted: Admitted  # the request as the dispatcher let it through
    receive: Receive
    send: Send
    path: str
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the relay task's: cancel to end it
    down_scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the client writer's IBKR→client loop
    connected: trio.Event = field(default_factory=trio.Event)  # ``upstream`` is open, or the relay task ended
    down_done: trio.Event = field(default_factory=trio.Event)  # IBKR→client has stopped and the client was told
    done: trio.Event = field(default_factory=trio.Event)  # the relay task ended: upstream closed, slot given back
    upstream: UpstreamWebSocket | None = None
    close_code: int | None = None  # what the client is told when the gateway ends the relay
    failure: str | None = None  # why IBKR's WebSocket did not open (no secret): the client's 502 says it
    client_closed: bool = False  # nothing more goes to the client (a Close went out, or it disconnected)
    client_stuck: bool = False  # a write to the client has been pending past the deadline
    upstream_closing: bool = False  # a write to IBKR found its leg closed or broken: the client writer reads why
    started: bool = False  # the relay task runs (it then gives the slot back)
    holds_slot: bool = True  # a max_websockets slot is taken for this relay until its upstream socket is closed
    counted_open: bool = False
    # Write progress for the watchdog: each counter is odd while a write is pending.
    down_writes: int = 0
    up_writes: int = 0
    down_seen: int = 0
    down_since: float = 0.0
    up_seen: int = 0
    up_since: float = 0.0
    # Keep-alive: when something last went up (trio time), when the pending keep-alive write started (None: none
    # pending; the watchdog checks it like ``up_writes``), and until when each keep-alive's answer is dropped.
    up_last: float = 0.0
    keepalive_since: float | None = None
    keepalive_replies: list[float] = field(default_factory=list)


def _take_keepalive_reply(relay: _Relay) -> bool:
    """Count one tic answer against the relay's own keep-alives: ``True`` (drop it) when one still waits for its
    answer, ``False`` (the client's own ``tic`` was answered) otherwise."""
    replies = relay.keepalive_replies
    now = trio.current_time()
    while replies:
        if replies.pop(0) > now:
            return True
    return False


class WebSocketRelay:
    """Relays allow-listed WebSocket upgrades to IBKR under the current session."""

    def __init__(self, *, manager: SessionManager, settings: RelaySettings) -> None:
        self._manager = manager
        self._settings = settings
        self.counters = RelayCounters()
        self._none_open = trio.Event()
        self._none_open.set()
        self._watched: set[_Relay] = set()  # open relays whose writes the watchdog checks
        self._writers: trio.Nursery | None = None  # set while :meth:`run` runs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the client writers and the write-deadline watchdog; relays are served only while this runs.

        Run it beside the server (not inside it, nor in a session): cancelling it at shutdown is bounded once the
        server has closed its connections, which ends any write still pending to a client.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watchdog)
            self._writers = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._writers = None

    async def wait_all_closed(self) -> None:
        """Return once no relay is open (used by the graceful drain)."""
        while self.counters.open:
            await self._none_open.wait()

    # --- the handler: the server's task for the client connection ----------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI ``websocket`` connection whose path, route and origin were already checked."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        admitted: Admitted = scope[ADMITTED_KEY]
        path = admitted.request.path
        writers = self._writers
        if writers is None:
            raise RuntimeError("WebSocketRelay.run() is not running")
        counters = self.counters
        if counters.slots >= self._settings.max_relays:
            await refuse_over_limit(
                send, admitted, limit=self._settings.max_relays, holders="relays are open or opening", logger=log
            )
            return
        # The slot is taken here, with no checkpoint since the check: concurrent upgrades cannot all pass it.
        counters.slots += 1
        relay = _Relay(scope=scope, admitted=admitted, receive=receive, send=send, path=path)
        writer_started = False
        try:
            session = await self._start(relay)
            if session is None:
                return
            await relay.connected.wait()
            upstream = relay.upstream
            if upstream is None:  # refused, unreachable, or the session ended meanwhile
                await self._refuse(relay, self._opening_failed(relay, session))
                return
            await send(self._accept_message(relay))
            writers.start_soon(self._client_writer, relay, upstream, session)
            writer_started = True
            await relay.down_done.wait()
            await relay.done.wait()  # bounded: the relay task's close is
            await self._drain_client(relay)
        finally:
            relay.cancel_scope.cancel()
            if not writer_started:
                relay.down_done.set()  # nobody reads IBKR on this side: the relay task may
            else:
                relay.down_scope.cancel()  # the writer ends once its pending write (if any) does
            if not relay.started:  # no session, or cancelled before the relay task ran: nothing else gives it back
                self._release_slot(relay)

    async def _start(self, relay: _Relay) -> LiveSession | None:
        """Start the relay task in the ready session's nursery; ``None`` (client closed 1013) without a session."""
        while True:
            try:
                session = await self._manager.wait_ready(self._settings.ready_timeout_s)
            except SessionNotReady as exc:
                message = (
                    f"{exc}; the gateway keeps trying by itself: reconnect after Retry-After "
                    "(an upgrade waits up to session.ready_timeout_s for a session)"
                )
                await self._refuse(relay, UpgradeRefusal(503, exc.code, message, headers=(self._retry_after(),)))
                return None
            try:
                await session.nursery.start(self._run, relay, session)
            except RuntimeError:  # the session nursery is closing: wait for the next session
                await trio.lowlevel.checkpoint()
                continue
            return session

    def _retry_after(self) -> tuple[bytes, bytes]:
        return b"retry-after", str(self._manager.retry_after_s()).encode()

    def _opening_failed(self, relay: _Relay, session: LiveSession) -> UpgradeRefusal:
        """Why the relay ended before IBKR's WebSocket opened: the session ended meanwhile (503), or IBKR refused or
        could not be reached (502)."""
        if session.ended.is_set() and relay.close_code in (None, session.close_code):
            message = (
                f"the IBKR session ended while this WebSocket was opening (close code {session.close_code}: "
                "restart or shutdown); reconnect after Retry-After"
            )
            return UpgradeRefusal(503, "session_ended", message, headers=(self._retry_after(),))
        failure = relay.failure or "the relay failed while opening IBKR's WebSocket"
        message = f"{failure}; reconnect later"
        return UpgradeRefusal(502, "upstream_websocket_failed", message)

    async def _refuse(self, relay: _Relay, refusal: UpgradeRefusal) -> None:
        """Turn the client's upgrade away before accept (once; shielded and bounded), logged with its reason."""
        if relay.client_closed:
            return
        relay.client_closed = True
        request = relay.admitted.request
        with trio.move_on_after(_CLOSE_TIMEOUT_S) as cancel:
            cancel.shield = True
            try:
                await refuse_upgrade(
                    relay.send,
                    relay.scope,
                    refusal,
                    logger=log,
                    path=relay.path,
                    client=request.client,
                    origin=request.origin,
                    request_id=relay.admitted.request_id,
                )
            except Exception as exc:  # the client may already be gone; nothing left to tell it
                log.debug("%s: refusal not delivered: %s", relay.path, type(exc).__name__)

    @staticmethod
    def _accept_message(relay: _Relay) -> Message:
        accept: dict[str, object] = {"type": "websocket.accept"}
        if relay.admitted.request_id:
            accept["headers"] = [(b"x-request-id", relay.admitted.request_id.encode("ascii"))]
        if relay.admitted.request.subprotocol:
            accept["subprotocol"] = relay.admitted.request.subprotocol
        return accept

    @staticmethod
    def _client_close_code(relay: _Relay, session: LiveSession, upstream: UpstreamWebSocket | None) -> int:
        if relay.close_code is not None:  # the gateway ended the relay (deadline, session end, IBKR refused)
            return relay.close_code
        if session.ended.is_set():
            return session.close_code
        if upstream is not None and upstream.closed is not None:
            return relay_close_code(upstream.closed.code)
        return _UPSTREAM_FAILURE

    async def _client_writer(self, relay: _Relay, upstream: UpstreamWebSocket, session: LiveSession) -> None:
        """IBKR→client until IBKR's leg closes or the relay task ends the relay (cancelling ``down_scope``); then
        end the relay task and tell the client how the relay ended (in the relay's nursery; never raises)."""
        try:
            await self._upstream_to_client(relay, upstream)
            relay.cancel_scope.cancel()  # the relay task stops reading the client and closes IBKR's leg
            await self._close_client(relay, self._client_close_code(relay, session, upstream))
        except Exception:  # a relay must never take its siblings down
            log.exception("%s: relay failed", relay.path)
        finally:
            relay.cancel_scope.cancel()
            relay.down_done.set()

    async def _upstream_to_client(self, relay: _Relay, upstream: UpstreamWebSocket) -> None:
        counters = self.counters
        send = relay.send
        with relay.down_scope:
            while True:
                try:
                    payload = await upstream.receive()
                except WebSocketClosed:
                    return
                if relay.keepalive_replies and is_tic_reply(payload) and _take_keepalive_reply(relay):
                    continue  # the answer to the relay's own keep-alive: the client did not ask for it
                relay.down_writes += 1
                if isinstance(payload, str):
                    await send({"type": "websocket.send", "text": payload})
                else:
                    await send({"type": "websocket.send", "bytes": payload})
                relay.down_writes += 1
                counters.messages_down += 1

    async def _close_client(self, relay: _Relay, code: int) -> None:
        """Close the client leg once (shielded, bounded); used after accept (a refusal before it is :meth:`_refuse`)."""
        if relay.client_closed:
            return
        relay.client_closed = True
        with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            try:
                await relay.send({"type": "websocket.close", "code": code})
            except Exception as exc:  # the client may already be gone; nothing left to tell it
                log.debug("%s: client close not delivered: %s", relay.path, type(exc).__name__)

    async def _drain_client(self, relay: _Relay) -> None:
        """Take (and drop) what the client still sends, once the relay task no longer reads it, until nothing has
        come for ``_CLOSE_TIMEOUT_S``.

        The server hands the client's messages over through a small bounded queue, and its reader waits while that
        queue is full — even after the app has returned — so it would never see the client's Close or reset again,
        and the connection would stay for good. Messages can follow the disconnect: a reset seen by a write queues
        the disconnect while the reader is still handing over the frames of its last read, and a flooding client
        that went away may have left megabytes of frames in the socket's receive buffer. Hence a bound on silence
        rather than on the whole drain; it costs the handler task only (no slot, no upstream socket).
        """
        receive = relay.receive
        take = _ready_messages(receive)
        while True:
            with trio.move_on_after(_CLOSE_TIMEOUT_S):  # one timer per wait for the server's reader, not per message
                try:
                    await receive()
                    while take is not None:
                        take()
                except trio.WouldBlock:
                    pass  # all taken: wait for the reader again
                except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                    return  # a server that closes the queue: nothing left to drain
                continue
            return

    # --- the relay task: in the session's nursery -------------------------------------------------------------

    async def _run(self, relay: _Relay, session: LiveSession, *, task_status: trio.TaskStatus[None]) -> None:
        """The relay task (in the session nursery): never raises; always closes IBKR's leg and gives the slot back."""
        relay.started = True
        task_status.started()
        settings = self._settings
        try:
            with relay.cancel_scope:
                url, headers = websocket_request(
                    settings.ws_base_url,
                    access_token=settings.access_token,
                    cookie=session.cookie.reveal(),
                    user_agent=settings.user_agent,
                    query=relay.admitted.query,
                )
                try:
                    async with connect_websocket(
                        url,
                        ssl_context=settings.tls,
                        extra_headers=headers,
                        max_message_bytes=settings.max_message_bytes,
                        connect_timeout_s=10,
                    ) as upstream:
                        relay.upstream = upstream
                        self._opened(relay)
                        relay.connected.set()  # the handler accepts the client and starts the client writer
                        try:
                            await self._relay_up(relay, upstream, session)
                        finally:
                            await self._end_upstream(relay, upstream, session)
                except UpstreamError as exc:  # it did not open: refused, unreachable, broken, too slow
                    self._failed(relay, str(exc))
        except trio.Cancelled:
            raise
        except Exception:  # a relay must never take its siblings down
            log.exception("%s: relay failed", relay.path)
        finally:
            if relay.close_code is None and session.ended.is_set():
                relay.close_code = session.close_code
            relay.upstream = None
            relay.down_scope.cancel()  # the client writer stops relaying (if it still does) and tells the client
            relay.connected.set()
            self._closed(relay)
            relay.done.set()

    @staticmethod
    def _failed(relay: _Relay, failure: str) -> None:
        """IBKR's WebSocket did not open: log why (the client's refusal repeats it) and close with 1011."""
        log.warning("%s: %s", relay.path, failure)
        relay.failure = failure
        relay.close_code = _UPSTREAM_FAILURE

    def _opened(self, relay: _Relay) -> None:
        counters = self.counters
        counters.open += 1
        counters.opened_total += 1
        if counters.open == 1:
            self._none_open = trio.Event()
        client = relay.admitted.request.client  # real address behind trusted proxies
        counters.clients[id(relay)] = client
        relay.counted_open = True
        log.info("%s: WebSocket relay open client=%s", relay.path, client)
        self._watched.add(relay)

    def _closed(self, relay: _Relay) -> None:
        """The relay task ends: IBKR's socket is closed (or was never opened)."""
        self._watched.discard(relay)
        if relay.counted_open:
            relay.counted_open = False
            counters = self.counters
            counters.open -= 1
            client = counters.clients.pop(id(relay), "-")
            if not counters.open:
                self._none_open.set()
            log.info("%s: WebSocket relay closed client=%s", relay.path, client)
        self._release_slot(relay)

    def _release_slot(self, relay: _Relay) -> None:
        """Give the relay's ``max_websockets`` slot back (once, whoever calls first)."""
        if relay.holds_slot:
            relay.holds_slot = False
            self.counters.slots -= 1

    async def _relay_up(self, relay: _Relay, upstream: UpstreamWebSocket, session: LiveSession) -> None:
        """Client→IBKR with the keep-alive beside it, in the relay task's own nursery.

        The first keep-alive is written before the client's first message goes up. Whichever side ends (the client
        disconnected, or a write found IBKR's leg closed or broken) ends the other, so the keep-alive task never
        outlives the relay; a cancelled relay task cancels both.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self._keep_alive, relay, upstream, nursery.cancel_scope)
            await self._client_to_upstream(relay, upstream, session)
            nursery.cancel_scope.cancel()

    async def _keep_alive(
        self,
        relay: _Relay,
        upstream: UpstreamWebSocket,
        relay_up: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Send a keep-alive now (started once it is written) and whenever nothing has gone up for
        ``upstream_keepalive_s``; once IBKR's leg is closed or broken, cancel ``relay_up`` (client→IBKR too)."""
        interval = self._settings.upstream_keepalive_s
        alive = await self._send_keepalive(relay, upstream)
        task_status.started()
        while alive:
            await trio.sleep_until(relay.up_last + interval)
            if trio.current_time() - relay.up_last >= interval:  # else the client sent something meanwhile
                alive = await self._send_keepalive(relay, upstream)
        relay_up.cancel()

    async def _send_keepalive(self, relay: _Relay, upstream: UpstreamWebSocket) -> bool:
        """Write one ``tic`` to IBKR and expect its answer; ``False`` (and ``upstream_closing`` set, so the client
        writer tells the client why) when IBKR's leg is closed or broken."""
        now = trio.current_time()
        relay.up_last = now
        replies = relay.keepalive_replies
        replies[:] = [until for until in replies if until > now]  # answers that never came will not come now
        # Expected before the write: on loopback the answer may be read before this task runs again.
        replies.append(now + self._settings.upstream_keepalive_s)
        relay.keepalive_since = now
        try:
            await upstream.send_many(_KEEPALIVE)
        except WebSocketClosed:
            relay.upstream_closing = True
            return False
        finally:
            relay.keepalive_since = None
        return True

    async def _client_to_upstream(self, relay: _Relay, upstream: UpstreamWebSocket, session: LiveSession) -> None:
        """Client→IBKR until the client disconnects (its Close is passed on) or IBKR's leg is closed or broken.

        A client's ``{"session": …}`` message (IBKR's way to authenticate a socket; ibind sends it with the value it
        read from ``/tickle``, which the gateway answers with an opaque value) goes up with the session's real value.
        """
        counters = self.counters
        receive = relay.receive
        ready = _ready_messages(receive)
        while True:
            message = await receive()
            batch: list[str | bytes] = []
            disconnect: Message | None = None
            while True:  # what the client sent meanwhile goes up in one write (one system call, not one each)
                kind = message["type"]
                if kind == "websocket.receive":
                    data = message.get("bytes")
                    if data is not None:
                        batch.append(data)
                    else:
                        text = message.get("text") or ""
                        batch.append(_with_real_session(text, session) if text.startswith('{"session"') else text)
                elif kind == "websocket.disconnect":
                    disconnect = message
                    relay.client_closed = True
                    break
                if ready is None or len(batch) >= _MAX_BATCH:
                    break
                try:
                    message = ready()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            if batch:
                relay.up_last = trio.current_time()  # the keep-alive waits for this much silence again
                relay.up_writes += 1
                try:
                    await upstream.send_many(batch)
                except WebSocketClosed:
                    relay.upstream_closing = True  # the client writer reads why IBKR's leg closed and tells the client
                    return
                finally:
                    relay.up_writes += 1
                counters.messages_up += len(batch)
            if disconnect is not None:
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    scope.shield = True
                    await upstream.start_close(relay_close_code(disconnect.get("code"), default=1000))
                return

    async def _end_upstream(self, relay: _Relay, upstream: UpstreamWebSocket, session: LiveSession) -> None:
        """Close IBKR's leg, shielded and within ``_CLOSE_TIMEOUT_S`` in all.

        When the gateway ends the relay the client writer tells the client first. The peer's Close is read here only
        once the writer no longer reads IBKR (one reader at a time); if the handshake does not finish in time, or the
        writer may still read, the socket is closed without waiting.
        """
        self._watched.discard(relay)  # ending: bounded from here on
        if relay.close_code is None and session.ended.is_set():
            relay.close_code = session.close_code
        with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            if not relay.client_closed and not relay.upstream_closing:
                relay.down_scope.cancel()  # the client writer stops relaying and tells the client why
            if not relay.client_stuck:  # a stuck writer tells nobody anything: do not wait for it
                await relay.down_done.wait()
            await upstream.start_close(1000)  # no-op if a Close went out (the client's code) or a write failed
            if relay.down_done.is_set():
                await upstream.wait_closed()
        if upstream.closed is None:
            upstream.abort()

    # --- the watchdog: the write deadlines ---------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Check every open relay's pending writes against the deadlines (in :meth:`run`'s nursery)."""
        settings = self._settings
        period = min(_MAX_WATCH_PERIOD_S, settings.client_write_timeout_s / 4, settings.upstream_write_timeout_s / 4)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for relay in list(self._watched):
                self._check_writes(relay, now)

    def _check_writes(self, relay: _Relay, now: float) -> None:
        settings = self._settings
        writes = relay.down_writes
        if writes != relay.down_seen:
            relay.down_seen, relay.down_since = writes, now
        elif writes & 1 and now - relay.down_since >= settings.client_write_timeout_s:
            relay.client_stuck = True
            self._expire(relay, _CLIENT_TOO_SLOW, "the client", settings.client_write_timeout_s)
            return
        writes = relay.up_writes
        if writes != relay.up_seen:
            relay.up_seen, relay.up_since = writes, now
        elif writes & 1 and now - relay.up_since >= settings.upstream_write_timeout_s:
            self._expire(relay, _UPSTREAM_FAILURE, "IBKR", settings.upstream_write_timeout_s)
            return
        since = relay.keepalive_since  # a keep-alive write has its own mark: it may wait behind a client write
        if since is not None and now - since >= settings.upstream_write_timeout_s:
            self._expire(relay, _UPSTREAM_FAILURE, "IBKR", settings.upstream_write_timeout_s)

    def _expire(self, relay: _Relay, code: int, peer: str, deadline_s: float) -> None:
        self._watched.discard(relay)
        if relay.close_code is None:
            relay.close_code = code
        log.warning(
            "%s: %s took none of our bytes for %g s: relay closed (%d) client=%s",
            relay.path,
            peer,
            deadline_s,
            relay.close_code,
            relay.admitted.request.client,
        )
        relay.cancel_scope.cancel()
