"""The gateway end to end against the simulator over loopback: proxy, relay, session lifecycle, status, shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel
import trio_websocket

from gateway.config import load_config
from gateway.runtime import Gateway, serve_gateway
from gateway.session.state import State
from gateway.simulator import Record, Simulator, SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"session": {"tickle_interval_s": 1}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05, "heartbeat_s": 0.5},
    ) as gateway:
        yield gateway


def upstream_records(gw: TestGateway, path: str) -> list[Record]:
    return [r for r in gw.simulator.records if r.path == path]


async def test_signed_get_with_query_is_accepted(gw: TestGateway) -> None:
    async with gw.client() as http:
        r = await http.get(
            "/v1/api/iserver/marketdata/snapshot", params={"conids": "265598,8314", "fields": "31,84,86"}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert {item["conid"] for item in body} == {265598, 8314}
    (record,) = upstream_records(gw, "/v1/api/iserver/marketdata/snapshot")
    assert record.accepted
    assert record.raw_query == "conids=265598%2C8314&fields=31%2C84%2C86"


async def test_post_with_json_body_is_accepted(gw: TestGateway) -> None:
    async with gw.client() as http:
        r = await http.post("/v1/api/iserver/secdef/search", json={"symbol": "AAPL"})
    assert r.status_code == 200, r.text
    assert any(item.get("symbol") == "AAPL" for item in r.json())
    (record,) = upstream_records(gw, "/v1/api/iserver/secdef/search")
    assert record.accepted and record.method == "POST"


async def test_client_authorization_and_cookie_never_reach_upstream(gw: TestGateway) -> None:
    async with gw.client() as http:
        r = await http.get(
            "/v1/api/sim/echo?x=1",
            headers={
                "Authorization": "Bearer client-secret",
                "Cookie": "api=stolen",
                "X-Forwarded-For": "6.6.6.6",
                "Proxy-Authorization": "Basic eA==",
                "User-Agent": "client-agent",
                "Accept": "application/json",
            },
        )
    assert r.status_code == 200, r.text
    seen = {name.lower(): value for name, value in r.json()["headers"]}
    (record,) = upstream_records(gw, "/v1/api/sim/echo")
    authorization = record.header("authorization")
    assert authorization is not None
    assert authorization.startswith("OAuth ")
    assert record.accepted
    assert "client-secret" not in json.dumps(r.json())
    assert "cookie" not in seen
    assert "x-forwarded-for" not in seen
    assert "proxy-authorization" not in seen
    assert seen["user-agent"] == "ibkr-oauth-gateway"
    assert seen["accept"] == "application/json"
    assert "server" not in r.headers


async def test_routes_not_allow_listed_never_reach_upstream(gw: TestGateway) -> None:
    before = len(gw.simulator.records)
    async with gw.client() as http:
        for method, path in [
            ("POST", "/v1/api/logout"),
            ("POST", "/v1/api/tickle"),
            ("POST", "/v1/api/oauth/live_session_token"),
            ("GET", "/v1/api/unknown"),
            ("GET", "/v1/api/iserver/../logout"),
            ("GET", "/v1/api/iserver/%2e%2e/logout"),
        ]:
            r = await http.request(method, path)
            assert r.status_code in (400, 404), (method, path, r.status_code)
            assert r.json()["source"] == "gateway"
    client_paths = {r.path for r in gw.simulator.records[before:]} - {"/v1/api/tickle"}
    assert client_paths == set()


async def test_streaming_download_and_upload(gw: TestGateway) -> None:
    size = 8 * 1024 * 1024
    async with gw.client() as http:
        digest, received = hashlib.sha256(), 0
        async with http.stream("GET", f"/v1/api/sim/stream?bytes={size}&chunk=65536") as r:
            assert r.status_code == 200
            async for chunk in r.aiter_raw():
                received += len(chunk)
                digest.update(chunk)
        assert received == size

        payload = os.urandom(3 * 1024 * 1024)

        async def body() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100_000):
                yield payload[i : i + 100_000]
                await trio.lowlevel.checkpoint()

        r = await http.post("/v1/api/sim/upload", content=body())
    assert r.status_code == 200, r.text
    assert r.json()["bytes"] == len(payload)
    assert r.json()["sha256"] == hashlib.sha256(payload).hexdigest()


async def _subscribe(ws: trio_websocket.WebSocketConnection, conid: int = 265598) -> dict[str, object]:
    await ws.send_message(f'smd+{conid}+{{"fields":["31","84","86"]}}')
    with trio.fail_after(5):
        while True:
            message = json.loads(await ws.get_message())
            if message.get("topic") == f"smd+{conid}":
                return dict(message)


async def test_websocket_relay_streams_ticks(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url) as ws:
        first = await _subscribe(ws)
        assert first["conid"] == 265598
        second = await _subscribe(ws)
        assert second["topic"] == "smd+265598"
    assert gw.gateway.relays.opened_total == 1
    with trio.fail_after(3):
        while gw.gateway.relays.open:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.01)


async def test_websocket_burst_from_the_client_reaches_upstream_whole_and_in_order(gw: TestGateway) -> None:
    """A client that writes faster than the relay forwards: what queued up goes upstream in batches (one write
    each), and nothing is lost, reordered or merged; text and binary keep their kind."""
    sent = [f"burst-{index}" for index in range(500)]
    async with open_websocket(gw.ws_url) as ws:
        for index, text in enumerate(sent):
            await ws.send_message(text.encode() if index % 7 == 0 else text)
        with trio.fail_after(10):
            while sum(m.text.startswith("burst-") for m in gw.simulator.ws_messages) < len(sent):  # noqa: ASYNC110
                await trio.sleep(0.02)
    got = [m for m in gw.simulator.ws_messages if m.text.startswith("burst-")]
    assert [m.text for m in got] == sent
    assert [m.binary for m in got] == [index % 7 == 0 for index in range(len(sent))]
    assert gw.gateway.relays.messages_up >= len(sent)


@pytest.mark.parametrize("client_sending", [False, True])
async def test_ibkr_close_code_and_reason_reach_the_client(gw: TestGateway, client_sending: bool) -> None:
    """IBKR closes the WebSocket with its own code: the client gets that code (also while it is writing, when the
    relay's write toward IBKR is what finds the leg closed), and the relay ends."""
    async with trio.open_nursery() as nursery, open_websocket(gw.ws_url) as ws:
        await _subscribe(ws)
        if client_sending:

            async def keep_sending() -> None:
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    while True:
                        await ws.send_message("ech+hb")
                        await trio.lowlevel.checkpoint()

            nursery.start_soon(keep_sending)
            await trio.sleep(0.1)
        nursery.start_soon(gw.simulator.faults.close_websockets, 4001, "bye")
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 4001
    with trio.fail_after(5):
        while gw.gateway.relays.slots:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.01)
    assert gw.gateway.relays.open == 0


async def test_session_failure_closes_relays_1012_and_new_relays_work(gw: TestGateway) -> None:
    generation = (await gw.manager.wait_ready(5)).generation
    async with open_websocket(gw.ws_url) as ws:
        await _subscribe(ws)
        gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # a failed tickle: the LST is unknown
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1012
    assert await gw.wait_new_session(generation) > generation
    async with open_websocket(gw.ws_url) as ws:
        await _subscribe(ws)


async def test_lst_expiry_mid_traffic_get_retried_post_not_replayed(gw: TestGateway) -> None:
    generation = (await gw.manager.wait_ready(5)).generation
    gw.simulator.faults.expire_lst()
    async with gw.client() as http:
        r = await http.get("/v1/api/portfolio/accounts")
        assert r.status_code == 200, r.text
        assert gw.manager.active is not None and gw.manager.active.generation > generation

        generation = gw.manager.active.generation
        gw.simulator.faults.expire_lst()
        posts_before = len(upstream_records(gw, "/v1/api/iserver/secdef/search"))
        r = await http.post("/v1/api/iserver/secdef/search", json={"symbol": "IBM"})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "not re-sent" in r.json()["error"]
        assert len(upstream_records(gw, "/v1/api/iserver/secdef/search")) == posts_before + 1
        await gw.wait_new_session(generation)
        r = await http.post("/v1/api/iserver/secdef/search", json={"symbol": "IBM"})
        assert r.status_code == 200


async def test_requests_during_rehandshake_wait_and_succeed(gw: TestGateway) -> None:
    session = await gw.manager.wait_ready(5)
    gw.simulator.faults.set_delay(0.3)  # make the next handshake take a while
    gw.manager.report_unauthorized(session, "test")
    results: list[int] = []
    async with gw.client() as http:

        async def one() -> None:
            r = await http.get("/v1/api/iserver/accounts")
            results.append(r.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
    gw.simulator.faults.set_delay(0)
    assert results == [200] * 10
    assert gw.manager.active is not None and gw.manager.active.generation > session.generation


async def test_status_endpoints_say_simulator_and_hold_no_secret(
    gw: TestGateway, ibkr_sim_credentials: SimulatorCredentials
) -> None:
    async with gw.client() as http:
        health = await http.get("/health")
        session = await http.get("/session")
        page = await http.get("/")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    status = session.json()
    assert status["state"] == "ready"
    assert status["simulator"] is True
    assert status["mode"] == "simulator (not IBKR)"
    assert status["lst_expires"] is not None and status["last_tickle"] is not None
    assert "built-in IBKR simulator" in page.text
    cookie = gw.simulator.current_session
    assert cookie
    for text in (health.text, session.text, page.text):
        for secret in (ibkr_sim_credentials.access_token_secret, cookie, ibkr_sim_credentials.access_token):
            assert secret not in text


@pytest.mark.parametrize(
    ("label", "paper", "summary"),
    [
        ("family-paper", True, "family-paper · DU1234567 · paper"),
        ("family live <ops>", False, "family live <ops> · DU1234567 · live"),
        ("", None, "DU1234567 · paper or live: not reported"),
    ],
    ids=["paper", "live", "unreported"],
)
async def test_session_and_page_say_which_account_they_serve(
    ibkr_sim_credentials: SimulatorCredentials, label: str, paper: bool | None, summary: str
) -> None:
    """``[ibkr] label`` and IBKR's ``isPaper`` (the simulator answers true, false or leaves it out) reach
    ``/session`` beside the account ids, and the status page's title, heading and Account row."""
    async with (
        open_test_gateway(
            {"ibkr": {"label": label}}, credentials=ibkr_sim_credentials, simulator_options={"paper": paper}
        ) as gw,
        gw.client() as http,
    ):
        status = (await http.get("/session")).json()
        page = (await http.get("/")).text
    assert status["account"] == {"label": label or None, "paper": paper}
    assert status["accounts"]["iserver"] == ["DU1234567"]
    assert status["account_summary"] == summary
    assert f'<td data-key="account_summary">{html.escape(summary)}</td>' in page
    if label:
        assert f"<title>{html.escape(label)} · ibkr-oauth-gateway status</title>" in page
        assert f'<span id="label">{html.escape(label)}</span>' in page
    else:
        assert "<title>ibkr-oauth-gateway status</title>" in page and 'id="label"' not in page


async def test_health_503_while_upstream_down(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway({"session": {"ready_timeout_s": 1}}, credentials=ibkr_sim_credentials) as gw:
        await gw.simulator.faults.down()
        session = gw.manager.active
        assert session is not None
        gw.manager.report_unauthorized(session, "test")
        async with gw.client() as http:
            r = await http.get("/health")
            assert r.status_code == 503
            r = await http.get("/v1/api/iserver/accounts", timeout=20)
            assert r.status_code == 503
            assert "retry-after" in r.headers
        await gw.simulator.faults.up()
        await gw.wait_ready(10)


async def test_clean_shutdown_logs_out(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        simulator = gw.simulator
        async with open_websocket(gw.ws_url) as ws:
            await _subscribe(ws)
            gw.gateway.request_shutdown()
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1001
    logouts = [r for r in simulator.records if r.path == "/v1/api/logout"]
    assert len(logouts) == 1 and logouts[0].accepted


async def test_unready_gateway_answers_503_with_retry_after(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(
        {"session": {"ready_timeout_s": 0.2}}, credentials=ibkr_sim_credentials, wait_ready=False
    ) as gw:
        await gw.simulator.faults.down()
        session = gw.manager.active
        if session is not None:
            gw.manager.report_unauthorized(session, "test")
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.get("/v1/api/iserver/accounts")
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["code"] == "session_not_ready"
        await gw.simulator.faults.up()


async def test_real_credential_path_against_an_external_simulator(
    tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials
) -> None:
    """The production path: key files on disk, loaded and checked by the config loader, simulator disabled."""
    simulator = Simulator(ibkr_sim_credentials)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.serve, "127.0.0.1", 0)
        loaded = load_config(simulator.write_credentials(tmp_path / "creds", gateway_port=0), env={})
        assert loaded.credentials is not None
        assert not loaded.config.simulator.enabled
        gateway: Gateway = await nursery.start(serve_gateway, loaded)
        await gateway.manager.wait_ready(5)
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            accounts = await http.get("/v1/api/iserver/accounts")
            status = (await http.get("/session")).json()
        gateway.request_shutdown()
        await gateway.wait_stopped()
        nursery.cancel_scope.cancel()
    assert accounts.status_code == 200
    assert status["simulator"] is False
    assert status["mode"] == "IBKR"
    assert any(r.path == "/v1/api/logout" and r.accepted for r in simulator.records)


async def test_an_unauthenticated_brokerage_session_is_reopened_and_relays_stay(gw: TestGateway) -> None:
    """``authenticated:false`` costs an ``ssodh/init`` under the same LST, not a new handshake: read-only meanwhile
    (routes outside /iserver work, /iserver waits), the relay stays open, and the re-opened session is a new
    generation whose warm-up read the accounts again."""
    session = await gw.manager.wait_ready(5)
    handshakes, generation = gw.manager.stats.handshakes, session.generation
    async with open_websocket(gw.ws_url) as ws, gw.client() as http:
        await _subscribe(ws)
        mark = len(gw.simulator.records)
        gw.simulator.faults.set_tickle_unauthenticated(True)
        with trio.fail_after(5):
            while gw.manager.state is not State.READ_ONLY:  # noqa: ASYNC110 - gateway-owned state
                await trio.sleep(0.01)
        health = await http.get("/health")
        assert (health.status_code, health.json()["status"]) == (503, "read-only")
        assert (await http.get("/session")).json()["read_only"] is True
        assert (await http.get("/v1/api/portfolio/accounts")).status_code == 200  # the LST alone will do
        gw.simulator.faults.set_tickle_unauthenticated(False)
        assert await gw.wait_new_session(generation) == generation + 1
        assert gw.manager.live is session  # the same LST session
        assert gw.manager.stats.handshakes == handshakes
        assert (await http.get("/v1/api/iserver/accounts")).headers["x-gateway-session"] == str(generation + 1)
        await ws.send_message("tic")  # the relay is still there
        with trio.fail_after(5):
            await ws.get_message()
    paths = [r.path for r in gw.simulator.records[mark:]]
    assert "/v1/api/oauth/live_session_token" not in paths
    assert "/v1/api/iserver/auth/ssodh/init" in paths
    reopened = paths.index("/v1/api/iserver/auth/ssodh/init")
    assert "/v1/api/iserver/accounts" in paths[reopened:]
