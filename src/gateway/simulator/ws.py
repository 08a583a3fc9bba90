"""The simulator's WebSocket endpoint ``/v1/api/ws`` (ASGI): handshake checks, session attach, heartbeats,
``tic``/``ech+hb`` answers and ``smd``/``umd`` market-data streams (docs/protocol.md §9).

Handshake: ``oauth_token`` query = the access token and ``Cookie: api=<tickle session>``; a wrong or missing
token, or a wrong ``api`` cookie, is refused with an HTTP 401 (IBKR-shaped JSON body) and recorded. Without an
``api`` cookie the connection is accepted, the server sends ``{"message":"waiting for session"}`` and expects
``{"session":"<session>"}`` (a wrong one closes with 1008). Once attached: ``system``, ``act`` and ``sts``
messages, then a ``system`` heartbeat every ``heartbeat_s``. Subscriptions stream only changed fields every
``tick_interval_s`` and end after ``subscription_ttl_s``.

Idle rule (IBKR closes a socket whose client sends no ``tic``/``ech+hb`` for about a minute, docs/protocol.md §10.3):
a connection on which the client sent no message for ``ws_idle_close_s`` (60 s; ``None`` = never) is closed with
:data:`IDLE_CLOSE_CODE` and reason :data:`IDLE_CLOSE_REASON`, and recorded like any server close. Any message counts,
not only keep-alives; WebSocket pings do not (the server answers them itself). Assumption: IBKR's close code for an
idle socket is not documented; ibind users report closes from IBKR as 1000 with no reason, so 1000 it is, with a
reason that says why (clients see 1000 either way).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import trio

from gateway.simulator import payloads
from gateway.simulator.asgi import Receive, RequestInfo, Scope, Send, encode_json
from gateway.simulator.core import WsMessage
from gateway.simulator.hub import WsHandle
from gateway.simulator.market import DEFAULT_FIELDS
from gateway.simulator.verify import parse_query

if TYPE_CHECKING:
    from gateway.simulator.core import SimCore

log = logging.getLogger("gateway.simulator")

WS_PATH = "/v1/api/ws"
# What a send raises when hypercorn is closing the connection under it: stock hypercorn writes the EOF of a
# connection whose peer has closed outside its send lock, so a send racing that close fails (BusyResourceError)
# instead of being dropped as sends after a close are. The connection is over either way.
_CONNECTION_GONE = (trio.BusyResourceError, trio.BrokenResourceError, trio.ClosedResourceError)
MAX_WS_MESSAGES = 10_000
IDLE_CLOSE_CODE = 1000
IDLE_CLOSE_REASON = "idle"
MAX_FIELDS = 50


def _cookies(request: RequestInfo) -> dict[str, str]:
    jar: dict[str, str] = {}
    for header in request.header_values("cookie"):
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name:
                jar.setdefault(name.strip(), value.strip())
    return jar


async def _refuse(core: SimCore, request: RequestInfo, endpoint: str, send: Send, status: int, reason: str) -> None:
    core.record(request, endpoint, accepted=False, status=status, reason=reason)
    log.info("websocket handshake refused: %d %s", status, reason)
    body = encode_json(payloads.error_body(reason, status))
    headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})


async def handle_websocket(core: SimCore, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one WebSocket connection from handshake to close."""
    request = RequestInfo.from_scope(scope)
    first = await receive()
    if first.get("type") != "websocket.connect":
        return
    endpoint = WS_PATH if request.raw_path == WS_PATH else "unknown"
    if not (request.header("user-agent") or "").strip():
        await _refuse(core, request, endpoint, send, 403, "missing user-agent")
        return
    if core.faults.delay_s:
        await trio.sleep(core.faults.delay_s)
    fault = core.faults.take_request_fault(request.raw_path)
    if fault is not None:
        await _refuse(core, request, endpoint, send, fault.status, fault.reason)
        return
    if endpoint != WS_PATH:
        await _refuse(core, request, endpoint, send, 404, "not found")
        return
    query = dict(parse_query(request.raw_query) or [])
    token = query.get("oauth_token")
    if token is None:
        await _refuse(core, request, endpoint, send, 401, "missing oauth_token")
        return
    if token != core.view.access_token:
        await _refuse(core, request, endpoint, send, 401, "invalid oauth_token")
        return
    cookie = _cookies(request).get("api")
    if cookie is not None and (core.state.session_id is None or cookie != core.state.session_id):
        await _refuse(core, request, endpoint, send, 401, "invalid session cookie")
        return
    core.record(request, endpoint, accepted=True, status=101, reason="ok" if cookie else "waiting for session")
    await send({"type": "websocket.accept"})
    connection = _Connection(core, request, receive, send)
    core.hub.add(connection.handle)
    try:
        await connection.run(attached=cookie is not None)
    finally:
        core.hub.remove(connection.handle)


class _Connection:
    """One accepted WebSocket: a single writer task owns ``send``; everything else queues text to it."""

    def __init__(self, core: SimCore, request: RequestInfo, receive: Receive, send: Send) -> None:
        self.core = core
        self.request = request
        self.receive = receive
        self.send = send
        self.handle = WsHandle()
        self.send_lock = trio.Lock()
        self.outbox_in, self.outbox_out = trio.open_memory_channel[str](256)
        self.attached = False
        self.closing = False
        self.gone = False
        self.subscriptions: dict[int, trio.CancelScope] = {}
        self.nursery: trio.Nursery | None = None
        self.last_heard = trio.current_time()  # when the client last sent a message (the idle rule)

    async def run(self, *, attached: bool) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._close_watch)
            if self.core.config.ws_idle_close_s is not None:
                nursery.start_soon(self._idle_watch, self.core.config.ws_idle_close_s)
            if attached:
                await self._attach()
            else:
                await self._emit({"message": "waiting for session"})
            while True:
                message = await self.receive()
                kind = message.get("type")
                if kind == "websocket.disconnect":
                    nursery.cancel_scope.cancel()
                    break
                if kind == "websocket.receive":
                    self.last_heard = trio.current_time()
                    await self._on_message(message)
        if self.handle.close_code is not None and not self.gone:
            with trio.move_on_after(1.0):  # let the client answer our close frame before the socket goes
                while (await self.receive()).get("type") != "websocket.disconnect":
                    pass

    # ------------------------------------------------------------------ outgoing

    async def _send(self, message: dict[str, Any]) -> bool:
        """Send one ASGI message; False, and the connection's handler ends, if the server is closing it."""
        try:
            await self.send(message)
        except _CONNECTION_GONE:
            self.gone = True
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()
            return False
        return True

    async def _send_text(self, text: str) -> None:
        if self.core.ws_binary:
            await self._send({"type": "websocket.send", "bytes": text.encode("utf-8")})
        else:
            await self._send({"type": "websocket.send", "text": text})

    async def _writer(self) -> None:
        async for text in self.outbox_out:
            async with self.send_lock:
                if self.closing:
                    return  # nothing may follow our close frame
                await self._send_text(text)

    async def _close_watch(self) -> None:
        await self.handle.close_requested.wait()
        code = self.handle.close_code or 1000
        async with self.send_lock:
            self.closing = True
            if not await self._send({"type": "websocket.close", "code": code, "reason": self.handle.close_reason}):
                return
        self.core.recorder.add(
            time=self.core.now_s(),
            method="WS",
            path=self.request.raw_path,
            raw_query=self.request.raw_query,
            headers=(),
            endpoint=WS_PATH,
            accepted=True,
            status=code,
            reason=f"closed by server: {self.handle.close_reason or 'fault'}",
            count=False,
        )
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def _idle_watch(self, limit_s: float) -> None:
        """Ask for the idle close once the client has sent nothing for ``limit_s`` (see the module docstring)."""
        while True:
            await trio.sleep_until(self.last_heard + limit_s)
            if trio.current_time() - self.last_heard >= limit_s:  # else a message came meanwhile: wait on
                break
        log.info("websocket closed: the client sent nothing for %g s", limit_s)
        self.handle.request_close(IDLE_CLOSE_CODE, IDLE_CLOSE_REASON)

    async def _emit(self, obj: Any) -> None:
        await self.outbox_in.send(json.dumps(obj, separators=(",", ":")))

    # ------------------------------------------------------------------ session

    async def _attach(self) -> None:
        core = self.core
        self.attached = True
        session = core.state.session_id or ""
        authenticated, competing = core.tickle_status()
        await self._emit(payloads.ws_system_hello(paper=core.config.paper))
        await self._emit(payloads.ws_act(session, paper=core.config.paper))
        await self._emit(payloads.ws_sts(payloads.auth_status(authenticated=authenticated, competing=competing)))
        assert self.nursery is not None
        self.nursery.start_soon(self._heartbeat)

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.core.config.heartbeat_s)
            await self._emit(payloads.ws_heartbeat(self.core.now_ms()))

    # ------------------------------------------------------------------ incoming

    async def _on_message(self, message: Any) -> None:
        data = message.get("bytes")
        binary = data is not None
        if binary:
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                await self._emit({"error": "message is not UTF-8", "code": 1})
                return
        else:
            text = str(message.get("text") or "")
        self.core.ws_messages.append(WsMessage(self.handle.id, self.core.now_s(), text, binary))
        if len(self.core.ws_messages) > MAX_WS_MESSAGES:
            del self.core.ws_messages[: MAX_WS_MESSAGES // 2]
        text = text.strip()
        if not self.attached:
            await self._on_waiting(text)
            return
        topic, _, rest = text.partition("+")
        if text == "tic":
            await self._emit(payloads.ws_tic(self.core.state.session_id or "", self.core.now_ms()))
        elif text == "ech+hb":
            await self.outbox_in.send("ech+hb")
        elif topic == "smd":
            await self._subscribe(rest)
        elif topic == "umd":
            conid_text, _, _ = rest.partition("+")
            scope = self.subscriptions.pop(int(conid_text), None) if conid_text.isdigit() else None
            if scope is not None:
                scope.cancel()
        elif text.startswith("{"):
            await self._emit({"error": "unexpected message", "code": 1})
        else:
            await self._emit(payloads.ws_unknown_topic(topic))

    async def _on_waiting(self, text: str) -> None:
        session: object = None
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            session = parsed.get("session")
        if session is None:
            await self._emit({"message": "waiting for session"})
            return
        current = self.core.state.session_id
        if not isinstance(session, str) or current is None or session != current:
            log.info("websocket session message refused: invalid session")
            self.handle.request_close(1008, "invalid session")
            return
        await self._attach()

    async def _subscribe(self, rest: str) -> None:
        conid_text, _, args_text = rest.partition("+")
        topic = f"smd+{conid_text[:20]}"
        if not conid_text.isascii() or not conid_text.isdigit() or len(conid_text) > 12:
            await self._emit({"topic": topic, "error": "invalid conid"})
            return
        conid = int(conid_text)
        if self.core.market.instrument(conid) is None:
            await self._emit({"topic": topic, "error": "invalid conid"})
            return
        if not self.core.state.bridge:
            await self._emit({"topic": topic, "error": "no bridge"})
            return
        fields: tuple[str, ...] = DEFAULT_FIELDS
        if args_text.strip():
            try:
                args = json.loads(args_text)
            except (ValueError, RecursionError):
                args = None
            raw_fields = args.get("fields", []) if isinstance(args, dict) else None
            if not isinstance(raw_fields, list) or not all(
                isinstance(f, str | int) and not isinstance(f, bool) for f in raw_fields
            ):
                await self._emit({"topic": topic, "error": "invalid arguments"})
                return
            fields = tuple(str(f) for f in raw_fields[:MAX_FIELDS]) or DEFAULT_FIELDS
        old = self.subscriptions.pop(conid, None)
        if old is not None:
            old.cancel()
        scope = trio.CancelScope()
        self.subscriptions[conid] = scope
        assert self.nursery is not None
        self.nursery.start_soon(self._stream, conid, fields, scope)

    async def _stream(self, conid: int, fields: tuple[str, ...], scope: trio.CancelScope) -> None:
        core = self.core
        last: dict[str, str] = {}
        with scope, trio.move_on_after(core.config.subscription_ttl_s):
            while True:
                core.market.step(conid)
                values = core.market.fields(conid, fields)
                changed = {k: v for k, v in values.items() if last.get(k) != v}
                if changed:
                    last.update(changed)
                    tick: dict[str, Any] = {
                        "topic": f"smd+{conid}",
                        "conid": conid,
                        "conidEx": str(conid),
                        "_updated": core.now_ms(),
                        "server_id": "q0",
                        "6119": "q0",
                    }
                    tick.update(changed)
                    await self._emit(tick)
                await trio.sleep(core.config.tick_interval_s)
        if self.subscriptions.get(conid) is scope:
            del self.subscriptions[conid]
