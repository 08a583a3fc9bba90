"""The quart-trio app for the gateway's own endpoints: the status page ``/``, ``/health`` and ``/session``.

Contract: ``/health`` answers 200 only when the session is ready and IBKR says authenticated, 503 with the state
otherwise; ``/session`` is the status snapshot as JSON; ``/`` renders the same snapshot as a single dependency-free page
(``status_page.html``) that refreshes itself from ``/session`` every 2 s, counts "in N min" / "N s ago" down
live, and says so when the gateway stops answering. The page names the account it serves: the ``[ibkr] label`` in
its title and heading, and an "Account" row with the label, the account ids and paper or live. None of them shows
a secret.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from gateway.web.status import StatusSource, healthy, snapshot

_TABLES = {
    "status": (
        ("account_summary", "Account"),
        ("state", "Session state"),
        ("since", "In this state since"),
        ("lst_expires", "Live session token expires"),
        ("last_tickle", "Last tickle"),
        ("next_attempt", "Next handshake attempt"),
        ("relays_open", "Open WebSocket relays"),
        ("relays_messages", "Messages relayed"),
        ("handshakes", "Handshakes"),
        ("sessions_ended", "Sessions ended"),
    ),
    "details": (
        ("handshake_failures", "Handshake failures"),
        ("lst_refreshes", "LST refreshes"),
        ("authenticated", "IBKR says authenticated"),
        ("competing", "Competing session"),
        ("mode", "Upstream kind"),
        ("upstream", "Upstream"),
        ("pacing_summary", "IBKR pacing"),
        ("websocket_summary", "WebSocket mode"),
    ),
}
"""Table id -> (key, label) rows, in order; ``relays_*`` are read from ``relays``, the rest are snapshot keys."""

_TEMPLATE = Path(__file__).with_name("status_page.html").read_text(encoding="utf-8")
_MARKER = re.compile(r"@@[A-Z_]+@@")


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "—" if value is None else html.escape(str(value))


def _value(status: dict[str, Any], key: str) -> Any:
    relays = status["relays"]
    if key == "relays_open":
        return relays["open"]
    if key == "relays_messages":
        return relays["messages_up"] + relays["messages_down"]
    return status[key]


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script>`` element: ``<`` is escaped, so no ``</script>`` or ``<!--`` can end it early
    (``json.dumps`` already escapes every non-ASCII character)."""
    return json.dumps(value).replace("<", "\\u003c")


def render_status_page(status: dict[str, Any]) -> str:
    """The status page for a snapshot: the values rendered server-side (HTML-escaped, readable without
    JavaScript) plus the snapshot itself, from which the page's script re-renders and then polls ``/session``."""
    tables = {
        table: "".join(
            f'<tr><th>{label}</th><td data-key="{key}">{_cell(_value(status, key))}</td></tr>' for key, label in rows
        )
        for table, rows in _TABLES.items()
    }
    errors = "".join(
        f'<li><time datetime="{html.escape(e["at"])}">{html.escape(e["at"])}</time> {html.escape(e["message"])}</li>'
        for e in status["recent_errors"]
    )
    sim_banner = (
        '<div class="banner sim"><strong>Simulator:</strong> this gateway talks to the built-in IBKR simulator, '
        "not to Interactive Brokers. Prices and accounts are made up.</div>"
        if status["simulator"]
        else ""
    )
    health_text = "Healthy: session ready" if status["healthy"] else f"Not ready: {html.escape(status['state'])}"
    label = status["account"]["label"]
    parts = {
        "@@TITLE@@": html.escape(f"{label} · ibkr-oauth-gateway" if label else "ibkr-oauth-gateway"),
        "@@LABEL@@": f' <span id="label">{html.escape(label)}</span>' if label else "",
        "@@SIM_BANNER@@": sim_banner,
        "@@HEALTH_CLASS@@": "ok" if status["healthy"] else "bad",
        "@@HEALTH_TEXT@@": health_text,
        "@@STATUS_ROWS@@": tables["status"],
        "@@DETAIL_ROWS@@": tables["details"],
        "@@ERRORS@@": errors or '<li class="none">none since the gateway started</li>',
        "@@TABLES@@": _script_json(_TABLES),
        "@@SNAPSHOT@@": _script_json(status),
    }
    # One pass, so text filled in for one marker (an error message, say) is never read as another marker.
    return _MARKER.sub(lambda match: parts[match.group(0)], _TEMPLATE)


def build_pages_app(source: StatusSource) -> QuartTrio:
    """The Quart app serving ``/``, ``/health`` and ``/session`` from ``source``."""
    app = QuartTrio("gateway")
    app.config["RESPONSE_TIMEOUT"] = None

    def _json(payload: dict[str, Any], status: int) -> Response:
        return Response(
            json.dumps(payload),
            status=status,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/")
    async def index() -> Response:
        return Response(
            render_status_page(snapshot(source)),
            content_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/session")
    async def session() -> Response:
        return _json(snapshot(source), 200)

    @app.get("/health")
    async def health() -> Response:
        status = snapshot(source)
        ok = healthy(source)
        word = "ok" if ok else "read-only" if status["read_only"] else "unavailable"
        body = {"status": word, "state": status["state"], "simulator": status["simulator"]}
        if not ok:  # why, for whoever looks (the message is scrubbed of every registered secret and cut short)
            body["last_error"] = status["last_error"]
            body["hint"] = status["last_error_hint"]
        return _json(body, 200 if ok else 503)

    return app
