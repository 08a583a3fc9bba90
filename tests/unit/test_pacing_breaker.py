"""The upstream-429 breaker with explicit time: known sequences, and one-probe / capped-doubling properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing.breaker import Breaker, BreakerState

fast = settings(max_examples=40, deadline=None)
C, OPEN, H = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def test_closed_lets_everything_through_and_ignores_success() -> None:
    breaker = Breaker(60.0, 900.0)
    for now in (0.0, 1.0, 2.0):
        assert breaker.allow(now) == 0.0
        breaker.on_response(200, None, now)
    assert breaker.state is C and breaker.trips == 0


def test_a_429_opens_then_one_probe_then_closes() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 10.0)
    assert (breaker.state, breaker.opened_at, breaker.open_until, breaker.cooldown_s) == (OPEN, 10.0, 70.0, 60.0)
    assert breaker.allow(10.0) == 60.0
    assert breaker.allow(69.5) == 0.5
    assert breaker.wait_time(70.0) == 0.0 and breaker.poll(70.0) is H  # a peek hands nothing out
    assert breaker.allow(70.0) == 0.0  # the probe
    assert breaker.allow(70.0) == math.inf  # nobody else while it is out
    assert breaker.allow(80.0) == math.inf
    breaker.on_response(200, None, 80.5)
    assert (breaker.state, breaker.opened_at, breaker.open_until, breaker.reopens) == (C, None, None, 0)
    assert breaker.allow(80.5) == 0.0 and breaker.trips == 1


def test_failed_probes_double_the_hold_up_to_the_cap() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 0.0)
    holds = []
    now = 0.0
    for _ in range(6):
        now = breaker.open_until or now
        assert breaker.allow(now) == 0.0
        breaker.on_response(429, None, now)
        holds.append(breaker.cooldown_s)
    assert holds == [120.0, 240.0, 480.0, 900.0, 900.0, 900.0]
    assert breaker.reopens == 6
    now = breaker.open_until or now
    assert breaker.allow(now) == 0.0
    breaker.on_response(200, None, now)
    assert breaker.cooldown_s == 60.0 and breaker.reopens == 0  # the next incident starts small again
    breaker.on_response(429, None, now + 1)
    assert breaker.open_until == now + 61 and breaker.trips == 2


@pytest.mark.parametrize(
    ("retry_after", "hold"),
    [(None, 60.0), (30.0, 60.0), (300.0, 300.0), (5_000.0, 900.0), (-5.0, 60.0), (0.0, 60.0)],
)
def test_retry_after_longer_than_the_cooldown_wins_up_to_the_cap(retry_after: float | None, hold: float) -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, retry_after, 0.0)
    assert breaker.open_until == hold


def test_doubling_starts_from_the_hold_actually_used() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, 300.0, 0.0)
    assert breaker.allow(300.0) == 0.0
    breaker.on_response(429, None, 300.0)
    assert breaker.open_until == 900.0  # 300 + 2 * 300


def test_late_answers_while_open() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 0.0)
    breaker.on_response(200, None, 1.0, probe=False)  # requests sent before it opened
    breaker.on_response(429, None, 2.0, probe=False)
    assert (breaker.state, breaker.open_until, breaker.reopens) == (OPEN, 60.0, 0)  # no doubling per stale 429
    breaker.on_response(429, 120.0, 3.0, probe=False)
    assert breaker.open_until == 123.0  # but IBKR's Retry-After may extend the hold
    breaker.on_response(429, 10.0, 4.0, probe=False)
    assert breaker.open_until == 123.0  # never shorten it


def test_only_the_probe_answer_closes_it() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 0.0)
    assert breaker.allow(60.0) == 0.0
    breaker.on_response(200, None, 61.0, probe=False)
    assert breaker.state is H and breaker.probe_in_flight
    breaker.on_response(200, None, 62.0)
    assert breaker.state is C


def test_a_stale_429_in_half_open_reopens() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 0.0)
    assert breaker.allow(60.0) == 0.0
    breaker.on_response(429, None, 61.0, probe=False)
    assert breaker.state is OPEN and breaker.open_until == 181.0


def test_abandoned_probe_frees_the_place() -> None:
    breaker = Breaker(60.0, 900.0)
    breaker.on_response(429, None, 0.0)
    assert breaker.allow(60.0) == 0.0
    breaker.abandon_probe()
    assert breaker.state is H
    breaker.on_response(200, None, 61.0)  # an answer with no probe out does not close it
    assert breaker.state is H
    assert breaker.allow(61.0) == 0.0
    assert breaker.allow(61.0) == math.inf


@pytest.mark.parametrize(("cooldown", "cap"), [(0.0, 10.0), (-1.0, 10.0), (10.0, 5.0), (10.0, math.inf)])
def test_bad_parameters(cooldown: float, cap: float) -> None:
    with pytest.raises(ValueError, match="cooldown_s"):
        Breaker(cooldown, cap)


event = st.one_of(
    st.tuples(st.just("allow"), st.floats(0.0, 200.0)),
    st.tuples(st.just("answer"), st.sampled_from([200, 429, 500]), st.booleans(), st.none() | st.floats(0.0, 2000.0)),
    st.tuples(st.just("abandon")),
)


@fast
@given(
    cooldown=st.floats(1.0, 100.0),
    factor=st.floats(1.0, 20.0),
    events=st.lists(st.tuples(st.floats(0.0, 50.0), event), max_size=60),
)
def test_at_most_one_probe_and_holds_stay_within_bounds(
    cooldown: float, factor: float, events: list[tuple[float, tuple[object, ...]]]
) -> None:
    cap = cooldown * factor
    breaker = Breaker(cooldown, cap)
    now, probes_out = 0.0, 0
    for gap, (kind, *args) in events:
        now += gap
        before = breaker.poll(now)
        if kind == "allow":
            if breaker.allow(now) == 0.0:
                assert before is not OPEN  # nothing goes while open
                if before is H:
                    probes_out += 1
                    assert probes_out == 1  # exactly one probe at a time
        elif kind == "answer":
            status, is_probe, retry_after = args
            assert isinstance(status, int) and isinstance(is_probe, bool)
            assert retry_after is None or isinstance(retry_after, float)
            breaker.on_response(status, retry_after, now, probe=is_probe)
        else:
            breaker.abandon_probe()
        if not breaker.probe_in_flight:
            probes_out = 0
        assert cooldown <= breaker.cooldown_s <= cap
        if breaker.state is OPEN:
            assert breaker.open_until is not None and breaker.opened_at is not None
            assert breaker.open_until - now <= cap + 1e-9
