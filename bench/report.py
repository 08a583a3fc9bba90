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
        zero = 0.0 if deltas else None  # direct's own row, only where the section was measured
        return Row(group, figure, zero, get(deltas, "nginx", key), get(deltas, "gateway", key), ratios=False)

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


# ---------------------------------------------------------------- fan-out: one upstream tick to many clients

FANOUT_MODES = ("direct", "relay", "shared")
GOAL_RATE = 30_000.0  # client-messages/s on one core (issue 14)
GOAL_ADDED_P99_MS = 5.0


def _step_view(step: dict[str, Any]) -> dict[str, Any]:
    """The figures of one fan-out step that the summary keeps."""
    cpu = step.get("cpu_ms_per_message", {})
    share = step.get("cpu_share_of_one_core", {})
    return {
        "due_per_s": step.get("target_per_s"),
        "delivered_per_s": step.get("delivered_per_s"),
        "delivered_ratio": step.get("delivered_ratio"),
        "p50_ms": step.get("p50_ms"),
        "p99_ms": step.get("p99_ms"),
        "upstream_sockets": step.get("upstream_sockets"),
        "upstream_subscriptions": step.get("upstream_subscriptions"),
        "upstream_frames_per_s": step.get("upstream_frames_per_s"),
        "gateway_cpu_ms_per_message": cpu.get("gateway"),
        "gateway_cpu_share": share.get("gateway"),
        "upstream_cpu_ms_per_message": (
            cpu["nginx_a"] + cpu["ticker"] if "nginx_a" in cpu and "ticker" in cpu else None
        ),
        "clients_cpu_ms_per_message": cpu.get("clients"),
        "machine_steal_share": step.get("machine_steal_share"),
        "fell_behind": step.get("fell_behind", ""),
    }


def fanout_summary(section: dict[str, Any]) -> dict[str, Any]:
    """Per mode: the fixed-rate step, the fastest ramp step that kept up, the first that fell behind; the added
    delay versus direct; RSS per idle client; and the issue's goals for shared mode."""
    out: dict[str, Any] = {}
    for mode in FANOUT_MODES:
        steps = section.get(mode, {}).get("fanout", {}).get("steps", [])
        if not steps:
            continue
        ramp = steps[1:]
        kept = [s for s in ramp if not s["fell_behind"]]
        behind = next((s for s in ramp if s["fell_behind"]), None)
        idle = section.get(mode, {}).get("idle")
        out[mode] = {
            "fixed": _step_view(steps[0]),
            "max_sustained": _step_view(max(kept, key=lambda s: s["delivered_per_s"])) if kept else None,
            "fell_behind_at": _step_view(behind) if behind else None,
            "idle": None
            if not idle
            else {
                "clients": idle["opened"],
                "live": idle["live"],
                "kib_per_client_idle": idle["kib_per_client_idle"],
                "kib_per_client_after_tic": idle["kib_per_client_after_tic"],
                "fds_per_client": idle["fds_per_client"],
            },
        }
    direct = out.get("direct", {}).get("fixed")
    for mode in ("relay", "shared"):
        if mode in out and direct:
            fixed = out[mode]["fixed"]
            out[mode]["added_vs_direct"] = {
                key: fixed[key] - direct[key] for key in ("p50_ms", "p99_ms") if fixed[key] is not None
            }
    shared = out.get("shared")
    if shared:
        fixed = shared["fixed"]
        best = shared["max_sustained"]
        cpu = best["gateway_cpu_ms_per_message"] if best else fixed["gateway_cpu_ms_per_message"]
        added_p99 = shared.get("added_vs_direct", {}).get("p99_ms")
        out["goals"] = {
            "one_upstream_frame_to_n_clients": fixed["upstream_sockets"] == 1
            and fixed["upstream_subscriptions"] == 1
            and fixed["delivered_ratio"] is not None
            and fixed["delivered_ratio"] >= 0.98,
            "max_sustained_per_s": best["delivered_per_s"] if best else None,
            "messages_per_gateway_cpu_second": 1000 / cpu if cpu else None,
            "rate_goal_met": bool(best and best["delivered_per_s"] >= GOAL_RATE),
            "added_p99_ms_at_fixed_rate": added_p99,
            "added_p99_ms_at_max_sustained": best["p99_ms"] - direct["p99_ms"] if best and direct else None,
            "added_p99_goal_met": added_p99 is not None and added_p99 <= GOAL_ADDED_P99_MS,
        }
    return out


def _cell(value: float | None, scale: float = 1.0) -> str:
    return fmt(value * scale if value is not None else None)


def fanout_markdown(results: dict[str, Any]) -> str | None:
    """The fan-out table (direct / relay / shared / shared÷relay) and the goals, or None when not measured."""
    section = results.get("shared_fanout")
    if not isinstance(section, dict) or not section.get("summary"):
        return None
    summary: dict[str, Any] = section["summary"]
    empty: dict[str, Any] = {}

    def view(mode: str, part: str) -> dict[str, Any]:
        found = summary.get(mode, empty).get(part)
        return found if isinstance(found, dict) else empty

    def row(figure: str, part: str, key: str, scale: float = 1.0, ratio_ok: bool = True) -> str:
        values = [view(mode, part).get(key) for mode in FANOUT_MODES]
        cells = [_cell(v, scale) for v in values]
        by_relay = ratio(values[2], values[1]) if ratio_ok else "—"
        return f"| {figure} | {' | '.join(cells)} | {by_relay} |"

    def text_row(figure: str, cells: list[str]) -> str:
        return f"| {figure} | {' | '.join(cells)} | — |"

    subs = "upstream_subscriptions"
    fixed = view("direct", "fixed").get("due_per_s") or view("shared", "fixed").get("due_per_s")
    at = f"at {fmt(fixed)}/s"
    idle_count = fmt(view("shared", "idle").get("clients"))
    lines = [
        "| figure | direct | relay | shared | shared÷relay |",
        "|---|---:|---:|---:|---:|",
        text_row(
            "upstream sockets / subscriptions",
            [
                f"{view(m, 'fixed').get('upstream_sockets', '—')} / {view(m, 'fixed').get(subs, '—')}"
                for m in FANOUT_MODES
            ],
        ),
        row(f"{at}: upstream tick frames/s", "fixed", "upstream_frames_per_s"),
        row(f"{at}: client-messages/s delivered", "fixed", "delivered_per_s"),
        row(f"{at}: delay p50 (ms)", "fixed", "p50_ms"),
        row(f"{at}: delay p99 (ms)", "fixed", "p99_ms"),
        row(f"{at}: added p50 vs direct (ms)", "added_vs_direct", "p50_ms", ratio_ok=False),
        row(f"{at}: added p99 vs direct (ms)", "added_vs_direct", "p99_ms", ratio_ok=False),
        row(f"{at}: gateway CPU per message (µs)", "fixed", "gateway_cpu_ms_per_message", 1000),
        row(f"{at}: gateway CPU (share of one core)", "fixed", "gateway_cpu_share"),
        row(f"{at}: nginx A + ticker CPU per message (µs)", "fixed", "upstream_cpu_ms_per_message", 1000),
        row(f"{at}: clients' CPU per message (µs)", "fixed", "clients_cpu_ms_per_message", 1000),
        row(f"{at}: CPU time stolen by the hypervisor (share)", "fixed", "machine_steal_share", ratio_ok=False),
        row("ramp: most client-messages/s delivered, kept up", "max_sustained", "delivered_per_s"),
        row("ramp: … its delay p99 (ms)", "max_sustained", "p99_ms"),
        row("ramp: … gateway CPU per message (µs)", "max_sustained", "gateway_cpu_ms_per_message", 1000),
        row("ramp: … gateway CPU (share of one core)", "max_sustained", "gateway_cpu_share"),
        row(
            "ramp: … CPU time stolen by the hypervisor (share)", "max_sustained", "machine_steal_share", ratio_ok=False
        ),
        text_row(
            "ramp: first step that fell behind (due → delivered/s)",
            [
                f"{fmt(view(m, 'fell_behind_at').get('due_per_s'))} → "
                f"{fmt(view(m, 'fell_behind_at').get('delivered_per_s'))}"
                if view(m, "fell_behind_at")
                else "none"
                for m in FANOUT_MODES
            ],
        ),
        row(f"{idle_count} idle clients: KiB of gateway RSS per client", "idle", "kib_per_client_idle"),
        row("idle clients: KiB per client after one tic each", "idle", "kib_per_client_after_tic"),
        row("idle clients: fds per client", "idle", "fds_per_client"),
    ]
    goals = summary.get("goals")
    if goals:
        yes = {True: "met", False: "NOT met"}
        lines += [
            "",
            "Goals (issue 14), shared mode:",
            f"- each frame encoded once, written to N clients: {yes[bool(goals['one_upstream_frame_to_n_clients'])]} "
            "(one upstream socket and subscription; every tick reached every client as the text IBKR sent, not "
            "re-encoded; the gateway builds each WebSocket frame once and writes the same bytes to every client)",
            f"- ≥ {GOAL_RATE:,.0f} client-messages/s: {yes[bool(goals['rate_goal_met'])]} — "
            f"{fmt(goals['max_sustained_per_s'])}/s kept up; {fmt(goals['messages_per_gateway_cpu_second'])} "
            "messages per gateway CPU-second",
            f"- p99 added ≤ {GOAL_ADDED_P99_MS:g} ms: {yes[bool(goals['added_p99_goal_met'])]} — "
            f"{fmt(goals['added_p99_ms_at_fixed_rate'])} ms {at}, "
            f"{fmt(goals['added_p99_ms_at_max_sustained'])} ms at the ramp's fastest kept-up step",
        ]
        for mode in FANOUT_MODES:
            behind = view(mode, "fell_behind_at")
            if behind:
                lines.append(f"- {mode}: fell behind at {fmt(behind.get('due_per_s'))}/s: {behind.get('fell_behind')}")
    lines += [
        "",
        "Delay: the client's receive time minus the ticker's send stamp (CLOCK_MONOTONIC, same machine). Direct has "
        "the ticker write one frame per client per tick (as IBKR would for 100 relays), so its delay includes that "
        "serialisation; shared mode's includes the gateway writing the tick to its clients one after the other.",
    ]
    return "\n".join(lines)
