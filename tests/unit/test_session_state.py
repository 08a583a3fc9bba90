"""Session state machine: the whole (state, event) table, legal and illegal sequences, and the back-off rule."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.session.state import (
    RECOVERY,
    TRANSITIONS,
    Backoff,
    Event,
    IllegalTransition,
    Remedy,
    RestartPolicy,
    State,
    Trouble,
    next_state,
    session_call_trouble,
)

fast = settings(max_examples=30, deadline=None)

S, E = State, Event

# Written out independently of the module, from its docstring diagram: every legal move, nothing else.
EXPECTED: dict[tuple[State, Event], State] = {
    (S.STARTING, E.CONNECT): S.HANDSHAKING,
    (S.HANDSHAKING, E.READY): S.READY,
    (S.HANDSHAKING, E.FAIL): S.BACKOFF,
    (S.READY, E.FAIL): S.BACKOFF,
    (S.BACKOFF, E.RETRY): S.HANDSHAKING,
    (S.STARTING, E.SHUTDOWN): S.STOPPING,
    (S.HANDSHAKING, E.SHUTDOWN): S.STOPPING,
    (S.READY, E.SHUTDOWN): S.STOPPING,
    (S.BACKOFF, E.SHUTDOWN): S.STOPPING,
    (S.STOPPING, E.SHUTDOWN): S.STOPPING,
    (S.STOPPING, E.FAIL): S.STOPPING,
    (S.STOPPING, E.STOPPED): S.STOPPED,
    # read-only: the LST works, the brokerage session does not (yet, or no more)
    (S.HANDSHAKING, E.READ_ONLY): S.READ_ONLY,
    (S.READY, E.LOST): S.READ_ONLY,
    (S.READ_ONLY, E.REOPENED): S.READY,
    (S.READ_ONLY, E.FAIL): S.BACKOFF,
    (S.READ_ONLY, E.SHUTDOWN): S.STOPPING,
}


def test_transition_table_is_exactly_the_documented_one() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_state_event_pair_moves_or_raises(state: State, event: Event) -> None:
    expected = EXPECTED.get((state, event))
    if expected is not None:
        assert next_state(state, event) is expected
    else:
        with pytest.raises(IllegalTransition) as info:
            next_state(state, event)
        assert repr(event.value) in str(info.value)
        assert repr(state.value) in str(info.value)
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__  # no KeyError chained into the message


def test_illegal_transition_is_not_a_lookup_error() -> None:
    assert not issubclass(IllegalTransition, LookupError)


@pytest.mark.parametrize(
    ("events", "states"),
    [
        (
            [E.CONNECT, E.READY, E.FAIL, E.RETRY, E.READY, E.SHUTDOWN, E.STOPPED],
            [S.HANDSHAKING, S.READY, S.BACKOFF, S.HANDSHAKING, S.READY, S.STOPPING, S.STOPPED],
        ),
        ([E.SHUTDOWN, E.STOPPED], [S.STOPPING, S.STOPPED]),
        (
            [E.CONNECT, E.FAIL, E.RETRY, E.FAIL, E.RETRY, E.READY],
            [S.HANDSHAKING, S.BACKOFF, S.HANDSHAKING, S.BACKOFF, S.HANDSHAKING, S.READY],
        ),
        (
            [E.CONNECT, E.FAIL, E.SHUTDOWN, E.SHUTDOWN, E.STOPPED],
            [S.HANDSHAKING, S.BACKOFF, S.STOPPING, S.STOPPING, S.STOPPED],
        ),
        ([E.CONNECT, E.SHUTDOWN, E.STOPPED], [S.HANDSHAKING, S.STOPPING, S.STOPPED]),
    ],
)
def test_legal_sequences(events: list[Event], states: list[State]) -> None:
    state = S.STARTING
    walked = []
    for event in events:
        state = next_state(state, event)
        walked.append(state)
    assert walked == states


@pytest.mark.parametrize(
    "events",
    [
        [E.READY],  # ready without a handshake
        [E.CONNECT, E.READY, E.READY],
        [E.CONNECT, E.CONNECT],
        [E.CONNECT, E.RETRY],
        [E.CONNECT, E.READY, E.RETRY],
        [E.CONNECT, E.FAIL, E.READY],  # ready straight out of back-off
        [E.CONNECT, E.FAIL, E.FAIL],
        [E.STOPPED],
        [E.CONNECT, E.READY, E.STOPPED],  # stopped without stopping
        [E.SHUTDOWN, E.CONNECT],
        [E.SHUTDOWN, E.STOPPED, E.CONNECT],  # a handshake after shutdown
        [E.SHUTDOWN, E.STOPPED, E.SHUTDOWN],
    ],
)
def test_illegal_sequences_fail_on_the_last_event(events: list[Event]) -> None:
    state = S.STARTING
    for event in events[:-1]:
        state = next_state(state, event)
    with pytest.raises(IllegalTransition):
        next_state(state, events[-1])


@pytest.mark.parametrize("event", list(Event))
def test_nothing_leaves_stopped(event: Event) -> None:
    with pytest.raises(IllegalTransition):
        next_state(S.STOPPED, event)


@pytest.mark.parametrize("state", [S.STARTING, S.HANDSHAKING, S.READY, S.BACKOFF, S.STOPPING])
def test_shutdown_is_possible_until_stopped(state: State) -> None:
    assert next_state(state, E.SHUTDOWN) is S.STOPPING


def test_enums_are_their_wire_strings() -> None:
    assert [s.value for s in State] == [
        "starting", "handshaking", "ready", "read_only", "backoff", "stopping", "stopped"
    ]  # fmt: skip
    assert State("ready") is S.READY
    assert f"{S.BACKOFF}" == "backoff"
    assert Event("retry") is E.RETRY


@fast
@given(st.lists(st.sampled_from(list(Event)), max_size=30))
def test_property_random_walks_keep_the_invariants(events: list[Event]) -> None:
    state = S.STARTING
    for event in events:
        try:
            after = next_state(state, event)
        except IllegalTransition:
            assert (state, event) not in EXPECTED
            continue
        if after is S.READY:
            assert state in (S.HANDSHAKING, S.READ_ONLY)  # ready only after a handshake or a re-opened brokerage
        if state in (S.STOPPING, S.STOPPED):
            assert after in (S.STOPPING, S.STOPPED)  # no way back once shutting down
        state = after


# --- Backoff ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "cap", "attempt", "jitter", "expected"),
    [
        (1.0, 300.0, 0, 0.0, 0.5),
        (1.0, 300.0, 0, 0.5, 0.75),
        (1.0, 300.0, 1, 0.0, 1.0),
        (1.0, 300.0, 3, 0.0, 4.0),
        (1.0, 300.0, 8, 0.0, 128.0),
        (1.0, 300.0, 9, 0.0, 150.0),  # 512 capped to 300
        (1.0, 300.0, 63, 0.0, 150.0),
        (1.0, 300.0, 64, 0.0, 150.0),
        (0.25, 10.0, 2, 0.5, 0.75),
        (2.0, 1.0, 0, 0.0, 0.5),  # a cap below base still caps
    ],
)
def test_backoff_known_answers(base: float, cap: float, attempt: int, jitter: float, expected: float) -> None:
    assert Backoff(base, cap).delay(attempt, jitter) == expected


@pytest.mark.parametrize("attempt", [64, 65, 1_000, 10**6, 2**63, 10**100])
def test_backoff_huge_attempts_are_capped_without_overflow(attempt: int) -> None:
    backoff = Backoff(1.0, 300.0)
    assert backoff.delay(attempt, 0.0) == 150.0
    assert backoff.delay(attempt, 0.5) == 225.0


@pytest.mark.parametrize(
    ("attempt", "jitter"),
    [(-1, 0.0), (-(10**9), 0.5), (0, -0.1), (0, 1.0), (0, 1.5), (0, math.nan), (0, math.inf), (0, -math.inf)],
)
def test_backoff_rejects_bad_attempt_or_jitter(attempt: int, jitter: float) -> None:
    with pytest.raises(ValueError, match="attempt must be >= 0 and jitter in"):
        Backoff(1.0, 300.0).delay(attempt, jitter)


_base = st.floats(min_value=1e-3, max_value=60.0)
_cap = st.floats(min_value=1e-3, max_value=3600.0)
_attempt = st.integers(min_value=0, max_value=10_000)
_jitter = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def _step(base: float, cap: float, attempt: int) -> float:
    # base >= 1e-3 and cap <= 3600, so 2**200 is past the cap for every case generated here
    return min(cap, base * 2.0 ** min(attempt, 200))


@fast
@given(_base, _cap, _attempt, _jitter)
def test_property_delay_lies_in_the_jitter_window(base: float, cap: float, attempt: int, jitter: float) -> None:
    delay = Backoff(base, cap).delay(attempt, jitter)
    step = _step(base, cap, attempt)
    assert 0.5 * step <= delay <= step
    assert delay <= cap


@fast
@given(_base, _cap, _attempt, _attempt, _jitter)
def test_property_delay_never_decreases_with_attempt(base: float, cap: float, a: int, b: int, jitter: float) -> None:
    low, high = sorted((a, b))
    backoff = Backoff(base, cap)
    assert backoff.delay(low, jitter) <= backoff.delay(high, jitter)
    # the upper bound (jitter just below 1) is monotone too
    assert backoff.delay(low, math.nextafter(1.0, 0.0)) <= backoff.delay(high, math.nextafter(1.0, 0.0))


@fast
@given(_base, _cap, st.integers(min_value=0, max_value=10**30), _jitter)
def test_property_delay_never_exceeds_cap(base: float, cap: float, attempt: int, jitter: float) -> None:
    assert Backoff(base, cap).delay(attempt, jitter) <= cap


# --- the recovery ladder and the restart rule -----------------------------------------------------------------------


def test_recovery_is_in_proportion_to_the_failure() -> None:
    """Written out from docs/operations.md's recovery ladder: only a dead or unknown token costs a new handshake."""
    assert RECOVERY == {
        Trouble.PROXY_401: Remedy.CONFIRM,
        Trouble.UNAUTHENTICATED: Remedy.REOPEN,
        Trouble.COMPETING: Remedy.REOPEN,
        Trouble.PACED: Remedy.WAIT,
        Trouble.TICKLE_401: Remedy.RESTART,
        Trouble.GONE: Remedy.RESTART,
        Trouble.TICKLE_ERROR: Remedy.RESTART,
        Trouble.LST_EXPIRED: Remedy.RESTART,
    }
    assert [session_call_trouble(status) for status in (401, 410, 429, 500, 0)] == [
        Trouble.TICKLE_401, Trouble.GONE, Trouble.PACED, Trouble.TICKLE_ERROR, Trouble.TICKLE_ERROR
    ]  # fmt: skip


POLICY = RestartPolicy(Backoff(base_s=1.0, cap_s=300.0), flap_window_s=300.0, flap_sessions=3)


def test_a_session_that_was_open_is_retried_at_once_unless_sessions_flap() -> None:
    full = 0.999999  # jitter at its top: the whole step
    assert POLICY.delay(0, 1, full) == pytest.approx(1.0)  # the first and second end in 5 min: ~1 s
    assert POLICY.delay(0, 2, full) == pytest.approx(1.0)
    assert POLICY.delay(0, 3, full) == pytest.approx(2.0)  # the third within the window: backing off
    assert POLICY.delay(0, 6, full) == pytest.approx(16.0)
    assert POLICY.delay(0, 200, full) == pytest.approx(300.0)  # capped


def test_back_off_grows_with_consecutive_failed_handshakes() -> None:
    full = 0.999999
    assert [POLICY.delay(n, 0, full) for n in (1, 2, 3, 4)] == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert POLICY.delay(3, 4, full) == pytest.approx(16.0)  # failed handshakes and flapping add up
    assert POLICY.delay(1, 0, 0.0) == pytest.approx(0.5)  # jitter: half to whole step
    with pytest.raises(ValueError, match="counts"):
        POLICY.delay(-1, 0, 0.5)
