"""The quart-trio app for the gateway's own endpoints: the status page ``/``, ``/health`` and ``/session``.

Contract: ``/health`` answers 200 only when the session is ready and IBKR says authenticated, 503 with the state
otherwise; ``/session`` is the status snapshot as JSON; ``/`` renders the same snapshot as a page that refreshes
itself from ``/session``. None of them shows a secret.
"""

from __future__ import annotations

import html
import json
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from gateway.web.status import StatusSource, healthy, snapshot

_ROWS = (
    ("mode", "Upstream kind"),
    ("state", "Session state"),
    ("since", "In this state since"),
    ("authenticated", "IBKR says authenticated"),
    ("competing", "Competing session"),
    ("last_tickle", "Last tickle"),
    ("lst_expires", "Live session token expires"),
    ("upstream", "Upstream"),
    ("pacing_summary", "IBKR pacing"),
    ("handshakes", "Handshakes"),
    ("sessions_ended", "Sessions ended"),
    ("last_error", "Last error"),
    ("last_error_at", "Last error at"),
    ("next_attempt", "Next handshake attempt"),
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ibkr-oauth-gateway</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1rem;max-width:44rem;color:#1b1b1b}}
h1{{font-size:1.3rem}} table{{border-collapse:collapse;width:100%}}
th,td{{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #ddd;vertical-align:top;word-break:break-word}}
th{{width:45%;font-weight:600}} .banner{{padding:.6rem;border-radius:.3rem;margin:.5rem 0}}
.ok{{background:#e3f6e5}} .bad{{background:#fde8e8}} .sim{{background:#fff4d6}}
</style></head>
<body>
<h1>ibkr-oauth-gateway</h1>
{sim_banner}
<div id="health" class="banner {health_class}">{health_text}</div>
<table id="status">{rows}</table>
<p>Open WebSocket relays: <span id="relays-open">{relays_open}</span>;
messages relayed: <span id="relays-messages">{relays_messages}</span>.</p>
<p><a href="session">/session</a> (JSON) · <a href="health">/health</a></p>
<script>
const labels = {labels};
function cell(v) {{
  if (v === null) return "—";
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;");
}}
async function refresh() {{
  try {{
    const r = await fetch("session" + location.search, {{cache: "no-store"}});
    const s = await r.json();
    const rows = labels.map(([k, l]) =>
      `<tr><th>${{l}}</th><td data-key="${{k}}">${{cell(s[k])}}</td></tr>`).join("");
    document.getElementById("status").innerHTML = rows;
    const h = document.getElementById("health");
    h.className = "banner " + (s.healthy ? "ok" : "bad");
    h.textContent = s.healthy ? "Healthy: session ready" : "Not ready: " + s.state;
    document.getElementById("relays-open").textContent = s.relays.open;
    document.getElementById("relays-messages").textContent = s.relays.messages_up + s.relays.messages_down;
  }} catch (e) {{ document.getElementById("health").textContent = "Gateway unreachable"; }}
}}
setInterval(refresh, 2000);
</script>
</body></html>
"""


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "—" if value is None else html.escape(str(value))


def render_status_page(status: dict[str, Any]) -> str:
    """The status page for a snapshot (values HTML-escaped)."""
    rows = "".join(f'<tr><th>{label}</th><td data-key="{key}">{_cell(status[key])}</td></tr>' for key, label in _ROWS)
    sim_banner = (
        '<div class="banner sim"><strong>Simulator:</strong> this gateway talks to the built-in IBKR simulator, '
        "not to Interactive Brokers. Prices and accounts are made up.</div>"
        if status["simulator"]
        else ""
    )
    relays = status["relays"]
    return _PAGE.format(
        sim_banner=sim_banner,
        health_class="ok" if status["healthy"] else "bad",
        health_text="Healthy: session ready" if status["healthy"] else f"Not ready: {html.escape(status['state'])}",
        rows=rows,
        relays_open=relays["open"],
        relays_messages=relays["messages_up"] + relays["messages_down"],
        labels=json.dumps([[k, label] for k, label in _ROWS]),
    )


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
        return _json(
            {"status": "ok" if ok else "unavailable", "state": status["state"], "simulator": status["simulator"]},
            200 if ok else 503,
        )

    return app
