"""IBKR's request pacing as the simulator enforces it: sliding windows and a penalty box (pure; no I/O, no clock).

Contract: :meth:`Pacer.arrive` is called once per request as it reaches "IBKR" with a monotonic ``now_s``. Every
arrival counts - also the ones answered 429 - because IBKR counts what it receives, not what it serves. A request
is refused when, counting itself, the global window or its endpoint's window holds more requests than the limit;
the first refusal opens the penalty box, during which every request is refused without being counted.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

from gateway.simulator.verify import Rejection

GLOBAL_PER_S = 50
"""IBKR's global limit for an OAuth session (requests per second per username)."""


@dataclass(frozen=True, slots=True)
class EndpointLimit:
    """At most ``requests`` per ``per_s`` seconds on the paths ``pattern`` (a regex on the path below
    ``/v1/api``) fully matches, with ``method`` (None: any method)."""

    pattern: str
    requests: int
    per_s: float
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        """True when this limit governs ``method path``."""
        return (self.method is None or self.method == method) and re.fullmatch(self.pattern, path) is not None


# IBKR's published per-endpoint table. The docs name the method for most rows; where a client may use either
# (tickle is documented as GET but usually POSTed) the limit is taken to belong to the endpoint, not the method.
# IBKR lists "/iserver/orders", whose real path is /iserver/account/orders: both are covered.
IBKR_LIMITS: tuple[EndpointLimit, ...] = (
    EndpointLimit(r"/iserver/marketdata/snapshot", 10, 1.0),
    EndpointLimit(r"/iserver/scanner/params", 1, 900.0),
    EndpointLimit(r"/iserver/scanner/run", 1, 1.0),
    EndpointLimit(r"/iserver/trades", 1, 5.0),
    EndpointLimit(r"/iserver/(account/)?orders", 1, 5.0, "GET"),
    EndpointLimit(r"/iserver/account/pnl/partitioned", 1, 5.0),
    EndpointLimit(r"/portfolio/accounts", 1, 5.0),
    EndpointLimit(r"/portfolio/subaccounts", 1, 5.0),
    EndpointLimit(r"/pa/(performance|summary|transactions)", 1, 900.0),
    EndpointLimit(r"/fyi/.*", 1, 1.0),
    EndpointLimit(r"/tickle", 1, 1.0),
    EndpointLimit(r"/sso/validate", 1, 60.0),
)


class SlidingWindow:
    """Arrival times within the last ``per_s`` seconds."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._times: deque[float] = deque()

    def add(self, now_s: float) -> int:
        """Count one arrival at ``now_s``; returns how many arrivals the window now holds."""
        while self._times and self._times[0] <= now_s - self.per_s:
            self._times.popleft()
        self._times.append(now_s)
        return len(self._times)

    def retry_after(self, now_s: float) -> float:
        """Seconds until the oldest arrival leaves the window."""
        return max(0.0, self._times[0] + self.per_s - now_s) if self._times else 0.0


class Pacer:
    """The global window, one window per endpoint limit, and the penalty box."""

    def __init__(
        self,
        penalty_s: float,
        global_per_s: int = GLOBAL_PER_S,
        limits: tuple[EndpointLimit, ...] = IBKR_LIMITS,
    ) -> None:
        if penalty_s < 0 or not math.isfinite(penalty_s) or global_per_s < 1:
            raise ValueError("penalty_s must be finite and >= 0, global_per_s >= 1")
        self.penalty_s = penalty_s
        self._global_limit = global_per_s
        self._global = SlidingWindow(1.0)
        self._limits = limits
        self._windows = [SlidingWindow(limit.per_s) for limit in limits]
        self._box_until: float | None = None
        self.refused = 0

    def penalty_left(self, now_s: float) -> float:
        """Seconds the penalty box still has to run (0 when closed)."""
        if self._box_until is None:
            return 0.0
        return max(0.0, self._box_until - now_s)

    def arrive(self, method: str, path: str, now_s: float) -> Rejection | None:
        """Count a request to ``path`` (below ``/v1/api``) and say whether it must be answered 429."""
        if self._box_until is not None:
            if now_s < self._box_until:
                self.refused += 1
                return Rejection("too many requests (penalty box)", status=429)
            self._box_until = None
        over = self._global.add(now_s) > self._global_limit
        for limit, window in zip(self._limits, self._windows, strict=True):
            if limit.matches(method, path) and window.add(now_s) > limit.requests:
                over = True
        if not over:
            return None
        self.refused += 1
        self._box_until = now_s + self.penalty_s
        return Rejection("too many requests", status=429)

    def clear(self) -> None:
        """Forget every arrival and let anyone in the penalty box out."""
        self._global = SlidingWindow(1.0)
        self._windows = [SlidingWindow(limit.per_s) for limit in self._limits]
        self._box_until = None
