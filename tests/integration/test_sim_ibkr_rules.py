"""IBKR's session rules in the simulator, over loopback: accounts first, snapshot pre-flight, pacing with a penalty
box, ``compete`` against another session, and the nightly reset."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from gateway.simulator import Simulator
from gateway.testing import open_test_gateway
from tests.integration.sim_client import Client, ready_client, shared_credentials, start_simulator

ACCT = "DU1234567"
SNAPSHOT = "/v1/api/iserver/marketdata/snapshot"
ACCOUNTS_FIRST = "Please query /accounts first"
PORTFOLIO_FIRST = "Please query /portfolio/accounts first"
INIT = "/v1/api/iserver/auth/ssodh/init"
# The order calls the rule covers (the simulator has no order book: once the rule lets them through, 404).
ORDER_CALLS = (
    ("GET", "/v1/api/iserver/account/orders"),
    ("POST", f"/v1/api/iserver/account/{ACCT}/orders"),
    ("POST", "/v1/api/iserver/reply/5a6e8f0c-1"),
)


async def _init(http: httpx.AsyncClient, client: Client, *, compete: bool = True) -> dict[str, Any]:
    r = await client.request(http, "POST", INIT, json={"publish": True, "compete": compete})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def _snapshot(http: httpx.AsyncClient, client: Client, conids: str = "265598") -> httpx.Response:
    return await client.request(http, "GET", SNAPSHOT, [("conids", conids), ("fields", "31,84,86")])


def _error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, str(response.json().get("error"))


async def _auth(http: httpx.AsyncClient, client: Client) -> tuple[bool, bool]:
    tickle = (await client.request(http, "POST", "/v1/api/tickle")).json()["iserver"]["authStatus"]
    status = (await client.request(http, "GET", "/v1/api/iserver/auth/status")).json()
    pair = (tickle["authenticated"], tickle["competing"])
    assert pair == (status["authenticated"], status["competing"])
    return pair


async def _accounts_read_resets_on(sim: Simulator, http: httpx.AsyncClient, client: Client, how: str) -> None:
    assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200
    assert (await _snapshot(http, client)).status_code == 200
    if how == "logout":
        assert (await client.request(http, "POST", "/v1/api/logout")).status_code == 200
    elif how == "nightly":
        sim.faults.nightly_reset()
    await _init(http, client)
    assert _error(await _snapshot(http, client)) == (400, ACCOUNTS_FIRST), how


async def test_accounts_first_for_snapshot_and_orders_per_brokerage_session(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, accounts_first=True)
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            r = await _snapshot(http, client)
            assert r.json() == {"error": ACCOUNTS_FIRST, "statusCode": 400}
            for method, path in ORDER_CALLS:
                assert _error(await client.request(http, method, path, json={})) == (400, ACCOUNTS_FIRST)
            # Endpoints outside the rule are not held back.
            assert (await client.request(http, "GET", "/v1/api/iserver/secdef/search", [("symbol", "AAPL")])).is_success
            assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200
            assert (await _snapshot(http, client)).status_code == 200
            for method, path in ORDER_CALLS:
                assert _error(await client.request(http, method, path, json={})) == (404, "not found")
            # The flag belongs to the brokerage session: every (re)open or end forgets it.
            for how in ("re-init", "logout", "nightly"):
                await _accounts_read_resets_on(sim, http, client, how)
            # A new LST alone does not open a new brokerage session.
            assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200
            assert (await client.get_lst(http)).valid
            assert (await _snapshot(http, client)).status_code == 200


async def test_portfolio_calls_need_portfolio_accounts_with_the_current_lst(nursery: trio.Nursery) -> None:
    _, url = await start_simulator(nursery, accounts_first=True)
    positions = f"/v1/api/portfolio/{ACCT}/positions/0"
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url, init=False)  # a read-only session is enough
            assert _error(await client.request(http, "GET", positions)) == (400, PORTFOLIO_FIRST)
            assert (await client.request(http, "GET", "/v1/api/portfolio/accounts")).status_code == 200
            assert _error(await client.request(http, "GET", positions)) == (404, "not found")
            assert (await client.get_lst(http)).valid  # a new LST forgets it
            assert _error(await client.request(http, "GET", positions)) == (400, PORTFOLIO_FIRST)
            assert (await client.request(http, "GET", "/v1/api/portfolio/subaccounts")).status_code == 200
            assert _error(await client.request(http, "GET", positions)) == (404, "not found")


async def test_rules_are_on_by_default_and_can_be_switched_off(nursery: trio.Nursery) -> None:
    on = Simulator(shared_credentials())
    config = on.app.core.config
    assert (config.accounts_first, config.snapshot_preflight, config.pacing) == (True, True, True)
    _, url = await start_simulator(nursery)  # the direct protocol tests' helper switches them off
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            first = (await _snapshot(http, client)).json()[0]
            assert {"31", "84", "86"} <= first.keys()
            for _ in range(15):  # above the snapshot limit (10/s)
                assert (await _snapshot(http, client)).status_code == 200
            assert (await client.request(http, "GET", f"/v1/api/portfolio/{ACCT}/summary")).status_code == 404


async def test_snapshot_preflight_per_conid_and_brokerage_session(nursery: trio.Nursery) -> None:
    _, url = await start_simulator(nursery, snapshot_preflight=True)
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            first = (await _snapshot(http, client)).json()
            assert [entry["conid"] for entry in first] == [265598]
            assert not {"31", "84", "86"} & first[0].keys()
            second = (await _snapshot(http, client, "265598,8314")).json()
            assert {"31", "84", "86"} <= second[0].keys()
            assert second[1]["conid"] == 8314
            assert not {"31", "84", "86"} & second[1].keys()  # 8314's first time
            await _init(http, client)  # a new brokerage session starts over
            assert not {"31", "84", "86"} & (await _snapshot(http, client)).json()[0].keys()
            assert {"31", "84", "86"} <= (await _snapshot(http, client)).json()[0].keys()


async def test_pacing_per_endpoint_429_then_penalty_box_ends(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, pacing=True, penalty_box_s=1.0)
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            assert (await client.request(http, "POST", "/v1/api/tickle")).status_code == 200
            r = await client.request(http, "POST", "/v1/api/tickle")  # tickle: 1/s
            assert r.status_code == 429
            assert r.json()["error"] == "too many requests"
            assert r.headers["Retry-After"] == "1"
            # The penalty box: every endpoint is refused, counted requests or not.
            r = await client.request(http, "GET", "/v1/api/iserver/accounts")
            assert (r.status_code, r.json()["error"]) == (429, "too many requests (penalty box)")
            await trio.sleep(1.1)
            assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200
            assert (await client.request(http, "POST", "/v1/api/tickle")).status_code == 200
            refused = [r for r in sim.records if r.status == 429]
            assert [r.reason for r in refused] == ["too many requests", "too many requests (penalty box)"]


async def test_pacing_global_limit(nursery: trio.Nursery) -> None:
    _, url = await start_simulator(nursery, pacing=True, penalty_box_s=0.5)
    statuses: list[int] = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as http:
            client = await ready_client(http, url, init=False)

            async def one() -> None:
                statuses.append((await client.request(http, "GET", "/v1/api/sim/echo")).status_code)

            # Far above 50/s: even on a slow machine many more than 50 arrive within one second.
            async with trio.open_nursery() as burst:
                for _ in range(150):
                    burst.start_soon(one)
            assert set(statuses) == {200, 429}
            assert statuses.count(200) <= 50
            await trio.sleep(1.1)
            assert (await client.request(http, "GET", "/v1/api/sim/echo")).status_code == 200


async def test_compete_against_another_session(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            # Nobody else holds the session: compete=false opens it as well.
            assert (await _init(http, client, compete=False))["authenticated"] is True
            sim.faults.set_other_session()
            assert not sim.bridge
            assert await _auth(http, client) == (False, True)
            assert _error(await client.request(http, "GET", "/v1/api/iserver/accounts")) == (400, "no bridge")
            refused = await _init(http, client, compete=False)
            assert (refused["authenticated"], refused["competing"]) == (False, True)
            assert _error(await client.request(http, "GET", "/v1/api/iserver/accounts")) == (400, "no bridge")
            assert sim.records[-2].reason == "brokerage session held elsewhere (compete=false)"
            taken = await _init(http, client, compete=True)
            assert (taken["authenticated"], taken["competing"]) == (True, False)
            assert await _auth(http, client) == (True, False)
            assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200

            # Over the admin path; when the other session leaves, a plain init works again.
            r = await http.post(f"{url}/_sim/faults/other_session", json={})
            assert r.json() == {"ok": True}
            assert (await http.get(f"{url}/_sim/state")).json()["rules"]["held_elsewhere"] is True
            await http.post(f"{url}/_sim/faults/other_session", json={"active": False})
            assert await _auth(http, client) == (False, False)
            assert (await _init(http, client, compete=False))["authenticated"] is True


async def test_nightly_reset_keeps_the_lst_and_read_only_routes(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = sim.current_session
            lst_expiry = sim.lst_expires_ms
            sim.faults.nightly_reset()
            assert await _auth(http, client) == (False, False)
            assert _error(await client.request(http, "GET", "/v1/api/iserver/accounts")) == (400, "no bridge")
            assert _error(await _snapshot(http, client)) == (400, "no bridge")
            # The LST and the read-only session live on.
            assert (await client.request(http, "GET", "/v1/api/portfolio/accounts")).status_code == 200
            assert (await client.request(http, "GET", "/v1/api/sim/echo")).status_code == 200
            assert (sim.current_session, sim.lst_expires_ms) == (session, lst_expiry)
            assert (await _init(http, client))["authenticated"] is True
            assert (await client.request(http, "GET", "/v1/api/iserver/accounts")).status_code == 200
            # And over the admin path.
            assert (await http.post(f"{url}/_sim/faults/nightly_reset", json={})).json() == {"ok": True}
            assert not sim.bridge
            assert (await http.get(f"{url}/_sim/state")).json()["bridge"] is False


async def test_rules_and_faults_through_the_testing_api() -> None:
    overrides = {"simulator": {"accounts_first": True, "pacing": True, "penalty_box_s": 0.5}}
    async with open_test_gateway(overrides, simulator_options={"snapshot_preflight": True}, wait_ready=False) as gw:
        async with httpx.AsyncClient() as http:
            rules = (await http.get(f"{gw.simulator_url}/_sim/state")).json()["rules"]
        assert (rules["accounts_first"], rules["snapshot_preflight"], rules["pacing"]) == (True, True, True)
        assert rules["penalty_box_s"] == 0.5
        gw.simulator.faults.set_other_session()
        gw.simulator.faults.nightly_reset()
        gw.simulator.faults.reset()
        assert not gw.simulator.bridge
