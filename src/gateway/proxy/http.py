"""One proxied HTTP exchange: wait for a session, sign, stream the request up and the response down.

Contract:
- The request goes upstream with the client's method, raw path and raw query unchanged, only allow-listed
  headers, the configured User-Agent, and an ``Authorization`` header signed last under the session's current LST.
- Bodies stream both ways with backpressure (nothing is buffered whole); response bytes are passed raw, so
  ``Content-Encoding`` and ``Content-Length`` stay consistent.
- No ready session within ``ready_timeout_s`` → 503 JSON with ``Retry-After``. Upstream connect failure → 502,
  timeout → 504, each with a JSON body saying what failed.
- IBKR 401 → the session is renewed, unless the request merely raced an LST refresh (it was signed with the token
  just replaced, or while a refresh was in flight: IBKR rejects the old token as soon as it issues the new one —
  then it waits for the new token); a request without a body and an idempotent method (GET, HEAD, OPTIONS) is
  re-signed with a fresh nonce and sent once more under the current token; anything else is never re-sent (503).
- If the upstream fails after the response started, the client connection is aborted (a chunked response never
  gets its last chunk, a sized one is cut short): a truncated body never looks complete.
- If the client disconnects, the upstream exchange is cancelled.
- Every upstream attempt waits for its turn under IBKR's pacing (:class:`~gateway.pacing.Pacer`) before it is signed;
  a request that cannot get a turn within ``pacing.max_wait_s``, or arrives while an IBKR 429 holds all traffic,
  gets 429 with ``Retry-After`` and never reaches IBKR. Every upstream status is reported to the pacer.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from gateway.asgi import Receive, Scope, Send, send_error
from gateway.errors import PacingRejected, SessionNotReady, UpstreamError
from gateway.metrics import RequestMetrics
from gateway.pacing import Pacer
from gateway.proxy import transforms
from gateway.session.supervisor import LiveSession, SessionManager
from gateway.upstream.http1 import Http1Pool, UpstreamResponse

log = logging.getLogger("gateway.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


class ClientGone(Exception):
    """The client disconnected before its request body was fully received."""


class BodyTooLarge(Exception):
    """The client's (chunked) request body grew past the route's limit."""


class _Retry(enum.Enum):
    """What an attempt asks for next."""

    DONE = "done"
    RESIGN = "resign"  # same session, token refreshed meanwhile
    NEW_SESSION = "new_session"  # wait for the renewed session


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
    body: AsyncIterator[bytes] | None
    retryable: bool
    outcome: Outcome

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


async def _request_body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """The client's request body as it arrives (ASGI ``http.request`` messages), at most ``limit`` bytes."""
    total = 0
    while True:
        message = await receive()
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


async def _wait_for_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """After the body is read, the next ASGI message can only be ``http.disconnect``: cancel the exchange."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


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
        """Handle one ASGI ``http`` exchange whose path and route were already checked by the dispatcher."""
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("ascii")
        query: bytes = scope.get("query_string", b"")
        path_text = raw_path.decode("ascii")
        started = time.monotonic()
        outcome = Outcome()
        self.in_flight += 1
        self._idle = trio.Event() if self.in_flight == 1 else self._idle
        try:
            await self._exchange(scope, receive, send, method, raw_path, query, outcome)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            log.info(
                "%s %s -> %d %.1f ms %d bytes client=%s",
                method,
                path_text,
                outcome.status,
                (time.monotonic() - started) * 1000,
                outcome.sent,
                scope.get("gateway.client", "-"),  # the dispatcher's ClientLabel: X-Forwarded-For from trusted proxies
            )

    async def _exchange(
        self, scope: Scope, receive: Receive, send: Send, method: str, raw_path: bytes, query: bytes, outcome: Outcome
    ) -> None:
        settings = self._settings
        client_headers: list[tuple[bytes, bytes]] = scope["headers"]
        headers = transforms.upstream_request_headers(client_headers)
        headers.append((b"user-agent", settings.user_agent))
        if transforms.header_value(headers, b"accept-encoding") is None:
            headers.append((b"accept-encoding", b"identity"))
        length = transforms.header_value(client_headers, b"content-length")
        chunked = transforms.header_value(client_headers, b"transfer-encoding") is not None
        has_body = chunked or (length is not None and length.strip() not in (b"", b"0"))
        if length is not None and not chunked:
            headers.append((b"content-length", length.strip()))
        path = raw_path.decode("ascii")
        exchange = _Exchange(
            send=send,
            method=method,
            path=path,
            url=transforms.upstream_url(settings.base_url, raw_path, query),
            target=raw_path + b"?" + query if query else raw_path,
            route=scope.get("gateway.route", path),
            headers=headers,
            body=None,
            retryable=method in IDEMPOTENT and not has_body,
            outcome=outcome,
        )
        session = await self._ready_session(exchange)
        if session is None:
            return
        with trio.CancelScope() as exchange_scope:
            async with trio.open_nursery() as watchers:
                if has_body:
                    exchange.body = _request_body(receive, scope.get("gateway.max_body", 1 << 62))
                else:
                    # Drain the (empty) request so the next receive() reports a disconnect.
                    await receive()
                    watchers.start_soon(_wait_for_disconnect, receive, exchange_scope)
                try:
                    await self._send_upstream(exchange, session)
                finally:
                    watchers.cancel_scope.cancel()

    async def _ready_session(self, exchange: _Exchange) -> LiveSession | None:
        """The ready session, or ``None`` after answering 503 with ``Retry-After``."""
        try:
            return await self._manager.wait_ready(self._settings.ready_timeout_s)
        except SessionNotReady as exc:
            hint = str(self._manager.retry_after_s()).encode()
            await exchange.fail(503, exc.code, str(exc), [(b"retry-after", hint)])
            return None

    async def _send_upstream(self, exchange: _Exchange, session: LiveSession) -> None:
        """At most two attempts (the second only after a 401, see the module contract), each in a pacer slot."""
        for attempt in (0, 1):
            try:
                async with self._pacer.acquire(exchange.method, exchange.path):
                    retry = await self._attempt(exchange, session, attempt)
            except PacingRejected as exc:
                hint = str(math.ceil(exc.retry_after_s)).encode()
                await exchange.fail(429, exc.code, str(exc), [(b"retry-after", hint)])
                return
            if retry is _Retry.DONE:
                return
            if retry is _Retry.NEW_SESSION:
                renewed = await self._ready_session(exchange)
                if renewed is None:
                    return
                session = renewed

    async def _attempt(self, exchange: _Exchange, session: LiveSession, attempt: int) -> _Retry:
        """Sign, send and relay once (inside the pacer's slot); says whether and how to try again."""
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
            )
        except UpstreamError as exc:
            await exchange.fail(exc.status, exc.code, str(exc))
            return _Retry.DONE
        except ClientGone:
            return _Retry.DONE
        except BodyTooLarge:
            await exchange.fail(
                413,
                "body_too_large",
                f"{where}: request body exceeds the route's limit; not forwarded completely",
                [(b"connection", b"close")],
            )
            return _Retry.DONE
        if self._metrics is not None:  # IBKR's latency: request written (body included) to response head read
            self._metrics.observe_upstream(exchange.route, time.monotonic() - sent_at)
        retry_after = response.header(b"retry-after")
        self._pacer.record_response(response.status, retry_after.decode("latin-1") if retry_after else None)
        if response.status == 401 and attempt == 0:
            response.close()
            # A request signed just before an LST refresh took effect is a race, not a dead session: IBKR rejects
            # the old token from the moment it issues the new one, before the new signer is in place here.
            raced = session.signer is not signer or session.refreshing
            if not raced:
                self._manager.report_unauthorized(session, where)
            if not exchange.retryable:
                why = (
                    "IBKR rejected the request's token while it was being refreshed (401)"
                    if raced
                    else "IBKR rejected the session (401); it is being renewed"
                )
                await exchange.fail(
                    503,
                    "session_renewing",
                    f"{where}: {why}. This request was not re-sent because it is not idempotent; retry it.",
                    [(b"retry-after", b"1")],
                )
                return _Retry.DONE
            if raced and session.usable:
                await session.wait_refresh(self._settings.ready_timeout_s)
                return _Retry.RESIGN  # re-sign under the refreshed token, same session
            return _Retry.NEW_SESSION
        try:
            await self._relay_response(exchange.send, response, where, exchange.outcome)
        finally:
            response.close()  # a body not read to its end (client gone, upstream broke off): never reused
        return _Retry.DONE

    async def _relay_response(self, send: Send, response: UpstreamResponse, where: str, outcome: Outcome) -> None:
        outcome.status = response.status
        headers = transforms.downstream_response_headers(response.headers)
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
