"""Session states, the events that move between them as a transition table, and the back-off rule (pure).

The supervisor (the shell) owns the clock and the network; this module only says which move is legal, so an
impossible sequence (ready without a handshake, a handshake after shutdown) fails loudly instead of drifting.

::

    starting ──connect──▶ handshaking ──ready──▶ ready
                              │  ▲                 │
                            fail │retry          fail
                              ▼  │                 │
                            backoff ◀──────────────┘
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
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Event(enum.StrEnum):
    """What happened to it."""

    CONNECT = "connect"
    READY = "ready"
    FAIL = "fail"
    RETRY = "retry"
    SHUTDOWN = "shutdown"
    STOPPED = "stopped"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.STARTING, Event.CONNECT): State.HANDSHAKING,
    (State.HANDSHAKING, Event.READY): State.READY,
    (State.HANDSHAKING, Event.FAIL): State.BACKOFF,
    (State.READY, Event.FAIL): State.BACKOFF,
    (State.BACKOFF, Event.RETRY): State.HANDSHAKING,
    (State.STARTING, Event.SHUTDOWN): State.STOPPING,
    (State.HANDSHAKING, Event.SHUTDOWN): State.STOPPING,
    (State.READY, Event.SHUTDOWN): State.STOPPING,
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
