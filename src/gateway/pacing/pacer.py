"""Hold upstream requests to IBKR's pacing: the trio shell that sleeps and wakes tasks for the pure scheduler.

Usage (the proxy, around every upstream request)::

    async with pacer.acquire("GET", "/v1/api/iserver/marketdata/snapshot"):
        response = await send_upstream(...)
        pacer.record_response(response.status_code, response.headers.get("retry-after"))

All decisions live in :mod:`gateway.pacing.scheduler`; this module only reads ``trio.current_time()`` (so tests can
use ``MockClock``/``autojump_clock``), sleeps, and wakes the tasks whose tickets changed.

Waking discipline (no polling, no thundering herd): a waiting task sleeps on its own ``trio.Event`` until its
deadline. Grants, rejections and releases are decided synchronously by whichever task changes the state, and only
the affected tasks are woken. Time-based changes (a window slot expiring, a breaker cool-down ending) are handled by
one task, the *timekeeper* (the oldest waiter), which also sleeps until :attr:`Scheduler.next_change_at`; it is
poked whenever it changes or that instant moves earlier.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar

import trio

from gateway.errors import PacingRejected
from gateway.pacing.model import PacingSettings
from gateway.pacing.retry_after import parse_retry_after
from gateway.pacing.scheduler import Scheduler, Ticket, TicketState

# Which (pacer, ticket) the current task is sending under, so record_response can tell the probe's answer apart.
_CURRENT: ContextVar[tuple[Pacer, Ticket] | None] = ContextVar("gateway_pacing_ticket", default=None)


class Pacer:
    """Paces upstream traffic globally and per endpoint, and holds it while IBKR's 429 breaker is open.

    ``settings`` must be valid (see :func:`gateway.pacing.model.settings_problems`), else ``ValueError``. The pacer
    may be created outside ``trio.run``; every other method must run inside it.
    """

    def __init__(self, settings: PacingSettings) -> None:
        self.settings = settings
        self._scheduler = Scheduler(settings)
        self._events: dict[Ticket, trio.Event] = {}
        self._keeper: Ticket | None = None
        self._keeper_wake = math.inf
        self._disabled_429s = 0

    # -- stats -------------------------------------------------------------------------------------------------------

    @property
    def rejected_total(self) -> int:
        """Requests rejected with :class:`PacingRejected` since start."""
        return self._scheduler.rejected_total

    @property
    def upstream_429_total(self) -> int:
        """429 answers from IBKR fed to :meth:`record_response` since start."""
        return self._scheduler.upstream_429_total + self._disabled_429s

    @property
    def queued_now(self) -> int:
        """Requests waiting for their turn right now."""
        return self._scheduler.queued

    # -- the API -----------------------------------------------------------------------------------------------------

    def reconfigure(self, settings: PacingSettings) -> None:
        """Apply new settings live (config reload), keeping the breaker, counters, queue and recent grants (see
        :meth:`Scheduler.reconfigure`). Invalid ``settings`` raise ``ValueError`` and change nothing. Every waiting
        task is woken once to re-check under the new rules (a reload is rare; this keeps the wake-up logic simple).
        """
        self._scheduler.reconfigure(settings, trio.current_time())
        self.settings = settings
        self._keeper, self._keeper_wake = None, math.inf
        for event in list(self._events.values()):
            event.set()

    def acquire(self, method: str, path: str, *, first: bool = False) -> AbstractAsyncContextManager[None]:
        """Wait until ``method path`` may go upstream; the body of the ``async with`` is the upstream exchange.

        Waits (FIFO per rule; oldest first across rules for the global budget) until the breaker, the global window,
        the rule's window and its concurrency cap all allow the request, for at most ``settings.max_wait_s``;
        otherwise raises :class:`PacingRejected` with ``retry_after_s >= 1`` — at once when the wait is already
        known to be too long. A rejected or cancelled request takes nothing; a cancelled request that had just been
        granted gives its places back. The concurrency place is held until the block exits, however it exits.
        With ``settings.enabled`` false this does nothing. ``first`` queues it ahead of every waiting request (the
        session's own warm-up, which client requests wait for anyway).
        """
        return self._acquire(method, path, first)

    @asynccontextmanager
    async def _acquire(self, method: str, path: str, first: bool) -> AsyncIterator[None]:
        if not self.settings.enabled:
            yield
            return
        ticket = self._submit(method, path, first)
        granted = False
        try:
            await self._wait_for_grant(ticket)
            granted = True
        finally:
            if not granted:
                self._settle(self._scheduler.cancel(ticket, trio.current_time()), None)
        marker = _CURRENT.set((self, ticket))
        try:
            yield
        finally:
            _CURRENT.reset(marker)
            self._settle(self._scheduler.release(ticket, trio.current_time()), None)

    def record_response(self, status: int, retry_after: str | None) -> None:
        """Feed the status of every upstream answer (call it inside the ``acquire`` block).

        A 429 opens the breaker for the cool-down, or for ``retry_after`` (delay-seconds or HTTP-date; junk is
        ignored) if longer. Inside the block the answer is attributed to its request, so only the probe's answer
        can close a half-open breaker; outside, an answer is taken as the probe's.
        """
        if not self.settings.enabled:
            if status == 429:
                self._disabled_429s += 1
            return
        retry_after_s = parse_retry_after(retry_after, time.time()) if status == 429 else None
        current = _CURRENT.get()
        ticket = current[1] if current is not None and current[0] is self else None
        self._settle(self._scheduler.on_response(ticket, status, retry_after_s, trio.current_time()), None)

    def hold_s(self) -> float:
        """Seconds until IBKR's 429 breaker lets traffic go again (``0.0`` when it does now, or pacing is off). Session
        calls outside the queue (tickles, handshakes) wait this long: one sent inside IBKR's penalty box only
        extends it. While the half-open probe is out, the probe decides: ``0.0``."""
        if not self.settings.enabled:
            return 0.0
        wait = self._scheduler.breaker.wait_time(trio.current_time())
        return wait if math.isfinite(wait) else 0.0

    def snapshot(self) -> dict[str, object]:
        """JSON-able state for ``/session``: breaker (state, ``closes_in_s``, cool-down, reopens), queue, counters."""
        if not self.settings.enabled:
            return {"enabled": False, "upstream_429_total": self.upstream_429_total}
        return {"enabled": True, **self._scheduler.snapshot(trio.current_time())}

    # -- waiting -----------------------------------------------------------------------------------------------------

    def _submit(self, method: str, path: str, first: bool) -> Ticket:
        ticket, changed = self._scheduler.submit(method, path, trio.current_time(), first=first)
        self._settle(changed, ticket)
        if ticket.state is TicketState.REJECTED:
            raise self._rejection(ticket)
        return ticket

    async def _wait_for_grant(self, ticket: Ticket) -> None:
        if ticket.state is TicketState.GRANTED:
            await trio.lowlevel.checkpoint()
            return
        while ticket.state is TicketState.WAITING:
            event = trio.Event()
            self._events[ticket] = event
            wake_at = ticket.deadline
            if self._scheduler.timekeeper() is ticket:
                wake_at = min(wake_at, self._scheduler.next_change_at)
                self._keeper, self._keeper_wake = ticket, wake_at
            try:
                with trio.move_on_at(wake_at):
                    await event.wait()
            finally:
                del self._events[ticket]
            if ticket.state is TicketState.WAITING:
                self._settle(self._scheduler.pump(trio.current_time()), ticket)
        if ticket.state is TicketState.REJECTED:
            raise self._rejection(ticket)

    def _settle(self, changed: list[Ticket], current: Ticket | None) -> None:
        """Wake the tasks whose tickets changed, and the timekeeper if it changed or must wake earlier."""
        for ticket in changed:
            if ticket is not current:
                self._poke(ticket)
        keeper = self._scheduler.timekeeper()
        if keeper is None or keeper is current:
            return
        if keeper is not self._keeper or self._scheduler.next_change_at < self._keeper_wake:
            self._poke(keeper)

    def _poke(self, ticket: Ticket) -> None:
        event = self._events.get(ticket)
        if event is not None:
            event.set()

    @staticmethod
    def _rejection(ticket: Ticket) -> PacingRejected:
        assert ticket.reason is not None
        return PacingRejected(ticket.message, retry_after_s=ticket.retry_after_s, reason=ticket.reason.value)
