"""One WebSocket relay between a client and IBKR's ``/v1/api/ws``, owned by the session's nursery.

Contract:
- The handler (hypercorn's task) waits for a ready session and starts the relay *in that session's nursery*, then
  waits for it; if the client leaves, the handler cancels the relay. If the session ends, the session nursery
  cancels the relay, which closes the client with the session's close code (1012 restart, 1001 shutdown).
- Upstream is opened with ``?oauth_token=<access token>``, ``Cookie: api=<session from tickle>`` and the
  configured User-Agent; no Authorization header. Text and binary frames pass both ways unchanged.
- Either side closing closes the other with the same code where that code may be sent (1005/1006/1015 and
  reserved codes become 1011 toward the client, 1000 toward IBKR).
- A relay never raises into the session nursery, and every close is shielded and bounded.
- ``max_relays`` (``server.max_websockets``) caps relays opening or open: the slot is taken before the relay waits
  for a session or connects upstream, so at no instant do more relays hold or open an upstream socket; one more
  upgrade is accepted and closed with 1013 (try again later). See :class:`RelayCounters`.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

import trio

from gateway.asgi import Message, Receive, Scope, Send
from gateway.errors import SessionNotReady
from gateway.session.supervisor import LiveSession, SessionManager
from gateway.upstream.wsclient import UpstreamWebSocket, WebSocketClosed, WebSocketRejected, connect_websocket

log = logging.getLogger("gateway.websocket")

_CLOSE_TIMEOUT_S = 2.0
_MAX_BATCH = 64  # messages sent upstream in one write at most
_UNSENDABLE = frozenset({1004, 1005, 1006, 1015})


def _ready_messages(receive: Receive) -> Callable[[], Message] | None:
    """A non-blocking take of the client's next ASGI message, when the server offers one, else ``None``.

    hypercorn hands the app a trio memory channel's bound ``receive``; its ``receive_nowait`` (raises
    ``trio.WouldBlock`` when nothing is queued) lets a relay send everything a client wrote in one burst upstream
    in one write. With any other server the relay simply sends message by message.
    """
    take = getattr(getattr(receive, "__self__", None), "receive_nowait", None)
    return take if callable(take) else None


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


@dataclass
class RelayCounters:
    """Live numbers for the status page (no secrets).

    ``slots`` is what ``server.max_websockets`` caps: relays *opening* (waiting for a ready session or for IBKR's
    handshake answer) plus relays *open*. A slot is taken before anything else happens to an upgrade and given back
    once, when the relay's upstream socket is closed (or was never opened). ``open`` counts only relays whose
    upstream WebSocket is connected, so ``/session`` and ``/metrics`` keep meaning "open relays"; ``slots - open``
    (``opening`` in ``/session``) are the ones still opening, or closing their upstream socket.
    """

    open: int = 0
    slots: int = 0
    opened_total: int = 0
    messages_up: int = 0
    messages_down: int = 0
    clients: dict[int, object] = field(default_factory=dict)  # open relay → its client label (see status.py)


@dataclass(eq=False)
class _Relay:
    """State of one relay, shared between the handler and the task in the session nursery."""

    scope: Scope
    receive: Receive
    send: Send
    path: str
    done: trio.Event = field(default_factory=trio.Event)
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    client_closed: bool = False
    started: bool = False  # the relay task runs (it then gives the slot back)
    holds_slot: bool = True  # a max_websockets slot is taken for this relay until its upstream socket is closed


class WebSocketRelay:
    """Relays allow-listed WebSocket upgrades to IBKR under the current session."""

    def __init__(self, *, manager: SessionManager, settings: RelaySettings) -> None:
        self._manager = manager
        self._settings = settings
        self.counters = RelayCounters()
        self._none_open = trio.Event()
        self._none_open.set()

    async def wait_all_closed(self) -> None:
        """Return once no relay is open (used by the graceful drain)."""
        while self.counters.open:
            await self._none_open.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI ``websocket`` connection whose path, route and origin were already checked."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        path = (scope.get("raw_path") or scope["path"].encode()).decode("ascii")
        counters = self.counters
        if counters.slots >= self._settings.max_relays:
            log.warning("%s: refused, %d relays already open or opening (server.max_websockets)", path, counters.slots)
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        # The slot is taken here, with no checkpoint since the check: concurrent upgrades cannot all pass it.
        counters.slots += 1
        relay = _Relay(scope=scope, receive=receive, send=send, path=path)
        try:
            while True:
                try:
                    session = await self._manager.wait_ready(self._settings.ready_timeout_s)
                except SessionNotReady:
                    await send({"type": "websocket.close", "code": 1013})  # try again later; before accept → 403
                    return
                try:
                    await session.nursery.start(self._run, relay, session)
                except RuntimeError:  # the session nursery is closing: wait for the next session
                    await trio.lowlevel.checkpoint()
                    continue
                break
            await relay.done.wait()
        finally:
            relay.cancel_scope.cancel()
            if not relay.started:  # no session, or cancelled before the relay task ran: nothing else gives it back
                self._release_slot(relay)

    def _release_slot(self, relay: _Relay) -> None:
        """Give the relay's ``max_websockets`` slot back (once, whoever calls first)."""
        if relay.holds_slot:
            relay.holds_slot = False
            self.counters.slots -= 1

    def _upstream_url(self, path: str, query: bytes) -> str:
        token = "oauth_token=" + quote(self._settings.access_token, safe="")
        url = self._settings.ws_base_url + path + "?" + token
        return url + ("&" + query.decode("ascii") if query else "")

    async def _run(self, relay: _Relay, session: LiveSession, *, task_status: trio.TaskStatus[None]) -> None:
        """The relay task (in the session nursery): never raises; always closes both legs."""
        relay.started = True
        task_status.started()
        settings = self._settings
        try:
            with relay.cancel_scope:
                headers = [
                    (b"cookie", b"api=" + session.cookie.reveal().encode("ascii")),
                    (b"user-agent", settings.user_agent.encode("ascii")),
                ]
                try:
                    async with connect_websocket(
                        self._upstream_url(relay.path, relay.scope.get("query_string", b"")),
                        ssl_context=settings.tls,
                        extra_headers=headers,
                        max_message_bytes=settings.max_message_bytes,
                        connect_timeout_s=10,
                    ) as upstream:
                        accept: dict[str, object] = {"type": "websocket.accept"}
                        if relay.scope.get("gateway.request_id"):
                            accept["headers"] = [(b"x-request-id", relay.scope["gateway.request_id"].encode("ascii"))]
                        if relay.scope.get("gateway.subprotocol"):
                            accept["subprotocol"] = relay.scope["gateway.subprotocol"]
                        await relay.send(accept)
                        self.counters.open += 1
                        self.counters.opened_total += 1
                        if self.counters.open == 1:
                            self._none_open = trio.Event()
                        client = relay.scope.get("gateway.client", "-")  # real address behind trusted proxies
                        self.counters.clients[id(relay)] = client
                        log.info("%s: WebSocket relay open client=%s", relay.path, client)
                        try:
                            await self._pump(relay, upstream)
                        finally:
                            if session.ended.is_set():
                                # Tell the client first (1012 restart / 1001 shutdown), then close upstream.
                                await self._close_client(relay, session.close_code)
                            self.counters.open -= 1
                            self.counters.clients.pop(id(relay), None)
                            if not self.counters.open:
                                self._none_open.set()
                            log.info("%s: WebSocket relay closed client=%s", relay.path, client)
                except WebSocketRejected as exc:
                    log.warning("%s: upstream WebSocket refused: HTTP %d", relay.path, exc.status)
                    await self._close_client(relay, 1011)
                except OSError as exc:
                    log.warning("%s: cannot connect upstream WebSocket: %s", relay.path, exc.strerror or exc)
                    await self._close_client(relay, 1011)
                except trio.BrokenResourceError:
                    log.warning("%s: upstream WebSocket connection broke during the handshake", relay.path)
                    await self._close_client(relay, 1011)
                except trio.TooSlowError:
                    log.warning("%s: upstream WebSocket did not connect in time", relay.path)
                    await self._close_client(relay, 1011)
        except trio.Cancelled:
            raise
        except Exception:  # a relay must never take its siblings down
            log.exception("%s: relay failed", relay.path)
        finally:
            if not relay.client_closed and session.ended.is_set():
                with trio.CancelScope(shield=True):
                    await self._close_client(relay, session.close_code)
            self._release_slot(relay)  # the upstream socket is closed (or was never opened) by now
            relay.done.set()

    async def _pump(self, relay: _Relay, upstream: UpstreamWebSocket) -> None:
        async with trio.open_nursery() as pump:
            pump.start_soon(self._upstream_to_client, relay, upstream, pump.cancel_scope)
            await self._client_to_upstream(relay, upstream, pump.cancel_scope)  # this task: one task fewer per relay

    async def _client_to_upstream(self, relay: _Relay, upstream: UpstreamWebSocket, done: trio.CancelScope) -> None:
        counters = self.counters
        receive = relay.receive
        ready = _ready_messages(receive)
        while True:
            message = await receive()
            batch: list[str | bytes] = []
            while True:  # what the client sent meanwhile goes up in one write (one system call, not one each)
                kind = message["type"]
                if kind == "websocket.receive":
                    data = message.get("bytes")
                    batch.append(data if data is not None else message.get("text") or "")
                elif kind == "websocket.disconnect":
                    with contextlib.suppress(WebSocketClosed):
                        if batch:
                            await upstream.send_many(batch)
                            counters.messages_up += len(batch)
                    relay.client_closed = True
                    code = relay_close_code(message.get("code"), default=1000)
                    with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                        scope.shield = True
                        await upstream.start_close(code)  # the peer's answer is awaited when the connection closes
                    done.cancel()
                    return
                if ready is None or len(batch) >= _MAX_BATCH:
                    break
                try:
                    message = ready()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            if not batch:
                continue
            try:
                await upstream.send_many(batch)
            except WebSocketClosed:
                return  # the other direction sees the close and handles it
            counters.messages_up += len(batch)

    async def _upstream_to_client(self, relay: _Relay, upstream: UpstreamWebSocket, done: trio.CancelScope) -> None:
        counters = self.counters
        send = relay.send
        while True:
            try:
                payload = await upstream.receive()
            except WebSocketClosed as exc:
                await self._close_client(relay, relay_close_code(exc.code))
                done.cancel()
                return
            if isinstance(payload, str):
                await send({"type": "websocket.send", "text": payload})
            else:
                await send({"type": "websocket.send", "bytes": payload})
            counters.messages_down += 1

    async def _close_client(self, relay: _Relay, code: int) -> None:
        """Close the client leg once (shielded, bounded); before accept this rejects the handshake."""
        if relay.client_closed:
            return
        relay.client_closed = True
        with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            try:
                await relay.send({"type": "websocket.close", "code": code})
            except Exception as exc:  # the client may already be gone; nothing left to tell it
                log.debug("%s: client close not delivered: %s", relay.path, type(exc).__name__)
