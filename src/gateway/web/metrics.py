"""The ``/metrics`` endpoint: reads the live objects at scrape time and answers the Prometheus text format.

Session, relay and pacing numbers are read here from the objects that already keep them (the session manager, the
relay counters, the pacer), so the hot path pays nothing for them; only the per-request counters live in
:class:`~gateway.metrics.RequestMetrics`. Nothing read here is a secret: states, counts and timestamps.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, cast

from gateway.asgi import Receive, Scope, Send
from gateway.metrics import CONTENT_TYPE, GatewayReadings, RequestMetrics, render_metrics
from gateway.session.state import State
from gateway.web.status import StatusSource


def _version() -> str:
    try:
        return metadata.version("ibkr-oauth-gateway")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


VERSION = _version()


def readings(source: StatusSource) -> GatewayReadings:
    """Everything ``/metrics`` shows besides the request counters, read now."""
    manager = source.manager
    stats = manager.stats
    session = manager.active
    pacer = source.pacer
    breaker_open = False
    if pacer.settings.enabled:
        breaker = pacer.snapshot().get("breaker")
        breaker_open = isinstance(breaker, dict) and breaker.get("state") != "closed"
    return GatewayReadings(
        version=VERSION,
        start_time_s=source.started_at,
        session_state=manager.state.value,
        session_states=[state.value for state in State],
        state_seconds={state.value: seconds for state, seconds in manager.state_seconds().items()},
        session_ready=session is not None,
        handshakes=stats.handshakes,
        lst_refreshes=stats.lst_refreshes,
        failures=dict(stats.failures),
        lst_expires_at_s=session.lst_expires_at_ms / 1000 if session is not None else None,
        last_tickle_at_s=stats.last_tickle_at,
        relays_open=source.relays.open,
        relays_total=source.relays.opened_total,
        messages_up=source.relays.messages_up,
        messages_down=source.relays.messages_down,
        pacing_enabled=pacer.settings.enabled,
        pacing_queued=pacer.queued_now,
        pacing_rejected=pacer.rejected_total,
        upstream_429=pacer.upstream_429_total,
        breaker_open=breaker_open,
        **_shared_readings(source),
    )


def _shared_readings(source: StatusSource) -> dict[str, Any]:
    if source.shared is None:
        return {}
    snapshot = source.shared()
    subscribers = snapshot["subscribers"]
    return {
        "shared_upstream_subscriptions": int(cast(int, snapshot["upstream_subscriptions"])),
        "shared_upstream_connected": bool(snapshot["upstream_connected"]),
        "shared_subscribers": dict(cast(dict[str, int], subscribers)),
    }


class MetricsPage:
    """ASGI app answering ``GET``/``HEAD /metrics`` (access was already checked by the dispatcher)."""

    def __init__(self, source: StatusSource, requests: RequestMetrics) -> None:
        self._source = source
        self._requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = render_metrics(self._requests, readings(self._source)).encode("utf-8")
        headers = [
            (b"content-type", CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
