"""The trio pacer on virtual time: rates per window, bounded queueing, the 429 breaker, cancellation, no-op mode."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from gateway.errors import GatewayError, PacingRejected
from gateway.pacing import Limit, Pacer, PacingSettings
from gateway.pacing.model import API

SNAPSHOT = API + "/iserver/marketdata/snapshot"
TRADES = API + "/iserver/trades"
HISTORY = API + "/iserver/marketdata/history"
ACCOUNTS = API + "/iserver/accounts"  # no per-endpoint rule: paced only globally


@dataclass
class Log:
    """What a crowd of clients saw."""

    granted: list[float] = field(default_factory=list)
    rejected: list[tuple[float, PacingRejected]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


async def client(
    pacer: Pacer,
    log: Log,
    path: str,
    *,
    method: str = "GET",
    start: float = 0.0,
    hold_s: float = 0.0,
    status: int | None = None,
    retry_after: str | None = None,
) -> None:
    """One request: wait until ``start``, acquire, hold the upstream exchange for ``hold_s``, report ``status``."""
    await trio.sleep_until(start)
    try:
        async with pacer.acquire(method, path):
            log.granted.append(trio.current_time())
            log.in_flight += 1
            log.max_in_flight = max(log.max_in_flight, log.in_flight)
            try:
                await trio.sleep(hold_s)
                if status is not None:
                    pacer.record_response(status, retry_after)
            finally:
                log.in_flight -= 1
    except PacingRejected as exc:
        log.rejected.append((trio.current_time(), exc))


def max_in_window(times: list[float], window_s: float) -> int:
    """The most grants in any half-open window ``[t, t + window_s)``."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] + window_s <= t:  # the same float arithmetic as the window's own expiry
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def part(pacer: Pacer, *keys: str) -> object:
    """``pacer.snapshot()[k1][k2]...``."""
    value: object = pacer.snapshot()
    for key in keys:
        assert isinstance(value, dict)
        value = value[key]
    return value


def settings(**overrides: object) -> PacingSettings:
    return PacingSettings(**overrides)  # type: ignore[arg-type]


class StepCounter(trio.abc.Instrument):
    """Counts task steps: a busy loop shows up as a huge count (virtual time would not move)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


# -- rates -----------------------------------------------------------------------------------------------------------


async def test_200_snapshot_requests_go_at_exactly_the_endpoint_rate(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(global_requests_per_s=50.0, global_burst=50))
    log = Log()
    steps = StepCounter()
    trio.lowlevel.add_instrument(steps)
    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(client, pacer, log, SNAPSHOT)
    trio.lowlevel.remove_instrument(steps)

    # 10 at once, then 10 each second as the window slides: 60 within max_wait_s = 5.
    assert log.granted == [float(second) for second in range(6) for _ in range(10)]
    assert max_in_window(log.granted, 1.0) == 10  # G4: no 1-second window over the endpoint rate
    assert max(Counter(math.floor(t) for t in log.granted).values()) == 10  # nor any calendar second
    assert max_in_window(log.granted, 1.0) <= 50  # nor the global one

    # The other 140 were refused at once (fast 429), each with an honest, whole-second Retry-After.
    assert len(log.rejected) == 140
    assert {t for t, _ in log.rejected} == {0.0}
    for _, exc in log.rejected:
        assert isinstance(exc, GatewayError)
        assert exc.status == 429
        assert exc.reason == "endpoint"
        assert exc.retry_after_s >= 1 and exc.retry_after_s == int(exc.retry_after_s)
        assert "GET /v1/api/iserver/marketdata/snapshot" in str(exc)
    assert sorted(exc.retry_after_s for _, exc in log.rejected)[0] == 6.0  # the 61st request's real turn
    assert pacer.rejected_total == 140
    assert pacer.queued_now == 0
    assert steps.steps < 3 * 200  # each task woken about once, when it was its turn: no polling, no herd

    # Rejected requests took nothing: the next one goes exactly when the sixty grants allow.
    late = Log()
    await client(pacer, late, SNAPSHOT, start=5.5)
    assert late.granted == [6.0]


async def test_global_rate_paces_unruled_paths_oldest_first(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(global_requests_per_s=10.0, global_burst=10))
    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(client, pacer, log, ACCOUNTS)
    assert log.granted == [float(second) for second in range(6) for _ in range(10)]
    assert len(log.rejected) == 40
    assert {exc.reason for _, exc in log.rejected} == {"global"}
    assert "global limit" in str(log.rejected[0][1])


async def test_a_small_burst_spreads_requests_but_never_exceeds_the_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = Pacer(settings(global_requests_per_s=10.0, global_burst=3))
    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(25):
            nursery.start_soon(client, pacer, log, ACCOUNTS)
    # 3 at a time every 0.3 s, until the per-second cap of 10 says wait for the next second.
    assert [round(t, 6) for t in log.granted[:12]] == [0.0] * 3 + [0.3] * 3 + [0.6] * 3 + [0.9] + [1.0] * 2
    assert max_in_window(log.granted, 1.0) == 10
    assert max_in_window(log.granted, 0.3) == 3
    assert len(log.granted) == 25


async def test_one_per_five_seconds_rule(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(max_wait_s=12.0))
    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(client, pacer, log, TRADES)
    assert log.granted == [0.0, 5.0, 10.0]

    strict = Pacer(settings())  # max_wait_s = 5
    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(client, strict, log, TRADES)
    assert log.granted == [10.0, 15.0]
    [(when, exc)] = log.rejected
    assert when == 10.0 and exc.retry_after_s == 10.0 and exc.reason == "endpoint"
    assert "1 request per 5 s" in str(exc)


async def test_rules_do_not_block_each_other(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(max_wait_s=12.0))
    log_trades, log_accounts = Log(), Log()
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(client, pacer, log_trades, TRADES)
        for _ in range(3):
            nursery.start_soon(partial(client, pacer, log_accounts, ACCOUNTS, start=0.5))
    assert log_trades.granted == [0.0, 5.0, 10.0]
    assert log_accounts.granted == [0.5, 0.5, 0.5]  # not stuck behind the waiting trades requests


async def test_history_allows_five_concurrent(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(partial(client, pacer, log, HISTORY, hold_s=1.0))
    assert log.max_in_flight == 5
    assert log.granted == [0.0] * 5 + [1.0] * 3

    log = Log()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(partial(client, pacer, log, HISTORY, start=10.0, hold_s=30.0))
    assert log.max_in_flight == 5
    assert len(log.rejected) == 3
    for when, exc in log.rejected:
        assert when == 15.0  # waited the full max_wait_s, then gave up
        assert exc.reason == "endpoint" and exc.retry_after_s >= 1
        assert "5 concurrent" in str(exc)


async def test_concurrency_place_is_released_when_the_body_raises(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    for _ in range(10):
        with pytest.raises(RuntimeError):
            async with pacer.acquire("GET", HISTORY):
                raise RuntimeError("upstream blew up")
    assert part(pacer, "limits", "* /v1/api/iserver/marketdata/history") == {"waiting": 0, "in_flight": 0}


# -- the 429 breaker -------------------------------------------------------------------------------------------------


def crowd(
    nursery: trio.Nursery,
    pacer: Pacer,
    log: Log,
    starts: list[float],
    *,
    hold_s: float = 0.0,
    status: int | None = None,
) -> None:
    for t in starts:
        nursery.start_soon(partial(client, pacer, log, ACCOUNTS, start=t, hold_s=hold_s, status=status))


def every(start: float, stop: float, step: float) -> list[float]:
    return [start + i * step for i in range(math.ceil((stop - start) / step))]


async def test_429_holds_everything_for_the_cooldown_then_one_probe(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    log = Log()
    starts = every(0.5, 70.0, 0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(client, pacer, Log(), ACCOUNTS, status=429))
        crowd(nursery, pacer, log, starts, hold_s=0.25, status=200)

    assert [t for t in log.granted if t < 60.0] == []  # G4: nothing upstream during the cool-down
    assert [t for t in log.granted if 60.0 <= t < 60.25] == [60.0]  # then exactly one probe
    assert min(t for t in log.granted if t > 60.0) == 60.25  # the rest waited for the probe's answer
    # Everything that could outlast the hold (arrived at 55 or later) went; the rest was refused at once ...
    assert len(log.granted) == len([t for t in starts if t >= 55.0])
    assert len(log.granted) + len(log.rejected) == len(starts)
    for when, exc in log.rejected:
        assert exc.reason == "breaker" and "429" in str(exc)
        assert when < 55.0
        assert exc.retry_after_s == math.ceil(60.0 - when)  # ... with the time left
    assert max_in_window(log.granted, 1.0) <= 10
    assert pacer.snapshot()["breaker"] == {
        "state": "closed",
        "closes_in_s": 0.0,
        "cooldown_s": 60.0,
        "reopens": 0,
        "trips": 1,
        "probe_in_flight": False,
    }
    assert pacer.upstream_429_total == 1


async def test_a_second_429_doubles_the_cooldown(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    log = Log()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(client, pacer, Log(), ACCOUNTS, status=429))
        crowd(nursery, pacer, log, every(59.0, 61.0, 0.5), status=429)  # the probe at 60 is answered 429
        crowd(nursery, pacer, log, every(170.0, 200.0, 1.0), status=200)
    assert [t for t in log.granted if t < 180.0] == [60.0]
    assert next(t for t in log.granted if t >= 180.0) == 180.0  # 60 + 2 * 60
    assert part(pacer, "breaker", "state") == "closed"
    assert pacer.upstream_429_total == 2


async def test_retry_after_longer_than_the_cooldown_wins(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    async with pacer.acquire("GET", ACCOUNTS):
        pacer.record_response(429, "300")
    assert part(pacer, "breaker", "closes_in_s") == 300.0
    with pytest.raises(PacingRejected) as info:
        async with pacer.acquire("GET", ACCOUNTS):
            pass
    assert info.value.retry_after_s == 300.0 and info.value.reason == "breaker"
    log = Log()
    await client(pacer, log, ACCOUNTS, start=297.0, status=200)
    assert log.granted == [300.0]


async def test_garbage_retry_after_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    async with pacer.acquire("GET", ACCOUNTS):
        pacer.record_response(429, "soon, promise")
    assert part(pacer, "breaker", "closes_in_s") == 60.0


async def test_a_probe_that_ends_unanswered_lets_the_next_probe_go(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    async with pacer.acquire("GET", ACCOUNTS):
        pacer.record_response(429, None)
    await trio.sleep_until(60.0)
    with pytest.raises(ConnectionError):
        async with pacer.acquire("GET", ACCOUNTS):  # the probe ...
            raise ConnectionError("refused")  # ... never got an answer
    assert part(pacer, "breaker", "state") == "half_open"
    log = Log()
    await client(pacer, log, ACCOUNTS, status=200)
    assert log.granted == [60.0]
    assert part(pacer, "breaker", "state") == "closed"


async def test_only_the_probe_closes_the_breaker(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(max_wait_s=2.0))
    stale, probe, queued = Log(), Log(), Log()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(client, pacer, stale, ACCOUNTS, hold_s=61.0, status=200))  # sent before the 429
        nursery.start_soon(partial(client, pacer, Log(), ACCOUNTS, start=0.5, status=429))
        nursery.start_soon(partial(client, pacer, probe, ACCOUNTS, start=60.0, hold_s=2.0, status=200))
        nursery.start_soon(partial(client, pacer, queued, ACCOUNTS, start=61.5))
    assert stale.granted == [0.0] and probe.granted == [60.5]
    # The stale request's 200 at 61 did not close the breaker; the request at 61.5 waited for the probe's answer.
    assert queued.granted == [62.5]


async def test_answers_recorded_outside_the_block_count_as_the_probe(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings())
    pacer.record_response(429, None)
    await trio.sleep_until(60.0)
    answer = trio.Event()

    async def reporter() -> None:  # started outside the block, so its context does not name the request
        await answer.wait()
        pacer.record_response(200, None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        async with pacer.acquire("GET", ACCOUNTS):
            assert part(pacer, "breaker", "state") == "half_open"
            answer.set()
            await trio.sleep(1.0)
            assert part(pacer, "breaker", "state") == "closed"


# -- cancellation ----------------------------------------------------------------------------------------------------


async def test_cancelling_a_waiter_frees_its_place(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(max_wait_s=12.0))
    first, gone, third = Log(), Log(), Log()
    scope = trio.CancelScope()

    async def goes_away() -> None:
        with scope:
            await client(pacer, gone, TRADES, start=0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, pacer, first, TRADES)
        nursery.start_soon(goes_away)
        nursery.start_soon(partial(client, pacer, third, TRADES, start=0.5))
        await trio.sleep(1.0)
        assert pacer.queued_now == 2
        assert part(pacer, "limits", "GET /v1/api/iserver/trades", "waiting") == 2
        scope.cancel()
    assert gone.granted == [] and gone.rejected == []
    assert third.granted == [5.0]  # moved up into the cancelled request's turn
    assert pacer.queued_now == 0
    assert pacer._events == {}  # no leaked waiter
    assert pacer.rejected_total == 0


async def test_a_grant_cancelled_before_use_is_given_back(autojump_clock: trio.testing.MockClock) -> None:
    rule = Limit("GET", "/v1/api/slow", requests=2, per_s=5, max_concurrent=1)
    pacer = Pacer(settings(limits=(rule,), max_wait_s=10.0))
    gone = Log()
    scope = trio.CancelScope()

    async def goes_away() -> None:
        with scope:
            await client(pacer, gone, "/v1/api/slow")

    # The outer request holds the one concurrency place; the waiter is cancelled, and the release that follows
    # grants it in the same step, before it can run: it must give the grant back.
    async with trio.open_nursery() as nursery, pacer.acquire("GET", "/v1/api/slow"):
        nursery.start_soon(goes_away)
        await trio.sleep(1.0)
        assert pacer.queued_now == 1
        scope.cancel()
    assert gone.granted == []
    late = Log()
    await client(pacer, late, "/v1/api/slow")
    assert late.granted == [1.0]  # the window still had room: the cancelled grant took nothing
    assert part(pacer, "granted_total") == 2
    assert part(pacer, "limits", "GET /v1/api/slow") == {"waiting": 0, "in_flight": 0}


# -- reporting and no-op mode ------------------------------------------------------------------------------------------


async def test_snapshot_is_json_and_counts_waiters(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(max_wait_s=12.0))
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(client, pacer, Log(), TRADES)
        await trio.sleep(1.0)
        snap = pacer.snapshot()
        json.dumps(snap)
        assert snap["enabled"] is True
        assert snap["queued"] == 2
        assert part(pacer, "limits", "GET /v1/api/iserver/trades") == {"waiting": 2, "in_flight": 0}
        assert part(pacer, "breaker", "state") == "closed"


async def test_disabled_pacer_is_a_no_op(autojump_clock: trio.testing.MockClock) -> None:
    pacer = Pacer(settings(enabled=False))
    log = Log()
    pacer.record_response(429, "900")
    async with trio.open_nursery() as nursery:
        for _ in range(500):
            nursery.start_soon(partial(client, pacer, log, SNAPSHOT, hold_s=1.0))
    assert log.granted == [0.0] * 500 and log.max_in_flight == 500
    assert pacer.rejected_total == 0 and pacer.queued_now == 0
    assert pacer.upstream_429_total == 1
    assert pacer.snapshot() == {"enabled": False, "upstream_429_total": 1}


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="global_burst"):
        Pacer(settings(global_burst=0))
