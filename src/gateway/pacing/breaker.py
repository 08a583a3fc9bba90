"""The upstream-429 circuit breaker: after IBKR says "too many requests", hold all traffic for a cool-down (pure).

IBKR puts an IP that keeps exceeding its pacing into a 10-15 minute penalty box, so retrying into a 429 makes things
worse. The breaker turns the first 429 into silence::

    closed ──429──▶ open ──cool-down over──▶ half_open ──probe answered, not 429──▶ closed
                     ▲                           │
                     └──── probe answered 429 ───┘   (hold doubles, capped)

* **closed**: everything may go.
* **open**: nothing may go until ``open_until``. The hold is ``cooldown_s`` (first: the configured cool-down) or the
  429's Retry-After if longer; Retry-After is capped at ``max_cooldown_s`` so a hostile or garbled header cannot lock
  the gateway for longer than the operator allows.
* **half_open**: exactly one probe at a time may go. A probe answered with anything but 429 closes the breaker and
  resets the hold; a probe answered 429 reopens it with the hold doubled (capped at ``max_cooldown_s``). A probe that
  ends without an answer (:meth:`abandon_probe`) frees the place for the next probe.

Responses not marked as the probe's (``probe=False``: requests sent before the breaker opened) never close it; while
open, their Retry-After can only extend the hold; in half_open they are ignored unless they are 429, which reopens
(IBKR is still saying "too many"). Time is always an argument.
"""

from __future__ import annotations

import enum
import math

TOO_MANY_REQUESTS = 429


class BreakerState(enum.StrEnum):
    """Where the breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Breaker:
    """Holds upstream traffic after a 429; see the module docstring for the rules.

    Public read-only attributes: ``opened_at`` (when it last opened or reopened, ``None`` when closed),
    ``open_until`` (end of the current hold), ``cooldown_s`` (the current hold; the configured cool-down when closed),
    ``reopens`` (probes answered 429 in the current incident), ``trips`` (incidents since start),
    ``probe_in_flight``.
    """

    def __init__(self, cooldown_s: float, max_cooldown_s: float) -> None:
        if not (math.isfinite(cooldown_s) and cooldown_s > 0):
            raise ValueError(f"cooldown_s must be a finite number > 0, not {cooldown_s!r}")
        if not (math.isfinite(max_cooldown_s) and max_cooldown_s >= cooldown_s):
            raise ValueError(f"max_cooldown_s must be finite and >= cooldown_s, not {max_cooldown_s!r}")
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.cooldown_s = cooldown_s
        self.opened_at: float | None = None
        self.open_until: float | None = None
        self.reopens = 0
        self.trips = 0
        self.probe_in_flight = False
        self._state = BreakerState.CLOSED

    def retune(self, cooldown_s: float, max_cooldown_s: float) -> None:
        """New cool-down bounds (config reload). A hold in force keeps its end (``open_until``); the next hold and
        the next doubling use the new bounds."""
        if not (math.isfinite(cooldown_s) and cooldown_s > 0 and math.isfinite(max_cooldown_s)):
            raise ValueError("cool-downs must be finite numbers > 0")
        if max_cooldown_s < cooldown_s:
            raise ValueError("max_cooldown_s must be >= cooldown_s")
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.cooldown_s = cooldown_s if self._state is BreakerState.CLOSED else min(self.cooldown_s, max_cooldown_s)

    @property
    def state(self) -> BreakerState:
        """The state as of the last call that was given ``now`` (use :meth:`poll` for the state at a given time)."""
        return self._state

    def poll(self, now: float) -> BreakerState:
        """The state at ``now``: an open breaker whose hold is over becomes half_open."""
        if self._state is BreakerState.OPEN and self.open_until is not None and now >= self.open_until:
            self._state = BreakerState.HALF_OPEN
            self.probe_in_flight = False
        return self._state

    def wait_time(self, now: float) -> float:
        """``0.0`` if a request may go at ``now``; else seconds to wait (``math.inf`` while a probe is out). A peek."""
        state = self.poll(now)
        if state is BreakerState.CLOSED:
            return 0.0
        if state is BreakerState.OPEN:
            assert self.open_until is not None
            return self.open_until - now
        return math.inf if self.probe_in_flight else 0.0

    def allow(self, now: float) -> float:
        """Like :meth:`wait_time`, but a ``0.0`` in half_open hands out the one probe place (the caller must send)."""
        wait = self.wait_time(now)
        if wait == 0.0 and self._state is BreakerState.HALF_OPEN:
            self.probe_in_flight = True
        return wait

    def abandon_probe(self) -> None:
        """The probe ended without an upstream answer (cancelled, connect failure): let the next probe go."""
        self.probe_in_flight = False

    def _hold(self, now: float, cooldown_s: float, retry_after_s: float | None) -> None:
        honoured = 0.0 if retry_after_s is None else min(max(retry_after_s, 0.0), self.max_cooldown_s)
        self.cooldown_s = max(cooldown_s, honoured)
        self.opened_at = now
        self.open_until = now + self.cooldown_s
        self.probe_in_flight = False
        self._state = BreakerState.OPEN

    def on_response(self, status: int, retry_after_s: float | None, now: float, *, probe: bool = True) -> None:
        """Feed one upstream answer.

        ``retry_after_s`` is the 429's Retry-After in seconds (``None`` when absent or unreadable). ``probe`` says
        whether the answer belongs to the request :meth:`allow` let through in half_open; callers that cannot tell
        leave it ``True``.
        """
        state = self.poll(now)
        too_many = status == TOO_MANY_REQUESTS
        if state is BreakerState.CLOSED:
            if too_many:
                self.trips += 1
                self.reopens = 0
                self._hold(now, self.base_cooldown_s, retry_after_s)
        elif state is BreakerState.OPEN:
            if too_many and retry_after_s is not None:
                assert self.open_until is not None
                honoured = min(max(retry_after_s, 0.0), self.max_cooldown_s)
                self.open_until = max(self.open_until, now + honoured)
        elif too_many:
            self.reopens += 1
            self._hold(now, min(self.cooldown_s * 2, self.max_cooldown_s), retry_after_s)
        elif probe and self.probe_in_flight:
            self._state = BreakerState.CLOSED
            self.cooldown_s = self.base_cooldown_s
            self.opened_at = None
            self.open_until = None
            self.reopens = 0
            self.probe_in_flight = False
