"""Failures on demand: what the simulator should get wrong next, and the switches tests and users flip.

Sync switches only change state that the HTTP/WebSocket code consults per request; the async ones (close
WebSockets, down/up) act through :class:`FaultHooks`, implemented by the serving :class:`~gateway.simulator.Simulator`.
Durations use trio's clock (``trio.current_time``), so they work under a virtual clock; set them from inside
the trio run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import trio


class FaultHooks(Protocol):
    """The actions a fault needs from the running simulator."""

    def expire_lst(self) -> None:
        """Make the current live session token expired now."""

    def set_other_session(self, active: bool) -> None:
        """Another platform takes (True) or leaves (False) this user's brokerage session."""

    def end_brokerage_session(self) -> None:
        """End the brokerage session now, keeping the LST and the read-only session."""

    async def close_websockets(self, code: int, reason: str) -> int:
        """Close every open WebSocket with ``code``; return how many were closed."""

    async def go_down(self) -> None:
        """Close the listener (and every connection); return once connections are refused."""

    async def go_up(self) -> None:
        """Listen again on the same port; return once connections are accepted."""


@dataclass(frozen=True, slots=True)
class FaultResponse:
    """An IBKR-shaped failure to send instead of the real answer."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _FailRule:
    remaining: int
    status: int
    path_prefix: str | None
    error: str


def _matches(prefix: str | None, path: str) -> bool:
    return prefix is None or path.startswith(prefix)


class Faults:
    """The fault switchboard. All switches are off after construction and after :meth:`reset`.

    Every switch is a plain call that takes effect at once, except the three that wait for sockets and must be
    awaited: :meth:`down`, :meth:`up` and :meth:`close_websockets`.
    """

    def __init__(self, hooks: FaultHooks) -> None:
        self._hooks = hooks
        self._fail_rules: list[_FailRule] = []
        self._rate_n = 0
        self._rate_until: float | None = None
        self._rate_prefix: str | None = None
        self._delay_s = 0.0
        self._delay_next: list[float] = []
        self._drops: list[int | None] = []
        self.tickle_unauthenticated = False
        self.tickle_competing = False
        self.tickle_clear_on_init = False
        self._down = False

    # ------------------------------------------------------------------ switches

    def expire_lst(self) -> None:
        """Expire the current LST now: following requests get 401 ``live session token expired``."""
        self._hooks.expire_lst()

    def set_other_session(self, active: bool = True) -> None:
        """Another session of the same user (TWS, mobile, Client Portal) logs in and takes the brokerage session
        (``active=True``): ours ends at once, tickle and auth status say ``authenticated:false, competing:true``,
        ``ssodh/init`` with ``compete=false`` is refused (200, same status) and with ``compete=true`` takes the
        session back. ``active=False``: the other session logs out (ours stays closed until the next init)."""
        self._hooks.set_other_session(active)

    def nightly_reset(self) -> None:
        """IBKR's nightly ``/iserver`` reset, now: the brokerage session ends (tickle and auth status say
        ``authenticated:false``, ``/iserver`` calls get 400 ``no bridge``) while the LST stays valid and
        non-``/iserver`` routes keep working; the next ``ssodh/init`` opens a new brokerage session."""
        self._hooks.end_brokerage_session()

    def set_tickle_unauthenticated(
        self, unauthenticated: bool = True, *, competing: bool = False, clear_on_init: bool = False
    ) -> None:
        """Make tickle, ``auth/status``, ``ssodh/init`` and WS ``sts`` report ``authenticated:false`` (and
        ``competing`` as given). Sticky until switched off, :meth:`reset`, or - with ``clear_on_init`` - the
        next ``ssodh/init``."""
        self.tickle_unauthenticated = unauthenticated
        self.tickle_competing = competing if unauthenticated else False
        self.tickle_clear_on_init = clear_on_init if unauthenticated else False

    def on_init(self) -> None:
        """Called by ``ssodh/init``; clears the tickle fault when it was set with ``clear_on_init``."""
        if self.tickle_clear_on_init:
            self.set_tickle_unauthenticated(False)

    def fail_next(self, n: int, status: int = 500, path_prefix: str | None = None, error: str | None = None) -> None:
        """Fail the next ``n`` requests (whose raw path starts with ``path_prefix``, if given) with ``status``
        and ``{"error": error or the status phrase, "statusCode": status}``. Rules queue up in call order."""
        if n < 0 or not 100 <= status <= 599:
            raise ValueError("fail_next needs n >= 0 and an HTTP status 100-599")
        if n:
            reason = error if error is not None else _phrase(status)
            self._fail_rules.append(_FailRule(n, status, path_prefix, reason))

    def rate_limit(self, n: int | None = None, seconds: float | None = None, path_prefix: str | None = None) -> None:
        """Answer 429 to the next ``n`` requests, or to every request for ``seconds`` (exactly one of them)."""
        if (n is None) == (seconds is None):
            raise ValueError("rate_limit needs exactly one of n or seconds")
        self._rate_prefix = path_prefix
        if n is not None:
            if n < 0:
                raise ValueError("n must be >= 0")
            self._rate_n, self._rate_until = n, None
        else:
            assert seconds is not None
            if seconds < 0 or not math.isfinite(seconds):
                raise ValueError("seconds must be a finite number >= 0")
            self._rate_n, self._rate_until = 0, trio.current_time() + seconds

    def set_delay(self, seconds: float) -> None:
        """Delay every IBKR-route response (and WebSocket handshake) by ``seconds`` (0 switches it off)."""
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("delay must be a finite number >= 0")
        self._delay_s = float(seconds)

    def delay_next(self, n: int, seconds: float) -> None:
        """Hold the next ``n`` IBKR-route requests ``seconds`` before IBKR handles (and records) them: a slow way
        to IBKR (a congested link, a busy edge), as opposed to :meth:`set_delay`'s slow IBKR for every request."""
        if n < 0 or seconds < 0 or not math.isfinite(seconds):
            raise ValueError("delay_next needs n >= 0 and a finite number of seconds >= 0")
        self._delay_next.extend([float(seconds)] * n)

    def drop_mid_response(self, n: int = 1, after_bytes: int | None = None) -> None:
        """For the next ``n`` responses of ``/v1/api/sim/stream``: send headers and ``after_bytes`` of the body
        (default: half), then close the connection."""
        if n < 0 or (after_bytes is not None and after_bytes < 0):
            raise ValueError("drop_mid_response needs n >= 0 and after_bytes >= 0")
        self._drops.extend([after_bytes] * n)

    async def close_websockets(self, code: int = 1011, reason: str = "") -> int:
        """Close every open WebSocket with ``code``; returns how many were open."""
        return await self._hooks.close_websockets(code, reason)

    async def down(self) -> None:
        """Close the listener and all connections; connections are refused until :meth:`up`.

        While down, the admin path is unreachable too (it shares the listener)."""
        await self._hooks.go_down()
        self._down = True

    async def up(self) -> None:
        """Listen again on the same port."""
        await self._hooks.go_up()
        self._down = False

    def reset(self) -> None:
        """Switch every synchronous fault off (an other session leaves). Does not change down/up (use :meth:`up`)
        nor reopen a brokerage session that a fault ended."""
        self._fail_rules.clear()
        self._rate_n, self._rate_until, self._rate_prefix = 0, None, None
        self._delay_s = 0.0
        self._delay_next.clear()
        self._drops.clear()
        self.set_tickle_unauthenticated(False)
        self._hooks.set_other_session(False)

    # ------------------------------------------------------------------ consulted per request

    @property
    def is_down(self) -> bool:
        """True between :meth:`down` and :meth:`up`."""
        return self._down

    @property
    def delay_s(self) -> float:
        """Seconds to delay each response."""
        return self._delay_s

    def take_delay(self) -> float:
        """Seconds to hold the request now arriving: :meth:`set_delay`'s, or a pending :meth:`delay_next` (consumed)
        if longer."""
        extra = self._delay_next.pop(0) if self._delay_next else 0.0
        return max(self._delay_s, extra)

    def take_request_fault(self, path: str) -> FaultResponse | None:
        """Consume and return the failure for a request to ``path``, if any (fail_next first, then 429)."""
        for rule in self._fail_rules:
            if rule.remaining > 0 and _matches(rule.path_prefix, path):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._fail_rules.remove(rule)
                return FaultResponse(rule.status, rule.error)
        if not _matches(self._rate_prefix, path):
            return None
        if self._rate_n > 0:
            self._rate_n -= 1
            return FaultResponse(429, "too many requests", (("Retry-After", "1"),))
        if self._rate_until is not None:
            left = self._rate_until - trio.current_time()
            if left > 0:
                return FaultResponse(429, "too many requests", (("Retry-After", str(max(1, math.ceil(left)))),))
            self._rate_until = None
        return None

    def take_drop(self) -> tuple[bool, int | None]:
        """Consume one pending drop for the stream route: ``(True, after_bytes)`` or ``(False, None)``."""
        if self._drops:
            return True, self._drops.pop(0)
        return False, None

    def describe(self) -> dict[str, Any]:
        """The switches' state as JSON-ready data (for the admin path)."""
        rate_left = None
        if self._rate_until is not None:
            rate_left = max(0.0, self._rate_until - trio.current_time())
        return {
            "down": self._down,
            "delay_s": self._delay_s,
            "delay_next": len(self._delay_next),
            "fail_next": [
                {"remaining": r.remaining, "status": r.status, "path_prefix": r.path_prefix, "error": r.error}
                for r in self._fail_rules
            ],
            "rate_limit": {"n": self._rate_n, "seconds_left": rate_left, "path_prefix": self._rate_prefix},
            "drop_mid_response": len(self._drops),
            "tickle": {
                "unauthenticated": self.tickle_unauthenticated,
                "competing": self.tickle_competing,
                "clear_on_init": self.tickle_clear_on_init,
            },
        }


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"
