"""Gateway behaviour at the edges: LST refresh, upstream failures, truncation, CORS/Origin, secret hygiene in logs."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest
import trio
import trio_websocket

from gateway.errors import UpstreamConnectError
from gateway.logs import configure_logging
from gateway.session import calls
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket


async def test_lst_is_refreshed_before_expiry_without_dropping_traffic(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    async with open_test_gateway(credentials=ibkr_sim_credentials, simulator_options={"lst_ttl_s": 2.0}) as gw:
        generation = (await gw.manager.wait_ready(5)).generation
        statuses: list[int] = []
        async with gw.client() as http:
            with trio.move_on_after(4.5):
                while True:
                    statuses.append((await http.get("/v1/api/iserver/accounts")).status_code)
                    await trio.sleep(0.05)
        assert gw.manager.stats.lst_refreshes >= 1
        assert set(statuses) == {200}
        assert gw.manager.active is not None
        assert gw.manager.active.generation == generation  # refreshed in place: no session restart
        lst_requests = [r for r in gw.simulator.records if r.path == "/v1/api/oauth/live_session_token"]
        assert len(lst_requests) == 1 + gw.manager.stats.lst_refreshes


async def test_a_request_racing_an_lst_refresh_is_re_signed_not_a_session_restart(
    ibkr_sim_credentials: SimulatorCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IBKR rejects the old LST from the moment it issues a new one; until the gateway has derived and installed the
    new token, requests signed with the old one come back 401. That is a race with the refresh, not a dead session:
    they wait for the new token and are re-signed, and the session (with its relays) goes on. The window, a few ms
    of DH math in real life, is widened here to 0.5 s after the simulator has issued the new token."""
    real = calls.request_live_session_token
    issued = 0

    async def slow_to_install(*args: object, **kwargs: object) -> calls.LiveSessionToken:
        nonlocal issued
        token = await real(*args, **kwargs)  # type: ignore[arg-type]
        issued += 1
        if issued > 1:  # a refresh (not the first handshake): the simulator already rejects the old token
            await trio.sleep(0.5)
        return token

    monkeypatch.setattr(calls, "request_live_session_token", slow_to_install)
    async with open_test_gateway(credentials=ibkr_sim_credentials, simulator_options={"lst_ttl_s": 2.0}) as gw:
        generation = (await gw.manager.wait_ready(5)).generation
        statuses: list[int] = []

        async def keep_asking(http: httpx.AsyncClient) -> None:
            while True:
                statuses.append((await http.get("/v1/api/iserver/accounts")).status_code)
                await trio.sleep(0.02)

        async with gw.client() as http, trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(keep_asking, http)
            with trio.fail_after(10):
                while gw.manager.stats.lst_refreshes < 1:  # noqa: ASYNC110 - polls a counter owned by the gateway
                    await trio.sleep(0.05)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        raced = [r for r in gw.simulator.records if r.status == 401 and "superseded" in r.reason]
        assert raced, "no request hit the refresh window: the test did not exercise the race"
        assert set(statuses) == {200}
        assert gw.manager.active is not None
        assert gw.manager.active.generation == generation  # no session restart


async def test_upstream_connection_refused_is_502(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        await gw.simulator.faults.down()
        async with gw.client() as http:
            r = await http.get("/v1/api/sim/echo")
        await gw.simulator.faults.up()
    assert r.status_code == 502
    body = r.json()
    assert body["code"] == "upstream_connect"
    assert "GET /v1/api/sim/echo" in body["error"]


async def test_upstream_timeout_is_504(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway({"upstream": {"read_timeout_s": 0.3}}, credentials=ibkr_sim_credentials) as gw:
        gw.simulator.faults.set_delay(1.0)
        async with gw.client() as http:
            r = await http.get("/v1/api/sim/echo")
        gw.simulator.faults.set_delay(0)
    assert r.status_code == 504
    assert r.json()["code"] == "upstream_timeout"


async def test_upstream_dying_mid_body_is_never_a_complete_response(gw_fast: TestGateway) -> None:
    size = 1_000_000
    gw_fast.simulator.faults.drop_mid_response(1, after_bytes=200_000)
    received = 0
    async with gw_fast.client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("GET", f"/v1/api/sim/stream?bytes={size}&chunk=16384") as r:
                assert r.status_code == 200
                async for chunk in r.aiter_raw():
                    received += len(chunk)
        assert received < size
        # The gateway keeps serving.
        r = await http.get(f"/v1/api/sim/stream?bytes={size}")
        assert len(r.content) == size


@pytest.fixture
async def gw_fast(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"server": {"allowed_origins": ["https://dash.example.com"]}}, credentials=ibkr_sim_credentials
    ) as gateway:
        yield gateway


async def test_cors_preflight_and_headers_for_allowed_origin_only(gw_fast: TestGateway) -> None:
    async with gw_fast.client() as http:
        ok = await http.options(
            "/v1/api/iserver/accounts",
            headers={"Origin": "https://dash.example.com", "Access-Control-Request-Method": "GET"},
        )
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == "https://dash.example.com"
        r = await http.get("/v1/api/iserver/accounts", headers={"Origin": "https://dash.example.com"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://dash.example.com"
        for evil in ("https://dash.example.com.evil.test", "null", "http://dash.example.com", "https://evil.test"):
            pre = await http.options(
                "/v1/api/iserver/accounts", headers={"Origin": evil, "Access-Control-Request-Method": "GET"}
            )
            assert "access-control-allow-origin" not in pre.headers
            r = await http.get("/v1/api/iserver/accounts", headers={"Origin": evil})
            assert r.status_code == 403
            assert "access-control-allow-origin" not in r.headers


async def test_websocket_from_foreign_origin_is_refused(gw_fast: TestGateway) -> None:
    before = gw_fast.gateway.relays.opened_total
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with open_websocket(
            gw_fast.ws_base_url + "/v1/api/ws", extra_headers=[(b"Origin", b"https://evil.test")]
        ):
            pass
    assert rejected.value.status_code == 403
    async with open_websocket(
        gw_fast.ws_base_url + "/v1/api/ws", extra_headers=[(b"Origin", b"https://dash.example.com")]
    ) as ws:
        await ws.get_message()
    assert gw_fast.gateway.relays.opened_total == before + 1


async def test_websocket_on_unrouted_path_is_refused(gw_fast: TestGateway) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected):
        async with open_websocket(gw_fast.ws_base_url + "/v1/api/other"):
            pass


def _forms(value: str | bytes) -> set[str]:
    raw = value.encode() if isinstance(value, str) else value
    forms = {base64.b64encode(raw).decode(), raw.hex()}
    if isinstance(value, str):
        forms |= {value, quote(value, safe="")}
    return forms


async def test_no_secret_in_debug_logs_responses_or_status(ibkr_sim_credentials: SimulatorCredentials) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("debug", "text", stream=stream)
    bodies: list[str] = []
    try:
        async with open_test_gateway({"session": {"tickle_interval_s": 1}}, credentials=ibkr_sim_credentials) as gw:
            session = await gw.manager.wait_ready(5)
            lst = session.signer._lst.reveal()
            async with gw.client() as http:
                # The gateway's own answers (upstream bodies pass through unchanged and are IBKR's business).
                for path in ("/session", "/", "/health", "/v1/api/nope", "/v1/api/x/../y"):
                    bodies.append((await http.get(path)).text)
                assert (await http.get("/v1/api/iserver/accounts")).status_code == 200
                async with open_websocket(gw.ws_url) as ws:
                    await ws.send_message('smd+265598+{"fields":["31"]}')
                    for _ in range(4):
                        await ws.get_message()
                cookie = gw.simulator.current_session
                gw.simulator.faults.expire_lst()  # a 401, a restart, a second LST and cookie
                gw.simulator.faults.fail_next(1, status=500, path_prefix="/v1/api/oauth")
                assert (await http.get("/v1/api/iserver/accounts")).status_code == 200
                bodies.append((await http.get("/session")).text)
                second = await gw.manager.wait_ready(5)
                lst2 = second.signer._lst.reveal()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    logs = stream.getvalue()
    assert "session ready -> backoff" in logs or "ready -> backoff" in logs  # the restart was logged
    assert "GET /v1/api/iserver/accounts -> 200" in logs
    assert cookie
    secrets = {
        "access token secret": _forms(ibkr_sim_credentials.access_token_secret),
        "prepend": _forms(bytes.fromhex(_prepend(ibkr_sim_credentials))),
        "access token": _forms(ibkr_sim_credentials.access_token),
        "LST": _forms(lst) | _forms(lst2),
        "session cookie": _forms(cookie),
    }
    for name, forms in secrets.items():
        for form in forms:
            assert form not in logs, f"{name} leaked into the logs"
            for body in bodies:
                assert form not in body, f"{name} leaked into a response"


def _prepend(creds: SimulatorCredentials) -> str:
    from gateway.oauth.keys import decrypt_access_token_secret, load_rsa_private_key

    key = load_rsa_private_key(creds.encryption_key_pem, what="test")
    return decrypt_access_token_secret(key, creds.access_token_secret)


async def test_a_handshake_failure_landing_as_the_gateway_stops_does_not_end_it_with_an_error(
    ibkr_sim_credentials: SimulatorCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown during a handshake whose LST call fails in the same step (before the cancellation lands): the failure
    is recorded and the gateway keeps stopping (it used to raise IllegalTransition out of the supervisor)."""
    handle: list[TestGateway] = []
    started = trio.Event()

    async def fails_as_shutdown_begins(*args: object, **kwargs: object) -> calls.LiveSessionToken:
        await started.wait()
        await handle[0].manager.stop()  # no checkpoint inside: the failure below is seen before the cancellation
        raise UpstreamConnectError("POST /v1/api/oauth/live_session_token: upstream connection failed (test)")

    monkeypatch.setattr(calls, "request_live_session_token", fails_as_shutdown_begins)
    async with open_test_gateway(credentials=ibkr_sim_credentials, wait_ready=False) as gw:
        handle.append(gw)
        started.set()
        with trio.fail_after(5):
            await gw.manager.wait_stopped()
        assert gw.manager.state.value == "stopped"
        assert "upstream connection failed (test)" in gw.manager.stats.last_error
