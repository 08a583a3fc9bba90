"""Keeps one brokerage session alive: handshake, tickle, LST refresh, back-off, and the per-session nursery.

Shape (design.md §1)::

    SessionManager.run ── loop: handshake (LST → validate → ssodh/init → tickle until authenticated)
                                └── per-session nursery ── tickle timer
                                                        ├── LST refresh timer
                                                        └── every WebSocket relay of this session

Contract:
- A session failure (failed tickle, ``authenticated:false``, an upstream 401 reported by the proxy, LST expiry or a
  failed refresh) ends the session: its nursery is cancelled, so tickle, refresh and every relay stop together
  (relays close their clients with :attr:`LiveSession.close_code`, 1012 here), then the manager backs off
  (exponential with jitter, capped) and runs the whole handshake again.
- Nothing in the per-session nursery raises into it: timers and relays report failures with
  :meth:`LiveSession.end`.
- :meth:`SessionManager.wait_ready` hands out only a session that is ready; a request never goes upstream with an
  empty or stale token.
- :meth:`SessionManager.stop` closes relays with 1001 and stops the loop; :meth:`SessionManager.logout` then ends
  the brokerage session upstream (bounded), once in-flight requests have drained.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from gateway.config.model import Credentials
from gateway.errors import GatewayError, SessionNotReady, UpstreamStatusError
from gateway.logs import register_secret, scrub
from gateway.redact import Secret
from gateway.session import calls
from gateway.session.state import Backoff, Event, State, next_state
from gateway.upstream.client import RequestSigner

log = logging.getLogger("gateway.session")

CLOSE_SERVICE_RESTART = 1012
CLOSE_GOING_AWAY = 1001
_AUTH_POLLS = 10  # tickles (1 s apart) to wait for authenticated:true after ssodh/init
_LOGOUT_TIMEOUT_S = 3.0
STABLE_SESSION_S = 60.0
"""A session ready at least this long resets the reconnect back-off; a shorter one counts as a failed attempt."""
RECENT_ERRORS = 10
"""How many recent session errors the status keeps (oldest dropped first)."""
MAX_ERROR_CHARS = 300
"""A recorded error message is cut to this many characters (the status page shows short messages)."""

FAILURE_REASONS = ("handshake", "tickle_error", "unauthenticated", "competing", "upstream_401", "lst_expired", "other")
"""The bounded set of reasons a handshake fails or a ready session ends (``SessionStats.failures`` keys)."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What the supervisor needs from the config, in one place."""

    base_url: str
    user_agent: str
    compete: bool
    tickle_interval_s: float
    backoff: Backoff
    refresh_margin_s: float = 300.0
    """Refresh the LST this long before IBKR's expiration (capped at 10 % of the token's lifetime)."""


@dataclass(eq=False)
class LiveSession:
    """One ready brokerage session. ``signer`` and ``cookie`` change in place when the LST is refreshed.

    ``nursery`` is the per-session nursery: WebSocket relays of this session are started in it.
    """

    generation: int
    signer: RequestSigner
    cookie: Secret[str]
    lst_expires_at_ms: int
    nursery: trio.Nursery
    started_at: float = field(default_factory=time.time)
    ended: trio.Event = field(default_factory=trio.Event)
    end_reason: str = ""
    end_kind: str = "other"
    close_code: int = CLOSE_SERVICE_RESTART
    _refresh_done: trio.Event | None = None  # set while an LST refresh is in flight

    @property
    def refreshing(self) -> bool:
        """True from the moment a new LST is asked for until the new signer is in place (or the refresh failed).

        IBKR rejects the old token as soon as it has issued the new one, so a 401 in this window is a race with the
        refresh, not a dead session.
        """
        return self._refresh_done is not None

    def begin_refresh(self) -> None:
        """Mark an LST refresh as in flight (see :attr:`refreshing`)."""
        self._refresh_done = trio.Event()

    def end_refresh(self) -> None:
        """The refresh is over (new signer installed, or it failed): wake requests waiting for it."""
        done, self._refresh_done = self._refresh_done, None
        if done is not None:
            done.set()

    async def wait_refresh(self, timeout_s: float) -> None:
        """Return when no refresh is in flight (at most ``timeout_s`` later)."""
        done = self._refresh_done
        if done is not None:
            with trio.move_on_after(timeout_s):
                await done.wait()

    def end(self, reason: str, *, close_code: int = CLOSE_SERVICE_RESTART, kind: str = "other") -> bool:
        """End this session (first caller wins); returns whether this call ended it.

        ``kind`` is one of :data:`FAILURE_REASONS` (the metrics label); ``reason`` is the human message.
        """
        if self.ended.is_set():
            return False
        self.end_reason = reason
        self.end_kind = kind
        self.close_code = close_code
        self.ended.set()
        self.nursery.cancel_scope.cancel()
        return True

    @property
    def usable(self) -> bool:
        """True while the session has not ended."""
        return not self.ended.is_set()


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One recorded session error: when (epoch seconds) and a short, secret-free message."""

    at: float
    message: str


@dataclass
class SessionStats:
    """Counters and timestamps for the status page, ``/session`` and ``/health`` (no secrets).

    ``recent_errors`` holds the last :data:`RECENT_ERRORS` errors, oldest first; add to it only through
    :meth:`note_error`, which scrubs registered secrets and shortens the message.
    """

    handshakes: int = 0
    handshake_failures: int = 0
    sessions_ended: int = 0
    lst_refreshes: int = 0
    last_error: str = ""
    last_error_at: float | None = None
    last_tickle_at: float | None = None
    authenticated: bool = False
    competing: bool = False
    next_attempt_at: float | None = None
    recent_errors: deque[ErrorEntry] = field(default_factory=lambda: deque(maxlen=RECENT_ERRORS))

    def note_error(self, message: str, at: float) -> ErrorEntry:
        """Record an error at ``at``: it becomes ``last_error`` and joins ``recent_errors`` (bounded).

        Defence in depth: error texts are built never to hold secrets, but any registered secret that slipped
        into one (say, echoed in an upstream body) is replaced by ``***`` before it is kept.
        """
        text = scrub(" ".join(message.split()))
        if len(text) > MAX_ERROR_CHARS:
            text = text[: MAX_ERROR_CHARS - 1] + "…"
        entry = ErrorEntry(at=at, message=text)
        self.last_error = text
        self.last_error_at = at
        self.recent_errors.append(entry)
        return entry

    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    """Failed handshakes and ended sessions by kind (:data:`FAILURE_REASONS`)."""


class SessionManager:
    """Owns the session loop; see the module contract."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        credentials: Credentials,
        settings: SessionSettings,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._credentials = credentials
        self._settings = settings
        self._rng = rng
        self.state = State.STARTING
        self.since = time.time()
        self._since_monotonic = time.monotonic()
        self._state_seconds = dict.fromkeys(State, 0.0)
        self.stats = SessionStats()
        self._active: LiveSession | None = None
        self._changed = trio.Event()
        self._generation = 0
        self._stopping = False
        self._stopped = trio.Event()
        self._loop_scope: trio.CancelScope | None = None
        self._last_session: LiveSession | None = None
        self.last_tickle: Mapping[str, Any] = {}
        """IBKR's latest tickle answer without the session cookie value (see :mod:`gateway.web.tickle`)."""

    # --- state ------------------------------------------------------------------------------------------

    @property
    def active(self) -> LiveSession | None:
        """The ready session, or ``None``."""
        session = self._active
        return session if session is not None and session.usable and self.state is State.READY else None

    def _move(self, event: Event, note: str = "") -> None:
        new = next_state(self.state, event)
        if new is not self.state:
            log.info("session %s -> %s%s", self.state.value, new.value, f": {note}" if note else "")
            now = time.monotonic()
            self._state_seconds[self.state] += now - self._since_monotonic
            self._since_monotonic = now
            self.state = new
            self.since = time.time()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def state_seconds(self) -> dict[State, float]:
        """Seconds spent in each state since start, the current one counted up to now."""
        spent = dict(self._state_seconds)
        spent[self.state] += time.monotonic() - self._since_monotonic
        return spent

    async def wait_ready(self, timeout_s: float) -> LiveSession:
        """The ready session, waiting up to ``timeout_s``; raises :class:`SessionNotReady` after that.

        With a session ready it returns at once, without a checkpoint: it runs on every proxied request, and the
        proxy checkpoints right after (pacing, the upstream write).
        """
        session = self.active
        if session is not None:
            return session
        with trio.move_on_after(timeout_s):
            while True:
                session = self.active
                if session is not None:
                    return session
                if self.state in (State.STOPPING, State.STOPPED):
                    break
                await self._changed.wait()
        raise SessionNotReady(f"no IBKR session became ready within {timeout_s:g} s (state: {self.state.value})")

    async def wait_changed(self) -> None:
        """Return at the manager's next state move (for observers such as the systemd status line)."""
        await self._changed.wait()

    def report_unauthorized(self, session: LiveSession, where: str) -> None:
        """The proxy saw IBKR answer 401 under ``session``: end it (once) so a new handshake starts."""
        if session.end(f"IBKR answered 401 to {where}", kind="upstream_401"):
            log.warning("session ended: IBKR answered 401 to %s", where)

    def retry_after_s(self) -> int:
        """A ``Retry-After`` hint in whole seconds for clients turned away while no session is ready."""
        if self.stats.next_attempt_at is not None:
            return max(1, round(self.stats.next_attempt_at - time.time()) + 1)
        return 1

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run sessions until :meth:`stop`; reports started at once (readiness is :meth:`wait_ready`)."""
        task_status.started()
        attempt = 0
        with trio.CancelScope() as scope:
            self._loop_scope = scope
            while not self._stopping:
                self._move(Event.CONNECT if self.state is State.STARTING else Event.RETRY)
                held_s = await self._one_session()
                if self._stopping:
                    break
                # Only a session that lasted resets the back-off: one that dies right after the handshake (a
                # competing login, an upstream that flaps) must not turn the loop into an LST hammer.
                attempt = 0 if held_s >= STABLE_SESSION_S else attempt + 1
                delay = self._settings.backoff.delay(min(attempt, 64), self._rng())
                self.stats.next_attempt_at = time.time() + delay
                log.info("next handshake in %.1f s", delay)
                await trio.sleep(delay)
                self.stats.next_attempt_at = None
        self._finish()

    def _finish(self) -> None:
        if self.state is not State.STOPPING:
            self._move(Event.SHUTDOWN)
        self._move(Event.STOPPED)
        self._stopped.set()

    async def _one_session(self) -> float:
        """Handshake and hold one session; returns how long it was ready, in seconds (0 if it never was)."""
        try:
            lst = await self._handshake_token()
            signer = RequestSigner(self._credentials.identity, lst.token)
            cookie = await self._establish(signer)
        except GatewayError as exc:
            self._handshake_failed(str(exc))
            return 0.0
        except Exception as exc:  # an upstream answer nobody foresaw must not take the gateway down
            log.exception("unexpected error during the handshake")
            self._handshake_failed(f"unexpected error during the handshake: {type(exc).__name__}")
            return 0.0
        self._generation += 1
        async with trio.open_nursery() as nursery:
            session = LiveSession(
                generation=self._generation,
                signer=signer,
                cookie=cookie,
                lst_expires_at_ms=lst.expires_at_ms,
                nursery=nursery,
            )
            self._active = session
            self._move(Event.READY, f"generation {session.generation}")
            nursery.start_soon(self._tickle_loop, session)
            nursery.start_soon(self._refresh_loop, session)
            ready_at = time.time()
            await session.ended.wait()
        self._active = None
        if not self._stopping:
            self.stats.sessions_ended += 1
            self._record_failure(session.end_reason, session.end_kind)
            self._move(Event.FAIL, session.end_reason)
        return time.time() - ready_at

    def _handshake_failed(self, reason: str) -> None:
        self._record_failure(reason, "handshake")
        self.stats.handshake_failures += 1
        self._move(Event.FAIL, reason)

    def _record_failure(self, reason: str, kind: str) -> None:
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1
        self.stats.note_error(reason, time.time())
        self.stats.authenticated = False
        log.warning("session failure: %s", reason)

    async def _handshake_token(self) -> calls.LiveSessionToken:
        self.stats.handshakes += 1
        lst = await calls.request_live_session_token(
            self._client,
            base_url=self._settings.base_url,
            credentials=self._credentials,
            user_agent=self._settings.user_agent,
        )
        register_secret(lst.token.reveal(), slot="live_session_token")
        return lst

    async def _establish(self, signer: RequestSigner) -> Secret[str]:
        """ssodh/init, then tickle (1 s apart, bounded) until IBKR says authenticated; returns the cookie."""
        settings = self._settings
        await calls.ssodh_init(
            self._client,
            base_url=settings.base_url,
            signer=signer,
            user_agent=settings.user_agent,
            compete=settings.compete,
        )
        for poll in range(_AUTH_POLLS):
            if poll:
                await trio.sleep(1.0)
            result = await calls.tickle(
                self._client, base_url=settings.base_url, signer=signer, user_agent=settings.user_agent
            )
            self._note_tickle(result)
            if result.status.competing:
                raise UpstreamStatusError("another session of this IBKR user is competing for the brokerage session")
            if result.status.authenticated:
                return result.session
        raise UpstreamStatusError(
            f"IBKR did not report the brokerage session authenticated after {_AUTH_POLLS} tickles"
        )

    def _note_tickle(self, result: calls.TickleResult) -> None:
        register_secret(result.session.reveal(), slot="session_cookie")
        self.stats.last_tickle_at = time.time()
        self.last_tickle = result.answer
        self.stats.authenticated = result.status.authenticated
        self.stats.competing = result.status.competing

    async def _tickle_loop(self, session: LiveSession) -> None:
        settings = self._settings
        while True:
            await trio.sleep(settings.tickle_interval_s)
            try:
                result = await calls.tickle(
                    self._client, base_url=settings.base_url, signer=session.signer, user_agent=settings.user_agent
                )
            except GatewayError as exc:
                session.end(f"tickle failed: {exc}", kind="tickle_error")
                return
            except Exception as exc:  # never raise into the session nursery
                log.exception("unexpected error in tickle")
                session.end(f"tickle failed: unexpected {type(exc).__name__}", kind="tickle_error")
                return
            self._note_tickle(result)
            session.cookie = result.session
            if result.status.competing:
                session.end("tickle: another session is competing for the brokerage session", kind="competing")
                return
            if not result.status.authenticated:
                session.end("tickle: IBKR says the brokerage session is not authenticated", kind="unauthenticated")
                return

    async def _refresh_loop(self, session: LiveSession) -> None:
        """Replace the LST before IBKR's expiration without ending the session."""
        while True:
            remaining = session.lst_expires_at_ms / 1000 - time.time()
            lifetime = max(0.0, session.lst_expires_at_ms / 1000 - session.started_at)
            margin = min(self._settings.refresh_margin_s, lifetime * 0.1)
            await trio.sleep(max(0.0, remaining - margin))
            session.begin_refresh()
            try:
                lst = await self._handshake_token()
            except Exception as exc:  # GatewayError or anything unforeseen: retry until the token expires
                session.end_refresh()
                reason = str(exc) if isinstance(exc, GatewayError) else f"unexpected {type(exc).__name__}"
                if not isinstance(exc, GatewayError):
                    log.exception("unexpected error refreshing the live session token")
                if time.time() * 1000 >= session.lst_expires_at_ms:
                    session.end(f"live session token expired and could not be refreshed: {reason}", kind="lst_expired")
                    return
                log.warning("LST refresh failed, retrying: %s", reason)
                self.stats.note_error(f"LST refresh failed, retrying: {reason}", time.time())
                await trio.sleep(min(30.0, max(1.0, margin / 4)))
                continue
            session.signer = RequestSigner(self._credentials.identity, lst.token)
            session.end_refresh()
            session.lst_expires_at_ms = lst.expires_at_ms
            session.started_at = time.time()
            self.stats.lst_refreshes += 1
            log.info("live session token refreshed")

    # --- shutdown ---------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop the loop and end the session with close code 1001 (relays close their clients).

        The ended session's signer is kept so :meth:`logout` can still end the brokerage session after in-flight
        requests have drained. Safe to call more than once.
        """
        if self._stopping:
            return
        self._stopping = True
        session = self._active
        self._last_session = session
        self._move(Event.SHUTDOWN)
        if session is not None and session.usable:
            session.end("gateway shutting down", close_code=CLOSE_GOING_AWAY)
        if self._loop_scope is not None:
            self._loop_scope.cancel()
        else:
            self._finish()

    async def logout(self) -> bool:
        """``POST /logout`` with the last session's signer (bounded); returns whether IBKR confirmed it."""
        session = self._last_session
        if session is None:
            return False
        with trio.move_on_after(_LOGOUT_TIMEOUT_S):
            try:
                await calls.logout(
                    self._client,
                    base_url=self._settings.base_url,
                    signer=session.signer,
                    user_agent=self._settings.user_agent,
                )
            except GatewayError as exc:
                log.warning("logout failed: %s", exc)
                return False
            log.info("logged out of IBKR")
            return True
        log.warning("logout did not finish within %.0f s", _LOGOUT_TIMEOUT_S)
        return False

    async def wait_stopped(self) -> None:
        """Return once the loop has stopped."""
        await self._stopped.wait()
