"""Config reload: which keys apply live (pure plan), and the pacer switching settings without losing its state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.config.model import Config
from gateway.config.parse import parse_config
from gateway.config.reload import plan_reload
from gateway.errors import PacingRejected
from gateway.pacing import Pacer
from gateway.pacing.breaker import BreakerState
from gateway.pacing.model import API, Limit, PacingSettings
from gateway.pacing.scheduler import Scheduler, TicketState

TRADES = API + "/iserver/trades"
ACCOUNTS = API + "/iserver/accounts"


def config(data: dict[str, object]) -> Config:
    base: dict[str, object] = {"simulator": {"enabled": True}, "routes": [{"path": "/v1/api/iserver/*"}]}
    parsed, _ = parse_config({**base, **data}, source="t.toml", base_dir=Path.cwd(), env={})
    return parsed


def test_routes_pacing_checks_and_level_apply_the_rest_waits_for_a_restart() -> None:
    running = config({})
    new = config(
        {
            "routes": [{"path": "/v1/api/iserver/*"}, {"path": "/v1/api/portfolio/*"}],
            "pacing": {"global_requests_per_s": 5, "global_burst": 5},
            "server": {"port": 6001, "allowed_origins": ["https://a.example"], "metrics": "off", "api_keys": "k" * 20},
            "session": {"tickle_interval_s": 30},
            "logging": {"level": "debug", "format": "json"},
        }
    )
    plan = plan_reload(running, new)
    assert set(plan.applied) == {
        "routes",
        "pacing.global_requests_per_s",
        "pacing.global_burst",
        "server.allowed_origins",
        "server.metrics",
        "server.api_keys",
        "logging.level",
    }
    assert set(plan.restart_needed) == {"server.port", "session.tickle_interval_s", "logging.format"}
    effective = plan.config
    assert effective.routes == new.routes and effective.pacing == new.pacing
    assert effective.server.port == running.server.port and effective.server.metrics == "off"
    assert effective.session == running.session
    assert (effective.logging.level, effective.logging.format) == ("debug", "text")
    assert "k" * 20 not in repr(plan.applied)


def test_same_config_changes_nothing() -> None:
    running = config({"server": {"api_keys": "k" * 20}})
    plan = plan_reload(running, config({"server": {"api_keys": "k" * 20}}))
    assert plan.applied == () and plan.restart_needed == ()
    assert plan.config == running


def test_scheduler_reconfigure_keeps_breaker_counters_queue_and_recent_grants() -> None:
    scheduler = Scheduler(PacingSettings(global_requests_per_s=2.0, global_burst=2, max_wait_s=100.0))
    granted = [scheduler.submit("GET", ACCOUNTS, 0.0)[0] for _ in range(2)]
    waiting = scheduler.submit("GET", TRADES, 0.0)[0]
    assert [t.state for t in granted] == [TicketState.GRANTED] * 2 and waiting.state is TicketState.WAITING
    scheduler.on_response(granted[0], 429, None, 0.1)
    assert scheduler.breaker.state is BreakerState.OPEN
    open_until = scheduler.breaker.open_until

    new = PacingSettings(global_requests_per_s=5.0, global_burst=5, max_wait_s=100.0, breaker_cooldown_s=30.0)
    scheduler.reconfigure(new, 0.2)
    assert scheduler.settings is new
    assert scheduler.breaker.state is BreakerState.OPEN and scheduler.breaker.open_until == open_until
    assert scheduler.upstream_429_total == 1 and scheduler.granted_total == 2
    assert scheduler.queued == 1 and waiting.state is TicketState.WAITING
    assert waiting.lane is scheduler.lanes[waiting.lane.limit]  # re-homed under the new rules
    assert scheduler.global_windows[0].in_window(0.2) == 2  # the two grants still count against the new budget
    for ticket in granted:
        scheduler.release(ticket, 0.3)  # granted under the old settings, released under the new: no error


def test_reconfigure_moves_waiting_tickets_to_their_new_rule() -> None:
    scheduler = Scheduler(PacingSettings(max_wait_s=10.0))
    assert scheduler.submit("GET", TRADES, 0.0)[0].state is TicketState.GRANTED
    waiting = scheduler.submit("GET", TRADES, 0.0)[0]
    assert waiting.state is TicketState.WAITING  # built-in rule: 1 per 5 s
    faster = Limit(method="GET", path=TRADES, requests=10, per_s=1)
    changed = scheduler.reconfigure(PacingSettings(max_wait_s=10.0, limits=(faster,)), 1.0)
    assert changed == [waiting]
    assert waiting.state.value == "granted"
    assert waiting.lane.limit == faster


def test_invalid_settings_change_nothing() -> None:
    scheduler = Scheduler(PacingSettings())
    before = scheduler.settings
    with pytest.raises(ValueError, match="global_burst"):
        scheduler.reconfigure(dataclasses.replace(before, global_burst=0), 0.0)
    assert scheduler.settings is before


async def test_pacer_reconfigure_wakes_waiters_under_the_new_rules(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(PacingSettings(global_requests_per_s=1.0, global_burst=1, max_wait_s=30.0))
    granted_at: list[float] = []
    rejected: list[PacingRejected] = []

    async def one() -> None:
        try:
            async with pacer.acquire("GET", ACCOUNTS):
                granted_at.append(trio.current_time())
        except PacingRejected as exc:
            rejected.append(exc)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(one)
        await trio.sleep(0.5)
        assert len(granted_at) == 1 and pacer.queued_now == 3
        pacer.reconfigure(PacingSettings(global_requests_per_s=10.0, global_burst=10, max_wait_s=30.0))
    assert not rejected
    assert [round(t - start, 3) for t in granted_at] == [0.0, 0.5, 0.5, 0.5]
    assert pacer.snapshot()["granted_total"] == 4
