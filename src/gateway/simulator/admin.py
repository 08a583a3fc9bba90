"""The loopback-only admin path ``/_sim/...``: flip faults and read records over HTTP (JSON in and out).

Not OAuth-signed; refused with 403 unless the peer address is loopback. Records leave with Authorization and
Cookie values redacted. The admin path shares the listener, so while the simulator is "down" it is unreachable
too: ``POST /_sim/faults/down`` therefore requires ``{"seconds": S}`` and comes back up by itself.

Routes (GET unless noted)::

    /_sim/state                       settings, session, LST expiry, IBKR rules, faults, counts, open WebSockets
    /_sim/records?since=SEQ           redacted records with seq > SEQ
    /_sim/counts                      requests per endpoint
    POST /_sim/records/clear          forget records and counters
    POST /_sim/faults/expire_lst
    POST /_sim/faults/tickle          {"unauthenticated": true, "competing": false, "clear_on_init": false}
    POST /_sim/faults/close_websockets {"code": 1011, "reason": ""}
    POST /_sim/faults/fail_next       {"n": 1, "status": 500, "path_prefix": null, "error": null}
    POST /_sim/faults/rate_limit      {"n": 3} or {"seconds": 2.5}, optional "path_prefix"
    POST /_sim/faults/delay           {"seconds": 0.5}; with "n": 3 only the next 3 requests (delay_next)
    POST /_sim/faults/drop_mid_response {"n": 1, "after_bytes": null}
    POST /_sim/faults/down            {"seconds": 2}
    POST /_sim/faults/other_session   {"active": true}: another platform holds the brokerage session
    POST /_sim/faults/nightly_reset   the brokerage session ends now (IBKR's nightly reset)
    POST /_sim/faults/reset
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import trio

from gateway.simulator import payloads
from gateway.simulator.asgi import BodyTooLarge, ClientGone, Receive, RequestInfo, Send, read_body, send_json
from gateway.simulator.verify import parse_query

if TYPE_CHECKING:
    from gateway.simulator.core import SimCore

MAX_DOWN_S = 3600.0


class AdminError(Exception):
    """A refused admin request."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _int(data: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AdminError(f"{name} must be an integer in [{low}, {high}]")
    return value


def _float(data: dict[str, Any], name: str, default: float | None, high: float) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise AdminError(f"{name} must be a number in [0, {high}]")
    if not math.isfinite(value):
        raise AdminError(f"{name} must be finite")
    return float(value)


def _str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise AdminError(f"{name} must be a string or null")
    return value


def _bool(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise AdminError(f"{name} must be a boolean")
    return value


def _rules(core: SimCore) -> dict[str, Any]:
    """The IBKR rules' settings and where the session stands with them."""
    config, state, pacer = core.config, core.state, core.pacer
    return {
        "accounts_first": config.accounts_first,
        "snapshot_preflight": config.snapshot_preflight,
        "pacing": config.pacing,
        "penalty_box_s": config.penalty_box_s,
        "penalty_left_s": pacer.penalty_left(trio.current_time()) if pacer is not None else 0.0,
        "accounts_read": state.accounts_read,
        "portfolio_accounts_read": state.portfolio_accounts_read,
        "held_elsewhere": state.held_elsewhere,
    }


async def _route(core: SimCore, request: RequestInfo, body: bytes) -> Any:
    path, method = request.raw_path, request.method
    faults = core.faults
    data: dict[str, Any] = {}
    if method == "POST" and body.strip():
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise AdminError("invalid json body") from exc
        if not isinstance(parsed, dict):
            raise AdminError("json body must be an object")
        data = parsed
    gets = {"/_sim/state", "/_sim/records", "/_sim/counts"}
    if path in gets and method != "GET":
        raise AdminError("method not allowed", 405)
    if path.startswith("/_sim/") and path not in gets and method != "POST":
        raise AdminError("method not allowed", 405)
    if path == "/_sim/state":
        state = core.state
        return {
            "lenient": core.config.lenient,
            "lst": {"issued": state.lst is not None, "expires_ms": state.lst_expires_ms, "count": state.lst_issued},
            "bridge": state.bridge,
            "session_active": state.session_id is not None,
            "rules": _rules(core),
            "websockets": len(core.hub),
            "faults": faults.describe(),
            "counts": core.recorder.counts,
        }
    if path == "/_sim/records":
        since_text = dict(parse_query(request.raw_query) or []).get("since", "0")
        if not since_text.isascii() or not since_text.isdigit() or len(since_text) > 15:
            raise AdminError("since must be a non-negative integer")
        since = int(since_text)
        return {"records": [r.redacted() for r in core.recorder.records if r.seq > since]}
    if path == "/_sim/counts":
        return core.recorder.counts
    if path == "/_sim/records/clear":
        core.recorder.clear()
    elif path == "/_sim/faults/expire_lst":
        faults.expire_lst()
    elif path == "/_sim/faults/tickle":
        faults.set_tickle_unauthenticated(
            _bool(data, "unauthenticated", True),
            competing=_bool(data, "competing", False),
            clear_on_init=_bool(data, "clear_on_init", False),
        )
    elif path == "/_sim/faults/close_websockets":
        code = _int(data, "code", 1011, 1000, 4999)
        assert code is not None
        closed = await faults.close_websockets(code, (_str(data, "reason") or "")[:120])
        return {"ok": True, "closed": closed}
    elif path == "/_sim/faults/fail_next":
        n = _int(data, "n", 1, 0, 1_000_000)
        status = _int(data, "status", 500, 100, 599)
        assert n is not None
        assert status is not None
        faults.fail_next(n, status=status, path_prefix=_str(data, "path_prefix"), error=_str(data, "error"))
    elif path == "/_sim/faults/rate_limit":
        n = _int(data, "n", None, 0, 1_000_000)
        seconds = _float(data, "seconds", None, 86400.0)
        if (n is None) == (seconds is None):
            raise AdminError("give exactly one of n or seconds")
        faults.rate_limit(n=n, seconds=seconds, path_prefix=_str(data, "path_prefix"))
    elif path == "/_sim/faults/delay":
        seconds = _float(data, "seconds", None, 3600.0)
        if seconds is None:
            raise AdminError("seconds is required")
        n = _int(data, "n", None, 0, 1_000_000)
        if n is None:
            faults.set_delay(seconds)
        else:
            faults.delay_next(n, seconds)
    elif path == "/_sim/faults/drop_mid_response":
        n = _int(data, "n", 1, 0, 1_000_000)
        after = _int(data, "after_bytes", None, 0, 1 << 40)
        assert n is not None
        faults.drop_mid_response(n, after_bytes=after)
    elif path == "/_sim/faults/down":
        seconds = _float(data, "seconds", None, MAX_DOWN_S)
        if seconds is None:
            raise AdminError("seconds is required: the admin path goes down with the listener")
        if core.schedule_down is None:
            raise AdminError("not serving", 409)
        core.schedule_down(seconds)
    elif path == "/_sim/faults/other_session":
        faults.set_other_session(_bool(data, "active", True))
    elif path == "/_sim/faults/nightly_reset":
        faults.nightly_reset()
    elif path == "/_sim/faults/reset":
        faults.reset()
    else:
        raise AdminError("not found", 404)
    return {"ok": True}


async def handle_admin(core: SimCore, request: RequestInfo, receive: Receive, send: Send) -> None:
    """Serve one admin request (403 for non-loopback peers)."""
    if not request.client_is_loopback:
        await send_json(send, 403, payloads.error_body("admin path is loopback-only", 403))
        return
    try:
        body = await read_body(receive, 64 * 1024)
        result = await _route(core, request, body)
    except ClientGone:
        return
    except BodyTooLarge:
        await send_json(send, 413, payloads.error_body("request body too large", 413))
        return
    except AdminError as exc:
        await send_json(send, exc.status, payloads.error_body(exc.reason, exc.status))
        return
    except ValueError as exc:
        await send_json(send, 400, payloads.error_body(str(exc), 400))
        return
    await send_json(send, 200, result)
