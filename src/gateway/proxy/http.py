"""One proxied HTTP exchange: wait for a session, sign, stream the request up and the response down.

Contract:
- The request goes upstream with the client's method, raw path and raw query unchanged, only allow-listed
  headers, the configured User-Agent, and an ``Authorization`` header signed last under the session's current LST.
- A request body must arrive whole within ``body_timeout_s`` of the request (a client trickling it is answered
  408 and its connection closed). Bodies up to :data:`BUFFER_BODY_BYTES` — sized or chunked, all of IBKR's JSON
  bodies — are read whole before the request waits for a session or a pacing turn, so a slow client never holds
  an upstream connection or IBKR's pacing, and a body over the route's limit (413) never reaches IBKR; a chunked
  one goes up with ``Content-Length``, and a POST, PUT or PATCH without a body with ``Content-Length: 0``.
  Larger bodies (routes that allow them) stream up with backpressure; one cut by the deadline or the limit aborts
  its upstream exchange, so IBKR never sees a complete request. Response bytes are passed raw, so
  ``Content-Encoding`` and ``Content-Length`` stay consistent.
- No ready session within ``ready_timeout_s`` → 503 JSON with ``Retry-After``; paths outside ``/iserver/`` take a
  read-only session (brokerage session down, LST working) as ready. An upstream failure before the response
  started (:class:`~gateway.errors.UpstreamError`: no connection, a broken one, a malformed answer) → 502, a
  timeout → 504, each with a JSON body whose ``code`` and message say what failed.
- IBKR 401 (or 410): if the request merely raced an LST refresh (it was signed with the token just replaced, or
  while a refresh was in flight: IBKR rejects the old token as soon as it issues the new one), it waits for the new
  token. Otherwise the session manager confirms with a tickle under the same token
  (:meth:`~gateway.session.supervisor.SessionManager.confirm`): only a confirmed dead token renews the session. A
  request without a body and an idempotent method (:data:`~gateway.upstream.http1.REPLAYABLE`: GET, HEAD, OPTIONS)
  is then re-signed with a fresh nonce and sent once more (under the same token if it works, under the new
  session's otherwise); anything else is never re-sent: it gets IBKR's own answer when the token works, 503
  ``session_renewing`` when it is being renewed.
- Every answer from IBKR carries ``X-Gateway-Session: <generation>``, the session it was sent under; a new value
  means a new brokerage session at IBKR, whose per-session state (snapshot pre-flights, subscriptions) starts over.
- If the upstream fails after the response started, the client connection is aborted (a chunked response never
  gets its last chunk, a sized one is cut short): a truncated body never looks complete.
- If the client disconnects, the upstream exchange is cancelled.
- Every upstream attempt waits for its turn under IBKR's pacing (:class:`~gateway.pacing.Pacer`) before it is signed;
  a request that cannot get a turn within ``pacing.max_wait_s``, or arrives while an IBKR 429 holds all traffic,
  gets 429 with ``Retry-After`` and never reaches IBKR. Every upstream status is reported to the pacer.
- A reused upstream connection that fails before any byte of the answer (IBKR closed it as it was picked) costs an
  idempotent request without a body one more attempt on a new connection, under a pacing turn of its own: IBKR
  may have counted the first write. Anything else gets 502.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

import trio

from gateway.asgi import Receive, Scope, Send, send_error
from gateway.edge.request import ADMITTED_KEY, Admitted
from gateway.errors import PacingRejected, SessionNotReady, UpstreamError, UpstreamStale
from gateway.metrics import RequestMetrics
from gateway.pacing import Pacer
from gateway.proxy import transforms
from gateway.session.supervisor import LiveSession, SessionManager
from gateway.upstream.http1 import REPLAYABLE, Http1Pool, UpstreamResponse

log = logging.getLogger("gateway.proxy")

BROKERAGE_PREFIX = "/v1/api/iserver/"
PORTFOLIO_PREFIX = "/v1/api/portfolio/"
REFUSED = frozenset({401, 410})
"""IBKR's answers that may mean the session's token is dead: confirmed before anything is renewed."""
SESSION_HEADER = b"x-gateway-session"
"""On every answer from IBKR: the generation of the session it was sent under (see the module contract)."""
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods whose requests always say how long their body is upstream (``Content-Length: 0`` when there is none)."""
BUFFER_BODY_BYTES = 64 * 1024
"""A sized request body up to this is read whole before anything goes upstream (IBKR's bodies are small JSON)."""


class ClientGone(Exception):
    """The client disconnected before its request body was fully received."""


class BodyTooLarge(Exception):
    """The client's (chunked) request body grew past the route's limit."""


class BodyTimeout(Exception):
    """The client's request body did not arrive whole within ``body_timeout_s``."""


def _not_resent(where: str, why: str) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    """The 503 for a non-idempotent request IBKR refused under a token that is being replaced."""
    message = f"{where}: {why}. This request was not re-sent because it is not idempotent; retry it."
    return 503, "session_renewing", message, [(b"retry-after", b"1")]


class _Retry(enum.Enum):
    """What an attempt asks for next."""

    DONE = "done"
    RESIGN = "resign"  # same session, token refreshed meanwhile
    NEW_SESSION = "new_session"  # wait for the renewed session
    RESEND = "resend"  # a stale keep-alive connection failed before any answer: once more, on a new pacing turn
    SESSION_GONE = "session_gone"  # the session ended before this attempt was sent: not an attempt, wait for the next


@dataclass(slots=True)
class Outcome:
    """What the client was sent, for the log line: status (``499`` = client left first) and body bytes."""

    status: int = 499
    sent: int = 0


@dataclass(slots=True)
class _Exchange:
    """One client request on its way upstream: what is sent, and where the answer goes."""

    send: Send
    method: str
    path: str
    url: str
    target: bytes
    route: str  # the allow-list pattern that matched: the metrics label
    headers: list[tuple[bytes, bytes]]
    body: AsyncGenerator[bytes] | None
    retryable: bool
    outcome: Outcome
    resent_stale: bool = False

    @property
    def brokerage(self) -> bool:
        """Whether the request needs the brokerage session (``/iserver``); others work read-only, with the LST."""
        return self.path.startswith(BROKERAGE_PREFIX)

    @property
    def where(self) -> str:
        """``METHOD /path`` for messages and logs."""
        return f"{self.method} {self.path}"

    async def fail(
        self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer the client with the gateway's JSON error and note the status for the log line."""
        self.outcome.status = status
        await send_error(self.send, status, code, message, headers=headers or [])


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What one exchange needs from the config."""

    base_url: str
    user_agent: bytes
    ready_timeout_s: float
    body_timeout_s: float = 30.0


async def _request_body(receive: Receive, limit: int, deadline: float, received: int = 0) -> AsyncGenerator[bytes]:
    """The client's request body as it arrives (ASGI ``http.request`` messages), at most ``limit`` bytes in all
    (``received`` of them already taken), all of it before ``deadline`` (trio time)."""
    total = received
    while True:
        with trio.CancelScope(deadline=deadline) as waiting:
            message = await receive()
        if waiting.cancelled_caught:
            raise BodyTimeout
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _body_start(receive: Receive, limit: int, deadline: float) -> tuple[bytes, bool]:
    """The first :data:`BUFFER_BODY_BYTES` (or a little more) of the body, and whether that is all of it."""
    parts: list[bytes] = []
    size = 0
    async with aclosing(_request_body(receive, limit, deadline)) as body:
        async for chunk in body:
            parts.append(chunk)
            size += len(chunk)
            if size > BUFFER_BODY_BYTES:
                return b"".join(parts), False
    return b"".join(parts), True


async def _replay(start: bytes, rest: AsyncGenerator[bytes] | None = None) -> AsyncGenerator[bytes]:
    """A body whose start was read already (one piece), then the rest as it arrives."""
    if start:
        yield start
    if rest is not None:
        async with aclosing(rest):
            async for chunk in rest:
                yield chunk


async def _wait_for_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """After the body is read, the next ASGI message can only be ``http.disconnect``: cancel the exchange."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _body_too_large_answer(where: str, *, partly_sent: bool = False) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    """The 413 for a body that grew past the route's limit (the connection closes)."""
    what = "its start went upstream and that exchange was aborted" if partly_sent else "nothing was forwarded"
    return (
        413,
        "body_too_large",
        f"{where}: request body exceeds the route's limit; {what}",
        [(b"connection", b"close")],
    )


def _body_timeout_answer(where: str, timeout_s: float) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    """The 408 for a body that did not arrive in time: status, code, message, headers (the connection closes)."""
    return (
        408,
        "body_timeout",
        f"{where}: the request body did not arrive within {timeout_s:g} s (server.body_timeout_s); not forwarded",
        [(b"connection", b"close")],
    )


class HttpProxy:
    """Proxies allow-listed HTTP requests to IBKR under the current session."""

    def __init__(
        self,
        *,
        manager: SessionManager,
        upstream: Http1Pool,
        settings: ProxySettings,
        pacer: Pacer,
        metrics: RequestMetrics | None = None,
    ) -> None:
        self._manager = manager
        self._metrics = metrics  # observe_upstream(route, seconds) per upstream answer; see RequestMetrics
        self._upstream = upstream
        self._settings = settings
        self._pacer = pacer
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no proxied exchange is in flight (used by the graceful drain)."""
        while self.in_flight:
            await self._idle.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI ``http`` exchange the dispatcher admitted (its :class:`Admitted` is in the scope)."""
        admitted: Admitted = scope[ADMITTED_KEY]
        request = admitted.request
        started = time.monotonic()
        outcome = Outcome()
        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle
        try:
            await self._exchange(admitted, receive, send, outcome)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            log.info(
                "%s %s -> %d %.1f ms %d bytes client=%s",
                request.method,
                request.path,
                outcome.status,
                (time.monotonic() - started) * 1000,
                outcome.sent,
                request.client,  # X-Forwarded-For from trusted proxies
            )

    async def _exchange(self, admitted: Admitted, receive: Receive, send: Send, outcome: Outcome) -> None:
        settings = self._settings
        request = admitted.request
        method, raw_path, query = request.method, request.raw_path, admitted.query
        headers = transforms.upstream_request_headers(request.raw_headers)
        headers.append((b"user-agent", settings.user_agent))
        if transforms.header_value(headers, b"accept-encoding") is None:  # the client sent none that may go upstream
            headers.append((b"accept-encoding", b"identity"))
        length = request.header(b"content-length")  # the dispatcher let through one, all digits, or none
        chunked = request.chunked
        has_body = chunked or (length is not None and length.strip() not in (b"", b"0"))
        if length is not None and not chunked:
            headers.append((b"content-length", length.strip()))
        elif not chunked and method in BODY_METHODS:
            headers.append((b"content-length", b"0"))  # IBKR's edge answers 411 to a POST without a length
        path = request.path
        exchange = _Exchange(
            send=send,
            method=method,
            path=path,
            url=transforms.upstream_url(settings.base_url, raw_path, query),
            target=raw_path + b"?" + query if query else raw_path,
            route=admitted.route,
            headers=headers,
            body=None,
            retryable=method in REPLAYABLE and not has_body,
            outcome=outcome,
        )
        limit = admitted.max_body
        deadline = trio.current_time() + settings.body_timeout_s
        start, complete = b"", not has_body
        if has_body and (chunked or int(length or 0) <= BUFFER_BODY_BYTES):
            # Read before anything goes upstream: a slow or oversized body then holds no upstream connection or
            # pacing turn, and never reaches IBKR at all.
            try:
                start, complete = await _body_start(receive, limit, deadline)
            except ClientGone:
                return
            except BodyTimeout:
                await exchange.fail(*_body_timeout_answer(exchange.where, settings.body_timeout_s))
                return
            except BodyTooLarge:
                await exchange.fail(*_body_too_large_answer(exchange.where))
                return
            if complete and chunked:
                headers.append((b"content-length", str(len(start)).encode()))  # sized upstream
        session = await self._ready_session(exchange)
        if session is None:
            return
        with trio.CancelScope() as exchange_scope:
            async with trio.open_nursery() as watchers:
                if not has_body:
                    # Drain the (empty) request so the next receive() reports a disconnect.
                    await receive()
                elif complete:
                    exchange.body = _replay(start)
                else:
                    exchange.body = _replay(start, _request_body(receive, limit, deadline, len(start)))
                if complete:
                    watchers.start_soon(_wait_for_disconnect, receive, exchange_scope)
                try:
                    await self._send_upstream(exchange, session)
                finally:
                    watchers.cancel_scope.cancel()
                    if exchange.body is not None:  # not read to its end when the exchange failed: close it now
                        with trio.CancelScope(shield=True):
                            await exchange.body.aclose()

    async def _ready_session(self, exchange: _Exchange) -> LiveSession | None:
        """The ready session, or ``None`` after answering 503 with ``Retry-After``."""
        try:
            return await self._manager.wait_ready(self._settings.ready_timeout_s, brokerage=exchange.brokerage)
        except SessionNotReady as exc:
            hint = str(self._manager.retry_after_s()).encode()
            await exchange.fail(503, exc.code, str(exc), [(b"retry-after", hint)])
            return None

    async def _portfolio_ready(self, exchange: _Exchange, session: LiveSession) -> None:
        """A ``/portfolio`` request waits (bounded) until the session has read ``/portfolio/accounts`` under its
        current LST: IBKR refuses per-account portfolio calls before that."""
        if exchange.path.startswith(PORTFOLIO_PREFIX) and not session.portfolio_read.is_set():
            with trio.move_on_after(self._settings.ready_timeout_s):
                await session.portfolio_read.wait()

    async def _send_upstream(self, exchange: _Exchange, session: LiveSession) -> None:
        """Attempts, each in its own pacer turn: a second one only after a 401 (see the module contract), and one
        more for an idempotent request whose reused connection failed before any answer (IBKR may have counted the
        first, so the resend waits for a turn of its own)."""
        attempt = 0
        while True:
            await self._portfolio_ready(exchange, session)
            try:
                async with self._pacer.acquire(exchange.method, exchange.path):
                    retry = await self._attempt(exchange, session, attempt)
            except PacingRejected as exc:
                hint = str(math.ceil(exc.retry_after_s)).encode()
                await exchange.fail(429, exc.code, str(exc), [(b"retry-after", hint)])
                return
            if retry is _Retry.DONE:
                return
            if retry is _Retry.RESEND:
                continue
            if retry is not _Retry.SESSION_GONE:
                attempt += 1
            # A new session, or the brokerage session was found down meanwhile (an /iserver request waits for it).
            if retry in (_Retry.NEW_SESSION, _Retry.SESSION_GONE) or (exchange.brokerage and not session.brokerage):
                renewed = await self._ready_session(exchange)
                if renewed is None:
                    return
                session = renewed

    async def _attempt(self, exchange: _Exchange, session: LiveSession, attempt: int) -> _Retry:
        """Sign, send and relay once (inside the pacer's slot); says whether and how to try again."""
        if not session.usable:  # it ended while this request waited for its turn: nothing to send under it
            return _Retry.SESSION_GONE
        where = exchange.where
        signer = session.signer
        sent_at = time.monotonic()
        try:
            response = await self._upstream.send(
                exchange.method.encode("ascii"),
                exchange.target,
                exchange.headers,
                exchange.body,
                where,
                authorize=lambda: signer.authorization(exchange.method, exchange.url).encode("ascii"),
                resend_stale=False,
            )
        except UpstreamStale as exc:
            if exchange.retryable and not exchange.resent_stale:
                exchange.resent_stale = True
                return _Retry.RESEND
            await exchange.fail(exc.status, exc.code, str(exc))
            return _Retry.DONE
        except UpstreamError as exc:
            await exchange.fail(exc.status, exc.code, str(exc))
            return _Retry.DONE
        except ClientGone:
            return _Retry.DONE
        except BodyTooLarge:
            await exchange.fail(*_body_too_large_answer(where, partly_sent=True))
            return _Retry.DONE
        except BodyTimeout:
            await exchange.fail(*_body_timeout_answer(where, self._settings.body_timeout_s))
            return _Retry.DONE
        if self._metrics is not None:  # IBKR's latency: request written (body included) to response head read
            self._metrics.observe_upstream(exchange.route, time.monotonic() - sent_at)
        retry_after = response.header(b"retry-after")
        self._pacer.record_response(response.status, retry_after.decode("latin-1") if retry_after else None)
        if response.status in REFUSED and attempt == 0:
            # A request signed just before an LST refresh took effect is a race, not a dead session: IBKR rejects
            # the old token from the moment it issues the new one, before the new signer is in place here.
            if session.signer is not signer or session.refreshing:
                response.close()
                if not exchange.retryable:
                    await exchange.fail(*_not_resent(where, "IBKR rejected the request's token while it was being "
                                                     f"refreshed ({response.status})"))  # fmt: skip
                    return _Retry.DONE
                if session.usable:
                    await session.wait_refresh(self._settings.ready_timeout_s)
                    return _Retry.RESIGN  # re-sign under the refreshed token, same session
                return _Retry.NEW_SESSION
            # One refusal is not a verdict: a tickle under the same token decides (IBKR's answer is held meanwhile).
            try:
                alive = await self._manager.confirm(session, where)
            except BaseException:  # the client left (cancelled) while IBKR's answer was held: release it
                response.close()
                raise
            if not alive:
                response.close()
                if not exchange.retryable:
                    await exchange.fail(*_not_resent(where, "IBKR rejected the session's token; it is being renewed"))
                    return _Retry.DONE
                return _Retry.NEW_SESSION
            if exchange.retryable:
                response.close()
                return _Retry.RESIGN  # the token works: signed afresh and sent once more
            # Not idempotent, and the session is fine: IBKR's own answer goes to the client as it is.
        try:
            await self._relay_response(exchange.send, response, where, exchange.outcome, session.generation)
        finally:
            response.close()  # a body not read to its end (client gone, upstream broke off): never reused
        return _Retry.DONE

    async def _relay_response(
        self, send: Send, response: UpstreamResponse, where: str, outcome: Outcome, generation: int
    ) -> None:
        outcome.status = response.status
        headers = transforms.downstream_response_headers(response.headers)
        headers.append((SESSION_HEADER, str(generation).encode("ascii")))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        done = False
        while not done:
            try:
                chunk, done = await response.receive()
            except UpstreamError as exc:
                # Returning without the final body message makes the server close the connection mid-response.
                log.warning("%s: upstream failed mid-response after %d bytes: %s", where, outcome.sent, exc)
                return
            outcome.sent += len(chunk)
            if chunk or done:
                await send({"type": "http.response.body", "body": chunk, "more_body": not done})
