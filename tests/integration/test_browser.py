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
from gateway.testing import open_test_gateway
from tests.cdp import Browser, Page, open_chromium
from tests.conftest import Artifact, Figure

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "browser"
KEY = "browser-test-key-0123456789abcdef"
PHONE = (390, 844)
AAPL = 265598  # the simulator's conid for AAPL


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


async def sample_prices(page: Page, changes: int, timeout_s: float) -> tuple[list[str], float]:
    """Read the displayed last price every 50 ms until it has changed ``changes`` times; returns the distinct
    values seen in order and how long it took."""
    started = trio.current_time()
    values: list[str] = []
    with trio.move_on_after(timeout_s):
        while len(values) <= changes:
            text = await page.evaluate(js_text("#last"))
            if re.fullmatch(r"\d+\.\d+", text) and (not values or values[-1] != text):
                values.append(text)
            await trio.sleep(0.05)
    return values, trio.current_time() - started


async def test_dashboard_streams_live_prices_with_an_api_key_and_reconnects(
    browser: Browser, ibkr_sim_credentials: SimulatorCredentials, figure: Figure, artifact: Artifact
) -> None:
    """/examples/dashboard/: a search without a key asks for one; with the key pasted, AAPL is found, its price
    updates live over the gateway's WebSocket, and after the gateway restarts its session (close 1012) the page
    reconnects by itself and the prices move again."""
    with trio.fail_after(120):
        async with open_test_gateway(
            {"server": {"examples": True, "api_keys": KEY}, "session": {"tickle_interval_s": 1}},
            credentials=ibkr_sim_credentials,
            simulator_options={"tick_interval_s": 0.2},
        ) as gw:
            page = await browser.new_page()
            await page.navigate(gw.url + "/examples/dashboard/")

            async def search(symbol: str) -> None:
                await page.evaluate("document.getElementById('symbol').value = ''; document.getElementById('symbol')"
                                    ".focus()")  # fmt: skip
                await page.insert_text(symbol)
                await page.evaluate("document.querySelector('#search-form button').click()")

            await search("aapl")
            await page.wait_for(f"{js_text('#message')}.includes('API key')")
            assert await page.evaluate("document.getElementById('key-box').open")
            await page.evaluate("document.getElementById('api-key').focus()")
            await page.insert_text(KEY)
            await page.evaluate("document.querySelector('#key-form button[type=submit]').click()")
            assert await page.evaluate("sessionStorage.getItem('ibkr-gateway-example.api-key')") == KEY
            await search("aapl")
            await page.wait_for(f"!!document.querySelector('#results button[data-conid=\"{AAPL}\"]')")
            await page.evaluate(f"document.querySelector('#results button[data-conid=\"{AAPL}\"]').click()")

            values, first_changes_s = await sample_prices(page, changes=2, timeout_s=5)
            assert len(values) >= 3, values
            assert await page.evaluate(js_text("#connection")) == "live"
            assert re.fullmatch(r"\d+\.\d+", await page.evaluate(js_text("#bid")))
            assert re.fullmatch(r"\d+\.\d+", await page.evaluate(js_text("#ask")))
            assert gw.gateway.relays.open == 1
            desktop = await page.screenshot(OUTPUT / "dashboard-desktop.png")

            generation = (await gw.manager.wait_ready(5)).generation
            gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # a failed tickle: a new session
            restarted_at = trio.current_time()
            await page.wait_for(f"{js_text('#connection')}.includes('restarted its IBKR session')", timeout_s=10)
            await gw.wait_new_session(generation)
            await page.wait_for(
                "document.getElementById('connection').dataset.connects === '2' && "
                f"{js_text('#connection')} === 'live'",
                timeout_s=20,
            )
            back_after = trio.current_time() - restarted_at
            again, _ = await sample_prices(page, changes=2, timeout_s=5)
            assert len(again) >= 3, again
            scroll_width = await phone_check(page, OUTPUT / "dashboard-phone.png")
            assert page.errors == []

    artifact("dashboard_desktop", desktop)
    artifact("dashboard_phone", OUTPUT / "dashboard-phone.png")
    figure("dashboard_two_price_changes_within", round(first_changes_s, 2), "s", "<=5", first_changes_s <= 5)
    figure("dashboard_live_again_after_1012", round(back_after, 2), "s", "<=20", back_after <= 20)
    figure("dashboard_phone_scroll_width", scroll_width, "px", "<=390", scroll_width <= PHONE[0])
    assert scroll_width <= PHONE[0]
