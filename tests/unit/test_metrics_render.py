"""The pure metrics module: counters and histograms on the hot path, and the text exposition they render to."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    UPSTREAM_BUCKETS_S,
    Family,
    GatewayReadings,
    Histogram,
    RequestMetrics,
    format_value,
    histogram_samples,
    render,
    render_metrics,
)


def readings(**changes: object) -> GatewayReadings:
    values: dict[str, object] = {
        "version": "1.2.3",
        "start_time_s": 1_700_000_000.5,
        "session_state": "ready",
        "session_states": ["starting", "ready", "backoff"],
        "state_seconds": {"starting": 0.25, "ready": 12.0},
        "session_ready": True,
        "handshakes": 2,
        "lst_refreshes": 1,
        "failures": {"handshake": 1, "competing": 0},
        "lst_expires_at_s": 1_700_086_400.0,
        "last_tickle_at_s": None,
        "relays_open": 1,
        "relays_total": 3,
        "messages_up": 4,
        "messages_down": 50,
        "pacing_enabled": True,
        "pacing_queued": 2,
        "pacing_rejected": 7,
        "upstream_429": 1,
        "breaker_open": False,
    }
    values.update(changes)
    return GatewayReadings(**values)  # type: ignore[arg-type]


def parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_histogram_buckets_are_le_and_cumulative() -> None:
    hist = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        hist.observe(v)
    assert hist.counts == [2, 2, 1]  # 0.1 falls in le="0.1", 1.0 in le="1"
    text = render([Family("h", "histogram", "x", histogram_samples((), hist))])
    p = parsed(text)
    assert p["h_bucket", frozenset({("le", "0.1")})] == 2
    assert p["h_bucket", frozenset({("le", "1.0")})] == 4
    assert p["h_bucket", frozenset({("le", "+Inf")})] == 5
    assert p["h_count", frozenset()] == 5
    assert math.isclose(p["h_sum", frozenset()], 4.65)


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_never_loses_an_observation(values: list[float]) -> None:
    metrics = RequestMetrics()
    for v in values:
        metrics.observe_upstream("/r/*", v)
    if values:
        hist = metrics.upstream["/r/*"]
        assert sum(hist.counts) == len(values)
        assert len(hist.counts) == len(UPSTREAM_BUCKETS_S) + 1


def test_request_counter_bounds_the_method_label() -> None:
    metrics = RequestMetrics()
    metrics.count_request("/a/*", "GET", 200)
    metrics.count_request("/a/*", "GET", 200)
    metrics.count_request("unrouted", "PROPFIND", 404)
    metrics.count_request("unrouted", "X" * 1000, 404)
    assert metrics.requests == {("/a/*", "GET", 200): 2, ("unrouted", "OTHER", 404): 2}


def test_label_values_and_help_are_escaped() -> None:
    family = Family("m", "gauge", "help with \\ and\nnewline", [("", (("l", 'a"b\\c\nd'),), 1)])
    text = render([family])
    assert 'm{l="a\\"b\\\\c\\nd"} 1' in text
    assert "# HELP m help with \\\\ and\\nnewline" in text
    (sample,) = next(iter(text_string_to_metric_families(text))).samples
    assert sample.labels == {"l": 'a"b\\c\nd'}


def test_format_value() -> None:
    assert [format_value(v) for v in (3, 2.0, 0.25, math.inf, -math.inf, True)] == [
        "3",
        "2",
        "0.25",
        "+Inf",
        "-Inf",
        "1",
    ]
    assert format_value(math.nan) == "NaN"


def test_whole_exposition_parses_and_says_what_it_read() -> None:
    metrics = RequestMetrics()
    metrics.count_request("/v1/api/iserver/*", "GET", 200)
    metrics.observe_upstream("/v1/api/iserver/*", 0.03)
    text = render_metrics(metrics, readings())
    p = parsed(text)
    assert text.endswith("\n")
    assert (
        p[
            "gateway_http_requests_total",
            frozenset({("route", "/v1/api/iserver/*"), ("method", "GET"), ("status", "200")}),
        ]
        == 1
    )
    assert p["gateway_session_state", frozenset({("state", "ready")})] == 1
    assert p["gateway_session_state", frozenset({("state", "backoff")})] == 0
    assert p["gateway_session_state_seconds_total", frozenset({("state", "backoff")})] == 0
    assert p["gateway_session_failures_total", frozenset({("reason", "handshake")})] == 1
    assert p["gateway_websocket_messages_total", frozenset({("direction", "down")})] == 50
    assert p["gateway_pacing_rejected_total", frozenset()] == 7
    assert p["gateway_build_info", frozenset({("version", "1.2.3")})] == 1
    assert ("gateway_session_last_tickle_timestamp_seconds", frozenset()) not in p  # unknown: omitted
    assert p["gateway_session_lst_expiry_timestamp_seconds", frozenset()] == 1_700_086_400.0
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["gateway_upstream_request_duration_seconds"] == "histogram"
    assert types["gateway_http_requests"] == "counter"
    assert types["gateway_websocket_relays_open"] == "gauge"
