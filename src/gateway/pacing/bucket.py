"""Rate budgets with the clock as an argument: a classic token bucket and the sliding window the pacer uses (pure).

Both answer one question, "may a request go at ``now``, and if not, when?", and neither reads a clock: ``now`` (in
seconds, any origin, never decreasing; an earlier ``now`` is treated as the latest one seen) is always passed in.

Why the pacer uses :class:`SlidingWindow` and not :class:`TokenBucket`: a token bucket of capacity ``n`` refilled at
``n`` per second admits ``n`` requests at once and then one every ``1/n`` s, i.e. up to ``2n - 1`` requests in one
second. IBKR documents its limits as "``n`` per second", and the fault suite's fake IBKR, which counts every
one-second window, would see that as an overrun. A sliding window of ``n`` per ``window_s`` keeps the burst (``n`` at
once) and never lets any window of ``window_s`` seconds hold more than ``n``; over any interval it admits no more than
the bucket would.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import deque

# Tolerance for float round-off in TokenBucket: a token counts as available at 1 - EPSILON, so a caller that waits
# exactly the advertised time is never told to wait a few ulps more. The debt never accumulates (see try_take).
EPSILON = 1e-6


def _check_rate(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, not {value!r}")


class TokenBucket:
    """A token bucket: holds up to ``capacity`` tokens, starts full, gains ``rate_per_s`` tokens per second.

    Contract: over any closed interval ``[t, t + w]`` the number of successful takes is at most
    ``capacity + rate_per_s * w`` (plus :data:`EPSILON`). A take that is refused takes nothing.
    """

    def __init__(self, rate_per_s: float, capacity: float, now: float) -> None:
        _check_rate("rate_per_s", rate_per_s)
        if not (math.isfinite(capacity) and capacity >= 1):
            raise ValueError(f"capacity must be a finite number >= 1, not {capacity!r}")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self._tokens = capacity
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate_per_s)
            self._last = now

    def tokens(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (may be a hair below zero after a take, never below ``-EPSILON``)."""
        self._refill(now)
        return self._tokens

    def wait_time(self, now: float) -> float:
        """``0.0`` if a token is available at ``now``, else the seconds until one is; takes nothing."""
        self._refill(now)
        if self._tokens >= 1.0 - EPSILON:
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    def try_take(self, now: float) -> float:
        """Take a token if one is available: ``0.0`` means taken; otherwise the seconds until one is (nothing taken).

        A take leaves at least ``-EPSILON`` tokens, and the next take needs the bucket back at ``1 - EPSILON``, so the
        tolerance never adds up to an extra token.
        """
        wait = self.wait_time(now)
        if wait == 0.0:
            self._tokens -= 1.0
        return wait


class SlidingWindow:
    """At most ``limit`` grants in any half-open interval of ``window_s`` seconds.

    It keeps the times of the last ``limit`` grants; a grant at ``t`` is allowed when fewer than ``limit`` grants lie
    in ``(t - window_s, t]``. Times it reports are absolute (same origin as ``now``) and are exactly the instants at
    which the check flips, so a caller sleeping until them is never off by a rounding error.

    A grant is either stamped at once (:meth:`take`) or *held open* (:meth:`hold`): an open grant counts in every
    window until it is stamped with :meth:`settle` (or dropped with :meth:`drop`, never sent). The pacer holds a
    request's grant open until IBKR's answer arrives, which is after IBKR counted the request, so however late the
    request reached IBKR (a slow connect, a stalled writer, a busy receiver), IBKR can never count more than
    ``limit`` in any window of ``window_s``: for the last request of any window IBKR sees, every earlier-granted one
    in it was either still open or answered less than ``window_s`` before that grant.
    """

    def __init__(self, limit: int, window_s: float) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit!r}")
        _check_rate("window_s", window_s)
        self.limit = limit
        self.window_s = window_s
        self._log: deque[float] = deque()
        self._latest = -math.inf
        self._open: set[int] = set()
        self._handles = itertools.count()

    def _expire(self, now: float) -> None:
        log = self._log
        while log and log[0] + self.window_s <= now:
            log.popleft()

    def in_window(self, now: float) -> int:
        """Grants still counted at ``now`` (open ones included)."""
        self._expire(now)
        return len(self._log) + len(self._open)

    def available_at(self, now: float) -> float:
        """The earliest instant ``>= now`` at which a grant is allowed (``now`` itself when allowed now).

        ``math.inf`` when open grants alone fill the window: only a :meth:`settle` or :meth:`drop` can free a place.
        """
        self._expire(now)
        excess = len(self._log) + len(self._open) - self.limit
        if excess < 0:
            return now
        if excess >= len(self._log):
            return math.inf
        return self._log[excess] + self.window_s

    def wait_time(self, now: float) -> float:
        """``0.0`` if a grant is allowed at ``now``, else the seconds until one is; takes nothing."""
        at = self.available_at(now)
        return at - now if at > now else 0.0

    def take(self, now: float) -> float:
        """Record a grant at ``now`` and return the stamp recorded (for :meth:`refund`); raises if not allowed."""
        if self.available_at(now) > now:
            raise ValueError("no grant is available at this time")
        return self._stamp(now)

    def _stamp(self, now: float) -> float:
        stamp = max(now, self._latest)  # keep the log sorted even if a caller's clock stepped back
        self._latest = stamp
        self._log.append(stamp)
        return stamp

    def hold(self, now: float) -> int:
        """Record an open grant (see the class docstring) and return its handle; raises if not allowed at ``now``."""
        if self.available_at(now) > now:
            raise ValueError("no grant is available at this time")
        handle = next(self._handles)
        self._open.add(handle)
        return handle

    def settle(self, handle: int, now: float) -> None:
        """Stamp the open grant ``handle`` at ``now``: from here it counts for ``window_s``. No-op if not open."""
        if handle in self._open:
            self._open.remove(handle)
            self._stamp(now)

    def drop(self, handle: int) -> None:
        """Forget the open grant ``handle``, which was never sent. No-op if not open."""
        self._open.discard(handle)

    def try_take(self, now: float) -> float:
        """Take a grant if allowed: ``0.0`` means taken; otherwise the seconds until one is (nothing taken)."""
        wait = self.wait_time(now)
        if wait == 0.0:
            self.take(now)
        return wait

    def adopt(self, other: SlidingWindow, now: float) -> None:
        """Take over ``other``'s recent grants (its last ``limit`` stamps), so a window replaced by a reconfiguration
        still counts what was already sent; ``other``'s open grants are counted here as stamped at ``now`` (they
        keep settling on ``other``). Grants later refunded on ``other`` stay counted here (the safe side)."""
        latest = max(self._latest, other._latest, now)
        stamps = [*other._log, *(latest for _ in other._open)][-self.limit :]
        self._log = deque(stamps)
        self._latest = latest

    def refund(self, stamp: float) -> None:
        """Forget a grant recorded by :meth:`take` that was never used (a no-op once it has left the window)."""
        with contextlib.suppress(ValueError):
            self._log.remove(stamp)

    def grant_at(self, k: int, now: float) -> float:
        """The earliest instant the ``k``-th next grant (``k = 0`` is the next one) could happen.

        Assumes grants ``0 .. k-1`` are each taken as early as allowed and open grants settle at ``now``, so it is a
        lower bound for a request with ``k`` others ahead of it. Grant ``k`` must follow grant ``k - limit`` by
        ``window_s``: with ``f`` free places now, grant ``r < limit`` is at ``now`` when ``r < f``, else when log
        entry ``r - f`` expires; grant ``q * limit + r`` is ``q`` windows after grant ``r``.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, not {k!r}")
        self._expire(now)
        rounds, r = divmod(k, self.limit)
        log = [*self._log, *(max(now, self._latest) for _ in self._open)]
        free = self.limit - len(log)
        at = now if r < free else max(now, log[r - free] + self.window_s)
        for _ in range(rounds):  # repeated addition, exactly as the grants themselves will be stamped
            at += self.window_s
        return at
