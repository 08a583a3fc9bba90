"""Turn the benchmark's results into table rows and a Markdown table (direct / nginx / gateway and the ratios)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

PATHS = ("direct", "nginx", "gateway")


class Row(NamedTuple):
    """One table row; ``ratios`` is False where gateway÷x means nothing (deltas, counts)."""

    group: str
    figure: str
    direct: float | None
    nginx: float | None
    gateway: float | None
    ratios: bool = True


def get(results: dict[str, Any], *keys: str) -> float | None:
    """``results[k1][k2]...`` as a float, or None when missing or not a number."""
    value: Any = results
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _sub(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return (a - b) * scale if a is not None and b is not None else None


def rows(results: dict[str, Any], *, size_label: str, rate: float, idle_count: int) -> list[Row]:
    """The table's rows, in reading order."""

    def per_path(group: str, figure: str, *keys: str, scale: float = 1.0) -> Row:
        values = [get(results, keys[0], path, *keys[1:]) for path in PATHS]
        direct, nginx, gateway = (v * scale if v is not None else None for v in values)
        return Row(group, figure, direct, nginx, gateway)

    def added(group: str, figure: str, section: str, key: str) -> Row:
        deltas = results.get(section, {}).get("added_vs_direct", {})
        return Row(group, figure, 0.0, get(deltas, "nginx", key), get(deltas, "gateway", key), ratios=False)

    def relays(figure: str, key: str, *, ratios: bool = True) -> Row:
        idle = results.get("idle_websockets", {})
        return Row(n_idle, figure, None, get(idle, "nginx", key), get(idle, "gateway", key), ratios)

    def relay_delta(figure: str, after: str, before: str, scale: float = 1.0) -> Row:
        idle = results.get("idle_websockets", {})
        values = [_sub(get(idle, path, after), get(idle, path, before), scale) for path in ("nginx", "gateway")]
        return Row(n_idle, figure, None, values[0], values[1], ratios=False)

    wrk = "small GET, wrk -c16"
    fixed = f"{rate:g} req/s open loop"
    ws = "WebSocket, 1 connection"
    n_idle = f"{idle_count:,} idle WebSockets"
    mib = 1 / 1024
    cold = results.get("cold_start", {})
    return [
        per_path(wrk, "requests/s", "small_get", "rps"),
        per_path(wrk, "latency p50 (ms)", "small_get", "latency_ms", "50%"),
        per_path(wrk, "latency p99 (ms)", "small_get", "latency_ms", "99%"),
        per_path(wrk, "proxy CPU per request (ms)", "small_get", "proxy_cpu_ms_per_request"),
        per_path(wrk, "nginx A (upstream) CPU per request (ms)", "small_get", "origin_cpu_ms_per_request"),
        per_path(fixed, "latency p50 (ms)", "fixed_rate", "p50_ms"),
        per_path(fixed, "latency p99 (ms)", "fixed_rate", "p99_ms"),
        added(fixed, "added p50 vs direct (ms)", "fixed_rate", "p50_ms"),
        added(fixed, "added p99 vs direct (ms)", "fixed_rate", "p99_ms"),
        per_path(f"{size_label} download", "MB/s", "download", "mb_per_s"),
        per_path(f"{size_label} download", "proxy peak RSS (MiB)", "download", "hwm_kib", scale=mib),
        per_path(f"{size_label} download", "proxy RSS after (MiB)", "download", "rss_after_kib", scale=mib),
        per_path(f"{size_label} upload", "MB/s", "upload", "mb_per_s"),
        per_path(f"{size_label} upload", "proxy peak RSS (MiB)", "upload", "hwm_kib", scale=mib),
        per_path(f"{size_label} upload", "proxy RSS after (MiB)", "upload", "rss_after_kib", scale=mib),
        per_path(ws, "messages/s client→server", "ws_rates", "up_per_s"),
        per_path(ws, "messages/s server→client", "ws_rates", "down_per_s"),
        per_path(ws, "proxy CPU per message (ms)", "ws_rates", "proxy_cpu_ms_per_message"),
        per_path(ws, "echo round trip p50 (ms)", "ws_round_trips", "p50_ms"),
        per_path(ws, "echo round trip p99 (ms)", "ws_round_trips", "p99_ms"),
        added(ws, "added round trip p50 vs direct (ms)", "ws_round_trips", "p50_ms"),
        added(ws, "added round trip p99 vs direct (ms)", "ws_round_trips", "p99_ms"),
        relays("opened / answered an echo", "live", ratios=False),
        relays("seconds to open all (50 at a time)", "open_s"),
        relays("KiB per relay (proxy RSS, idle)", "kib_per_relay_idle"),
        relays("fds per relay", "fds_per_relay"),
        relay_delta("RSS kept after closing all (MiB)", "rss_closed_kib", "rss_before_kib", mib),
        relay_delta("fds after closing minus before", "fds_closed", "fds_before"),
        relay_delta(
            "RSS growth over a 2nd open/close cycle (MiB)", "second_cycle_rss_closed_kib", "rss_closed_kib", mib
        ),
        Row("cold start", "spawn → /health 200 (ms)", None, None, get(cold, "time_to_health_ms"), False),
        Row("cold start", "gateway CPU until ready (ms)", None, None, get(cold, "cpu_ms_until_ready"), False),
    ]


def fmt(value: float | None) -> str:
    """A figure with 3 significant-ish digits; ``—`` when absent."""
    if value is None or math.isnan(value):
        return "—"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23×``; ``—`` when either is absent or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.2f}×"


def markdown(table: list[Row]) -> str:
    """The Markdown table: path / figure / direct / nginx / gateway / gateway÷direct / gateway÷nginx."""
    lines = [
        "| path | figure | direct | nginx | gateway | gateway÷direct | gateway÷nginx |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        if row.direct is None and row.nginx is None and row.gateway is None:
            continue  # not measured in this mode
        by_direct = ratio(row.gateway, row.direct) if row.ratios else "—"
        by_nginx = ratio(row.gateway, row.nginx) if row.ratios else "—"
        lines.append(
            f"| {row.group} | {row.figure} | {fmt(row.direct)} | {fmt(row.nginx)} | {fmt(row.gateway)} | "
            f"{by_direct} | {by_nginx} |"
        )
    return "\n".join(lines)


def floor_markdown(results: dict[str, Any]) -> str | None:
    """The gateway next to its server stack alone (bench/floor.py), or None when the floor was not measured."""
    floor = results.get("floor")
    if not isinstance(floor, dict):
        return None
    pairs = [
        (
            "small GET: requests/s (wrk -c16)",
            get(floor, "small_get", "requests_per_s"),
            ("small_get", "gateway", "rps"),
        ),
        (
            "small GET: CPU per request (ms)",
            get(floor, "small_get", "cpu_ms_per_request"),
            ("small_get", "gateway", "proxy_cpu_ms_per_request"),
        ),
        (
            "small GET at 50 req/s: latency p50 (ms)",
            get(floor, "fixed_rate", "p50_ms"),
            ("fixed_rate", "gateway", "p50_ms"),
        ),
        (
            "small GET at 50 req/s: latency p99 (ms)",
            get(floor, "fixed_rate", "p99_ms"),
            ("fixed_rate", "gateway", "p99_ms"),
        ),
        ("download: MB/s", get(floor, "download", "mb_per_s"), ("download", "gateway", "mb_per_s")),
        ("upload: MB/s", get(floor, "upload", "mb_per_s"), ("upload", "gateway", "mb_per_s")),
        (
            "WebSocket: messages/s client→server",
            get(floor, "ws_rates", "up_per_s"),
            ("ws_rates", "gateway", "up_per_s"),
        ),
        (
            "WebSocket: messages/s server→client",
            get(floor, "ws_rates", "down_per_s"),
            ("ws_rates", "gateway", "down_per_s"),
        ),
        (
            "WebSocket: CPU per message (ms)",
            get(floor, "ws_rates", "cpu_ms_per_message"),
            ("ws_rates", "gateway", "proxy_cpu_ms_per_message"),
        ),
        (
            "idle WebSocket: KiB per connection",
            get(floor, "idle_websockets", "kib_per_connection_idle"),
            ("idle_websockets", "gateway", "kib_per_relay_idle"),
        ),
    ]
    lines = [
        "| figure | hypercorn alone, no-op app | gateway | gateway÷floor |",
        "|---|---:|---:|---:|",
    ]
    for figure, alone, keys in pairs:
        gateway = get(results, *keys)
        lines.append(f"| {figure} | {fmt(alone)} | {fmt(gateway)} | {ratio(gateway, alone)} |")
    return "\n".join(lines)
