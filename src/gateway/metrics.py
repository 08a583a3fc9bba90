"""Prometheus metrics: the hot-path request counters and the text exposition (format 0.0.4) renderer (pure).

Two halves with different costs:

- :class:`RequestMetrics` is touched on every request. Its counters are plain ints in dicts keyed by label tuples
  and its histograms are lists of ints indexed with :func:`bisect.bisect_left`; nothing is formatted, locked or
  allocated beyond the key tuple (everything runs on the one trio thread).
- :func:`render_metrics` runs only when ``/metrics`` is scraped: it formats the counters and the gauges the shell
  read from the live objects (:class:`GatewayReadings`) into the text format.

No clock, no I/O: the shell passes every number in.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

UPSTREAM_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the upstream-latency histogram: IBKR answers in tens to hundreds of ms, history/scanner calls in
seconds, and the default read timeout is 15 s (the ``+Inf`` bucket)."""

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other method a client invents is counted as ``OTHER`` (bounded)."""

UNROUTED = "unrouted"
"""The ``route`` label of requests that matched no allow-listed route and no internal endpoint."""

Labels = tuple[tuple[str, str], ...]


class Histogram:
    """Cumulative-at-render histogram: ``counts[i]`` holds observations in ``(bounds[i-1], bounds[i]]``; the last
    slot holds those above every bound (``+Inf``)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (``le`` semantics: a value equal to a bound falls in that bound's bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class RequestMetrics:
    """The per-request counters; see the module docstring for the cost rules.

    Contract for callers: ``route`` is a bounded label (an allow-list route pattern, an internal path or
    :data:`UNROUTED`), never a raw client path; ``seconds`` is a duration in seconds.
    """

    __slots__ = ("buckets", "requests", "upstream")

    def __init__(self, buckets: Sequence[float] = UPSTREAM_BUCKETS_S) -> None:
        self.buckets = tuple(buckets)
        self.requests: dict[tuple[str, str, int], int] = {}
        self.upstream: dict[str, Histogram] = {}

    def count_request(self, route: str, method: str, status: int) -> None:
        """One answered HTTP request."""
        key = (route, method if method in KNOWN_METHODS else "OTHER", status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1

    def observe_upstream(self, route: str, seconds: float) -> None:
        """IBKR's latency for one request on ``route``: from sending the request to receiving the response headers."""
        histogram = self.upstream.get(route)
        if histogram is None:
            histogram = self.upstream[route] = Histogram(self.buckets)
        histogram.observe(seconds)


@dataclass(frozen=True, slots=True)
class GatewayReadings:
    """What the shell read from the live objects at scrape time (no secrets: counts, states and timestamps only).

    Timestamps are Unix seconds; ``None`` means "not known now" and omits the sample.
    """

    version: str
    start_time_s: float
    session_state: str
    session_states: Sequence[str]
    state_seconds: Mapping[str, float]
    session_ready: bool
    handshakes: int
    lst_refreshes: int
    failures: Mapping[str, int]
    lst_expires_at_s: float | None
    last_tickle_at_s: float | None
    relays_open: int
    relays_total: int
    messages_up: int
    messages_down: int
    pacing_enabled: bool
    pacing_queued: int
    pacing_rejected: int
    upstream_429: int
    breaker_open: bool
    shared_upstream_subscriptions: int | None = None  # None: relay mode (no shared socket)
    shared_upstream_connected: bool = False
    shared_subscribers: Mapping[str, int] = field(default_factory=dict)  # topic → subscribers (shared mode)


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: ``samples`` are ``(name suffix, labels, value)``."""

    name: str
    kind: str  # counter, gauge or histogram
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as the text format writes it: integers without a point, ``+Inf``/``-Inf``/``NaN``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Family]) -> str:
    """The text exposition of ``families``: ``# HELP``, ``# TYPE`` and one line per sample, newline-terminated."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            name = family.name + suffix
            if labels:
                inner = ",".join(f'{key}="{_escape_label(text)}"' for key, text in labels)
                name = f"{name}{{{inner}}}"
            lines.append(f"{name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def histogram_samples(labels: Labels, histogram: Histogram) -> list[tuple[str, Labels, float]]:
    """The ``_bucket`` (cumulative, ending in ``+Inf``; bounds written as floats, ``le="1.0"``, as Prometheus' own
    clients do), ``_sum`` and ``_count`` samples of one histogram."""
    samples: list[tuple[str, Labels, float]] = []
    running = 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
        running += count
        samples.append(("_bucket", (*labels, ("le", "+Inf" if math.isinf(bound) else repr(float(bound)))), running))
    samples.append(("_sum", labels, histogram.total))
    samples.append(("_count", labels, running))
    return samples


def _gauge(name: str, help_text: str, value: float, labels: Labels = ()) -> Family:
    return Family(name, "gauge", help_text, [("", labels, value)])


def _counter(name: str, help_text: str, value: float, labels: Labels = ()) -> Family:
    return Family(name, "counter", help_text, [("", labels, value)])


def families(requests: RequestMetrics, r: GatewayReadings) -> list[Family]:
    """Every metric family the gateway exposes, in a stable order (docs/operations.md, "Metrics", lists them)."""
    http = Family(
        "gateway_http_requests_total",
        "counter",
        "HTTP requests answered, by allow-list route pattern (or internal path, or 'unrouted'), method and status.",
        [
            ("", (("route", route), ("method", method), ("status", str(status))), count)
            for (route, method, status), count in sorted(requests.requests.items())
        ],
    )
    upstream = Family(
        "gateway_upstream_request_duration_seconds",
        "histogram",
        "Time from sending a request to IBKR until its response headers arrived, by route.",
        [
            sample
            for route, hist in sorted(requests.upstream.items())
            for sample in histogram_samples((("route", route),), hist)
        ],
    )
    out = [
        Family(
            "gateway_build_info",
            "gauge",
            "Version of the running gateway (always 1).",
            [("", (("version", r.version),), 1)],
        ),
        _gauge("process_start_time_seconds", "When the gateway process started serving, Unix time.", r.start_time_s),
        http,
        upstream,
        Family(
            "gateway_session_state",
            "gauge",
            "1 for the session's current state, 0 for the others.",
            [("", (("state", state),), int(state == r.session_state)) for state in r.session_states],
        ),
        Family(
            "gateway_session_state_seconds_total",
            "counter",
            "Seconds the session has spent in each state since start, including the current one up to now.",
            [("", (("state", state),), round(r.state_seconds.get(state, 0.0), 3)) for state in r.session_states],
        ),
        _gauge("gateway_session_ready", "1 when a session is ready to carry requests, else 0.", int(r.session_ready)),
        _counter(
            "gateway_session_handshakes_total",
            "Live-session-token handshakes started (including refreshes).",
            r.handshakes,
        ),
        _counter("gateway_session_lst_refreshes_total", "Live session tokens replaced before expiry.", r.lst_refreshes),
        Family(
            "gateway_session_failures_total",
            "counter",
            "Failed handshakes and ended sessions, by reason.",
            [("", (("reason", reason),), count) for reason, count in sorted(r.failures.items())],
        ),
    ]
    if r.lst_expires_at_s is not None:
        out.append(
            _gauge(
                "gateway_session_lst_expiry_timestamp_seconds",
                "When the current live session token expires, Unix time.",
                r.lst_expires_at_s,
            )
        )
    if r.last_tickle_at_s is not None:
        out.append(
            _gauge(
                "gateway_session_last_tickle_timestamp_seconds",
                "When IBKR last answered a tickle, Unix time.",
                r.last_tickle_at_s,
            )
        )
    out += [
        _gauge("gateway_websocket_relays_open", "WebSocket relays open now.", r.relays_open),
        _counter("gateway_websocket_relays_total", "WebSocket relays opened since start.", r.relays_total),
        *(
            []
            if r.shared_upstream_subscriptions is None
            else [
                _gauge(
                    "gateway_websocket_shared_upstream_subscriptions",
                    "Shared mode: subscriptions held on IBKR's one socket.",
                    r.shared_upstream_subscriptions,
                ),
                _gauge(
                    "gateway_websocket_shared_upstream_connected",
                    "Shared mode: 1 while IBKR's socket is open.",
                    int(r.shared_upstream_connected),
                ),
                Family(
                    "gateway_websocket_shared_subscribers",
                    "gauge",
                    "Shared mode: clients subscribed to each topic (smd+CONID, sor, ...).",
                    [("", (("topic", topic),), count) for topic, count in sorted(r.shared_subscribers.items())],
                ),
            ]
        ),
        Family(
            "gateway_websocket_messages_total",
            "counter",
            "WebSocket messages relayed: 'up' = client to IBKR, 'down' = IBKR to client.",
            [("", (("direction", "up"),), r.messages_up), ("", (("direction", "down"),), r.messages_down)],
        ),
        _gauge(
            "gateway_pacing_enabled", "1 when [pacing] holds upstream traffic to IBKR's limits.", int(r.pacing_enabled)
        ),
        _gauge("gateway_pacing_queue_depth", "Requests waiting for their pacing turn now.", r.pacing_queued),
        _counter(
            "gateway_pacing_rejected_total", "Requests the gateway answered 429 itself (pacing).", r.pacing_rejected
        ),
        _counter("gateway_upstream_429_total", "429 Too Many Requests answers received from IBKR.", r.upstream_429),
        _gauge(
            "gateway_pacing_breaker_open",
            "1 while an IBKR 429 holds upstream traffic (open or half-open).",
            int(r.breaker_open),
        ),
    ]
    return out


def render_metrics(requests: RequestMetrics, readings: GatewayReadings) -> str:
    """The whole ``/metrics`` body."""
    return render(families(requests, readings))
