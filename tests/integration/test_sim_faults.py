"""Every fault of the simulator, driven through real loopback sockets: from the handle and over ``/_sim``."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import Simulator
from tests.integration.sim_client import (
    Client,
    next_json,
    ready_client,
    shared_credentials,
    start_simulator,
    wait_closed,
    ws_headers,
    ws_rejected,
    ws_url,
)


async def _session(http: httpx.AsyncClient, client: Client) -> str:
    return str((await client.request(http, "POST", "/v1/api/tickle")).json()["session"])


async def _admin(http: httpx.AsyncClient, url: str, path: str, body: Any = None) -> httpx.Response:
    if body is None and not path.startswith("/_sim/faults") and not path.endswith("/clear"):
        return await http.get(f"{url}{path}")
    return await http.post(f"{url}{path}", json=body if body is not None else {})


async def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return True
    await stream.aclose()
    return False


async def test_expire_lst_and_tickle_faults(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            sim.faults.expire_lst()
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert r.json() == {"error": "live session token expired", "statusCode": 401}
            assert (await client.get_lst(http)).valid
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200

            sim.faults.set_tickle_unauthenticated(True)
            status = (await client.request(http, "POST", "/v1/api/tickle")).json()["iserver"]["authStatus"]
            assert (status["authenticated"], status["competing"]) == (False, False)
            sim.faults.set_tickle_unauthenticated(True, competing=True)
            status = (await client.request(http, "GET", "/v1/api/iserver/auth/status")).json()
            assert (status["authenticated"], status["competing"]) == (False, True)
            session = await _session(http, client)
            token = shared_credentials().access_token
            async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
                sts = await next_json(ws, "sts")
                assert (sts["args"]["authenticated"], sts["args"]["competing"]) == (False, True)
            init = {"publish": True, "compete": True}
            r = await client.request(http, "POST", "/v1/api/iserver/auth/ssodh/init", json=init)
            assert r.json()["authenticated"] is False  # sticky until switched off
            sim.faults.set_tickle_unauthenticated(True, clear_on_init=True)
            r = await client.request(http, "POST", "/v1/api/iserver/auth/ssodh/init", json=init)
            assert r.json()["authenticated"] is True
            status = (await client.request(http, "POST", "/v1/api/tickle")).json()["iserver"]["authStatus"]
            assert status["authenticated"] is True


async def test_close_websockets_with_code(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    token = shared_credentials().access_token
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = await _session(http, client)
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            await next_json(ws, "sts")
            await ws.send_message('smd+265598+{"fields":["31"]}')
            await next_json(ws, "smd+")
            assert sim.websocket_count == 1
            async with trio.open_nursery() as inner:
                inner.start_soon(sim.faults.close_websockets, 1011)
                reason = await wait_closed(ws)
            assert reason.code == 1011
        assert sim.websocket_count == 0
        assert any(r.method == "WS" and r.status == 1011 for r in sim.records)


async def test_fail_next_rate_limit_and_delay(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    """Virtual time: the delay and the 429 window pass instantly, the simulator's wall clock stays real."""
    sim, url = await start_simulator(nursery)
    async with httpx.AsyncClient(timeout=120) as http:  # httpx deadlines run on the virtual clock too
        client = await ready_client(http, url, init=False)
        sim.faults.fail_next(2, status=503, path_prefix="/v1/api/tickle", error="service down")
        for _ in range(2):
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert (r.status_code, r.json()) == (503, {"error": "service down", "statusCode": 503})
        assert (await client.request(http, "GET", "/v1/api/portfolio/accounts")).status_code == 200
        assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200
        sim.faults.fail_next(1, status=500)
        r = await client.request(http, "GET", "/v1/api/portfolio/accounts")
        assert r.json() == {"error": "internal server error", "statusCode": 500}

        sim.faults.rate_limit(n=2)
        for _ in range(2):
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert (r.status_code, r.headers["retry-after"]) == (429, "1")
        assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200
        sim.faults.rate_limit(seconds=5)
        r = await client.request(http, "GET", "/v1/api/tickle")
        assert (r.status_code, r.headers["retry-after"]) == (429, "5")
        await trio.sleep(5.1)
        assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200

        sim.faults.set_delay(30)
        before = trio.current_time()
        assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200
        assert trio.current_time() - before >= 30
        sim.faults.reset()
        before = trio.current_time()
        await client.request(http, "GET", "/v1/api/tickle")
        assert trio.current_time() - before < 1

        sim.faults.fail_next(1, status=503, path_prefix="/v1/api/ws")
        status, body = await ws_rejected(ws_url(url, shared_credentials().access_token), ws_headers(None))
        assert (status, json.loads(body or b"")) == (503, {"error": "service unavailable", "statusCode": 503})


async def test_down_and_up_on_the_same_port(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    token = shared_credentials().access_token
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = await _session(http, client)
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            await next_json(ws, "sts")
            await sim.faults.down()
            assert sim.faults.is_down
            assert await _refused(url)
            assert (await wait_closed(ws)).code == 1006  # dropped without a close frame, like a crash
        await sim.faults.down()  # idempotent
        await sim.faults.up()
        await sim.faults.up()  # idempotent
        assert sim.url == url
        assert not await _refused(url)
        async with httpx.AsyncClient() as http:
            r = await client.request(http, "GET", "/v1/api/tickle")  # session state survived the outage
            assert r.json()["session"] == session


async def test_drop_mid_response(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url, init=False)
            for chunked in ("0", "1"):
                sim.faults.drop_mid_response(1, after_bytes=100_000)
                url_, headers = client.sign("GET", "/v1/api/sim/stream", [("bytes", "300000"), ("chunked", chunked)])
                received = 0
                with pytest.raises(httpx.RemoteProtocolError):
                    async with http.stream("GET", url_, headers=headers) as response:
                        assert response.status_code == 200
                        async for chunk in response.aiter_raw():
                            received += len(chunk)
                assert received == 100_000
                assert sim.records[-1].reason == "dropped mid-response"
            url_, headers = client.sign("GET", "/v1/api/sim/stream", [("bytes", "300000")])
            r = await http.get(url_, headers=headers)
            assert len(r.content) == 300_000


async def test_admin_path_drives_every_fault(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    token = shared_credentials().access_token
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = await _session(http, client)

            assert (
                await _admin(
                    http, url, "/_sim/faults/fail_next", {"n": 1, "status": 502, "path_prefix": "/v1/api/tickle"}
                )
            ).json() == {"ok": True}
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 502
            await _admin(http, url, "/_sim/faults/rate_limit", {"n": 1})
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 429
            await _admin(http, url, "/_sim/faults/delay", {"seconds": 0.2})
            started = time.monotonic()
            await client.request(http, "GET", "/v1/api/tickle")
            assert time.monotonic() - started >= 0.2
            await _admin(http, url, "/_sim/faults/tickle", {"unauthenticated": True, "competing": True})
            state = (await _admin(http, url, "/_sim/state")).json()
            assert state["faults"]["delay_s"] == 0.2
            assert state["faults"]["tickle"]["competing"] is True
            assert state["bridge"] is True
            await _admin(http, url, "/_sim/faults/reset")
            state = (await _admin(http, url, "/_sim/state")).json()
            assert state["faults"]["delay_s"] == 0
            assert state["faults"]["tickle"]["unauthenticated"] is False
            await _admin(http, url, "/_sim/faults/expire_lst")
            assert (await client.request(http, "GET", "/v1/api/tickle")).json()["error"] == "live session token expired"
            assert (await client.get_lst(http)).valid

            await _admin(http, url, "/_sim/faults/drop_mid_response", {"n": 1, "after_bytes": 10})
            url_, headers = client.sign("GET", "/v1/api/sim/stream", [("bytes", "1000")])
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(url_, headers=headers)

            async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
                await next_json(ws, "sts")
                async with trio.open_nursery() as inner:
                    inner.start_soon(
                        _admin, http, url, "/_sim/faults/close_websockets", {"code": 4001, "reason": "bye"}
                    )
                    reason = await wait_closed(ws)
                assert (reason.code, reason.reason) == (4001, "bye")

            records = (await _admin(http, url, "/_sim/records?since=0")).json()["records"]
            assert records
            blob = json.dumps(records)
            assert client.lst is not None
            assert session not in blob
            assert "oauth_signature" not in blob
            for record in records:
                for name, value in record["headers"]:
                    if name.lower() in ("authorization", "cookie"):
                        assert value == "<redacted>"
            last = records[-1]["seq"]
            assert (await _admin(http, url, f"/_sim/records?since={last}")).json() == {"records": []}
            counts = (await _admin(http, url, "/_sim/counts")).json()
            assert counts == sim.counts
            assert counts["/v1/api/tickle"] >= 4

            for path, body, status in [
                ("/_sim/faults/down", {}, 400),
                ("/_sim/faults/delay", {"seconds": -1}, 400),
                ("/_sim/faults/delay", {"seconds": "x"}, 400),
                ("/_sim/faults/rate_limit", {"n": 1, "seconds": 1}, 400),
                ("/_sim/faults/fail_next", {"n": True}, 400),
                ("/_sim/faults/nope", {}, 404),
            ]:
                r = await _admin(http, url, path, body)
                assert r.status_code == status
                assert r.json()["statusCode"] == status
            r = await http.post(f"{url}/_sim/faults/delay", content=b"{bad")
            assert r.json() == {"error": "invalid json body", "statusCode": 400}
            r = await http.get(f"{url}/_sim/faults/reset")
            assert r.status_code == 405
            r = await http.get(f"{url}/_sim/records?since=x")
            assert r.status_code == 400

            await _admin(http, url, "/_sim/records/clear")
            assert sim.records == []

            r = await _admin(http, url, "/_sim/faults/down", {"seconds": 0.5})
            assert r.json() == {"ok": True}
            await trio.sleep(0.3)
            assert await _refused(url)
            await trio.sleep(0.6)
            assert not await _refused(url)
        async with httpx.AsyncClient() as http:
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200


async def test_serve_twice_and_write_credentials_need_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    sim = Simulator(shared_credentials())
    with pytest.raises(RuntimeError, match="serving"):
        sim.write_credentials("/nonexistent")
    with pytest.raises(RuntimeError, match="not serving"):
        await sim.faults.up()
    assert sim.credentials is shared_credentials()
    assert sim.url is None
    assert sim.lst_expires_ms is None
    url = await nursery.start(sim.serve, "127.0.0.1", 0)
    assert sim.url == url
    with pytest.raises(RuntimeError, match="already serving"):
        await sim.serve("127.0.0.1", 0)
    toml_path = sim.write_credentials(tmp_path, gateway_port=5099)
    doc = tomllib.loads(toml_path.read_text())
    assert (doc["ibkr"]["base_url"], doc["server"]["port"]) == (url, 5099)
    async with httpx.AsyncClient() as http:
        client = await ready_client(http, url, init=False)
        await client.request(http, "GET", "/v1/api/tickle")
    per_second = sim.per_second("/v1/api/tickle")
    assert sum(per_second.values()) == 1
    assert sum(sim.per_second().values()) == 2
    assert "url=" in repr(sim)
