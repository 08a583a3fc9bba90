"""The status page and the dashboard example in real headless Chromium (driven over DevTools), against a gateway
and its simulator on loopback. Screenshots go to ``test-output/browser/`` (listed under "artifacts" at the end)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from tests.cdp import Browser, CdpError, Page, open_chromium
from tests.conftest import Artifact, Figure

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "browser"
KEY = "browser-test-key-0123456789abcdef"
PHONE = (390, 844)
AAPL = 265598  # the simulator's conids for AAPL and EUR.USD
EURUSD = 12087792


@pytest.fixture
async def browser(chromium_path: str, tmp_path: Path) -> AsyncIterator[Browser]:
    async with open_chromium(chromium_path, tmp_path) as chromium:
        yield chromium


def js_text(selector: str) -> str:
    """A JavaScript expression for the text of the first element matching ``selector`` ("" when absent)."""
    return f"((document.querySelector({json.dumps(selector)}) || {{}}).textContent || '')"


async def phone_check(page: Page, path: Path) -> int:
    """Emulate a 390 px wide phone, save a screenshot to ``path`` and return the page's scroll width."""
    await page.set_viewport(*PHONE, mobile=True, scale=2)
    await page.wait_for(f"innerWidth === {PHONE[0]}")
    await trio.sleep(0.3)  # one more render after the resize
    width: int = await page.evaluate("document.documentElement.scrollWidth")
    await page.screenshot(path, full_page=True)
    return width


async def test_status_page_shows_a_failing_session_live_and_recovers(
    browser: Browser, ibkr_sim_credentials: SimulatorCredentials, figure: Figure, artifact: Artifact
) -> None:
    """The page at / follows the session without a reload: healthy, then not ready with the error listed while
    the simulator fails tickles, then healthy again; LST expiry and last tickle count live; names the account it
    serves (label, ids, paper) and says when they are not known; fits a phone; and says so when the gateway stops
    answering."""
    with trio.fail_after(120):
        async with open_test_gateway(
            {"session": {"tickle_interval_s": 1}, "ibkr": {"label": "family-paper"}},
            credentials=ibkr_sim_credentials,
            simulator_options={"lst_ttl_s": 3600},
        ) as gw:
            page = await browser.new_page()
            await page.navigate(gw.url + "/")
            await page.evaluate("window.notReloaded = true")  # gone if anything reloads the page
            await page.wait_for(f"{js_text('#health')}.startsWith('Healthy')")
            lst = await page.wait_for(f"{js_text('td[data-key=lst_expires]')}.match(/\\(in (59|60) min\\)/)")
            assert lst
            tickle_before = await page.wait_for(f"{js_text('td[data-key=last_tickle]')}")
            assert re.search(r"\(\d+ s ago\)", tickle_before), tickle_before
            assert re.fullmatch(r"updated \d+ s ago", await page.evaluate(js_text("#freshness")))
            assert "none since" in await page.evaluate(js_text("#errors"))
            assert await page.evaluate("document.title") == "family-paper · ibkr-oauth-gateway status"
            assert await page.evaluate(js_text("h1")) == "ibkr-oauth-gateway family-paper"
            account = "td[data-key=account_summary]"
            assert await page.evaluate(js_text(account)) == "family-paper · DU1234567 · paper"
            # The countdown moves on its own between polls: the tickle time changes, its "ago" keeps counting.
            await page.wait_for(f"{js_text('td[data-key=last_tickle]')} !== {json.dumps(tickle_before)}")

            # IBKR drops the brokerage session (its nightly reset): read-only while the gateway re-opens it.
            gw.simulator.faults.set_tickle_unauthenticated(True)
            failed_at = trio.current_time()
            await page.wait_for(f"{js_text('#health')}.startsWith('Read-only')", timeout_s=10)
            shown_after = trio.current_time() - failed_at
            error = await page.wait_for(
                f"{js_text('#errors li')}.includes('not authenticated') && {js_text('#errors')}"
            )
            assert re.search(r"\d\d:\d\d:\d\d UTC", error), error
            assert await page.evaluate(js_text("td[data-key=state]")) == "read_only"
            gw.simulator.faults.set_tickle_unauthenticated(False)
            await page.wait_for(f"{js_text('#health')}.startsWith('Healthy')", timeout_s=20)

            # A failed tickle: the session ends and a new handshake follows.
            gw.simulator.faults.fail_next(1000, 500, path_prefix="/v1/api/tickle", error="tickle unavailable")
            await page.wait_for(f"{js_text('#health')}.startsWith('Not ready')", timeout_s=10)
            await page.wait_for(f"{js_text('#errors li')}.includes('tickle unavailable')")
            fix = await page.evaluate(js_text("#errors li .hint"))  # the newest error, with what to do about it
            assert fix.startswith("Fix: nothing to change"), fix
            await page.wait_for(f"{js_text(account)} === 'family-paper · accounts not read yet'")
            assert await page.evaluate(js_text("td[data-key=state]")) in ("backoff", "handshaking")
            await page.screenshot(OUTPUT / "status-failing-desktop.png", full_page=True)

            gw.simulator.faults.reset()
            await page.wait_for(f"{js_text('#health')}.startsWith('Healthy')", timeout_s=20)
            assert await page.evaluate(js_text("td[data-key=state]")) == "ready"
            assert await page.evaluate(js_text(account)) == "family-paper · DU1234567 · paper"
            assert int(await page.evaluate(js_text("td[data-key=handshakes]"))) >= 2
            assert int(await page.evaluate(js_text("td[data-key=sessions_ended]"))) >= 1
            assert "not authenticated" in await page.evaluate(js_text("#errors"))  # the errors stay listed
            assert await page.evaluate("window.notReloaded === true")

            html = await page.evaluate("document.documentElement.outerHTML")
            for secret in (
                ibkr_sim_credentials.access_token_secret,
                ibkr_sim_credentials.access_token,
                gw.simulator.current_session,
            ):
                assert secret
                assert secret not in html

            desktop = await page.screenshot(OUTPUT / "status-desktop.png", full_page=True)
            scroll_width = await phone_check(page, OUTPUT / "status-phone.png")
            assert page.errors == []

        # The gateway is gone; the page, still open, must say so instead of showing stale data as current.
        await page.wait_for(f"{js_text('#freshness')}.startsWith('gateway unreachable')", timeout_s=10)
        assert (await page.evaluate(js_text("#health"))).startswith("Gateway unreachable")
        unreachable = await page.screenshot(OUTPUT / "status-unreachable-phone.png")

    artifact("status_page_desktop", desktop)
    artifact("status_page_phone", OUTPUT / "status-phone.png")
    artifact("status_page_failing", OUTPUT / "status-failing-desktop.png")
    artifact("status_page_unreachable", unreachable)
    figure(
        "status_page_shows_failure_after", round(shown_after, 2), "s", "<=5 (tickle 1 s + poll 2 s)", shown_after <= 5
    )
    figure("status_page_phone_scroll_width", scroll_width, "px", "<=390", scroll_width <= PHONE[0])
    assert shown_after <= 5
    assert scroll_width <= PHONE[0]


def in_card(conid: int, selector: str = "") -> str:
    """The CSS selector for ``selector`` inside the watchlist card of ``conid`` (the card itself when empty)."""
    return f'#watchlist .card[data-conid="{conid}"] {selector}'.rstrip()


async def sample_prices(page: Page, selector: str, changes: int, timeout_s: float) -> tuple[list[str], float]:
    """Read the price shown by ``selector`` every 50 ms until it has changed ``changes`` times; returns the distinct
    values seen in order and how long it took."""
    started = trio.current_time()
    values: list[str] = []
    with trio.move_on_after(timeout_s):
        while len(values) <= changes:
            text = await page.evaluate(js_text(selector))
            if re.fullmatch(r"\d+\.\d+", text) and (not values or values[-1] != text):
                values.append(text)
            await trio.sleep(0.05)
    return values, trio.current_time() - started


async def reload(page: Page) -> None:
    """Reload the page as a user would and wait until the new document has loaded."""
    await page.evaluate("window.beforeReload = true; setTimeout(() => location.reload(), 0)")
    with trio.fail_after(15):
        while True:
            await trio.sleep(0.05)
            try:  # while the old document goes, an evaluation may find no context
                if await page.evaluate("window.beforeReload === undefined && document.readyState === 'complete'"):
                    return
            except CdpError:
                pass


def sent_texts(gw: TestGateway, since: int = 0) -> list[tuple[int, str]]:
    """(connection, text) of every message IBKR (the simulator) received on a WebSocket, from index ``since``."""
    return [(m.connection, m.text) for m in gw.simulator.ws_messages[since:]]


async def wait_sent(gw: TestGateway, text: str, since: int, timeout_s: float = 5.0) -> None:
    """Wait until IBKR (the simulator) has received ``text`` on a WebSocket (looking from index ``since``)."""
    for _ in range(int(timeout_s / 0.05)):
        if text in [sent for _, sent in sent_texts(gw, since)]:
            return
        await trio.sleep(0.05)
    raise AssertionError(f"{text!r} never reached IBKR; it got {sent_texts(gw, since)}")


async def test_dashboard_watchlist_streams_persists_and_survives_a_session_restart(
    browser: Browser, ibkr_sim_credentials: SimulatorCredentials, figure: Figure, artifact: Artifact
) -> None:
    """/examples/dashboard/: a search without a key asks for one; with the key pasted, AAPL and EUR.USD go on the
    watchlist and both stream last, bid and ask over one WebSocket, coloured up or down as they move, each with a
    chart of its last prices; the list survives a reload (localStorage); after the gateway restarts its session
    (close 1012, relay mode) the page reconnects by itself, subscribes both again and the prices move again, with
    no reload; removing a symbol sends IBKR ``umd``; and the page fits a phone."""
    with trio.fail_after(150):
        async with open_test_gateway(
            {"server": {"examples": True, "api_keys": KEY}, "session": {"tickle_interval_s": 1}},
            credentials=ibkr_sim_credentials,
            simulator_options={"tick_interval_s": 0.2},
        ) as gw:
            page = await browser.new_page()
            url = gw.url + "/examples/dashboard/"
            await page.navigate(url)
            assert await page.evaluate(js_text("#connection")) == "not connected"  # nothing watched: no socket
            await page.wait_for(f"{js_text('#session')} === 'ready'")  # from /health, open without a key

            async def search(symbol: str) -> None:
                await page.evaluate("document.getElementById('symbol').value = ''; document.getElementById('symbol')"
                                    ".focus()")  # fmt: skip
                await page.insert_text(symbol)
                await page.evaluate("document.querySelector('#search-form button').click()")

            async def add(symbol: str, conid: int) -> None:
                await search(symbol)
                button = json.dumps(f'#results button[data-conid="{conid}"]')
                await page.wait_for(f"!!document.querySelector({button})")
                await page.evaluate(f"document.querySelector({button}).click()")
                await page.wait_for(f"!!document.querySelector({json.dumps(in_card(conid))})")

            await search("aapl")
            await page.wait_for(f"{js_text('#message')}.includes('API key')")
            assert await page.evaluate("document.getElementById('key-box').open")
            await page.evaluate("document.getElementById('api-key').focus()")
            await page.insert_text(KEY)
            await page.evaluate("document.querySelector('#key-form button[type=submit]').click()")
            assert await page.evaluate("sessionStorage.getItem('ibkr-gateway-example.api-key')") == KEY
            await add("aapl", AAPL)
            await add("eur.usd", EURUSD)
            assert await page.evaluate(js_text("#watch-count")) == "2"

            async def check_streaming() -> float:
                """Both cards' last prices change twice, and bid and ask are numbers that change too; returns how
                long the slower card took."""
                slowest = 0.0
                for conid in (AAPL, EURUSD):
                    values, took = await sample_prices(page, in_card(conid, "dd.last .num"), 2, timeout_s=5)
                    assert len(values) >= 3, (conid, values)
                    slowest = max(slowest, took)
                    for field in ("bid", "ask"):
                        values, _ = await sample_prices(page, in_card(conid, f"dd.{field} .num"), 1, timeout_s=5)
                        assert len(values) >= 2, (conid, field, values)
                return slowest

            first_changes_s = await check_streaming()
            assert await page.evaluate("document.getElementById('connection').dataset.state") == "open"
            assert await page.evaluate(js_text("#session")) == "ready"
            assert gw.gateway.relays.open == 1  # one socket for the whole list
            subscribed = [text for _, text in sent_texts(gw) if text.startswith("smd+")]
            fields = '+{"fields":["31","84","86"]}'
            assert subscribed == [f"smd+{AAPL}{fields}", f"smd+{EURUSD}{fields}"], subscribed

            # Each card's chart holds a point per last price seen, drawn as an SVG polyline.
            for conid in (AAPL, EURUSD):
                chart = json.dumps(in_card(conid, "svg.spark"))
                points = await page.evaluate(f"document.querySelector({chart} + ' polyline').points.numberOfItems")
                assert points >= 3, (conid, points)
                assert await page.evaluate(f"document.querySelector({chart}).dataset.points") == str(points)

            # The last price is coloured by its last move: both directions show up within a few ticks.
            colours: set[str] = set()
            classes = " + ' ' + ".join(
                f"document.querySelector({json.dumps(in_card(conid, 'dd.last'))}).className" for conid in (AAPL, EURUSD)
            )
            with trio.move_on_after(10):
                while not {"up", "down"} <= colours:
                    colours |= set((await page.evaluate(classes)).split()) & {"up", "down"}
                    await trio.sleep(0.05)
            assert {"up", "down"} <= colours, colours
            desktop = await page.screenshot(OUTPUT / "dashboard-desktop.png", full_page=True)

            # The watchlist is kept in localStorage: a reload brings both symbols back and they stream again.
            saved = json.loads(await page.evaluate("localStorage.getItem('ibkr-gateway-example.watchlist')"))
            assert [item["conid"] for item in saved] == [str(AAPL), str(EURUSD)]
            await reload(page)
            cards = await page.evaluate("[...document.querySelectorAll('#watchlist .card')].map(c => c.dataset.conid)")
            assert cards == [str(AAPL), str(EURUSD)]
            assert await page.evaluate(js_text(in_card(EURUSD, ".symbol"))) == "EUR.USD"
            await check_streaming()
            assert await page.evaluate("document.getElementById('connection').dataset.connects") == "1"

            # The gateway restarts its session: relay mode closes the socket with 1012, the page reconnects by
            # itself and subscribes both symbols again on the new socket, without a reload.
            await page.evaluate("window.notReloaded = true")
            before = len(gw.simulator.ws_messages)
            old_sockets = {connection for connection, _ in sent_texts(gw)}
            generation = (await gw.manager.wait_ready(5)).generation
            gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # a failed tickle: a new session
            restarted_at = trio.current_time()
            session_state = await page.wait_for(
                f"{js_text('#connection')}.includes('restarted its IBKR session') && "
                "document.getElementById('session').dataset.state",
                timeout_s=10,
            )
            assert session_state in ("restarting", "unavailable")  # from the close, or /health after it
            aapl_card = json.dumps(in_card(AAPL))
            assert await page.evaluate(f"document.querySelector({aapl_card}).classList.contains('stale')")
            await gw.wait_new_session(generation)
            await page.wait_for(
                "document.getElementById('connection').dataset.connects === '2' && "
                f"{js_text('#connection')} === 'open' && {js_text('#session')} === 'ready'",
                timeout_s=20,
            )
            back_after = trio.current_time() - restarted_at
            await check_streaming()
            again = [(c, text) for c, text in sent_texts(gw, before) if text.startswith("smd+")]
            assert [text for _, text in again] == [f"smd+{AAPL}{fields}", f"smd+{EURUSD}{fields}"], again
            assert len({c for c, _ in again}) == 1
            assert not {c for c, _ in again} & old_sockets
            assert await page.evaluate("window.notReloaded === true")
            scroll_width = await phone_check(page, OUTPUT / "dashboard-phone.png")

            # Removing a symbol unsubscribes it (umd), forgets it in localStorage and moves the focus on.
            await page.evaluate(f"document.querySelector({json.dumps(in_card(EURUSD, '.remove'))}).click()")
            await page.wait_for(f"!document.querySelector({json.dumps(in_card(EURUSD))})")
            await wait_sent(gw, f"umd+{EURUSD}+{{}}", before)
            saved = json.loads(await page.evaluate("localStorage.getItem('ibkr-gateway-example.watchlist')"))
            assert [item["conid"] for item in saved] == [str(AAPL)]
            assert await page.evaluate(js_text("#watch-count")) == "1"
            aapl_remove = json.dumps(in_card(AAPL, ".remove"))
            assert await page.evaluate(f"document.activeElement === document.querySelector({aapl_remove})")
            values, _ = await sample_prices(page, in_card(AAPL, "dd.last .num"), 1, timeout_s=5)
            assert len(values) >= 2, values
            assert page.errors == []

    artifact("dashboard_desktop", desktop)
    artifact("dashboard_phone", OUTPUT / "dashboard-phone.png")
    figure("dashboard_two_price_changes_within", round(first_changes_s, 2), "s", "<=5", first_changes_s <= 5)
    figure("dashboard_live_again_after_1012", round(back_after, 2), "s", "<=20", back_after <= 20)
    figure("dashboard_phone_scroll_width", scroll_width, "px", "<=390", scroll_width <= PHONE[0])
    assert scroll_width <= PHONE[0]


async def test_dashboard_in_shared_mode_keeps_its_socket_through_a_session_restart(
    browser: Browser, ibkr_sim_credentials: SimulatorCredentials, figure: Figure
) -> None:
    """Shared WebSocket mode: the page's socket stays open across a session restart; the page shows the gateway's
    ``restarting`` and ``ready`` notices, and prices move again once the gateway has re-subscribed by itself."""
    with trio.fail_after(90):
        async with open_test_gateway(
            {"server": {"examples": True}, "websocket": {"mode": "shared"}, "session": {"tickle_interval_s": 1}},
            credentials=ibkr_sim_credentials,
            simulator_options={"tick_interval_s": 0.2},
        ) as gw:
            page = await browser.new_page()
            await page.navigate(gw.url + "/examples/dashboard/")
            await page.evaluate("document.getElementById('symbol').focus()")
            await page.insert_text("aapl")
            await page.evaluate("document.querySelector('#search-form button').click()")
            button = json.dumps(f'#results button[data-conid="{AAPL}"]')
            await page.wait_for(f"!!document.querySelector({button})")
            await page.evaluate(f"document.querySelector({button}).click()")
            values, _ = await sample_prices(page, in_card(AAPL, "dd.last .num"), 2, timeout_s=5)
            assert len(values) >= 3, values
            await page.evaluate(
                "window.notReloaded = true; window.seen = []; const badge = document.getElementById('session');"
                "new MutationObserver(() => window.seen.push(badge.dataset.state + '/' + badge.dataset.source))"
                ".observe(badge, {attributes: true})"
            )
            generation = (await gw.manager.wait_ready(5)).generation
            gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # a failed tickle: a new session
            restarted_at = trio.current_time()
            await gw.wait_new_session(generation)
            seen = await page.wait_for(
                "window.seen.indexOf('ready/gateway') > window.seen.indexOf('restarting/gateway') && "
                "window.seen.includes('restarting/gateway') && window.seen.join()",
                timeout_s=20,
            )
            assert "restarting/close" not in seen, seen  # no close: the socket stayed open
            values, _ = await sample_prices(page, in_card(AAPL, "dd.last .num"), 2, timeout_s=10)
            back_after = trio.current_time() - restarted_at
            assert len(values) >= 3, values
            assert await page.evaluate("document.getElementById('connection').dataset.connects") == "1"
            assert await page.evaluate("window.notReloaded === true")
            upstream_smd = [text for _, text in sent_texts(gw) if text.startswith(f"smd+{AAPL}")]
            assert len(upstream_smd) == 2  # once per IBKR socket: the gateway re-subscribed by itself
            assert page.errors == []
    figure("dashboard_shared_live_again_after_restart", round(back_after, 2), "s", "<=20", back_after <= 20)
