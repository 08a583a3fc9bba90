"""The status snapshot shown on ``/``, ``/session`` and ``/health``: what the session is doing, never a secret."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from gateway.hints import Hint
from gateway.pacing import Pacer
from gateway.proxy.websocket import RelayCounters
from gateway.session.calls import Accounts
from gateway.session.state import State
from gateway.session.supervisor import SessionManager


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


def _iso_ms(epoch_s: float) -> str:
    """ISO-8601 UTC with milliseconds (the page sets its clock offset from it)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s)) + f".{int(epoch_s * 1000) % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class StatusSource:
    """Where the snapshot reads from. ``upstream`` is the base URL; ``simulator`` says it is not IBKR; ``label`` is
    the configured name of the account (``[ibkr] label``, ``""`` when none)."""

    manager: SessionManager
    relays: RelayCounters
    pacer: Pacer
    upstream: str
    simulator: bool
    started_at: float
    label: str = ""
    shared: Callable[[], dict[str, object]] | None = None  # shared WebSocket mode's snapshot; None in relay mode


def live_tasks() -> int:
    """How many trio tasks this process runs now (a leak indicator on ``/session``); 0 outside trio."""
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    count, pending = 0, [root] if root is not None else []
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def _hint(hint: Hint | None) -> dict[str, object] | None:
    return hint.as_dict() if hint is not None else None


def _websocket_summary(shared: dict[str, object] | None) -> str:
    """One line for the status page: the mode and, when shared, clients, IBKR's socket and subscribers per topic."""
    if shared is None:
        return "relay (one IBKR socket per client)"
    subscribers = shared.get("subscribers")
    topics = ", ".join(f"{k} {v}" for k, v in subscribers.items()) if isinstance(subscribers, dict) else ""
    socket = "open" if shared.get("upstream_connected") else "closed"
    return (
        f"shared: {shared.get('clients', 0)} client(s), IBKR socket {socket}, "
        f"{shared.get('upstream_subscriptions', 0)} upstream subscription(s)" + (f" ({topics})" if topics else "")
    )


def _pacing_summary(pacing: dict[str, Any]) -> str:
    """One line for the status page: breaker state, queue, refusals and IBKR 429s."""
    if not pacing.get("enabled"):
        return f"off (IBKR 429s seen: {pacing.get('upstream_429_total', 0)})"
    breaker = pacing.get("breaker", {})
    state = str(breaker.get("state", "closed"))
    if state != "closed":
        state += f", closes in {breaker.get('closes_in_s', 0):.0f} s"
    return (
        f"breaker {state}; queued {pacing.get('queued', 0)}; refused {pacing.get('rejected_total', 0)}; "
        f"IBKR 429s {pacing.get('upstream_429_total', 0)}"
    )


MAX_LISTED_CLIENTS = 50


def _accounts(accounts: Accounts) -> dict[str, object]:
    """The warm-up's account lists (ids only; they are not secrets, and every IBKR answer names them too)."""
    return {
        "iserver": list(accounts.iserver),
        "selected": accounts.selected or None,
        "portfolio": list(accounts.portfolio),
    }


PAPER_WORDS = {True: "paper", False: "live", None: "paper or live: not reported"}
"""How the status page words IBKR's ``isPaper``."""


def _account(label: str, accounts: Accounts | None) -> dict[str, object]:
    """Which account this gateway serves: the configured label (``None`` when unset) and IBKR's ``isPaper`` from
    the current session's ``/iserver/accounts`` (``None`` while no session has read it, or when IBKR did not say)."""
    return {"label": label or None, "paper": accounts.paper if accounts is not None else None}


def _account_summary(label: str, accounts: Accounts | None) -> str:
    """One line for the status page: label, account ids, and paper or live."""
    parts = [label] if label else []
    if accounts is None:
        parts.append("accounts not read yet")
    else:
        parts += [", ".join(accounts.iserver) or "no accounts listed", PAPER_WORDS[accounts.paper]]
    return " · ".join(parts)


def _relay_clients(labels: Iterable[object]) -> list[dict[str, str]]:
    """Who holds the open relays: address and scheme as the client saw them (behind nginx: ``X-Forwarded-For`` /
    ``X-Forwarded-Proto`` from a trusted proxy), at most :data:`MAX_LISTED_CLIENTS`."""
    listed: list[dict[str, str]] = []
    for label in itertools.islice(labels, MAX_LISTED_CLIENTS):
        describe = getattr(label, "describe", None)
        listed.append(describe() if callable(describe) else {"client": str(label), "scheme": "-"})
    return listed


def healthy(source: StatusSource) -> bool:
    """Ready and IBKR says the brokerage session is authenticated."""
    return source.manager.active is not None and source.manager.stats.authenticated


def snapshot(source: StatusSource) -> dict[str, Any]:
    """A JSON-able dict of the gateway's state. Contract: contains no token, secret, signature or cookie.

    ``account`` says which account the gateway serves: ``{"label": <[ibkr] label or None>, "paper": <IBKR's
    isPaper: true, false, or None when unknown>}``; ``accounts`` holds the ids; ``account_summary`` is both in one
    line for the status page.

    Times are ISO-8601 UTC strings; ``now`` is the gateway's clock at the snapshot, so a client can show "in 5 min"
    or "12 s ago" against it whatever its own clock says. ``recent_errors`` lists the last few session errors,
    newest first, each ``{"at": ..., "message": ..., "hint": {"cause", "fix", "keys"} or null}``;
    ``last_error_hint`` is the latest error's hint.
    """
    now = time.time()
    manager = source.manager
    shared = source.shared() if source.shared is not None else None
    stats = manager.stats
    pacing = source.pacer.snapshot()
    session = manager.live  # ready or read-only: the LST works
    lst_expiry = session.lst_expires_at_ms / 1000 if session is not None else None
    accounts = session.accounts if session is not None else None
    return {
        "now": _iso_ms(now),
        "state": manager.state.value,
        "ready": manager.active is not None,
        "read_only": manager.state is State.READ_ONLY and session is not None,
        "healthy": healthy(source),
        "since": _iso(manager.since),
        "upstream": source.upstream,
        "simulator": source.simulator,
        "mode": "simulator (not IBKR)" if source.simulator else "IBKR",
        "generation": session.generation if session is not None else None,
        "accounts": _accounts(accounts) if accounts is not None else None,
        "account": _account(source.label, accounts),
        "account_summary": _account_summary(source.label, accounts),
        "authenticated": stats.authenticated,
        "competing": stats.competing,
        "last_tickle": _iso(stats.last_tickle_at),
        "lst_expires": _iso(lst_expiry),
        "handshakes": stats.handshakes,
        "handshake_failures": stats.handshake_failures,
        "sessions_ended": stats.sessions_ended,
        "lst_refreshes": stats.lst_refreshes,
        "last_error": stats.last_error or None,
        "last_error_at": _iso(stats.last_error_at),
        "last_error_hint": _hint(stats.last_hint),
        "next_attempt": _iso(stats.next_attempt_at),
        "recent_errors": [
            {"at": _iso(e.at), "message": e.message, "hint": _hint(e.hint)} for e in reversed(stats.recent_errors)
        ],
        "websocket_mode": "relay" if source.shared is None else "shared",
        "shared": shared,
        "websocket_summary": _websocket_summary(shared),
        "relays": {
            "open": source.relays.open,
            "opening": source.relays.slots - source.relays.open,
            "opened_total": source.relays.opened_total,
            "messages_up": source.relays.messages_up,
            "messages_down": source.relays.messages_down,
            "clients": _relay_clients(source.relays.clients.values()),
        },
        "pacing": pacing,
        "pacing_summary": _pacing_summary(pacing),
        "uptime_s": round(now - source.started_at, 1),
        "tasks": live_tasks(),
    }
