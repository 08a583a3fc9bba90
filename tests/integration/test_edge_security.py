"""The strict edge: API keys, header and body limits, smuggling-shaped framing, absolute-form targets, WS caps."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.conftest import Figure

KEY = "k3y-for-tests-0123456789abcdef"


@pytest.fixture
async def secured(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"server": {"api_keys": f"{KEY},second-key-abcdefghijklmnop", "max_websockets": 2}},
        credentials=ibkr_sim_credentials,
    ) as gateway:
        yield gateway


async def test_api_key_required_everywhere_but_health(secured: TestGateway) -> None:
    before = len(secured.simulator.records)
    async with secured.client() as http:
        assert (await http.get("/health")).status_code == 200
        for path in ("/", "/session", "/v1/api/iserver/accounts"):
            r = await http.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["code"] == "unauthorized"
            r = await http.get(path, headers={"Authorization": "Bearer wrong-key-0123456789abcdef"})
            assert r.status_code == 401, path
        # Nothing refused reached the upstream (only the session's own tickles may have).
        assert {r.path for r in secured.simulator.records[before:]} <= {"/v1/api/tickle"}
        r = await http.get("/v1/api/iserver/accounts", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        r = await http.get("/session", params={"access_key": KEY})
        assert r.status_code == 200
        r = await http.get("/", params={"access_key": "second-key-abcdefghijklmnop"})
        assert r.status_code == 200
        assert "built-in IBKR simulator" in r.text


async def test_access_key_query_parameter_never_goes_upstream(secured: TestGateway) -> None:
    async with secured.client() as http:
        r = await http.get("/v1/api/sim/echo", params={"a": "1", "access_key": KEY, "b": "2"})
    assert r.status_code == 200
    (record,) = [rec for rec in secured.simulator.records if rec.path == "/v1/api/sim/echo"]
    assert record.raw_query == "a=1&b=2"
    assert record.accepted
    assert all(KEY not in value for _, value in record.headers)


async def test_websocket_keys_by_subprotocol_or_query(secured: TestGateway) -> None:
    url = secured.ws_base_url + "/v1/api/ws"
    with pytest.raises(trio_websocket.ConnectionRejected):
        async with open_websocket(url):
            pass
    async with open_websocket(url, subprotocols=[f"access_key.{KEY}"]) as ws:
        assert ws.subprotocol == f"access_key.{KEY}"
        assert '"topic":"system"' in await ws.get_message()
    async with open_websocket(url + f"?access_key={KEY}") as ws:
        await ws.get_message()
    handshakes = [r for r in secured.simulator.records if r.path == "/v1/api/ws" and r.method == "GET"]
    assert len(handshakes) == 2
    for handshake in handshakes:
        assert KEY not in handshake.raw_query
        assert handshake.header("sec-websocket-protocol") is None


async def test_websocket_cap_answers_1013(secured: TestGateway) -> None:
    url = secured.ws_base_url + f"/v1/api/ws?access_key={KEY}"
    async with open_websocket(url) as one, open_websocket(url) as two:
        await one.get_message()
        await two.get_message()
        async with open_websocket(url) as three:
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await three.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1013


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gateway:
        yield gateway


async def test_header_limits_431(gw: TestGateway) -> None:
    async with gw.client() as http:
        many = {f"X-H{i}": "v" for i in range(120)}
        r = await http.get("/v1/api/iserver/accounts", headers=many)
        assert r.status_code == 431
        r = await http.get("/v1/api/iserver/accounts", headers={"X-Big": "a" * 15000, "X-Big2": "b" * 3000})
        assert r.status_code in (400, 431)  # 431 from the gateway, or the HTTP parser's own cap just above it
        r = await http.get("/v1/api/iserver/accounts", headers={"X-Fine": "a" * 1000})
        assert r.status_code == 200


async def test_body_limit_413_sized_and_chunked(gw: TestGateway) -> None:
    big = b"x" * 70_000
    before = len([r for r in gw.simulator.records if r.path == "/v1/api/iserver/secdef/search"])
    async with gw.client() as http:
        r = await http.post("/v1/api/iserver/secdef/search", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["code"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"y" * 10_000

    async with gw.client() as http:
        r = await http.post("/v1/api/iserver/secdef/search", content=chunks())
        assert r.status_code == 413
    after = [r for r in gw.simulator.records if r.path == "/v1/api/iserver/secdef/search"]
    assert all(not r.accepted for r in after[before:])  # a cut-off body never completed upstream


async def raw_exchange(gw: TestGateway, request: bytes) -> bytes:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.move_on_after(3):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    return data


async def test_content_length_with_transfer_encoding_is_refused_and_closed(gw: TestGateway) -> None:
    smuggle = (
        b"POST /v1/api/iserver/secdef/search HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/api/iserver/accounts HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    before = len(gw.simulator.records)
    for _ in range(5):
        answer = await raw_exchange(gw, smuggle)
        # A 400 and a close; hypercorn may also drop such a pipelined connection before the 400 is written.
        # Either way the smuggled second request is never answered and never forwarded.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
        assert answer.count(b"HTTP/1.1 ") <= 1
    assert {r.path for r in gw.simulator.records[before:]} <= {"/v1/api/tickle"}
    async with gw.client() as http:  # and the gateway keeps serving
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200


async def test_content_length_with_transfer_encoding_alone_gets_400(gw: TestGateway) -> None:
    request = (
        b"POST /v1/api/iserver/secdef/search HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    answer = await raw_exchange(gw, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b'"code": "bad_framing"' in answer


async def test_two_different_content_lengths_are_refused(gw: TestGateway) -> None:
    request = (
        b"POST /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\n{}"
    )
    answer = await raw_exchange(gw, request)
    assert answer.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 400"), answer[:120]
    assert not [r for r in gw.simulator.records if r.path == "/v1/api/sim/echo"]


async def test_identical_duplicate_content_lengths_are_merged_into_one(gw: TestGateway) -> None:
    """What docs/security.md says: the HTTP parser merges identical duplicates (RFC 9110 §8.6 allows it); the
    request goes upstream once, with one Content-Length."""
    request = (
        b"POST /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    answer = await raw_exchange(gw, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:120]
    (record,) = [r for r in gw.simulator.records if r.path == "/v1/api/sim/echo"]
    assert [value for name, value in record.headers if name.lower() == "content-length"] == ["2"]


async def test_absolute_form_and_bad_targets_are_refused(gw: TestGateway) -> None:
    for target in (
        b"http://evil.test/v1/api/iserver/accounts",
        b"/v1/api/iserver/%2e%2e/logout",
        b"/v1/api/iserver//accounts",
        b"/v1/api/iserver/accounts;jsessionid=1",
        b"/v1/api/iserver\\accounts",
    ):
        answer = await raw_exchange(gw, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0] in (b"HTTP/1.1 400 ", b"HTTP/1.1 404 "), (target, answer[:80])


async def test_client_oauth_parameters_are_refused(gw: TestGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.get("/v1/api/iserver/accounts", params={"oauth_token": "x"})
    assert r.status_code == 400
    assert r.json()["code"] == "bad_query"


@pytest.fixture
async def gw_short_timeouts(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"server": {"keep_alive_timeout_s": 1, "read_timeout_s": 2, "websocket_ping_interval_s": 0.5}},
        credentials=ibkr_sim_credentials,
    ) as gateway:
        yield gateway


async def _seconds_until_closed(stream: trio.SocketStream, limit_s: float) -> float:
    started = trio.current_time()
    with trio.fail_after(limit_s):
        while await stream.receive_some(65536):
            pass
    return trio.current_time() - started


async def test_f13_idle_keep_alive_connection_is_closed(gw_short_timeouts: TestGateway, figure: Figure) -> None:
    host, port = gw_short_timeouts.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
        closed_after = await _seconds_until_closed(stream, 5)
    # hypercorn's trio worker does not run its keep-alive timer between requests, so an idle connection is reaped
    # by read_timeout_s (2 s here); the figure records which one fired.
    figure(
        "g14_idle_keepalive_closed_after", round(closed_after, 2), "s", "<=read_timeout+0.5=2.5", closed_after <= 2.5
    )
    assert closed_after <= 2.5


async def test_f10_slow_headers_are_cut_at_the_header_deadline(gw_short_timeouts: TestGateway, figure: Figure) -> None:
    """A slowloris client trickling header bytes is disconnected at the keep-alive (header) deadline."""
    host, port = gw_short_timeouts.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    started = trio.current_time()
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        with trio.fail_after(5):
            try:
                while True:
                    await stream.send_all(b"X-Slow: 1\r\n")
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    cut_after = trio.current_time() - started
    figure("g9_slowloris_cut_after", round(cut_after, 2), "s", "<=keep_alive+1=2", cut_after <= 2)
    assert cut_after <= 2
    async with gw_short_timeouts.client() as http:  # and the gateway keeps serving
        assert (await http.get("/health")).status_code == 200


async def test_idle_websocket_survives_read_timeout_thanks_to_pings(gw_short_timeouts: TestGateway) -> None:
    """A dashboard that only listens is not cut by read_timeout_s: the gateway's pings keep the socket talking."""
    async with open_websocket(gw_short_timeouts.ws_url) as ws:
        await ws.get_message()
        await trio.sleep(3)  # longer than read_timeout_s (2 s); the client answers pings automatically
        await ws.send_message('smd+265598+{"fields":["31"]}')
        with trio.fail_after(5):
            while '"topic":"smd+265598"' not in await ws.get_message():
                pass
