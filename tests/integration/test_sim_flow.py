"""The whole first-party flow against the simulator over real loopback sockets, with the independent client:
LST -> validate -> ssodh/init -> tickle -> REST -> WebSocket with ticks -> logout."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import stream_pattern
from tests.integration.sim_client import (
    Client,
    next_json,
    ready_client,
    shared_credentials,
    start_simulator,
    wait_closed,
    ws_headers,
    ws_url,
)


async def test_full_first_party_flow(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    creds = shared_credentials()
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = Client(creds, url)
            lst = await client.get_lst(http)
            assert lst.status == 200
            assert lst.valid, "LST signature must validate with the Java K encoding"
            assert re.fullmatch(r"[0-9a-f]+", lst.body["diffie_hellman_response"])
            assert abs(lst.body["live_session_token_expiration"] - (time.time() + 86400) * 1000) < 60_000

            r = await client.request(http, "GET", "/v1/api/iserver/accounts")
            assert (r.status_code, r.json()) == (400, {"error": "no bridge", "statusCode": 400})
            r = await client.request(http, "GET", "/v1/api/portfolio/accounts")  # read-only session works
            assert r.status_code == 200
            assert r.json()[0]["id"] == "DU1234567"

            r = await client.request(
                http, "POST", "/v1/api/iserver/auth/ssodh/init", json={"publish": True, "compete": True}
            )
            assert r.status_code == 200
            init = r.json()
            assert init["authenticated"] is True
            assert init["connected"] is True
            assert init["competing"] is False
            assert "serverVersion" in init["serverInfo"]

            r = await client.request(http, "POST", "/v1/api/tickle")
            tickle = r.json()
            session = tickle["session"]
            assert re.fullmatch(r"[0-9a-f]{32}", session)
            assert session == sim.current_session
            assert tickle["collission"] is False
            assert isinstance(tickle["userId"], int)
            assert tickle["ssoExpires"] > 0
            assert tickle["iserver"]["authStatus"]["authenticated"] is True
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert r.json()["session"] == session

            for method in ("GET", "POST"):
                r = await client.request(http, method, "/v1/api/iserver/auth/status")
                status = r.json()
                assert (status["authenticated"], status["connected"], status["competing"], status["fail"]) == (
                    True,
                    True,
                    False,
                    "",
                )

            r = await client.request(http, "GET", "/v1/api/iserver/accounts")
            assert r.json()["accounts"] == ["DU1234567"]

            r = await client.request(http, "GET", "/v1/api/iserver/secdef/search", [("symbol", "AAPL")])
            assert r.json()[0]["conid"] == "265598"
            r = await client.request(http, "POST", "/v1/api/iserver/secdef/search", json={"symbol": "IBM"})
            assert r.json()[0]["conid"] == "8314"

            r = await client.request(
                http,
                "GET",
                "/v1/api/iserver/marketdata/snapshot",
                [("conids", "265598,8314"), ("fields", "31,84,86,55")],
            )
            assert r.status_code == 200
            snap = {entry["conid"]: entry for entry in r.json()}
            assert snap[265598]["55"] == "AAPL"
            assert float(snap[8314]["84"]) < float(snap[8314]["86"])
            assert "_updated" in snap[265598]

            r = await client.request(
                http,
                "GET",
                "/v1/api/iserver/marketdata/history",
                [("conid", "265598"), ("period", "1d"), ("bar", "1h")],
            )
            assert len(r.json()["data"]) == 24

            async with trio_websocket.open_websocket_url(
                ws_url(url, creds.access_token), extra_headers=ws_headers(session)
            ) as ws:
                assert await next_json(ws) == {"topic": "system", "success": "simuser1", "isFT": False, "isPaper": True}
                act = await next_json(ws)
                assert act["topic"] == "act"
                assert act["args"]["accounts"] == ["DU1234567"]
                sts = await next_json(ws)
                assert sts["topic"] == "sts"
                assert sts["args"]["authenticated"] is True
                await ws.send_message('smd+265598+{"fields":["31","84","86"]}')
                first = await next_json(ws, "smd+")
                assert first["topic"] == "smd+265598"
                assert first["conid"] == 265598
                assert {"31", "84", "86", "_updated"} <= first.keys()
                for _ in range(3):
                    tick = await next_json(ws, "smd+")
                    assert set(tick) - {"topic", "conid", "conidEx", "_updated", "server_id", "6119"} <= {
                        "31",
                        "84",
                        "86",
                    }
                hb = await next_json(ws, "system")
                assert isinstance(hb["hb"], int)
                await ws.send_message("tic")
                tic = await next_json(ws, "tic")
                assert (tic["alive"], tic["id"]) == (True, session)
                await ws.send_message("ech+hb")
                assert await next_json(ws, "ech+hb") == "ech+hb"
                await ws.send_message(b"smd+8314+{}")  # binary frames are accepted too
                assert (await next_json(ws, "smd+8314"))["conid"] == 8314
                await ws.send_message("umd+265598+{}")
                await ws.send_message("umd+8314+{}")
                with trio.move_on_after(0.1):
                    while True:  # drain ticks already queued
                        await ws.get_message()
                with trio.move_on_after(0.3) as quiet:
                    await next_json(ws, "smd+")
                assert quiet.cancelled_caught, "no ticks after umd"
                await ws.send_message("xyz+1")
                with trio.fail_after(5):
                    reply = await next_json(ws)
                    while "error" not in reply:  # a heartbeat or a late tick may come first
                        reply = await next_json(ws)
                assert reply["code"] == 1

                r = await client.request(http, "POST", "/v1/api/logout")
                assert r.json() == {"status": True}
                assert (await wait_closed(ws)).code == 1000
            assert sim.current_session is None
            r = await client.request(http, "GET", "/v1/api/iserver/accounts")
            assert r.json()["error"] == "no bridge"

    assert all(r.accepted for r in sim.records if r.path not in ("/v1/api/iserver/accounts",) and r.method != "WS")
    counts = sim.counts
    assert counts["/v1/api/oauth/live_session_token"] == 1
    assert counts["/v1/api/tickle"] == 2
    assert counts["/v1/api/ws"] == 1
    assert {r.rule for r in sim.records if r.accepted and r.method != "WS" and r.endpoint != "/v1/api/ws"} == {"guide"}


async def test_test_routes_echo_stream_upload(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url, init=False)
            body = b"x" * 100_000
            r = await client.request(
                http, "PUT", "/v1/api/sim/echo/a/b", [("q", "1 2")], content=body, headers={"X-Custom": "yes"}
            )
            echo = r.json()
            assert echo["method"] == "PUT"
            assert echo["path"] == "/v1/api/sim/echo/a/b"
            assert echo["query"] == "q=1%202"
            assert echo["body_length"] == len(body)
            assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
            headers = {k.lower(): v for k, v in echo["headers"]}
            assert headers["x-custom"] == "yes"
            assert headers["authorization"] == "<redacted>"
            assert ["X-Custom", "yes"] in echo["headers"] or ["x-custom", "yes"] in echo["headers"]
            assert (sim.records[-1].header("Authorization") or "").startswith("OAuth ")

            total = 3_000_000
            url_, headers_ = client.sign("GET", "/v1/api/sim/stream", [("bytes", str(total)), ("chunk", "65536")])
            digest = hashlib.sha256()
            received = 0
            async with http.stream("GET", url_, headers=headers_) as response:
                assert response.headers["content-length"] == str(total)
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    received += len(chunk)
            assert received == total
            assert digest.hexdigest() == hashlib.sha256(stream_pattern(total)).hexdigest()

            url_, headers_ = client.sign("GET", "/v1/api/sim/stream", [("bytes", "1000"), ("chunked", "1")])
            r = await http.get(url_, headers=headers_)
            assert r.headers.get("transfer-encoding") == "chunked"
            assert r.content == stream_pattern(1000)

            async def gen() -> object:
                for _ in range(50):
                    yield b"y" * 65536

            r = await client.request(http, "POST", "/v1/api/sim/upload", content=gen())  # type: ignore[arg-type]
            assert r.json() == {"bytes": 50 * 65536, "sha256": hashlib.sha256(b"y" * 65536 * 50).hexdigest()}


async def test_subscription_ttl_and_heartbeat_interval(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, subscription_ttl_s=0.3, heartbeat_s=0.1, tick_interval_s=0.02)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = (await client.request(http, "POST", "/v1/api/tickle")).json()["session"]
        token = shared_credentials().access_token
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            await next_json(ws, "sts")
            await ws.send_message('smd+756733+{"fields":["31","55"]}')
            first = await next_json(ws, "smd+")
            assert first["55"] == "SPY"
            ticks = heartbeats = 0
            with trio.move_on_after(0.6):
                while True:
                    message = await next_json(ws)
                    ticks += str(message.get("topic", "")).startswith("smd+")
                    heartbeats += "hb" in message
            assert ticks >= 3
            assert heartbeats >= 3
            with trio.move_on_after(0.3) as quiet:
                await next_json(ws, "smd+")
            assert quiet.cancelled_caught, "subscription must end after subscription_ttl_s"
    assert sim.ws_messages[0].text.startswith("smd+756733")


async def test_simulator_logs_hold_no_secrets(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sim, url = await start_simulator(nursery)
    creds = shared_credentials()
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = (await client.request(http, "POST", "/v1/api/tickle")).json()["session"]
            await Client(creds, url, prepend_override="00" * 32).get_lst(http)
            bad = Client(creds, url)
            bad.lst = b"\x01" * 20
            await bad.request(http, "GET", "/v1/api/tickle")
            token = creds.access_token
            async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
                await next_json(ws, "sts")
                await ws.send_message(json.dumps({"session": session}))
                async with trio.open_nursery() as inner:
                    inner.start_soon(sim.faults.close_websockets, 1011)
                    await wait_closed(ws)
            sim.faults.drop_mid_response(1)
            url_, headers = client.sign("GET", "/v1/api/sim/stream")
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(url_, headers=headers)
            await client.request(http, "POST", "/v1/api/logout")
    assert client.lst is not None
    secrets_ = [
        creds.access_token_secret,
        client.prepend,
        base64.b64encode(client.lst).decode(),
        client.lst.hex(),
        session,
        *[line.decode() for line in creds.signature_key_pem.splitlines()[1:-1]],
        *[line.decode() for line in creds.encryption_key_pem.splitlines()[1:-1]],
    ]
    for record in sim.records:
        authorization = record.header("authorization")
        if authorization and "oauth_signature=" in authorization:
            secrets_.append(authorization.split('oauth_signature="', 1)[1].split('"', 1)[0])
    own = [r for r in caplog.records if r.name.startswith("gateway.simulator")]
    assert own, "the simulator logs something"
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in own)
    for secret in secrets_:
        assert secret not in text
