"""Pacing rules as data: one rule per IBKR endpoint, the pacer's settings, IBKR's documented table, rule lookup (pure).

A :class:`Limit` says "at most ``requests`` upstream requests to this endpoint in any ``per_s``-second window" and/or
"at most ``max_concurrent`` of them in flight at once". :func:`match_limit` picks the one rule that governs a request.
Nothing here reads a clock or does I/O; :func:`settings_problems` reports every problem at once so the config layer
can turn them into its own errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

API = "/v1/api"

_METHOD = re.compile(r"[A-Z]+")


@dataclass(frozen=True, slots=True)
class Limit:
    """One pacing rule.

    ``method`` is an upper-case HTTP method, or ``None`` for any method (then every method shares one budget).
    ``path`` is an exact path (``/v1/api/iserver/marketdata/snapshot``) or a prefix ending in ``/*``
    (``/v1/api/fyi/*`` matches ``/v1/api/fyi`` and everything below it, all sharing one budget).

    Rate: at most ``requests`` requests in any ``per_s``-second window. ``requests == 0`` means the rule sets no rate
    (``per_s`` is then ignored), e.g. a concurrency-only rule. A fractional ``requests`` is rounded toward safety
    (see :meth:`window`): never more requests in a window, never a faster long-run rate.

    ``max_concurrent``: at most this many requests under the rule in flight at once (``None`` = no cap).
    """

    method: str | None
    path: str
    requests: float
    per_s: float
    max_concurrent: int | None = None

    @property
    def has_rate(self) -> bool:
        """Whether the rule limits the request rate (not only concurrency)."""
        return self.requests > 0

    @property
    def is_prefix(self) -> bool:
        """Whether ``path`` is a ``/*`` prefix rather than an exact path."""
        return self.path.endswith("/*")

    @property
    def base(self) -> str:
        """The path without the trailing ``/*`` of a prefix rule."""
        return self.path[:-2] if self.is_prefix else self.path

    @property
    def rule(self) -> str:
        """A short human label: ``GET /v1/api/iserver/trades`` or ``* /v1/api/fyi/*``."""
        return f"{self.method or '*'} {self.path}"

    def window(self) -> tuple[int, float] | None:
        """``(n, window_s)``: at most ``n`` requests in any ``window_s`` seconds; ``None`` when there is no rate.

        ``requests >= 1``: ``(floor(requests), per_s)`` — a window never holds more than ``requests``, whole.
        ``requests < 1``: ``(1, per_s / requests)`` — one request per longer window, e.g. 0.5/s is 1 per 2 s.
        """
        if not self.has_rate:
            return None
        if self.requests >= 1:
            return math.floor(self.requests), self.per_s
        return 1, self.per_s / self.requests

    def describe(self) -> str:
        """The rule's budget in words, for error messages: ``1 request per 5 s, 5 concurrent``."""
        parts: list[str] = []
        if self.has_rate:
            noun = "request" if self.requests == 1 else "requests"
            parts.append(f"{self.requests:g} {noun} per {self.per_s:g} s")
        if self.max_concurrent is not None:
            parts.append(f"{self.max_concurrent} concurrent")
        return ", ".join(parts) or "no limit"

    def matches(self, method: str, path: str) -> bool:
        """Whether the rule applies to ``method`` and an already normalised ``path`` (see :func:`normalise_path`)."""
        if self.method is not None and self.method != method:
            return False
        if not self.is_prefix:
            return path == self.path
        base = self.base
        return path == base or path.startswith(base + "/")

    def specificity(self) -> tuple[int, int, int]:
        """Sort key of :func:`match_limit`: exact beats prefix, longer beats shorter, method-specific beats any."""
        return (0 if self.is_prefix else 1, len(self.base), 0 if self.method is None else 1)


def _api(*rows: tuple[str | None, str, float, float, int | None]) -> tuple[Limit, ...]:
    return tuple(Limit(m, API + p, r, s, c) for m, p, r, s, c in rows)


# docs/protocol.md §10.5 (IBKR's documented per-endpoint pacing). /iserver/account/orders is the real path of what
# IBKR's table calls /iserver/orders; both are listed. /tickle is listed for any method so GET and POST share one
# 1/s budget.
IBKR_DEFAULT_LIMITS: tuple[Limit, ...] = _api(
    ("GET", "/iserver/marketdata/snapshot", 10, 1, None),
    ("GET", "/iserver/scanner/params", 1, 900, None),
    ("POST", "/iserver/scanner/run", 1, 1, None),
    ("GET", "/iserver/trades", 1, 5, None),
    ("GET", "/iserver/account/orders", 1, 5, None),
    ("GET", "/iserver/orders", 1, 5, None),
    ("GET", "/iserver/account/pnl/partitioned", 1, 5, None),
    ("GET", "/portfolio/accounts", 1, 5, None),
    ("GET", "/portfolio/subaccounts", 1, 5, None),
    ("POST", "/pa/performance", 1, 900, None),
    ("POST", "/pa/summary", 1, 900, None),
    ("POST", "/pa/transactions", 1, 900, None),
    (None, "/fyi/*", 1, 1, None),
    (None, "/tickle", 1, 1, None),
    ("GET", "/sso/validate", 1, 60, None),
    (None, "/iserver/marketdata/history", 0, 0, 5),
)


@dataclass(frozen=True, slots=True)
class PacingSettings:
    """How the pacer holds upstream traffic.

    Global budget (see :meth:`global_windows`): never more than ``global_requests_per_s`` requests in any second, and
    never more than ``global_burst`` back to back. ``max_wait_s``: how long a request may queue before it is rejected
    with 429. Breaker: the first hold after an IBKR 429 is ``breaker_cooldown_s`` (or the response's Retry-After if
    longer); each failed probe doubles the hold, up to ``breaker_max_cooldown_s``, which also caps any Retry-After.
    ``enabled = False`` turns the pacer into a no-op. Validate with :func:`settings_problems`.
    """

    enabled: bool = True
    global_requests_per_s: float = 10.0
    global_burst: int = 10
    max_wait_s: float = 5.0
    breaker_cooldown_s: float = 60.0
    breaker_max_cooldown_s: float = 900.0
    limits: tuple[Limit, ...] = IBKR_DEFAULT_LIMITS
    send_margin_s: float = 0.0
    """Every window is this much longer than the rule says. A granted request reaches IBKR a little later than its
    grant (wake-up, signing, the write); the margin absorbs that jitter, so IBKR's own count per window stays within
    the rule as long as the jitter is below the margin. 0 = exact windows (what the unit tests reason about)."""

    def global_windows(self) -> tuple[tuple[int, float], ...]:
        """The global budget as ``(n, window_s)`` pairs, each "at most ``n`` requests in any ``window_s`` seconds".

        The per-second cap (``floor(rate)`` per 1 s; below 1/s, 1 per ``1/rate`` s) keeps every one-second window at
        or under the rate, which is how IBKR and a per-second counter see it. The burst window (``global_burst`` per
        ``global_burst / rate`` s) spreads requests out when the burst is smaller than the rate; a burst above the
        rate cannot lift the per-second cap. The default (10/s, burst 10) is the single window 10 per 1 s.
        """
        rate, burst = self.global_requests_per_s, self.global_burst
        per_second = (math.floor(rate), 1.0) if rate >= 1 else (1, 1.0 / rate)
        spread = (burst, burst / rate)
        return (per_second,) if spread == per_second or burst >= per_second[0] else (per_second, spread)


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def limit_problems(limit: Limit) -> list[tuple[str, str]]:
    """Every problem with one rule, as ``(field, message)`` pairs; empty when the rule is usable."""
    problems: list[tuple[str, str]] = []
    if limit.method is not None and not _METHOD.fullmatch(limit.method):
        problems.append(("method", f"must be an upper-case HTTP method or absent, not {limit.method!r}"))
    if not limit.path.startswith("/"):
        problems.append(("path", f"must start with '/', not {limit.path!r}"))
    elif "*" in limit.base or "?" in limit.path or (len(limit.base) > 1 and limit.base.endswith("/")):
        problems.append(("path", f"must be an exact path or end in '/*' (no '?', no other '*'), not {limit.path!r}"))
    if not (math.isfinite(limit.requests) and limit.requests >= 0):
        problems.append(("requests", f"must be a finite number >= 0, not {limit.requests!r}"))
    elif limit.requests > 0 and not _finite_positive(limit.per_s):
        problems.append(("per_s", f"must be a finite number > 0, not {limit.per_s!r}"))
    if limit.max_concurrent is not None and limit.max_concurrent < 1:
        problems.append(("max_concurrent", f"must be >= 1 or absent, not {limit.max_concurrent!r}"))
    return problems


def settings_problems(settings: PacingSettings) -> list[tuple[str, str]]:
    """Every problem with ``settings`` as ``(key, message)`` pairs (``limits[3].per_s``); empty when usable."""
    problems: list[tuple[str, str]] = []
    if not _finite_positive(settings.global_requests_per_s):
        problems.append(("global_requests_per_s", "must be a finite number > 0"))
    if settings.global_burst < 1:
        problems.append(("global_burst", "must be >= 1"))
    if not (math.isfinite(settings.max_wait_s) and settings.max_wait_s >= 0):
        problems.append(("max_wait_s", "must be a finite number >= 0"))
    if not _finite_positive(settings.breaker_cooldown_s):
        problems.append(("breaker_cooldown_s", "must be a finite number > 0"))
    if not _finite_positive(settings.breaker_max_cooldown_s):
        problems.append(("breaker_max_cooldown_s", "must be a finite number > 0"))
    elif settings.breaker_max_cooldown_s < settings.breaker_cooldown_s:
        problems.append(("breaker_max_cooldown_s", "must be >= breaker_cooldown_s"))
    for i, limit in enumerate(settings.limits):
        problems.extend((f"limits[{i}].{key}", message) for key, message in limit_problems(limit))
    return problems


def normalise_path(path: str) -> str:
    """The path a rule is matched against: no query or fragment, no trailing slash (``/x/`` must not dodge ``/x``)."""
    for mark in "?#":
        path = path.split(mark, 1)[0]
    while len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def match_limit(limits: Iterable[Limit], method: str, path: str) -> Limit | None:
    """The one rule that governs ``method path``, or ``None`` when no rule applies.

    The most specific matching rule wins: an exact path beats a prefix, a longer prefix beats a shorter one, and at
    equal paths a method-specific rule beats a method=None rule. Among equally specific rules the first listed wins.
    ``method`` is compared upper-cased; ``path`` is normalised with :func:`normalise_path`.
    """
    method = method.upper()
    path = normalise_path(path)
    best: Limit | None = None
    for limit in limits:
        if limit.matches(method, path) and (best is None or limit.specificity() > best.specificity()):
            best = limit
    return best
