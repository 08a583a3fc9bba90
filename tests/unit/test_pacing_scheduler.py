"""The pure scheduler on explicit time: fairness, fast rejection, breaker hand-off, refunds, random-run invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pacing.breaker import BreakerState
from gateway.pacing.model import API, Limit, PacingSettings
from gateway.pacing.scheduler import Reason, Scheduler, Ticket, TicketState

W, G, R, X = TicketState.WAITING, TicketState.GRANTED, TicketState.REJECTED, TicketState.CANCELLED
TRADES = API + "/iserver/trades"
ACCOUNTS = API + "/iserver/accounts"


def submit(scheduler: Scheduler, path: str, now: float, method: str = "GET") -> Ticket:
    return scheduler.submit(method, path, now)[0]


def answered(scheduler: Scheduler, ticket: Ticket, now: float) -> Ticket:
    """IBKR answers ``ticket`` at ``now`` and the exchange ends."""
    scheduler.on_response(ticket, 200, None, now)
    scheduler.release(ticket, now)
    return ticket


def test_oldest_first_across_rules_for_the_global_budget() -> None:
    scheduler = Scheduler(PacingSettings(global_requests_per_s=1.0, global_burst=1, max_wait_s=10.0))
    answered(scheduler, submit(scheduler, ACCOUNTS, 0.0), 0.0)
    a, b, c = (submit(scheduler, path, 0.0) for path in (ACCOUNTS, TRADES, ACCOUNTS))
    assert [t.state for t in (a, b, c)] == [W, W, W]
    assert scheduler.timekeeper() is a and scheduler.next_change_at == 1.0
    assert scheduler.pump(1.0) == [a]
    answered(scheduler, a, 1.0)
    assert scheduler.pump(2.0) == [b]
    answered(scheduler, b, 2.0)
    assert scheduler.pump(3.0) == [c]
    assert scheduler.timekeeper() is None and scheduler.next_change_at == math.inf


def test_a_blocked_rule_does_not_hold_up_other_rules() -> None:
    scheduler = Scheduler(PacingSettings(max_wait_s=10.0))
    assert answered(scheduler, submit(scheduler, TRADES, 0.0), 0.0).state is TicketState.RELEASED
    waiting = submit(scheduler, TRADES, 0.0)
    other = submit(scheduler, ACCOUNTS, 0.0)
    assert waiting.state is W and other.state is G
    assert scheduler.next_change_at == 5.0
    assert scheduler.pump(4.9) == [] and scheduler.pump(5.0) == [waiting]


def test_fast_rejection_takes_nothing_and_names_the_rule() -> None:
    scheduler = Scheduler(PacingSettings())
    first = submit(scheduler, TRADES, 0.0)
    answered(scheduler, first, 0.0)
    second, third = (submit(scheduler, TRADES, 0.0) for _ in range(2))
    assert (first.state, second.state, third.state) == (TicketState.RELEASED, W, R)
    assert third.reason is Reason.ENDPOINT and third.retry_after_s == 10.0
    assert third.message == (
        "pacing: endpoint limit GET /v1/api/iserver/trades (1 request per 5 s) is saturated; "
        "request rejected, retry in 10 s"
    )
    assert scheduler.lanes[second.lane.limit].waiting == 1  # the rejected one never queued
    assert scheduler.pump(5.0) == [second]
    answered(scheduler, second, 5.0)
    assert submit(scheduler, TRADES, 10.0).state is G  # and never took a turn


def test_expired_ticket_says_what_held_it() -> None:
    rule = Limit("GET", "/v1/api/slow", 0, 0, max_concurrent=1)
    scheduler = Scheduler(PacingSettings(limits=(rule,), max_wait_s=2.0))
    holder = submit(scheduler, "/v1/api/slow", 0.0)
    waiter = submit(scheduler, "/v1/api/slow", 0.5)
    assert (holder.state, waiter.state) == (G, W)
    assert scheduler.pump(2.4) == []
    assert scheduler.pump(2.5) == [waiter]
    assert waiter.state is R and waiter.reason is Reason.ENDPOINT and waiter.retry_after_s == 1.0
    assert "(1 concurrent) is saturated; request rejected after queueing 2.0 s" in waiter.message
    assert scheduler.rejected_total == 1


def test_a_failed_probe_rejects_waiters_that_cannot_outlast_the_new_hold() -> None:
    scheduler = Scheduler(PacingSettings(max_wait_s=5.0))
    scheduler.on_response(None, 429, None, 0.0)
    assert submit(scheduler, ACCOUNTS, 54.0).state is R  # cannot outlast the hold: refused at once
    probe = submit(scheduler, ACCOUNTS, 56.0)
    queued = submit(scheduler, ACCOUNTS, 57.0)
    assert scheduler.next_change_at == 60.0
    assert scheduler.pump(60.0) == [probe] and probe.probe and not queued.probe
    assert scheduler.breaker.probe_in_flight
    changed = scheduler.on_response(probe, 429, None, 60.5)
    assert changed == [queued]
    assert queued.state is R and queued.reason is Reason.BREAKER and queued.retry_after_s == 120.0
    assert "breaker open" in queued.message
    assert scheduler.release(probe, 60.6) == []
    assert scheduler.breaker.state is BreakerState.OPEN and scheduler.upstream_429_total == 2


def test_cancel_and_release_are_idempotent_and_give_places_back() -> None:
    rule = Limit("GET", "/v1/api/x", 1, 10, max_concurrent=1)
    scheduler = Scheduler(PacingSettings(limits=(rule,), max_wait_s=30.0))
    granted = submit(scheduler, "/v1/api/x", 0.0)
    waiting = submit(scheduler, "/v1/api/x", 0.0)
    assert scheduler.cancel(waiting, 1.0) == [] and waiting.state is X
    assert scheduler.cancel(waiting, 1.0) == []
    assert scheduler.queued == 0
    assert scheduler.cancel(granted, 1.0) == [] and granted.state is X  # granted but never sent: refunded
    assert scheduler.release(granted, 1.0) == []
    again = submit(scheduler, "/v1/api/x", 1.0)
    assert again.state is G  # window and concurrency place both came back
    assert scheduler.release(again, 2.0) == [] and again.state is TicketState.RELEASED
    assert scheduler.release(again, 2.0) == []
    assert scheduler.lanes[rule].in_flight == 0 and scheduler.granted_total == 1


def test_snapshot_shape() -> None:
    scheduler = Scheduler(PacingSettings())
    submit(scheduler, TRADES, 0.0)
    submit(scheduler, TRADES, 0.0)
    scheduler.on_response(None, 429, 90.0, 1.0)
    snap = scheduler.snapshot(31.0)
    assert snap["breaker"] == {
        "state": "open",
        "closes_in_s": 60.0,
        "cooldown_s": 90.0,
        "reopens": 0,
        "trips": 1,
        "probe_in_flight": False,
    }
    assert snap["queued"] == 0  # the waiter could not outlast the hold
    assert snap["rejected_total"] == 1 and snap["granted_total"] == 1 and snap["upstream_429_total"] == 1
    # The granted TRADES request has no answer yet: it still counts (IBKR may not have seen it yet).
    assert snap["global"] == {"requests_per_s": 10.0, "burst": 10, "window_s": 1.0, "in_window": 1}
    limits = snap["limits"]
    assert isinstance(limits, dict) and len(limits) == len(PacingSettings().limits)
    assert limits["GET /v1/api/iserver/trades"] == {"waiting": 0, "in_flight": 1}


def test_invalid_settings_raise_with_every_problem() -> None:
    with pytest.raises(ValueError, match=r"global_burst: must be >= 1; max_wait_s: must be a finite number >= 0"):
        Scheduler(PacingSettings(global_burst=0, max_wait_s=-1))


# -- random runs ----------------------------------------------------------------------------------------------------

RULES = (
    Limit("GET", "/a", 2, 1),
    Limit("GET", "/b", 1, 3),
    Limit(None, "/c", 0, 0, max_concurrent=2),
    Limit(None, "/d/*", 3, 2, max_concurrent=1),
)
PATHS = ["/a", "/b", "/c", "/d/x", "/free"]

op = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(PATHS)),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("answer"), st.integers(0, 50), st.sampled_from([200, 200, 429])),
)


def max_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] + window_s <= t:  # the same float arithmetic as the window's own expiry
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(op, max_size=60),
    max_wait=st.sampled_from([0.0, 1.0, 4.0]),
    arrivals=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
)
def test_random_runs_keep_every_budget_and_leave_nothing_behind(
    ops: list[tuple[object, ...]], max_wait: float, arrivals: list[float]
) -> None:
    config = PacingSettings(
        global_requests_per_s=4.0,
        global_burst=2,
        max_wait_s=max_wait,
        breaker_cooldown_s=2.0,
        breaker_max_cooldown_s=5.0,
        limits=RULES,
    )
    scheduler = Scheduler(config)
    now = 0.0
    tickets: list[Ticket] = []

    def check(changed: list[Ticket], before: BreakerState) -> None:
        granted = [t for t in changed if t.state is G]
        assert all(t.state in (G, R) for t in changed)
        assert all(t.retry_after_s >= 1.0 and t.reason is not None for t in changed if t.state is R)
        if before is BreakerState.OPEN:
            assert granted == []  # nothing goes while the breaker is open
        if before is BreakerState.HALF_OPEN and scheduler.breaker.state is not BreakerState.CLOSED:
            assert len(granted) <= 1  # one probe at a time
        assert (scheduler._probe is None) == (not scheduler.breaker.probe_in_flight)
        for limit, lane in scheduler.lanes.items():
            assert lane.waiting == sum(1 for t in tickets if t.lane is lane and t.state is W)
            assert lane.in_flight == sum(1 for t in tickets if t.lane is lane and t.state is G)
            if limit is not None and limit.max_concurrent is not None:
                assert lane.in_flight <= limit.max_concurrent
        assert all(t.deadline > now for t in tickets if t.state is W)  # nobody waits past the deadline

    def next_wake() -> float:
        return min([scheduler.next_change_at, *(t.deadline for t in tickets if t.state is W)])

    for kind, *args in ops:
        before = scheduler.breaker.poll(now)
        changed: list[Ticket] = []
        if kind == "submit":
            assert isinstance(args[0], str)
            ticket, changed = scheduler.submit("GET", args[0], now)
            tickets.append(ticket)
        elif kind == "tick":
            assert isinstance(args[0], float)
            now = min(now + args[0], next_wake())  # as the shell wakes: next change or next deadline
            before = scheduler.breaker.poll(now)
            changed = scheduler.pump(now)
        else:
            assert isinstance(args[0], int)
            live = [t for t in tickets if t.state is G or (kind == "cancel" and t.state is W)]
            if live:
                ticket = live[args[0] % len(live)]
                if kind == "release":
                    changed = scheduler.release(ticket, now)
                elif kind == "cancel":
                    changed = scheduler.cancel(ticket, now)
                else:
                    assert isinstance(args[1], int)
                    changed = scheduler.on_response(ticket, args[1], None, now)
        check(changed, before)

    # Budgets, counted over what was let through (a cancelled grant gave its places back), wherever IBKR counted
    # each request between its grant and its answer: at the grant, at the answer, or anywhere between (the jitter
    # of a slow connect or a busy receiver), with a request still unanswered possibly counted at any later time.
    sent = [t for t in tickets if t.state in (G, TicketState.RELEASED)]

    def counted_at(ticket: Ticket, f: float) -> float:
        start = ticket.granted_at or 0.0
        end = ticket.settled_at if ticket.settled_at is not None else now + 100.0  # unanswered: any time later
        return start + f * (end - start)

    for fractions in ([0.0], [1.0], arrivals, arrivals[::-1]):
        at = {t.seq: counted_at(t, fractions[i % len(fractions)]) for i, t in enumerate(sent)}
        assert max_in_window(list(at.values()), 0.5) <= 2  # burst 2 ...
        assert max_in_window(list(at.values()), 1.0) <= 4  # ... and 4 per second
        for limit in RULES:
            shape = limit.window()
            if shape is not None:
                assert max_in_window([at[t.seq] for t in sent if t.lane.limit is limit], shape[1]) <= shape[0]

    # Liveness: with time moving to each next change, every waiter leaves the queue by its deadline.
    for _ in range(1_000):
        for ticket in [t for t in tickets if t.state is G]:
            scheduler.on_response(ticket, 200, None, now)
            scheduler.release(ticket, now)
        if not scheduler.queued:
            break
        now = next_wake()
        scheduler.pump(now)
    assert scheduler.queued == 0
    assert all(t.state is not W for t in tickets)


def test_a_first_ticket_goes_ahead_of_every_waiting_one() -> None:
    """The session's warm-up: client requests queued before it wait for it anyway, so it takes the next turn."""
    scheduler = Scheduler(PacingSettings(global_requests_per_s=1.0, global_burst=1, max_wait_s=10.0))
    answered(scheduler, submit(scheduler, ACCOUNTS, 0.0), 0.0)
    queued = [submit(scheduler, ACCOUNTS, 0.0) for _ in range(3)]
    warm_up, _ = scheduler.submit("GET", ACCOUNTS, 0.5, first=True)
    assert warm_up.state is W and scheduler.timekeeper() is warm_up
    assert scheduler.pump(1.0) == [warm_up]
    answered(scheduler, warm_up, 1.0)
    assert scheduler.pump(2.0) == [queued[0]]


def test_a_first_ticket_is_not_refused_for_the_queue_it_skips() -> None:
    scheduler = Scheduler(PacingSettings(global_requests_per_s=1.0, global_burst=1, max_wait_s=2.0))
    answered(scheduler, submit(scheduler, ACCOUNTS, 0.0), 0.0)
    [submit(scheduler, ACCOUNTS, 0.0) for _ in range(2)]
    assert submit(scheduler, ACCOUNTS, 0.0).state is R  # a third would wait 3 s: refused
    warm_up, _ = scheduler.submit("GET", ACCOUNTS, 0.0, first=True)
    assert warm_up.state is W
