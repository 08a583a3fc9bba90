"""IBKR's runtime rules that the gateway follows for its clients, against the simulator (which enforces them)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio

from gateway.session.state import State
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gateway:
        await _portfolio_read(gateway)
        yield gateway


async def _portfolio_read(gw: TestGateway) -> None:
    """Wait for the session's background read of /portfolio/accounts (so it does not interleave with a test's)."""
    session = gw.manager.live
    assert session is not None
    with trio.fail_after(10):
        await session.portfolio_read.wait()


def _paths(gw: TestGateway, since: int) -> list[str]:
    """Paths IBKR saw from ``since`` on, without the background /portfolio/accounts reads of new sessions."""
    return [r.path for r in gw.simulator.records[since:] if r.path != PORTFOLIO_ACCOUNTS]


async def _raw(gw: TestGateway, request: bytes) -> bytes:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


def _echoed_headers(answer: bytes) -> list[list[str]]:
    """The request headers the simulator's echo route saw, from a raw HTTP answer."""
    headers = json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"]
    assert isinstance(headers, list)
    return headers


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_a_bodiless_request_goes_up_with_content_length_zero(gw: TestGateway, method: str) -> None:
    """``curl -X POST`` sends no Content-Length; IBKR's edge (and the simulator) answer such a request 411."""
    first = len(gw.simulator.records)
    answer = await _raw(gw, f"{method} /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    (record,) = [r for r in gw.simulator.records[first:] if r.path == "/v1/api/sim/echo"]
    assert record.status == 200
    assert ["content-length", "0"] in _echoed_headers(answer)


async def test_a_bodiless_get_gets_no_content_length(gw: TestGateway) -> None:
    answer = await _raw(gw, b"GET /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert [h for h in _echoed_headers(answer) if h[0] == "content-length"] == []


# --- warm-up: IBKR's per-session duties before any client request --------------------------------------------------

ISERVER_ACCOUNTS = "/v1/api/iserver/accounts"
PORTFOLIO_ACCOUNTS = "/v1/api/portfolio/accounts"
LST = "/v1/api/oauth/live_session_token"


def _session_paths(gw: TestGateway, since: int = 0) -> list[str]:
    """The accepted requests IBKR saw from ``since`` on, as paths (the session's own and the clients')."""
    return [r.path for r in gw.simulator.records[since:] if r.accepted and r.method != "WS"]


async def test_every_session_reads_the_accounts_before_it_opens(gw: TestGateway) -> None:
    """Warm-up at start and after every re-handshake: /iserver/accounts is read under the new token before the
    session is ready, so no client request can come first, and /portfolio/accounts right after (/portfolio requests
    wait for it); the answers carry the session's generation, which changes with it."""
    paths = _session_paths(gw)
    assert paths[paths.index(LST) :][-2:] == [ISERVER_ACCOUNTS, PORTFOLIO_ACCOUNTS]
    async with gw.client() as http:
        session = (await http.get("/session")).json()
        assert session["accounts"] == {"iserver": ["DU1234567"], "selected": "DU1234567", "portfolio": ["DU1234567"]}
        first = await http.get("/v1/api/iserver/accounts")
        assert first.headers["x-gateway-session"] == str(session["generation"])
        mark = len(gw.simulator.records)
        gw.simulator.faults.expire_lst()  # IBKR drops the token: the next request's 401 starts a new session
        again = await http.get("/v1/api/sim/echo")
        assert again.status_code == 200
        assert int(again.headers["x-gateway-session"]) == session["generation"] + 1
        assert (await http.get("/session")).json()["generation"] == session["generation"] + 1
        await _portfolio_read(gw)
    paths = _session_paths(gw, mark)
    renewed = paths.index(LST)
    assert paths[renewed:].index(ISERVER_ACCOUNTS) < paths[renewed:].index("/v1/api/sim/echo")  # before it opened
    assert PORTFOLIO_ACCOUNTS in paths[renewed:]  # read again under the new LST


async def test_a_failed_accounts_read_fails_the_handshake(gw: TestGateway) -> None:
    """Without /iserver/accounts the brokerage session is not usable for snapshots and orders: the handshake is
    retried rather than the session opened half-ready."""
    failures = gw.gateway.manager.stats.failures["handshake"]
    gw.simulator.faults.fail_next(1, 500, path_prefix=ISERVER_ACCOUNTS, error="accounts unavailable")
    gw.simulator.faults.expire_lst()
    async with gw.client() as http:
        assert (await http.get("/v1/api/sim/echo")).status_code == 200  # after the retried handshake
        errors = [e["message"] for e in (await http.get("/session")).json()["recent_errors"]]
    assert gw.gateway.manager.stats.failures["handshake"] == failures + 1
    assert any("GET /v1/api/iserver/accounts: IBKR answered 500: accounts unavailable" in e for e in errors), errors


async def test_a_failed_portfolio_accounts_read_is_noted_and_the_session_opens(gw: TestGateway) -> None:
    failures = gw.gateway.manager.stats.failures["handshake"]
    gw.simulator.faults.fail_next(1, 503, path_prefix=PORTFOLIO_ACCOUNTS)
    gw.simulator.faults.expire_lst()
    async with gw.client() as http:
        assert (await http.get("/v1/api/sim/echo")).status_code == 200
        await _portfolio_read(gw)
        session = (await http.get("/session")).json()
    assert gw.gateway.manager.stats.failures["handshake"] == failures
    assert session["accounts"]["portfolio"] == []
    assert any("/portfolio calls may fail" in e["message"] for e in session["recent_errors"])


# --- recovery in proportion: a 401 is confirmed before anything is renewed ------------------------------------------

TICKLE = "/v1/api/tickle"


async def test_one_401_on_a_data_call_is_confirmed_and_the_session_stays(gw: TestGateway) -> None:
    """IBKR refuses one request; a tickle under the same token says the token works: no new handshake, the GET is
    signed afresh and sent once more, a POST gets IBKR's own 401."""
    session = await gw.manager.wait_ready(5)
    handshakes = gw.manager.stats.handshakes
    async with gw.client() as http:
        gw.simulator.faults.fail_next(1, 401, path_prefix="/v1/api/sim/echo", error="not authorized")
        mark = len(gw.simulator.records)
        got = await http.get("/v1/api/sim/echo")
        assert got.status_code == 200
        assert _paths(gw, mark) == ["/v1/api/sim/echo", TICKLE, "/v1/api/sim/echo"]
        gw.simulator.faults.fail_next(1, 401, path_prefix="/v1/api/sim/echo", error="not authorized")
        await trio.sleep(1.1)  # past the reuse of the last verdict: this refusal is confirmed afresh
        mark = len(gw.simulator.records)
        posted = await http.post("/v1/api/sim/echo", json={"x": 1})
        assert (posted.status_code, posted.json()["error"]) == (401, "not authorized")  # IBKR's answer, as it is
        assert _paths(gw, mark) == ["/v1/api/sim/echo", TICKLE]
    assert gw.manager.stats.handshakes == handshakes
    assert gw.manager.live is session and session.usable


async def test_many_401s_at_once_cost_one_confirmation(gw: TestGateway) -> None:
    handshakes = gw.manager.stats.handshakes
    gw.simulator.faults.fail_next(20, 401, path_prefix="/v1/api/sim/echo")
    mark = len(gw.simulator.records)
    statuses: list[int] = []
    async with gw.client() as http:

        async def one() -> None:
            statuses.append((await http.get("/v1/api/sim/echo")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    tickles = [r for r in gw.simulator.records[mark:] if r.path == TICKLE]
    assert statuses == [200] * 20
    assert len(tickles) == 1  # one tickle a second at most (IBKR's limit), shared by every waiting request
    assert gw.manager.stats.handshakes == handshakes


async def test_a_dead_token_is_confirmed_and_renewed(gw: TestGateway) -> None:
    session = await gw.manager.wait_ready(5)
    handshakes = gw.manager.stats.handshakes
    gw.simulator.faults.expire_lst()
    async with gw.client() as http:
        got = await http.get("/v1/api/sim/echo")
    assert got.status_code == 200
    assert int(got.headers["x-gateway-session"]) > session.generation
    assert gw.manager.stats.handshakes == handshakes + 1
    assert not session.usable and session.end_kind == "tickle_401"


# --- read-only session, a handshake that cannot open the brokerage session, IBKR's 429 on a tickle -----------------


@pytest.fixture
async def quick(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    """Tickles every second, clients wait at most 3 s for a session (a handshake right after a tickle waits a
    second for its own: IBKR allows one a second), pacing on with a 2 s breaker."""
    async with open_test_gateway(
        {
            "session": {"tickle_interval_s": 1, "ready_timeout_s": 3},
            "pacing": {"enabled": True, "global_requests_per_s": 50, "global_burst": 50, "breaker_cooldown_s": 2},
        },
        credentials=ibkr_sim_credentials,
    ) as gateway:
        yield gateway


async def test_read_only_iserver_requests_wait_then_get_503_with_the_reason(quick: TestGateway) -> None:
    quick.simulator.faults.set_tickle_unauthenticated(True)
    with trio.fail_after(5):
        while quick.manager.state is not State.READ_ONLY:  # noqa: ASYNC110 - gateway-owned state
            await trio.sleep(0.01)
    async with quick.client() as http:
        started = trio.current_time()
        refused = await http.get("/v1/api/iserver/accounts")
        waited = trio.current_time() - started
        served = await http.get("/v1/api/sim/echo")  # outside /iserver: the LST alone will do
    assert refused.status_code == 503 and 2.9 <= waited <= 5
    body = refused.json()
    assert body["code"] == "session_not_ready"
    assert "brokerage session (/iserver) is down" in body["error"]
    assert "read-only" in body["error"]
    assert served.status_code == 200
    quick.simulator.faults.set_tickle_unauthenticated(False)


async def test_a_handshake_whose_brokerage_session_will_not_open_opens_read_only(quick: TestGateway) -> None:
    """A valid LST but ``ssodh/init`` refused (here 500; e.g. another login holds it with ``compete = false``):
    the session opens read-only and keeps trying ``ssodh/init`` under the same LST until IBKR opens it."""
    generation = (await quick.manager.wait_ready(5)).generation
    handshakes = quick.manager.stats.handshakes
    quick.simulator.faults.fail_next(2, 500, path_prefix="/v1/api/iserver/auth/ssodh/init", error="busy")
    quick.simulator.faults.expire_lst()
    async with quick.client() as http:
        assert (await http.get("/v1/api/sim/echo")).status_code == 200  # new LST; read-only is enough
        assert quick.manager.state is State.READ_ONLY
        assert quick.manager.stats.handshakes == handshakes + 1
        assert await quick.wait_new_session(generation + 1) >= generation + 2  # re-opened under the same LST
        assert quick.manager.stats.handshakes == handshakes + 1
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200


async def test_a_429_on_a_tickle_opens_the_breaker_and_the_session_stays(quick: TestGateway) -> None:
    session = await quick.manager.wait_ready(5)
    handshakes = quick.manager.stats.handshakes
    quick.simulator.faults.rate_limit(n=1, path_prefix=TICKLE)
    with trio.fail_after(5):
        while quick.gateway.pacer.upstream_429_total == 0:  # noqa: ASYNC110 - gateway-owned counter
            await trio.sleep(0.05)
    hold = quick.gateway.pacer.hold_s()
    assert hold > 1  # IBKR's pacing: the breaker holds everything, tickles too
    async with quick.client() as http:
        started = trio.current_time()
        held = await http.get("/v1/api/sim/echo")  # queued until the cool-down ends, then it is the probe
        waited = trio.current_time() - started
    assert held.status_code == 200 and waited >= hold - 0.2
    await trio.sleep(1.5)  # a tickle or two more
    assert session.usable and quick.manager.active is session
    assert quick.manager.stats.handshakes == handshakes


async def test_a_401_whose_confirmation_finds_the_brokerage_session_down_waits_for_it(gw: TestGateway) -> None:
    """The confirming tickle says the token works but the brokerage session is gone: it is re-opened under the same
    LST, and the /iserver GET is sent once more only then, under the new generation."""
    generation = (await gw.manager.wait_ready(5)).generation
    handshakes = gw.manager.stats.handshakes
    gw.simulator.faults.fail_next(1, 401, path_prefix="/v1/api/iserver/accounts")
    gw.simulator.faults.set_tickle_unauthenticated(True, clear_on_init=True)
    mark = len(gw.simulator.records)
    async with gw.client() as http:
        got = await http.get("/v1/api/iserver/accounts")
    assert got.status_code == 200
    assert got.headers["x-gateway-session"] == str(generation + 1)
    assert gw.manager.stats.handshakes == handshakes
    paths = [r.path for r in gw.simulator.records[mark:]]
    assert paths.index("/v1/api/iserver/auth/ssodh/init") < len(paths) - 1 - paths[::-1].index(ISERVER_ACCOUNTS)


async def test_410_on_a_tickle_renews_the_session(quick: TestGateway) -> None:
    """IBKR's 410 Gone on a session call: the token is no longer good here; a new LST and handshake."""
    session = await quick.manager.wait_ready(5)
    handshakes = quick.manager.stats.handshakes
    quick.simulator.faults.fail_next(1, 410, path_prefix=TICKLE, error="gone")
    assert await quick.wait_new_session(session.generation) > session.generation
    assert not session.usable and session.end_kind == "gone"
    assert quick.manager.stats.handshakes == handshakes + 1


async def test_410_on_a_client_request_is_confirmed_and_passed_on_when_the_token_works(gw: TestGateway) -> None:
    session = await gw.manager.wait_ready(5)
    handshakes = gw.manager.stats.handshakes
    gw.simulator.faults.fail_next(1, 410, path_prefix="/v1/api/sim/echo", error="gone")
    mark = len(gw.simulator.records)
    async with gw.client() as http:
        posted = await http.post("/v1/api/sim/echo", json={})
    assert (posted.status_code, posted.json()["error"]) == (410, "gone")
    assert _paths(gw, mark) == ["/v1/api/sim/echo", TICKLE]
    assert gw.manager.stats.handshakes == handshakes and session.usable


# --- IBKR's session events, as the simulator plays them -------------------------------------------------------------


async def _until_state(gw: TestGateway, state: State, limit_s: float = 5.0) -> None:
    with trio.fail_after(limit_s):
        while gw.manager.state is not state:  # noqa: ASYNC110 - gateway-owned state
            await trio.sleep(0.01)


async def test_the_nightly_reset_costs_a_re_init_not_a_handshake(quick: TestGateway) -> None:
    """IBKR ends the brokerage session at night and keeps the LST: read-only until ssodh/init re-opens it; the
    snapshot works again right after (the warm-up read the accounts in the new brokerage session)."""
    session = await quick.manager.wait_ready(5)
    handshakes, generation = quick.manager.stats.handshakes, session.generation
    async with open_websocket(quick.ws_url) as ws, quick.client() as http:
        await ws.get_message()
        quick.simulator.faults.nightly_reset()
        assert await quick.wait_new_session(generation) == generation + 1
        snapshot = await http.get("/v1/api/iserver/marketdata/snapshot", params={"conids": "265598", "fields": "31"})
        assert snapshot.status_code == 200, snapshot.text  # not 400 "Please query /accounts first"
        assert snapshot.headers["x-gateway-session"] == str(generation + 1)
        await ws.send_message("tic")  # the relay survived the reset
        with trio.fail_after(5):
            await ws.get_message()
    assert quick.manager.stats.handshakes == handshakes and quick.manager.live is session


async def test_another_login_holds_the_brokerage_session_while_compete_is_false(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """TWS takes the brokerage session; with ``compete = false`` the gateway does not take it back: read-only,
    ssodh/init retried, routes outside /iserver working. When TWS logs out, the next init opens it."""
    async with open_test_gateway(
        {"ibkr": {"compete": False}, "session": {"tickle_interval_s": 1, "ready_timeout_s": 1}},
        credentials=ibkr_sim_credentials,
    ) as gw:
        session = await gw.manager.wait_ready(5)
        generation = session.generation
        gw.simulator.faults.set_other_session(True)
        await _until_state(gw, State.READ_ONLY)
        async with gw.client() as http:
            assert (await http.get("/v1/api/sim/echo")).status_code == 200
            refused = await http.get("/v1/api/iserver/accounts")
            assert refused.status_code == 503 and "read-only" in refused.json()["error"]
            assert (await http.get("/session")).json()["competing"] is True
            await trio.sleep(2.5)  # ssodh/init keeps being refused: still read-only, same LST
            assert gw.manager.state is State.READ_ONLY and gw.manager.live is session
            gw.simulator.faults.set_other_session(False)
            assert await gw.wait_new_session(generation) > generation
            assert (await http.get("/v1/api/iserver/accounts")).status_code == 200


async def test_another_login_is_taken_over_when_compete_is_true(quick: TestGateway) -> None:
    session = await quick.manager.wait_ready(5)
    generation = session.generation
    quick.simulator.faults.set_other_session(True)
    assert await quick.wait_new_session(generation) == generation + 1  # ssodh/init took it back
    assert quick.manager.live is session


async def test_a_429_on_the_lst_request_holds_the_next_handshake_for_the_breaker(quick: TestGateway) -> None:
    """IBKR paces the token endpoint too: the breaker opens and the next handshake waits for it (one inside IBKR's
    penalty box would only extend it)."""
    session = await quick.manager.wait_ready(5)
    generation = session.generation
    quick.simulator.faults.rate_limit(n=1, path_prefix=LST)
    quick.simulator.faults.expire_lst()
    with trio.fail_after(5):
        while quick.gateway.pacer.upstream_429_total == 0:  # noqa: ASYNC110 - gateway-owned counter
            await trio.sleep(0.01)
    refused_at = trio.current_time()
    assert quick.gateway.pacer.hold_s() > 1
    assert await quick.wait_new_session(generation) > generation
    assert trio.current_time() - refused_at >= 1.5  # the breaker's 2 s cool-down, not the 0.05 s back-off


async def test_session_not_ready_and_health_say_why(quick: TestGateway) -> None:
    """A client turned away while the session fails learns the cause, as /health does (no secret in either)."""
    quick.simulator.faults.fail_next(1000, 500, path_prefix=LST, error="token service unavailable")
    quick.simulator.faults.expire_lst()
    async with quick.client() as http:
        refused = await http.get("/v1/api/sim/echo")
        health = await http.get("/health")
    assert refused.status_code == 503 and refused.json()["code"] == "session_not_ready"
    cause = "live_session_token: IBKR answered 500: token service unavailable"
    assert "last error: " in refused.json()["error"] and cause in refused.json()["error"]
    assert health.status_code == 503 and cause in health.json()["last_error"]
    quick.simulator.faults.reset()


async def test_a_failure_carries_its_fix_everywhere(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """A consumer key IBKR does not accept (not active yet), answered as tersely as IBKR does: /health, a turned-away
    client and /session's recent errors all say which config key fixes it."""
    async with (
        open_test_gateway(
            {"session": {"ready_timeout_s": 0.3, "reconnect_delay_s": 0.05, "reconnect_max_delay_s": 0.2}},
            credentials=ibkr_sim_credentials,
            simulator_options={"consumer_active": False, "terse_errors": True},
            wait_ready=False,
        ) as gw,
        gw.client() as http,
    ):
        with trio.fail_after(10):
            while not gw.manager.stats.recent_errors:  # noqa: ASYNC110 - gateway-owned state
                await trio.sleep(0.02)
        health = await http.get("/health")
        refused = await http.get("/v1/api/sim/echo")
        session = (await http.get("/session")).json()
    assert health.status_code == 503
    assert "error: invalid consumer" in health.json()["last_error"]
    assert health.json()["hint"]["keys"] == ["ibkr.consumer_key"]
    assert refused.status_code == 503 and "fix: compare ibkr.consumer_key" in refused.json()["error"]
    assert session["recent_errors"][0]["hint"]["keys"] == ["ibkr.consumer_key"]
    assert session["last_error_hint"] == session["recent_errors"][0]["hint"]
