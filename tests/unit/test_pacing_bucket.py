"""Rate budgets with explicit time: known answers, and the window bounds as hypothesis properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing.bucket import EPSILON, SlidingWindow, TokenBucket

fast = settings(max_examples=40, deadline=None)


# -- token bucket ------------------------------------------------------------------------------------------------------


def test_token_bucket_known_answers() -> None:
    bucket = TokenBucket(rate_per_s=2.0, capacity=3, now=100.0)
    assert [bucket.try_take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # starts full
    assert bucket.try_take(100.0) == 0.5  # refused: one token every 0.5 s ...
    assert bucket.tokens(100.0) == 0.0  # ... and nothing was taken
    assert bucket.try_take(100.25) == 0.25
    assert bucket.try_take(100.5) == 0.0
    assert bucket.wait_time(100.5) == 0.5  # peek takes nothing
    assert bucket.wait_time(100.5) == 0.5
    assert bucket.tokens(200.0) == 3  # refill stops at capacity
    assert bucket.tokens(150.0) == 3  # a clock step back changes nothing


def test_token_bucket_slow_rate() -> None:
    bucket = TokenBucket(rate_per_s=1 / 900, capacity=1, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == pytest.approx(900.0)
    assert bucket.try_take(450.0) == pytest.approx(450.0)
    assert bucket.try_take(900.0) == 0.0


@pytest.mark.parametrize(
    ("rate", "capacity"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0.5), (1.0, float("nan"))]
)
def test_token_bucket_rejects_bad_parameters(rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(rate, capacity, 0.0)


calls = st.lists(st.floats(min_value=0.0, max_value=2.0, allow_nan=False), min_size=1, max_size=80)


@fast
@given(
    rate=st.floats(min_value=0.01, max_value=100.0),
    capacity=st.integers(min_value=1, max_value=20),
    gaps=calls,
    start=st.floats(min_value=0.0, max_value=300_000.0),
)
def test_token_bucket_never_exceeds_capacity_plus_refill(
    rate: float, capacity: int, gaps: list[float], start: float
) -> None:
    bucket = TokenBucket(rate, capacity, start)
    now, taken = start, []
    for gap in gaps:
        now += gap
        if bucket.try_take(now) == 0.0:
            taken.append(now)
    for i, t in enumerate(taken):
        for j in range(i, len(taken)):
            window = taken[j] - t
            assert j - i + 1 <= capacity + rate * window + EPSILON


@fast
@given(rate=st.floats(min_value=0.01, max_value=1000.0), capacity=st.integers(1, 5), start=st.floats(0, 300_000.0))
def test_token_bucket_wait_is_enough(rate: float, capacity: int, start: float) -> None:
    bucket = TokenBucket(rate, capacity, start)
    now = start
    for _ in range(capacity + 3):
        wait = bucket.try_take(now)
        if wait:
            now += wait
            assert bucket.try_take(now) == 0.0  # waiting the advertised time is always enough


# -- sliding window ----------------------------------------------------------------------------------------------------


def test_sliding_window_known_answers() -> None:
    window = SlidingWindow(limit=3, window_s=1.0)
    assert [window.try_take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst goes at once
    assert window.try_take(10.5) == 0.5  # then nothing until the oldest grant leaves the window
    assert window.in_window(10.5) == 3  # nothing taken
    assert window.available_at(10.2) == 11.0
    assert window.try_take(11.0) == 0.0  # [10, 11) held 3; 11.0 starts a new window
    assert window.in_window(11.0) == 1
    assert window.try_take(11.0) == 0.0
    assert window.try_take(11.0) == 0.0
    assert window.try_take(11.0) == 1.0


def test_sliding_window_refund() -> None:
    window = SlidingWindow(limit=1, window_s=5.0)
    stamp = window.take(0.0)
    assert window.wait_time(1.0) == 4.0
    window.refund(stamp)
    assert window.wait_time(1.0) == 0.0
    window.refund(stamp)  # twice, or after it expired: harmless
    window.take(1.0)
    with pytest.raises(ValueError, match="no grant"):
        window.take(1.0)


def test_sliding_window_open_grants_count_until_settled() -> None:
    """A held grant counts until its answer, then one window more: a request that reached IBKR late (sent at 0,
    counted there at 0.9) cannot share IBKR's window with the next burst."""
    window = SlidingWindow(limit=2, window_s=1.0)
    first, second = window.hold(0.0), window.hold(0.0)
    assert window.in_window(50.0) == 2 and window.available_at(50.0) == math.inf  # unanswered: held for good
    window.settle(first, 0.9)
    assert window.available_at(1.0) == 1.9  # one window after the answer, not after the grant
    window.settle(first, 5.0)  # settling twice: no-op
    window.drop(second)  # never sent: its place comes back at once
    assert window.available_at(1.0) == 1.0 and window.in_window(1.0) == 1
    third = window.hold(1.0)
    assert window.available_at(1.0) == 1.9
    assert window.grant_at(0, 1.0) == 1.9 and window.grant_at(1, 1.0) == 2.0  # open ones taken as settling now
    window.drop(third)
    window.drop(third)
    with pytest.raises(ValueError, match="no grant"):
        window.hold(1.0), window.hold(1.0)


def test_sliding_window_adopts_open_grants_as_settled_now() -> None:
    old = SlidingWindow(limit=3, window_s=1.0)
    old.take(0.0)
    old.hold(0.5)
    new = SlidingWindow(limit=3, window_s=1.0)
    new.adopt(old, 0.8)
    assert new.in_window(0.8) == 2 and new.available_at(1.0) == 1.0
    assert new.in_window(1.0) == 1 and new.in_window(1.8) == 0


def test_sliding_window_keeps_order_when_the_clock_steps_back() -> None:
    window = SlidingWindow(limit=2, window_s=1.0)
    assert window.take(5.0) == 5.0
    assert window.take(4.0) == 5.0  # recorded at the latest time seen: expires no earlier than it should
    assert window.available_at(5.5) == 6.0


def test_sliding_window_grant_at_known_answers() -> None:
    window = SlidingWindow(limit=10, window_s=1.0)
    for _ in range(10):
        window.take(0.0)
    # 10 granted at 0: the next ones go 10 per second from t = 1.
    assert [window.grant_at(k, 0.0) for k in (0, 9, 10, 49, 50, 139)] == [1.0, 1.0, 2.0, 5.0, 6.0, 14.0]
    empty = SlidingWindow(limit=2, window_s=5.0)
    assert [empty.grant_at(k, 3.0) for k in range(5)] == [3.0, 3.0, 8.0, 8.0, 13.0]
    with pytest.raises(ValueError, match="k must be"):
        empty.grant_at(-1, 0.0)


@pytest.mark.parametrize(("limit", "window_s"), [(0, 1.0), (1, 0.0), (1, float("inf"))])
def test_sliding_window_rejects_bad_parameters(limit: int, window_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        SlidingWindow(limit, window_s)


@fast
@given(
    limit=st.integers(min_value=1, max_value=12),
    window_s=st.floats(min_value=0.01, max_value=900.0),
    gaps=calls,
    start=st.floats(min_value=0.0, max_value=300_000.0),
)
def test_sliding_window_never_more_than_limit_in_any_window(
    limit: int, window_s: float, gaps: list[float], start: float
) -> None:
    window = SlidingWindow(limit, window_s)
    now, taken = start, []
    for gap in gaps:
        now += gap * window_s
        if window.try_take(now) == 0.0:
            taken.append(now)
    for i, t in enumerate(taken):
        in_window = [u for u in taken[i:] if u < t + window_s]
        assert len(in_window) <= limit
        # and therefore also the token-bucket bound for closed windows: n <= capacity + rate * length
        for j in range(i, len(taken)):
            assert j - i + 1 <= limit + limit / window_s * (taken[j] - t) + 1e-9


@fast
@given(
    limit=st.integers(min_value=1, max_value=6),
    window_s=st.floats(min_value=0.01, max_value=900.0),
    gaps=calls,
    start=st.floats(min_value=0.0, max_value=300_000.0),
)
def test_sliding_window_greedy_schedule_matches_grant_at(
    limit: int, window_s: float, gaps: list[float], start: float
) -> None:
    window = SlidingWindow(limit, window_s)
    now = start
    for gap in gaps[:10]:
        now += gap * window_s
        window.try_take(now)
    predicted = [window.grant_at(k, now) for k in range(3 * limit)]
    # Take greedily, each as soon as allowed: the instants are exactly the predicted ones.
    actual = []
    for _ in range(3 * limit):
        at = window.available_at(now)
        window.take(at)
        actual.append(at)
        now = at
    assert actual == predicted
