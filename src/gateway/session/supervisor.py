"""Keeps one IBKR session alive: handshake, tickle, recovery, LST refresh, back-off, and the per-session nursery.

Shape::

    SessionManager.run ── loop: handshake (LST → validate → ssodh/init → tickle until authenticated → warm-up)
                                └── per-session nursery ── keeper: tickle timer, brokerage re-open
                                                        ├── LST refresh timer
                                                        └── every WebSocket relay of this session

Contract:
- Warm-up: before a session is ready (and so before any client request goes upstream under it), the manager reads
  ``GET /iserver/accounts`` (IBKR answers snapshot and order endpoints 400 "Please query /accounts first" in a
  brokerage session where it was not read) and ``GET /portfolio/accounts`` (read before other ``/portfolio`` calls),
  each in a pacing turn like any request. A failed ``/iserver/accounts`` fails the handshake; a failed
  ``/portfolio/accounts`` is logged and noted, and the session opens anyway. The result is
  :attr:`LiveSession.accounts`. Every ready session has a new :attr:`LiveSession.generation`, which the proxy puts
  on every answer, so a client sees when per-session state at IBKR (snapshot pre-flights, the accounts read) is gone.
- Recovery follows the ladder of :data:`gateway.session.state.RECOVERY`. A session ends only when its LST is dead or
  unknown (IBKR refuses it on a tickle, 410, a failed tickle, LST expiry or a failed refresh): its nursery is
  cancelled, so tickle, refresh and every relay stop together (relays close their clients with
  :attr:`LiveSession.close_code`, 1012 here), and the manager runs the whole handshake again after
  :class:`~gateway.session.state.RestartPolicy`'s delay (never inside an open pacing breaker). A 401 to a client's
  request is first confirmed (:meth:`SessionManager.confirm`, one tickle at most per second); a brokerage session
  that IBKR reports unauthenticated or competing is re-opened with ``ssodh/init`` under the same LST while the
  session is *read-only* (routes outside ``/iserver`` keep working, relays stay open); a 429 on a session call
  feeds the pacing breaker and the session stays.
- Nothing in the per-session nursery raises into it: timers and relays report failures with
  :meth:`LiveSession.end`.
- :meth:`SessionManager.wait_ready` hands out only a session that is ready (with ``brokerage=False``, read-only will
  do); a request never goes upstream with an empty or stale token.
- :meth:`SessionManager.stop` closes relays with 1001 and stops the loop; :meth:`SessionManager.logout` then ends
  the brokerage session upstream (bounded), once in-flight requests have drained.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import httpx
import trio

from gateway.config.model import Credentials
from gateway.errors import GatewayError, PacingRejected, SessionNotReady, UpstreamError, UpstreamStatusError
from gateway.hints import Hint, hint_for
from gateway.logs import register_secret, scrub
from gateway.oauth.signer import RequestSigner
from gateway.pacing import Pacer
from gateway.pacing.model import PacingSettings
from gateway.redact import Secret
from gateway.session import calls
from gateway.session.paths import ISERVER_ACCOUNTS_PATH, PORTFOLIO_ACCOUNTS_PATH
from gateway.session.state import (
    RECOVERY,
    Backoff,
    Event,
    Remedy,
    RestartPolicy,
    State,
    Trouble,
    next_state,
    session_call_trouble,
)

log = logging.getLogger("gateway.session")
_T = TypeVar("_T")

CLOSE_SERVICE_RESTART = 1012
CLOSE_GOING_AWAY = 1001
_AUTH_POLLS = 10  # tickles (1 s apart) to wait for authenticated:true after ssodh/init
_LOGOUT_TIMEOUT_S = 3.0
TICKLE_SPACING_S = 1.0
"""IBKR's tickle limit is one a second: tickles (periodic, confirmations, polls) keep this far apart."""
CONFIRM_REUSE_S = 1.0
"""A confirmation tickle's verdict is reused this long (IBKR allows one tickle per second)."""
REOPEN_MAX_DELAY_S = 60.0
"""While read-only, ssodh/init is retried with back-off up to this (tickles keep the session alive meanwhile)."""
RECENT_ERRORS = 10
"""How many recent session errors the status keeps (oldest dropped first)."""
MAX_ERROR_CHARS = 300
"""A recorded error message is cut to this many characters (the status page shows short messages)."""

FAILURE_REASONS = ("handshake", *(trouble.value for trouble in Trouble), "other")
"""The bounded set of reasons a handshake fails or a session ends or loses its brokerage session
(``SessionStats.failures`` keys)."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """What the supervisor needs from the config, in one place."""

    base_url: str
    user_agent: str
    compete: bool
    tickle_interval_s: float
    backoff: Backoff
    ready_timeout_s: float = 10.0
    """How long a client waits for a session: bounds a confirmation as well."""
    refresh_margin_s: float = 300.0
    """Refresh the LST this long before IBKR's expiration (capped at 10 % of the token's lifetime)."""


@dataclass(eq=False)
class LiveSession:
    """One live IBKR session (one LST). ``signer`` and ``cookie`` change in place when the LST is refreshed.

    ``nursery`` is the per-session nursery: WebSocket relays of this session are started in it. ``brokerage`` says
    whether the brokerage session (``/iserver``) is open; without it the session is read-only. ``generation`` is new
    with every new LST session and every re-opened brokerage session.
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
    brokerage: bool = True
    portfolio_read: trio.Event = field(default_factory=trio.Event)  # /portfolio/accounts read under the current LST
    confirming: trio.Event | None = None  # set when the confirmation tickle in flight has its verdict
    confirmed_at: float = -1e9  # trio time of the last verdict that the LST works
    accounts: calls.Accounts = field(default_factory=lambda: calls.Accounts(iserver=(), selected=""))
    _poked: trio.Event = field(default_factory=trio.Event)
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

    def poke(self) -> None:
        """Wake the session's keeper from :meth:`sleep` (the brokerage session was lost)."""
        self._poked.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until :meth:`poke`."""
        with trio.move_on_after(seconds):
            await self._poked.wait()
        self._poked = trio.Event()

    @property
    def usable(self) -> bool:
        """True while the session has not ended."""
        return not self.ended.is_set()


@dataclass(frozen=True, slots=True)
class _Opened:
    """What opening the brokerage session gave: the cookie, and either the warm-up's accounts or the trouble."""

    cookie: Secret[str]
    accounts: calls.Accounts
    trouble: Trouble | None = None
    reason: str = ""


_LIVE = (State.READY, State.READ_ONLY)


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One recorded session error: when (epoch seconds), a short, secret-free message, and what it most likely
    means and how to fix it (:func:`gateway.hints.hint_for`; ``None`` when no rule knows it)."""

    at: float
    message: str
    hint: Hint | None = None


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
        entry = ErrorEntry(at=at, message=text, hint=hint_for(text))
        self.last_error = text
        self.last_error_at = at
        self.recent_errors.append(entry)
        return entry

    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    """Failed handshakes and ended sessions by kind (:data:`FAILURE_REASONS`)."""

    @property
    def last_hint(self) -> Hint | None:
        """The hint of the latest recorded error, if there is one and a rule knows it."""
        return self.recent_errors[-1].hint if self.recent_errors else None

    def last_error_with_fix(self) -> str:
        """``last_error`` followed by its fix (``"…; fix: …"``), or ``"none"`` when nothing failed yet."""
        if not self.last_error:
            return "none"
        hint = self.last_hint
        return f"{self.last_error}; fix: {hint.fix}" if hint is not None else self.last_error


class SessionManager:
    """Owns the session loop; see the module contract."""

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        credentials: Credentials,
        settings: SessionSettings,
        rng: Callable[[], float] = random.random,
        pacer: Pacer | None = None,
    ) -> None:
        self._client = client
        self._pacer = pacer if pacer is not None else Pacer(PacingSettings(enabled=False))
        self._tickle_lock = trio.Lock()
        self._tickle_done_at = -1e9
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
        """The ready session (brokerage session open), or ``None``."""
        session = self._active
        return session if session is not None and session.usable and self.state is State.READY else None

    @property
    def live(self) -> LiveSession | None:
        """The session whose LST works, ready or read-only, or ``None``."""
        session = self._active
        return session if session is not None and session.usable and self.state in _LIVE else None

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

    async def wait_ready(self, timeout_s: float, *, brokerage: bool = True) -> LiveSession:
        """The ready session, waiting up to ``timeout_s``; raises :class:`SessionNotReady` after that.

        ``brokerage=False`` takes a read-only session too (routes outside ``/iserver`` work with the LST alone).
        With a session ready it returns at once, without a checkpoint: it runs on every proxied request, and the
        proxy checkpoints right after (pacing, the upstream write).
        """
        session = self.active if brokerage else self.live
        if session is not None:
            return session
        with trio.move_on_after(timeout_s):
            while True:
                session = self.active if brokerage else self.live
                if session is not None:
                    return session
                if self.state in (State.STOPPING, State.STOPPED):
                    break
                await self._changed.wait()
        if self.state is State.READ_ONLY:
            raise SessionNotReady(
                f"the IBKR brokerage session (/iserver) is down and did not come back within {timeout_s:g} s; "
                f"routes outside /iserver work (read-only session). Last error: {self.stats.last_error_with_fix()}"
            )
        cause = f"; last error: {self.stats.last_error_with_fix()}" if self.stats.last_error else ""
        raise SessionNotReady(f"no IBKR session became ready within {timeout_s:g} s (state: {self.state.value}){cause}")

    async def wait_changed(self) -> None:
        """Return at the manager's next state move (for observers such as the systemd status line)."""
        await self._changed.wait()

    def report_unauthorized(self, session: LiveSession, where: str) -> None:
        """End ``session`` (once) because IBKR refused its LST (a confirmed 401): a new handshake starts."""
        if session.end(f"IBKR answered 401 to {where}", kind=Trouble.PROXY_401.value):
            log.warning("session ended: IBKR answered 401 to %s", where)

    async def confirm(self, session: LiveSession, where: str) -> bool:
        """IBKR refused a client's request under ``session`` (401/410): does the LST still work? One refusal is
        not a verdict (:data:`RECOVERY`): a tickle with the current LST decides. Concurrent callers share one
        tickle, and a verdict that the LST works is reused for :data:`CONFIRM_REUSE_S`. Returns whether the session
        lives on; a dead LST ends it (a new handshake starts)."""
        while session.usable:
            if trio.current_time() - session.confirmed_at < CONFIRM_REUSE_S:
                return True
            if session.confirming is not None:
                with trio.move_on_after(self._settings.ready_timeout_s):
                    await session.confirming.wait()
                continue
            session.confirming = trio.Event()
            try:
                trouble = await self._tickle(session)
                if trouble is None or RECOVERY[trouble] is not Remedy.RESTART:
                    session.confirmed_at = trio.current_time()
                    log.info("IBKR refused %s, but the session's token still works: the session stays", where)
                if trouble is not None:
                    self._handle(session, trouble, f"while confirming a refusal of {where}")
            finally:
                done, session.confirming = session.confirming, None
                done.set()
        return False

    def retry_after_s(self) -> int:
        """A ``Retry-After`` hint in whole seconds for clients turned away while no session is ready."""
        if self.stats.next_attempt_at is not None:
            return max(1, round(self.stats.next_attempt_at - time.time()) + 1)
        return 1

    # --- the loop -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run sessions until :meth:`stop`; reports started at once (readiness is :meth:`wait_ready`)."""
        task_status.started()
        policy = RestartPolicy(self._settings.backoff)
        failed_handshakes = 0
        ended: deque[float] = deque()  # when recent sessions ended (trio time), for the flapping rule
        with trio.CancelScope() as scope:
            self._loop_scope = scope
            while not self._stopping:
                self._move(Event.CONNECT if self.state is State.STARTING else Event.RETRY)
                opened = await self._one_session()
                if self._stopping:
                    break
                now = trio.current_time()
                if opened:
                    failed_handshakes = 0
                    ended.append(now)
                else:
                    failed_handshakes += 1
                while ended and now - ended[0] > policy.flap_window_s:
                    ended.popleft()
                delay = policy.delay(failed_handshakes, len(ended), self._rng())
                delay = max(delay, self._pacer.hold_s())  # IBKR's penalty box: a handshake inside it only extends it
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

    async def _one_session(self) -> bool:
        """Handshake and hold one session until it ends; returns whether it opened (ready or read-only)."""
        try:
            lst = await self._handshake_token()
            signer = calls.request_signer(self._credentials.identity, lst.token, self._credentials.query_rule)
            opened = await self._open_brokerage(signer)
        except GatewayError as exc:
            self._handshake_failed(str(exc))
            return False
        except Exception as exc:  # an upstream answer nobody foresaw must not take the gateway down
            log.exception("unexpected error during the handshake")
            self._handshake_failed(f"unexpected error during the handshake: {type(exc).__name__}")
            return False
        self._generation += 1
        async with trio.open_nursery() as nursery:
            session = LiveSession(
                generation=self._generation,
                signer=signer,
                cookie=opened.cookie,
                lst_expires_at_ms=lst.expires_at_ms,
                nursery=nursery,
                accounts=opened.accounts,
                brokerage=opened.trouble is None,
            )
            # Per LST, with or without a brokerage session; in the background, because IBKR allows one read per 5 s
            # and a quick re-handshake would otherwise wait for it. /portfolio requests wait for it (portfolio_read).
            nursery.start_soon(self._portfolio_warm_up, session)
            self._active = session
            if opened.trouble is None:
                self._move(Event.READY, f"generation {session.generation}")
            else:
                self._record_failure(opened.reason, opened.trouble.value)
                self._move(Event.READ_ONLY, f"generation {session.generation}, {opened.reason}")
            nursery.start_soon(self._keep, session)
            nursery.start_soon(self._refresh_loop, session)
            await session.ended.wait()
        self._active = None
        if not self._stopping:
            self.stats.sessions_ended += 1
            self._record_failure(session.end_reason, session.end_kind)
            self._move(Event.FAIL, session.end_reason)
        return True

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
        lst = await self._paced_call(
            calls.request_live_session_token(
                self._client,
                base_url=self._settings.base_url,
                credentials=self._credentials,
                user_agent=self._settings.user_agent,
            )
        )
        register_secret(lst.token.reveal(), slot="live_session_token")
        return lst

    async def _open_brokerage(self, signer: RequestSigner) -> _Opened:
        """ssodh/init, then tickle (1 s apart, bounded) until IBKR says authenticated, then the warm-up.

        Raises :class:`GatewayError` when the LST itself is in doubt (IBKR refused it, 410, no answer). A brokerage
        session that will not open (init refused, still unauthenticated or competing) is not an LST problem: the
        result then names the trouble, and the session opens read-only.
        """
        settings = self._settings
        try:
            await self._paced_call(
                calls.ssodh_init(
                    self._client,
                    base_url=settings.base_url,
                    signer=signer,
                    user_agent=settings.user_agent,
                    compete=settings.compete,
                )
            )
        except UpstreamStatusError as exc:
            if exc.upstream_status in (0, 401, 410):
                raise
            init_failed: UpstreamStatusError | None = exc  # e.g. another login holds it and compete = false
        else:
            init_failed = None
        cookie: Secret[str] | None = None
        trouble, reason = Trouble.UNAUTHENTICATED, "IBKR did not open the brokerage session"
        for poll in range(1 if init_failed is not None else _AUTH_POLLS):
            if poll:
                await trio.sleep(1.0)
            result = await self._tickle_call(signer)
            self._note_tickle(result)
            cookie = result.session
            if result.status.competing:
                trouble, reason = Trouble.COMPETING, "another login of this IBKR user holds the brokerage session"
                break
            if result.status.authenticated and init_failed is None:
                return _Opened(cookie, await self._warm_up(signer))
            else:
                trouble, reason = Trouble.UNAUTHENTICATED, "IBKR reports the brokerage session not authenticated"
        assert cookie is not None
        if init_failed is not None:
            reason = f"brokerage session not opened: {init_failed}"
        return _Opened(cookie, calls.Accounts(iserver=(), selected=""), trouble, reason)

    async def _tickle_call(self, signer: RequestSigner) -> calls.TickleResult:
        """One tickle, never sooner than :data:`TICKLE_SPACING_S` after the previous one's answer (IBKR allows one a
        second, counted where it arrives: spacing from the answer keeps any delay on the way from bunching them)."""
        settings = self._settings
        async with self._tickle_lock:
            wait = self._tickle_done_at + TICKLE_SPACING_S - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            try:
                return await self._paced_call(
                    calls.tickle(
                        self._client, base_url=settings.base_url, signer=signer, user_agent=settings.user_agent
                    )
                )
            finally:
                self._tickle_done_at = trio.current_time()

    async def _paced_call(self, call: Awaitable[_T], *, in_turn: bool = False) -> _T:
        """Await a session call and tell the pacer what IBKR answered (a 429 opens its breaker).

        ``in_turn``: the call holds a pacing turn (``pacer.acquire``), so every status is its own, the probe's
        included. Outside a turn (tickles, init, the LST) only a 429 is reported: a success there says nothing
        about the half-open breaker's probe.
        """
        try:
            result = await call
        except UpstreamStatusError as exc:
            if exc.upstream_status == 429 or (in_turn and exc.upstream_status):
                self._pacer.record_response(exc.upstream_status, None)
            raise
        if in_turn:
            self._pacer.record_response(200, None)
        return result

    async def _warm_up(self, signer: RequestSigner) -> calls.Accounts:
        """IBKR's per-session duties before any client request (module contract): the accounts reads."""
        settings = self._settings
        async with self._pacer.acquire("GET", ISERVER_ACCOUNTS_PATH, first=True):
            return await self._paced_call(
                calls.iserver_accounts(
                    self._client, base_url=settings.base_url, signer=signer, user_agent=settings.user_agent
                ),
                in_turn=True,
            )

    async def _portfolio_warm_up(self, session: LiveSession) -> None:
        """Read ``/portfolio/accounts`` under the session's current LST, then let ``/portfolio`` requests go."""
        try:
            portfolio = await self._read_portfolio(session.signer)
            session.accounts = replace(session.accounts, portfolio=portfolio)
        finally:
            session.portfolio_read.set()

    async def _read_portfolio(self, signer: RequestSigner) -> tuple[str, ...]:
        """``GET /portfolio/accounts`` under a new LST (IBKR wants it read before other ``/portfolio`` calls; it
        needs no brokerage session). Best effort: a failure is logged and noted, and ``()`` returned."""
        settings = self._settings
        try:
            async with self._pacer.acquire("GET", PORTFOLIO_ACCOUNTS_PATH):
                return await self._paced_call(
                    calls.portfolio_accounts(
                        self._client, base_url=settings.base_url, signer=signer, user_agent=settings.user_agent
                    ),
                    in_turn=True,
                )
        except (PacingRejected, UpstreamError) as exc:
            message = f"warm-up: {exc}; /portfolio calls may fail until a client reads /portfolio/accounts"
            log.warning("%s", message)
            self.stats.note_error(message, time.time())
            return ()

    def _note_tickle(self, result: calls.TickleResult) -> None:
        register_secret(result.session.reveal(), slot="session_cookie")
        self.stats.last_tickle_at = time.time()
        self.last_tickle = result.answer
        self.stats.authenticated = result.status.authenticated
        self.stats.competing = result.status.competing

    async def _tickle(self, session: LiveSession) -> Trouble | None:
        """One tickle under ``session``'s current LST; what it says is wrong, or ``None`` when all is well."""
        try:
            result = await self._tickle_call(session.signer)
        except UpstreamStatusError as exc:
            self.stats.note_error(f"tickle failed: {exc}", time.time())
            return session_call_trouble(exc.upstream_status)
        except GatewayError as exc:
            self.stats.note_error(f"tickle failed: {exc}", time.time())
            return Trouble.TICKLE_ERROR
        except Exception as exc:  # never raise into the session nursery
            log.exception("unexpected error in tickle")
            self.stats.note_error(f"tickle failed: unexpected {type(exc).__name__}", time.time())
            return Trouble.TICKLE_ERROR
        self._note_tickle(result)
        session.cookie = result.session
        if result.status.competing:
            return Trouble.COMPETING
        if not result.status.authenticated:
            return Trouble.UNAUTHENTICATED
        return None

    def _handle(self, session: LiveSession, trouble: Trouble, context: str) -> None:
        """Apply the ladder's remedy for ``trouble`` that is not a confirmation (that is the caller's)."""
        remedy = RECOVERY[trouble]
        if remedy is Remedy.RESTART:
            session.end(f"{trouble.value} {context}: {self.stats.last_error}", kind=trouble.value)
        elif remedy is Remedy.REOPEN and session.brokerage:
            session.brokerage = False
            what = "competing login" if trouble is Trouble.COMPETING else "brokerage session not authenticated"
            self._record_failure(f"{what} ({context}); re-opening it, read-only meanwhile", trouble.value)
            self._move(Event.LOST, what)
            session.poke()  # the keeper re-opens it now, not at its next tickle
        elif remedy is Remedy.WAIT:
            log.warning("IBKR paced a session call (%s); the session stays, traffic waits for the breaker", context)

    async def _keep(self, session: LiveSession) -> None:
        """The session's keeper: a tickle every ``tickle_interval_s`` (later while IBKR's pacing breaker is open),
        the ladder's remedy for what it says, and while read-only, ``ssodh/init`` again with back-off."""
        settings = self._settings
        reopen_failures = 0
        while True:
            if session.brokerage:
                await session.sleep(max(settings.tickle_interval_s, self._pacer.hold_s()))
                if not session.brokerage:
                    continue  # lost meanwhile (a confirmation saw it)
                trouble = await self._tickle(session)
                if trouble is not None:
                    self._handle(session, trouble, "on the periodic tickle")
                continue
            if await self._reopen(session):
                reopen_failures = 0
                continue
            reopen_failures += 1
            delay = min(REOPEN_MAX_DELAY_S, settings.tickle_interval_s, 2.0 ** min(reopen_failures, 16) / 2)
            await trio.sleep(max(delay, self._pacer.hold_s()))
            trouble = await self._tickle(session)  # keeps the read-only session alive, and watches the LST
            if trouble is not None and RECOVERY[trouble] is Remedy.RESTART:
                self._handle(session, trouble, "while read-only")

    async def _reopen(self, session: LiveSession) -> bool:
        """One attempt to re-open the brokerage session under the current LST; on success the warm-up runs, the
        generation moves on and the session is ready again. A dead LST ends the session (returns False)."""
        try:
            opened = await self._open_brokerage(session.signer)
        except PacingRejected as exc:  # the warm-up could not get a pacing turn: not the token's fault
            self.stats.note_error(f"re-opening the brokerage session: {exc}", time.time())
            return False
        except GatewayError as exc:
            self.stats.note_error(f"re-opening the brokerage session: {exc}", time.time())
            status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else 0
            self._handle(session, session_call_trouble(status), "re-opening the brokerage session")
            return False
        session.cookie = opened.cookie
        if opened.trouble is not None:
            self.stats.note_error(f"brokerage session still down: {opened.reason}", time.time())
            return False
        self._generation += 1
        session.generation = self._generation
        session.accounts = replace(opened.accounts, portfolio=session.accounts.portfolio)  # same LST, still read
        session.brokerage = True
        self._move(Event.REOPENED, f"brokerage session re-opened, generation {session.generation}")
        return True

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
            session.signer = calls.request_signer(self._credentials.identity, lst.token, self._credentials.query_rule)
            session.end_refresh()
            session.lst_expires_at_ms = lst.expires_at_ms
            session.started_at = time.time()
            self.stats.lst_refreshes += 1
            session.portfolio_read = trio.Event()  # a new LST: IBKR wants /portfolio/accounts read again
            session.nursery.start_soon(self._portfolio_warm_up, session)
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
