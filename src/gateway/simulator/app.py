"""The simulator's ASGI application: IBKR's REST routes (verified strictly), the test routes, and dispatch of
WebSocket and admin traffic.

Order of decisions per IBKR request: User-Agent (403, like Akamai) -> Content-Length on body methods (411) ->
delay faults -> pacing (429; the request counts as it arrives) -> injected faults (fail_next, 429) -> OAuth
verification (401) -> brokerage bridge for ``/iserver`` (400 ``no bridge``) -> accounts read first (400) -> route
(404/405) -> handler. Every verdict is recorded. Bad input of any kind ends in an
IBKR-shaped 4xx; an internal error is a 500 with a log line, never a traceback to the client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import trio

from gateway.simulator import payloads
from gateway.simulator.admin import handle_admin
from gateway.simulator.asgi import (
    BodyTooLarge,
    ClientGone,
    Receive,
    RequestInfo,
    Scope,
    Send,
    consume_body,
    read_body,
    send_json,
)
from gateway.simulator.auth import Authentic, authenticate
from gateway.simulator.core import SimCore
from gateway.simulator.dh import answer_challenge, challenge_in_range, parse_hex_int
from gateway.simulator.faults import FaultResponse
from gateway.simulator.market import DEFAULT_FIELDS
from gateway.simulator.preconditions import (
    ACCOUNTS_FIRST_ERROR,
    PORTFOLIO_FIRST_ERROR,
    needs_iserver_accounts,
    needs_portfolio_accounts,
)
from gateway.simulator.records import redact_headers
from gateway.simulator.verify import Rejection, parse_query
from gateway.simulator.ws import handle_websocket

log = logging.getLogger("gateway.simulator")

API = "/v1/api"
LST_PATH = f"{API}/oauth/live_session_token"
INIT_PATH = f"{API}/iserver/auth/ssodh/init"
AUTH_STATUS_PATH = f"{API}/iserver/auth/status"
# The /iserver endpoints that answer without a brokerage session: opening one, and asking whether there is one.
BRIDGELESS = frozenset({INIT_PATH, AUTH_STATUS_PATH})
ISERVER_PREFIX = f"{API}/iserver/"
ECHO_PATH = f"{API}/sim/echo"
STREAM_PATH = f"{API}/sim/stream"
MAX_STREAM_BYTES = 1 << 34
MAX_CHUNK = 1 << 20
_PATTERN = bytes(range(256)) * 256  # 64 KiB of the repeating 0..255 pattern served by the stream route


def stream_pattern(n: int) -> bytes:
    """The first ``n`` bytes served by ``/v1/api/sim/stream``: ``bytes(range(256))`` repeated."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


class RequestError(Exception):
    """A handler's IBKR-shaped refusal."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class Reply:
    """What a handler answers: JSON (``body``) or a byte stream (``stream``), plus response headers."""

    status: int = 200
    body: Any = None
    stream: Callable[[], Iterator[bytes]] | None = None
    interval_s: float = 0.0
    content_length: int | None = None
    drop_after: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = "ok"


@dataclass
class Ctx:
    """One request being handled."""

    core: SimCore
    request: RequestInfo
    receive: Receive
    auth: Authentic
    body: bytes | None = None
    form: tuple[tuple[str, str], ...] = ()
    query: list[tuple[str, str]] = field(default_factory=list)

    def query_value(self, name: str) -> str | None:
        """First decoded query value of ``name``."""
        for key, value in self.query:
            if key == name:
                return value
        return None


Handler = Callable[[Ctx], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    """A REST route: allowed methods, handler, and whether to pre-read a (small) JSON/form body."""

    methods: frozenset[str]
    handler: Handler
    read_body: bool = False


# ------------------------------------------------------------------------------------------------ handlers


async def _lst(ctx: Ctx) -> Reply:
    core = ctx.core
    challenge = parse_hex_int(ctx.auth.header.get("diffie_hellman_challenge") or "")
    if challenge is None or not challenge_in_range(challenge, core.view.dh_prime):
        raise RequestError("invalid diffie_hellman_challenge", 401)
    grant = answer_challenge(
        challenge,
        core.new_server_secret(),
        prime=core.view.dh_prime,
        generator=core.view.dh_generator,
        prepend=core.view.prepend,
        consumer_key=core.view.consumer_key,
    )
    expires_ms = core.now_ms() + int(core.config.lst_ttl_s * 1000)
    core.state.issue_lst(grant.lst, expires_ms)
    log.info("live session token issued (#%d)", core.state.lst_issued)
    return Reply(
        body=payloads.lst_response(
            response_hex=grant.response_hex, signature_hex=grant.signature_hex, expires_ms=expires_ms
        )
    )


def _truthy(value: object, name: str, default: bool | None) -> bool:
    if value is None:
        if default is None:
            raise RequestError(f"{name} is required")
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(f"{name} must be a boolean")


def _json_object(ctx: Ctx) -> dict[str, Any] | None:
    """The JSON object body, None when there is no (non-form) body; RequestError when it is not an object."""
    if ctx.form or not ctx.body or not ctx.body.strip():
        return None
    try:
        data = json.loads(ctx.body)
    except (ValueError, RecursionError) as exc:
        raise RequestError("invalid json body") from exc
    if not isinstance(data, dict):
        raise RequestError("json body must be an object")
    return data


async def _ssodh_init(ctx: Ctx) -> Reply:
    data = _json_object(ctx)
    params: dict[str, object]
    if data is not None:
        params = data
    elif ctx.form:
        params = dict(ctx.form)
    else:
        params = dict(ctx.query)
    if not _truthy(params.get("publish"), "publish", None):
        raise RequestError("publish must be true")
    compete = _truthy(params.get("compete"), "compete", False)
    core = ctx.core
    opened = core.state.open_bridge(core.new_session_id(), compete=compete) is not None
    core.faults.on_init()
    authenticated, competing = core.tickle_status()
    # Refused because another platform holds the session: IBKR still answers 200 with a BrokerageSessionStatus,
    # whose authenticated:false / competing:true is what tells the client it is not ready.
    reason = "ok" if opened else "brokerage session held elsewhere (compete=false)"
    return Reply(body=payloads.auth_status(authenticated=authenticated, competing=competing), reason=reason)


async def _tickle(ctx: Ctx) -> Reply:
    core = ctx.core
    session = core.state.ensure_session(core.new_session_id())
    authenticated, competing = core.tickle_status()
    status = payloads.auth_status(authenticated=authenticated, competing=competing, connected=True)
    return Reply(
        body=payloads.tickle(
            session=session,
            sso_expires_ms=max(0, core.state.lst_expires_ms - core.now_ms()),
            status=status,
            bridge=core.state.bridge,
        )
    )


async def _auth_status(ctx: Ctx) -> Reply:
    authenticated, competing = ctx.core.tickle_status()
    return Reply(body={**payloads.auth_status(authenticated=authenticated, competing=competing), "fail": ""})


async def _logout(ctx: Ctx) -> Reply:
    core = ctx.core
    core.state.logout()
    await core.hub.close_all(1000, "logout", timeout_s=0.1)  # ask, do not hold the logout reply hostage
    return Reply(body={"status": True})


async def _iserver_accounts(ctx: Ctx) -> Reply:
    ctx.core.state.accounts_read = True
    return Reply(body=payloads.iserver_accounts(ctx.core.state.session_id, paper=ctx.core.config.paper))


async def _portfolio_accounts(ctx: Ctx) -> Reply:
    ctx.core.state.read_portfolio_accounts()
    return Reply(body=payloads.portfolio_accounts())


async def _secdef_search(ctx: Ctx) -> Reply:
    data = _json_object(ctx) if ctx.request.method == "POST" else None
    if data is not None:
        symbol = data.get("symbol")
        by_name = _truthy(data.get("name"), "name", False)
    else:
        symbol = ctx.query_value("symbol")
        by_name = _truthy(ctx.query_value("name"), "name", False)
    if not isinstance(symbol, str) or not symbol.strip():
        raise RequestError("symbol is required")
    return Reply(body=ctx.core.market.search(symbol[:64], by_name=by_name))


def _conid(text: str | None, name: str = "conid") -> int:
    if text is None or not text.strip():
        raise RequestError(f"{name} is required")
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise RequestError(f"invalid {name}")
    return int(text)


async def _snapshot(ctx: Ctx) -> Reply:
    raw = ctx.query_value("conids")
    if raw is None or not raw.strip():
        raise RequestError("conids is required")
    conids = [_conid(part, "conids") for part in raw.split(",") if part.strip()]
    if not conids or len(conids) > 100:
        raise RequestError("invalid conids")
    fields_raw = ctx.query_value("fields")
    fields = tuple(f.strip() for f in fields_raw.split(",") if f.strip()) if fields_raw else DEFAULT_FIELDS
    core = ctx.core
    now = core.now_ms()
    preflight = core.config.snapshot_preflight
    # IBKR answers a conid's first snapshot in a brokerage session with the bare entry (it only starts the
    # subscription then); the price fields come from the second request on.
    return Reply(
        body=[
            core.market.snapshot(c, () if preflight and core.state.first_snapshot(c) else fields, now) for c in conids
        ]
    )


async def _history(ctx: Ctx) -> Reply:
    conid = _conid(ctx.query_value("conid"))
    bar = ctx.query_value("bar")
    if not bar:
        raise RequestError("bar is required")
    period = ctx.query_value("period") or "1d"
    try:
        body = ctx.core.market.history(conid, period, bar, ctx.core.now_ms())
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return Reply(body=body)


async def _hash_body(ctx: Ctx) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    if ctx.body is not None:
        digest.update(ctx.body)
        size = len(ctx.body)
    else:

        def take(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            size += len(chunk)

        await consume_body(ctx.receive, take)
    return size, digest.hexdigest()


async def _echo(ctx: Ctx) -> Reply:
    size, sha = await _hash_body(ctx)
    request = ctx.request
    return Reply(
        body={
            "method": request.method,
            "path": request.raw_path,
            "query": request.raw_query,
            "headers": redact_headers(request.headers),
            "body_length": size,
            "body_sha256": sha,
        }
    )


async def _upload(ctx: Ctx) -> Reply:
    size, sha = await _hash_body(ctx)
    return Reply(body={"bytes": size, "sha256": sha})


def _int_param(ctx: Ctx, name: str, default: int, low: int, high: int) -> int:
    text = ctx.query_value(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 15 or not low <= int(text) <= high:
        raise RequestError(f"invalid {name}")
    return int(text)


async def _stream(ctx: Ctx) -> Reply:
    total = _int_param(ctx, "bytes", 1024, 0, MAX_STREAM_BYTES)
    chunk = _int_param(ctx, "chunk", 65536, 1, MAX_CHUNK)
    interval_ms = _int_param(ctx, "interval_ms", 0, 0, 60_000)
    chunked = ctx.query_value("chunked") in ("1", "true")
    drop, after = ctx.core.faults.take_drop()

    def produce() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            size = min(chunk, total - sent)
            offset = sent % 256
            piece = b""
            while len(piece) < size:
                take = min(size - len(piece), len(_PATTERN) - offset)
                piece += _PATTERN[offset : offset + take]
                offset = 0
            yield piece
            sent += size

    return Reply(
        stream=produce,
        interval_s=interval_ms / 1000,
        content_length=None if chunked else total,
        drop_after=(total // 2 if after is None else min(after, total)) if drop else None,
        headers=(("Content-Type", "application/octet-stream"),),
        reason="dropped mid-response" if drop else "ok",
    )


def _m(*methods: str) -> frozenset[str]:
    return frozenset(methods)


ROUTES: dict[str, Route] = {
    LST_PATH: Route(_m("POST"), _lst, read_body=True),
    INIT_PATH: Route(_m("POST"), _ssodh_init, read_body=True),
    f"{API}/tickle": Route(_m("GET", "POST"), _tickle, read_body=True),
    AUTH_STATUS_PATH: Route(_m("GET", "POST"), _auth_status, read_body=True),
    f"{API}/logout": Route(_m("POST"), _logout, read_body=True),
    f"{API}/iserver/accounts": Route(_m("GET"), _iserver_accounts),
    f"{API}/portfolio/accounts": Route(_m("GET"), _portfolio_accounts),
    f"{API}/portfolio/subaccounts": Route(_m("GET"), _portfolio_accounts),
    f"{API}/iserver/secdef/search": Route(_m("GET", "POST"), _secdef_search, read_body=True),
    f"{API}/iserver/marketdata/snapshot": Route(_m("GET"), _snapshot),
    f"{API}/iserver/marketdata/history": Route(_m("GET"), _history),
    STREAM_PATH: Route(_m("GET"), _stream),
    f"{API}/sim/upload": Route(_m("POST", "PUT"), _upload),
}
_ECHO_ROUTE = Route(_m("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"), _echo)


def match_route(raw_path: str) -> tuple[str, Route | None]:
    """``(endpoint name, route)`` for a raw path; the echo route also matches everything below it."""
    route = ROUTES.get(raw_path)
    if route is not None:
        return raw_path, route
    if raw_path == ECHO_PATH or raw_path.startswith(ECHO_PATH + "/"):
        return ECHO_PATH, _ECHO_ROUTE
    return "unknown", None


# ------------------------------------------------------------------------------------------------ the app


class SimulatorApp:
    """ASGI entry point (``lifespan``, ``http``, ``websocket`` scopes)."""

    def __init__(self, core: SimCore) -> None:
        self.core = core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await handle_websocket(self.core, scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = RequestInfo.from_scope(scope)
        if request.raw_path.startswith("/_sim/") or request.raw_path == "/_sim":
            await handle_admin(self.core, request, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
                date = (b"date", formatdate(self.core.now_s(), usegmt=True).encode("ascii"))
                message = {**message, "headers": [*message.get("headers", ()), date]}
            await send(message)

        try:
            await self._ibkr(request, receive, tracking_send)
        except ClientGone:
            self.core.record(
                request, match_route(request.raw_path)[0], accepted=False, status=499, reason="client disconnected"
            )
        except Exception as exc:
            log.error("internal simulator error (%s) on %s", type(exc).__name__, request.raw_path, exc_info=True)
            if not started:
                await send_json(send, 500, payloads.error_body("internal simulator error", 500))

    async def _reject(
        self,
        request: RequestInfo,
        endpoint: str,
        send: Send,
        status: int,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        authentication: bool = False,
    ) -> None:
        """Record and answer a refusal; an ``authentication`` 401 is answered tersely in ``terse_errors`` mode
        (the record keeps the precise reason; injected faults are always answered as given)."""
        self.core.record(request, endpoint, accepted=False, status=status, reason=reason)
        log.info("rejected %s %s: %d %s", request.method, request.raw_path, status, reason)
        if authentication and status == 401 and self.core.config.terse_errors:
            reason = payloads.terse_error(reason, secrets.randbelow(90000) + 10000)
        await send_json(send, status, payloads.error_body(reason, status), headers)

    def _pace(self, request: RequestInfo) -> FaultResponse | None:
        """The 429 pacing answers now (counting the request), or None; only IBKR's API paths are paced."""
        pacer = self.core.pacer
        if pacer is None or not request.raw_path.startswith(API + "/"):
            return None
        now = trio.current_time()
        refused = pacer.arrive(request.method, request.raw_path.removeprefix(API), now)
        if refused is None:
            return None
        retry_after = max(1, math.ceil(pacer.penalty_left(now)))
        return FaultResponse(refused.status, refused.reason, (("Retry-After", str(retry_after)),))

    def _accounts_unread(self, path: str) -> str | None:
        """The error for a call IBKR refuses until the accounts were read (``path`` below /v1/api), or None."""
        if not self.core.config.accounts_first:
            return None
        state = self.core.state
        if needs_iserver_accounts(path) and not state.accounts_read:
            return ACCOUNTS_FIRST_ERROR
        if needs_portfolio_accounts(path) and not state.portfolio_accounts_read:
            return PORTFOLIO_FIRST_ERROR
        return None

    async def _ibkr(self, request: RequestInfo, receive: Receive, send: Send) -> None:
        core = self.core
        endpoint, route = match_route(request.raw_path)
        if not (request.header("user-agent") or "").strip():
            await self._reject(request, endpoint, send, 403, "missing user-agent")
            return
        if request.method in ("POST", "PUT", "PATCH") and not (
            request.header_values("content-length") or request.header_values("transfer-encoding")
        ):
            await self._reject(request, endpoint, send, 411, "length required")
            return
        delay = core.faults.take_delay()
        if delay:
            await trio.sleep(delay)
        paced = self._pace(request)
        if paced is not None:
            await self._reject(request, endpoint, send, paced.status, paced.reason, paced.headers)
            return
        fault = core.faults.take_request_fault(request.raw_path)
        if fault is not None:
            await self._reject(request, endpoint, send, fault.status, fault.reason, fault.headers)
            return
        if not request.raw_path.startswith(API + "/"):
            await self._reject(request, endpoint, send, 404, "not found")
            return

        body: bytes | None = None
        form: tuple[tuple[str, str], ...] = ()
        content_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
        is_form = content_type == "application/x-www-form-urlencoded"
        if is_form or (route is not None and route.read_body):
            try:
                body = await read_body(receive, core.config.max_json_body)
            except BodyTooLarge:
                await self._reject(request, endpoint, send, 413, "request body too large")
                return
        if is_form and body:
            pairs = parse_query(body.decode("latin-1"))
            if pairs is None:
                await self._reject(request, endpoint, send, 400, "malformed form body")
                return
            form = tuple(pairs)

        verdict = authenticate(core, request, form, lst_request=request.raw_path == LST_PATH)
        if isinstance(verdict, Rejection):
            await self._reject(request, endpoint, send, verdict.status, verdict.reason, authentication=True)
            return
        if request.raw_path.startswith(ISERVER_PREFIX) and request.raw_path not in BRIDGELESS and not core.state.bridge:
            await self._reject(request, endpoint, send, 400, "no bridge")
            return
        unread = self._accounts_unread(request.raw_path.removeprefix(API))
        if unread is not None:
            await self._reject(request, endpoint, send, 400, unread)
            return
        if route is None:
            await self._reject(request, endpoint, send, 404, "not found")
            return
        if request.method not in route.methods:
            await self._reject(request, endpoint, send, 405, "method not allowed")
            return
        query = parse_query(request.raw_query) or []
        ctx = Ctx(core, request, receive, verdict, body=body, form=form, query=query)
        try:
            reply = await route.handler(ctx)
        except RequestError as exc:
            await self._reject(request, endpoint, send, exc.status, exc.reason, authentication=True)
            return
        core.record(request, endpoint, accepted=True, status=reply.status, reason=reply.reason, rule=verdict.rule)
        if reply.stream is None:
            await send_json(send, reply.status, reply.body, reply.headers)
            return
        # A streamed reply stops as soon as the client hangs up (hypercorn drops sends to a closed connection
        # silently, so without this the simulator would keep generating the whole body into the void).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await _send_stream(send, reply)
            nursery.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_stream(send: Send, reply: Reply) -> None:
    assert reply.stream is not None
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    if reply.content_length is not None:
        headers.append((b"content-length", str(reply.content_length).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    sent = 0
    for piece in reply.stream():
        if sent and reply.interval_s:
            await trio.sleep(reply.interval_s)
        if reply.drop_after is not None and sent + len(piece) >= reply.drop_after:
            part = piece[: reply.drop_after - sent]
            if part:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            log.info("dropping connection mid-response after %d bytes (fault)", reply.drop_after)
            return  # returning without the final body message makes hypercorn close the connection
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        sent += len(piece)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message.get("type") == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message.get("type") == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
