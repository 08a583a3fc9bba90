"""Session states and their transition table, the recovery ladder, and the restart back-off rule (pure).

The supervisor (the shell) owns the clock and the network; this module only says which move is legal, so an
impossible sequence (ready without a handshake, a handshake after shutdown) fails loudly instead of drifting, and
which remedy each kind of trouble gets, so recovery stays in proportion to the failure.

::

    starting ──connect──▶ handshaking ──ready──────▶ ready
                              │  ▲   ╲                │ ▲
                            fail │retry ╲read_only  lost│ │reopened
                              ▼  │      ╲             ▼ │
                            backoff ◀───── read_only ◀──┘    (the LST works; no brokerage session)
                               ▲                 fail │
                               └──────────────────────┘      (and ready ──fail──▶ backoff)
    any state ──shutdown──▶ stopping ──stopped──▶ stopped
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    """Where the brokerage session is."""

    STARTING = "starting"
    HANDSHAKING = "handshaking"
    READY = "ready"
    READ_ONLY = "read_only"  # the LST works, the brokerage session (/iserver) does not; it is being re-opened
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Event(enum.StrEnum):
    """What happened to it."""

    CONNECT = "connect"
    READY = "ready"
    READ_ONLY = "read_only"  # handshake: the LST works but the brokerage session could not be opened
    LOST = "lost"  # IBKR says the brokerage session is no longer authenticated (or another one competes)
    REOPENED = "reopened"  # ssodh/init brought it back, the warm-up is done
    FAIL = "fail"
    RETRY = "retry"
    SHUTDOWN = "shutdown"
    STOPPED = "stopped"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.CONNECT): State.HANDSHAKING,
    (State.HANDSHAKING, Event.READY): State.READY,
    (State.HANDSHAKING, Event.READ_ONLY): State.READ_ONLY,
    (State.HANDSHAKING, Event.FAIL): State.BACKOFF,
    (State.READY, Event.LOST): State.READ_ONLY,
    (State.READ_ONLY, Event.REOPENED): State.READY,
    (State.READY, Event.FAIL): State.BACKOFF,
    (State.READ_ONLY, Event.FAIL): State.BACKOFF,
    (State.BACKOFF, Event.RETRY): State.HANDSHAKING,
    (State.STARTING, Event.SHUTDOWN): State.STOPPING,
    (State.HANDSHAKING, Event.SHUTDOWN): State.STOPPING,
    (State.READY, Event.SHUTDOWN): State.STOPPING,
    (State.READ_ONLY, Event.SHUTDOWN): State.STOPPING,
    (State.BACKOFF, Event.SHUTDOWN): State.STOPPING,
    (State.STOPPING, Event.SHUTDOWN): State.STOPPING,
    # A handshake or session failure that lands after stop() but before its cancellation: the gateway keeps stopping.
    (State.STOPPING, Event.FAIL): State.STOPPING,
    (State.STOPPING, Event.STOPPED): State.STOPPED,
}


class IllegalTransition(Exception):
    """An event arrived in a state where it cannot happen (a bug in the caller, never an upstream fault)."""


def next_state(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; raises :class:`IllegalTransition` if the table has no entry."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"event {event.value!r} is not possible in state {state.value!r}") from None


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off with jitter: attempt ``n`` waits ``min(cap, base * 2**n) * (0.5 + jitter / 2)``.

    ``jitter`` is a caller-supplied number in ``[0, 1)`` (the shell draws it), so the wait lies in
    ``[half, full]`` of the exponential step and never exceeds ``cap``.
    """

    base_s: float
    cap_s: float

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        if attempt < 0 or not 0.0 <= jitter < 1.0:
            raise ValueError("attempt must be >= 0 and jitter in [0, 1)")
        step = self.cap_s if attempt >= 64 else min(self.cap_s, self.base_s * (2**attempt))
        return step * (0.5 + jitter / 2)


# --- the recovery ladder ----------------------------------------------------------------------------------------


class Trouble(enum.StrEnum):
    """What went wrong with a live session: the ladder's input (also the ``failures`` metric's label)."""

    PROXY_401 = "upstream_401"  # IBKR answered 401 (or 410) to a client's request
    TICKLE_401 = "tickle_401"  # IBKR refused the LST itself on a session call
    GONE = "gone"  # 410 on a session call: IBKR wants a new LST
    UNAUTHENTICATED = "unauthenticated"  # the brokerage session is down; the LST is fine
    COMPETING = "competing"  # another login holds the brokerage session
    PACED = "paced"  # 429 on a session call: IBKR's pacing
    TICKLE_ERROR = "tickle_error"  # the tickle failed otherwise (transport, 5xx, an answer without a session)
    LST_EXPIRED = "lst_expired"  # the LST expired and could not be refreshed


class Remedy(enum.StrEnum):
    """What the supervisor does about a :class:`Trouble`."""

    CONFIRM = "confirm"  # ask IBKR (a tickle with the current LST) before deciding; one refusal is not a verdict
    REOPEN = "reopen"  # ssodh/init with the current LST; read-only meanwhile, relays stay open
    WAIT = "wait"  # feed the pacing breaker and try again after it; the session stays
    RESTART = "restart"  # the LST is dead or unknown: end the session, new LST, whole handshake


RECOVERY: dict[Trouble, Remedy] = {
    Trouble.PROXY_401: Remedy.CONFIRM,
    Trouble.TICKLE_401: Remedy.RESTART,
    Trouble.GONE: Remedy.RESTART,
    Trouble.UNAUTHENTICATED: Remedy.REOPEN,
    Trouble.COMPETING: Remedy.REOPEN,
    Trouble.PACED: Remedy.WAIT,
    Trouble.TICKLE_ERROR: Remedy.RESTART,
    Trouble.LST_EXPIRED: Remedy.RESTART,
}
"""Recovery in proportion to the failure: only a confirmed dead (or unknown) LST costs a new handshake."""


def session_call_trouble(status: int) -> Trouble:
    """The trouble a session call (tickle, ssodh/init, an accounts read) that IBKR answered ``status`` signals;
    ``0`` (no status: transport failure or an unusable body) is a tickle error."""
    if status == 401:
        return Trouble.TICKLE_401
    if status == 410:
        return Trouble.GONE
    if status == 429:
        return Trouble.PACED
    return Trouble.TICKLE_ERROR


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How long to wait before the next handshake.

    Back-off grows with consecutive failed *handshakes*. A session that was open and then failed is retried at
    once (the first back-off step, about ``base_s``), unless sessions flap: when ``flap_sessions`` or more ended
    within ``flap_window_s``, each one beyond ``flap_sessions - 1`` adds a back-off step, so a session that dies
    right after every handshake (a competing login, an upstream that flaps) never turns the loop into an LST hammer.
    """

    backoff: Backoff
    flap_window_s: float = 300.0
    flap_sessions: int = 3

    def delay(self, failed_handshakes: int, recent_sessions_ended: int, jitter: float) -> float:
        """Seconds before the next handshake, given the handshakes failed in a row since the last open session and
        the sessions that ended within ``flap_window_s`` (``jitter`` in ``[0, 1)``, drawn by the shell)."""
        if failed_handshakes < 0 or recent_sessions_ended < 0:
            raise ValueError("counts must be >= 0")
        flapping = max(0, recent_sessions_ended - self.flap_sessions + 1)
        steps = max(0, failed_handshakes - 1) + flapping
        return self.backoff.delay(min(steps, 64), jitter)
