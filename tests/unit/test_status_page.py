"""The recent-errors ring (bounded, secret-free, short) and the status page rendering hostile text harmlessly."""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.logs import register_secret
from gateway.session.supervisor import MAX_ERROR_CHARS, RECENT_ERRORS, SessionStats
from gateway.web.pages import render_status_page


def test_recent_errors_are_bounded_newest_kept() -> None:
    stats = SessionStats()
    for i in range(RECENT_ERRORS + 5):
        stats.note_error(f"failure {i}", at=1000.0 + i)
    assert len(stats.recent_errors) == RECENT_ERRORS
    assert [e.message for e in stats.recent_errors] == [f"failure {i}" for i in range(5, RECENT_ERRORS + 5)]
    assert stats.last_error == f"failure {RECENT_ERRORS + 4}"
    assert stats.last_error_at == 1000.0 + RECENT_ERRORS + 4


def test_recent_errors_hold_no_registered_secret_and_stay_short() -> None:
    secret = "sEcReT-cookie-value-8c1f0e2d"
    register_secret(secret, slot="unit_test_status_page")
    stats = SessionStats()
    entry = stats.note_error(f"IBKR answered 500: {{'session': '{secret}'}}\n" + "x" * 1000, at=1.0)
    assert secret not in entry.message
    assert "***" in entry.message
    assert "\n" not in entry.message
    assert len(entry.message) <= MAX_ERROR_CHARS
    assert stats.last_error == entry.message


def snapshot(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "now": "2026-11-28T09:00:00.000Z",
        "state": "ready",
        "healthy": True,
        "since": "2026-11-28T08:00:00Z",
        "simulator": False,
        "mode": "IBKR",
        "upstream": "https://api.ibkr.com",
        "authenticated": True,
        "competing": False,
        "last_tickle": "2026-11-28T08:59:30Z",
        "lst_expires": "2026-11-29T08:00:00Z",
        "handshakes": 1,
        "handshake_failures": 0,
        "sessions_ended": 0,
        "lst_refreshes": 0,
        "last_error": None,
        "last_error_at": None,
        "next_attempt": None,
        "recent_errors": [],
        "relays": {"open": 2, "opened_total": 3, "messages_up": 4, "messages_down": 5},
        "pacing_summary": "breaker closed",
        "websocket_summary": "shared: 2 client(s), IBKR socket open, 1 upstream subscription(s)",
        "account": {"label": None, "paper": True},
        "account_summary": "DU1234567 · paper",
    }
    return base | overrides


def test_page_renders_every_row_server_side() -> None:
    page = render_status_page(snapshot())
    assert '<td data-key="relays_open">2</td>' in page
    assert '<td data-key="relays_messages">9</td>' in page
    assert '<td data-key="websocket_summary">shared: 2 client(s), IBKR socket open' in page
    assert '<td data-key="lst_expires">2026-11-29T08:00:00Z</td>' in page
    assert "none since the gateway started" in page
    assert "Healthy: session ready" in page
    assert "@@" not in page


def test_hostile_error_text_cannot_break_out_of_the_page() -> None:
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)> @@SNAPSHOT@@"
    page = render_status_page(snapshot(recent_errors=[{"at": "2026-11-28T08:30:00Z", "message": evil}]))
    assert "<script>alert(1)" not in page
    assert "<img src=x" not in page
    assert page.count("</script>") == 2  # the JSON island and the page's script, nothing injected
    # The marker inside the message is text, not a second substitution.
    assert page.count('<script type="application/json" id="snapshot">') == 1
    island = re.search(r'<script type="application/json" id="snapshot">(.*?)</script>', page, flags=re.S)
    assert island is not None
    assert json.loads(island.group(1))["recent_errors"][0]["message"] == evil


def test_page_names_the_account_it_serves() -> None:
    page = render_status_page(
        snapshot(account={"label": "family-paper", "paper": True}, account_summary="family-paper · DU1 · paper")
    )
    assert "<title>family-paper · ibkr-oauth-gateway status</title>" in page
    assert '<h1>ibkr-oauth-gateway <span id="label">family-paper</span></h1>' in page
    assert '<tr><th>Account</th><td data-key="account_summary">family-paper · DU1 · paper</td></tr>' in page
    unlabelled = render_status_page(snapshot())
    assert "<title>ibkr-oauth-gateway status</title>" in unlabelled
    assert "<h1>ibkr-oauth-gateway</h1>" in unlabelled


def test_hostile_label_is_text() -> None:
    evil = "</title><script>alert(1)</script>"
    page = render_status_page(snapshot(account={"label": evil, "paper": None}, account_summary=evil))
    assert "<script>alert(1)" not in page
    assert page.count("</title>") == 1
    assert page.count("&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt;") == 3  # title, heading, Account row
