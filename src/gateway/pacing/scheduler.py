"""Who may go upstream now: the pacer's queue, budgets and breaker as one state machine with ``now`` passed in (pure).

The trio shell (:mod:`gateway.pacing.pacer`) turns a request into a :class:`Ticket` with :meth:`Scheduler.submit`,
sleeps, and reports what happened (:meth:`~Scheduler.cancel`, :meth:`~Scheduler.release`,
:meth:`~Scheduler.on_response`). Every such call, and :meth:`~Scheduler.pump`, re-runs the grant pass and returns
the tickets it granted or rejected so the shell can wake exactly those tasks.

Rules of the grant pass (:meth:`Scheduler.pump`):

* Each rule (:class:`~gateway.pacing.model.Limit`, or "no rule") is a *lane* with its own FIFO queue, sliding
  window (:class:`~gateway.pacing.bucket.SlidingWindow`) and concurrency count. Waiting tickets are visited oldest
  first; a ticket whose lane cannot go now blocks only the younger tickets of its lane (no head-of-line blocking
  across endpoints); when the global budget is spent the pass stops (every ticket needs it, so the oldest goes
  first: fair across lanes).
* A ticket is granted only when the breaker, its lane's window and concurrency, and the global window all allow it;
  only then does it take its places, all in one synchronous step. So tickets woken together can never overdraw a
  budget, and a ticket that is rejected or cancelled while waiting has taken nothing.
* A ticket granted but abandoned before it was sent (:meth:`Scheduler.cancel`) gives its places back.
* A ticket whose deadline passes is rejected; a new ticket whose earliest possible start is already past its
  deadline is rejected at once. Both carry an honest Retry-After (when a request joining the queue now could go).

* A granted ticket counts in its windows from its grant until ``window_s`` after IBKR's answer
  (:meth:`Scheduler.on_response`), or after its end when no answer came (:meth:`Scheduler.release`). IBKR counts a
  request somewhere between the two, so no delay on the way (a slow connect, a busy receiver) can bunch requests
  at IBKR beyond the limit (see :class:`~gateway.pacing.bucket.SlidingWindow`).

Contract: no half-open interval of a budget's ``window_s`` ever holds more than its ``n`` requests, as counted
anywhere between their grant and their answer (every global window of :meth:`PacingSettings.global_windows` and
every rule's :meth:`Limit.window`); while the breaker is open nothing is granted; in half_open one probe at a time.
"""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field

from gateway.pacing.breaker import Breaker, BreakerState
from gateway.pacing.bucket import SlidingWindow
from gateway.pacing.model import Limit, PacingSettings, match_limit, settings_problems


class TicketState(enum.StrEnum):
    """Where a request is in the pacer."""

    WAITING = "waiting"
    GRANTED = "granted"  # may go upstream; holds a concurrency place until released
    REJECTED = "rejected"
    CANCELLED = "cancelled"  # gone before it was sent; took nothing (or gave it back)
    RELEASED = "released"  # was sent and is finished


class Reason(enum.StrEnum):
    """What made the pacer reject a request."""

    GLOBAL = "global"
    ENDPOINT = "endpoint"
    BREAKER = "breaker"


@dataclass(eq=False, slots=True)
class Lane:
    """The queue and budgets of one rule (``limit is None``: requests no rule covers, paced only globally)."""

    limit: Limit | None
    windows: tuple[SlidingWindow, ...]  # empty: no rate rule
    waiting: int = 0
    in_flight: int = 0

    def full(self) -> bool:
        """Whether the rule's concurrency cap is reached."""
        cap = None if self.limit is None else self.limit.max_concurrent
        return cap is not None and self.in_flight >= cap


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's passage through the pacer. Compared by identity."""

    seq: int
    method: str
    path: str
    lane: Lane
    enqueued_at: float
    deadline: float
    state: TicketState = TicketState.WAITING
    granted_at: float | None = None
    settled_at: float | None = None  # IBKR's answer arrived (or the exchange ended): counted from here on
    probe: bool = False
    responded: bool = False
    reason: Reason | None = None
    retry_after_s: float = 0.0
    message: str = ""
    _holds: list[tuple[SlidingWindow, int]] = field(default_factory=list)  # open grants, until the answer


def _available_at(windows: tuple[SlidingWindow, ...], now: float) -> float:
    """The earliest instant every one of ``windows`` allows a grant."""
    return max((window.available_at(now) for window in windows), default=now)


def _grant_at(windows: tuple[SlidingWindow, ...], k: int, now: float) -> float:
    """A lower bound on when the ``k``-th next grant can pass all of ``windows``."""
    return max((window.grant_at(k, now) for window in windows), default=now)


def retry_after_from(at: float, now: float) -> float:
    """Whole seconds (at least 1) until ``at``: what a Retry-After header should say."""
    return float(max(1, math.ceil(at - now - 1e-9)))


class Scheduler:
    """The pacer's whole state; see the module docstring. Invalid ``settings`` (:func:`settings_problems`) raise."""

    def __init__(self, settings: PacingSettings) -> None:
        problems = settings_problems(settings)
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        self.settings = settings
        margin = settings.send_margin_s
        self.global_windows = tuple(SlidingWindow(n, window_s + margin) for n, window_s in settings.global_windows())
        self.breaker = Breaker(settings.breaker_cooldown_s, settings.breaker_max_cooldown_s)
        self.lanes: dict[Limit | None, Lane] = {None: Lane(None, ())}
        for limit in settings.limits:
            if limit not in self.lanes:
                shape = limit.window()
                self.lanes[limit] = Lane(limit, () if shape is None else (SlidingWindow(shape[0], shape[1] + margin),))
        self._waiting: dict[int, Ticket] = {}  # insertion order is arrival order
        self._seq = itertools.count()
        self._probe: Ticket | None = None
        self.next_change_at = math.inf  # earliest instant a time-based block clears (after the last pass)
        self.granted_total = 0
        self.rejected_total = 0
        self.upstream_429_total = 0

    def reconfigure(self, settings: PacingSettings, now: float) -> list[Ticket]:
        """Switch to ``settings`` (a config reload) without losing what is in flight; returns the tickets changed.

        Kept: the breaker (an IBKR 429 hold stays in force; only its cool-down bounds change), the counters, the
        waiting queue in arrival order (each ticket moves to the lane of its rule under the new settings, keeping its
        deadline), and recent grants: a new global window adopts the old one's stamps and a rule present in both
        keeps its lane, so a reload can never open a burst beyond what IBKR has already seen. Granted requests
        finish under the lane they were granted in; a rule that is new starts empty. Invalid ``settings`` raise
        ``ValueError`` and change nothing.
        """
        problems = settings_problems(settings)
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        margin = settings.send_margin_s
        old_global = max(self.global_windows, key=lambda window: window.in_window(now))
        global_windows = tuple(SlidingWindow(n, window_s + margin) for n, window_s in settings.global_windows())
        for window in global_windows:
            window.adopt(old_global, now)
        lanes: dict[Limit | None, Lane] = {None: self.lanes[None]}
        for limit in settings.limits:
            if limit not in lanes:
                kept = self.lanes.get(limit)
                if kept is None:
                    shape = limit.window()
                    kept = Lane(limit, () if shape is None else (SlidingWindow(shape[0], shape[1] + margin),))
                lanes[limit] = kept
        for ticket in self._waiting.values():
            lane = lanes[match_limit(settings.limits, ticket.method, ticket.path)]
            if lane is not ticket.lane:
                ticket.lane.waiting -= 1
                ticket.lane = lane
                lane.waiting += 1
        self.settings = settings
        self.global_windows = global_windows
        self.lanes = lanes
        self.breaker.retune(settings.breaker_cooldown_s, settings.breaker_max_cooldown_s)
        return self.pump(now)

    @property
    def queued(self) -> int:
        """Tickets waiting now."""
        return len(self._waiting)

    def timekeeper(self) -> Ticket | None:
        """The oldest waiting ticket: the one whose task must wake at :attr:`next_change_at` and run :meth:`pump`."""
        return next(iter(self._waiting.values()), None)

    # -- estimates ---------------------------------------------------------------------------------------------------

    def _earliest(self, lane: Lane, now: float, *, first: bool = False) -> tuple[float, Reason | None]:
        """Lower bound on when a request joining ``lane`` now could go, and which budget sets it (None: none does).

        The ``p`` tickets already waiting in the lane go first (none for a ``first`` request) and each takes a lane
        and a global grant, so this is ``max`` of the breaker's hold, the lane window's and the global window's
        ``p``-th next grant.
        """
        p = 0 if first else lane.waiting
        at, reason = now, None
        if self.breaker.poll(now) is BreakerState.OPEN and self.breaker.open_until is not None:
            at, reason = self.breaker.open_until, Reason.BREAKER
        lane_at = _grant_at(lane.windows, p, now)
        if lane_at > at:
            at, reason = lane_at, Reason.ENDPOINT
        global_at = _grant_at(self.global_windows, p, now)
        if global_at > at:
            at, reason = global_at, Reason.GLOBAL
        return at, reason

    # -- transitions -------------------------------------------------------------------------------------------------

    def submit(self, method: str, path: str, now: float, *, first: bool = False) -> tuple[Ticket, list[Ticket]]:
        """A request wants to go. Returns its ticket (waiting, granted, or rejected at once) and every ticket changed.

        Rejected at once, taking nothing, when its earliest possible start is after ``now + max_wait_s``.
        ``first`` puts it at the head of the queue (the session's warm-up, which every client request waits for).
        """
        lane = self.lanes[match_limit(self.settings.limits, method, path)]
        ticket = Ticket(next(self._seq), method.upper(), path, lane, now, now + self.settings.max_wait_s)
        at, reason = self._earliest(lane, now, first=first)
        if at > ticket.deadline:
            self._reject(ticket, reason or Reason.GLOBAL, at, now)
            return ticket, [ticket]
        if first:
            self._waiting = {ticket.seq: ticket, **self._waiting}
        else:
            self._waiting[ticket.seq] = ticket
        lane.waiting += 1
        return ticket, self.pump(now)

    def cancel(self, ticket: Ticket, now: float) -> list[Ticket]:
        """The request is gone before it was sent: leave the queue, or give back the places of a grant. Idempotent."""
        if ticket.state is TicketState.WAITING:
            self._leave(ticket)
        elif ticket.state is TicketState.GRANTED:
            for window, handle in ticket._holds:
                window.drop(handle)
            ticket._holds.clear()
            ticket.lane.in_flight -= 1
            self.granted_total -= 1
            self._drop_probe(ticket)
        else:
            return []
        ticket.state = TicketState.CANCELLED
        return self.pump(now)

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """The granted request was sent and is finished: free its concurrency place. No-op for other states."""
        if ticket.state is not TicketState.GRANTED:
            return []
        ticket.lane.in_flight -= 1
        ticket.state = TicketState.RELEASED
        self._settle(ticket, now)  # ended unanswered (error, timeout): it may have reached IBKR, count it from now
        self._drop_probe(ticket)  # a probe that ends unanswered lets the next probe go
        return self.pump(now)

    def on_response(self, ticket: Ticket | None, status: int, retry_after_s: float | None, now: float) -> list[Ticket]:
        """An upstream answer arrived for ``ticket`` (``None``: unknown request; then it may settle a probe)."""
        if status == 429:
            self.upstream_429_total += 1
        probe = ticket is None or ticket is self._probe
        self.breaker.on_response(status, retry_after_s, now, probe=probe)
        if ticket is not None:
            ticket.responded = True
            self._settle(ticket, now)
        if self._probe is not None and not self.breaker.probe_in_flight:
            self._probe = None
        return self.pump(now)

    def pump(self, now: float) -> list[Ticket]:
        """Grant every ticket that may go at ``now``, reject those that cannot make their deadline; return them."""
        changed: list[Ticket] = []
        self.next_change_at = math.inf
        hold = self.breaker.wait_time(now)
        if hold == 0.0:
            self._grant_pass(now, changed)
        elif math.isfinite(hold):
            assert self.breaker.open_until is not None
            reopen = self.breaker.open_until
            self.next_change_at = reopen
            for ticket in list(self._waiting.values()):
                if ticket.deadline < reopen:
                    self._leave(ticket)
                    self._reject(ticket, Reason.BREAKER, reopen, now)
                    changed.append(ticket)
        for ticket in list(self._waiting.values()):
            if ticket.deadline <= now:
                self._expire(ticket, now)
                changed.append(ticket)
        return changed

    def _grant_pass(self, now: float, changed: list[Ticket]) -> None:
        blocked: set[Limit | None] = set()
        for ticket in list(self._waiting.values()):
            lane = ticket.lane
            if lane.limit in blocked:
                continue
            if lane.full():
                blocked.add(lane.limit)
                continue
            at = _available_at(lane.windows, now)
            if at > now:
                blocked.add(lane.limit)
                self.next_change_at = min(self.next_change_at, at)
                continue
            at = _available_at(self.global_windows, now)
            if at > now:
                self.next_change_at = min(self.next_change_at, at)
                return
            if self.breaker.allow(now) != 0.0:
                return  # half_open and the one probe has just been handed out
            self._grant(ticket, now)
            changed.append(ticket)

    def _grant(self, ticket: Ticket, now: float) -> None:
        self._leave(ticket)
        lane = ticket.lane
        lane.in_flight += 1
        for window in (*lane.windows, *self.global_windows):
            ticket._holds.append((window, window.hold(now)))
        if self.breaker.state is BreakerState.HALF_OPEN:
            ticket.probe = True
            self._probe = ticket
        ticket.state = TicketState.GRANTED
        ticket.granted_at = now
        self.granted_total += 1

    @staticmethod
    def _settle(ticket: Ticket, now: float) -> None:
        """IBKR has answered ``ticket`` (or it ended): its grants count from ``now`` for one window."""
        if ticket.settled_at is None:
            ticket.settled_at = now
        for window, handle in ticket._holds:
            window.settle(handle, now)
        ticket._holds.clear()

    def _leave(self, ticket: Ticket) -> None:
        del self._waiting[ticket.seq]
        ticket.lane.waiting -= 1

    def _drop_probe(self, ticket: Ticket) -> None:
        if ticket is self._probe:
            self._probe = None
            self.breaker.abandon_probe()

    def _expire(self, ticket: Ticket, now: float) -> None:
        """Reject a ticket whose wait is over, naming what still blocks it and when a new request could go."""
        self._leave(ticket)
        at, reason = self._earliest(ticket.lane, now)
        if self.breaker.poll(now) is not BreakerState.CLOSED:
            reason = Reason.BREAKER
        elif ticket.lane.full():
            reason = Reason.ENDPOINT
        self._reject(ticket, reason or Reason.GLOBAL, at, now)

    def _reject(self, ticket: Ticket, reason: Reason, at: float, now: float) -> None:
        ticket.state = TicketState.REJECTED
        ticket.reason = reason
        ticket.retry_after_s = retry_after_from(at, now)
        ticket.message = self._explain(ticket, reason, now)
        self.rejected_total += 1

    def _explain(self, ticket: Ticket, reason: Reason, now: float) -> str:
        if reason is Reason.BREAKER:
            what = f"IBKR answered 429 Too Many Requests; upstream traffic is held (breaker {self.breaker.state.value})"
        elif reason is Reason.ENDPOINT and ticket.lane.limit is not None:
            limit = ticket.lane.limit
            what = f"endpoint limit {limit.rule} ({limit.describe()}) is saturated"
        else:
            s = self.settings
            what = f"global limit ({s.global_requests_per_s:g} requests/s, burst {s.global_burst}) is saturated"
        waited = now - ticket.enqueued_at
        queued = f" after queueing {waited:.1f} s" if waited > 0 else ""
        return f"pacing: {what}; request rejected{queued}, retry in {ticket.retry_after_s:g} s"

    # -- reporting ---------------------------------------------------------------------------------------------------

    def snapshot(self, now: float) -> dict[str, object]:
        """A JSON-able picture for ``/session``: breaker, queue and counters, and per-rule waiting/in-flight counts."""
        breaker = self.breaker
        state = breaker.poll(now)
        closes_in = 0.0
        if state is BreakerState.OPEN and breaker.open_until is not None:
            closes_in = max(0.0, breaker.open_until - now)
        limits: dict[str, dict[str, int]] = {}
        for limit, lane in self.lanes.items():
            if limit is not None:
                limits[limit.rule] = {"waiting": lane.waiting, "in_flight": lane.in_flight}
        return {
            "breaker": {
                "state": state.value,
                "closes_in_s": round(closes_in, 3),
                "cooldown_s": breaker.cooldown_s,
                "reopens": breaker.reopens,
                "trips": breaker.trips,
                "probe_in_flight": breaker.probe_in_flight,
            },
            "queued": self.queued,
            "granted_total": self.granted_total,
            "rejected_total": self.rejected_total,
            "upstream_429_total": self.upstream_429_total,
            "global": {
                "requests_per_s": self.settings.global_requests_per_s,
                "burst": self.settings.global_burst,
                "window_s": self.global_windows[0].window_s,
                "in_window": self.global_windows[0].in_window(now),
            },
            "limits": limits,
        }
