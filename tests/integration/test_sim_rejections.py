"""The simulator rejects each deviation with its own IBKR-shaped reason, over real loopback sockets."""

from __future__ import annotations

import dataclasses
import json
import time
from functools import cache

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials, generate_credentials
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

SNAPSHOT = "/v1/api/iserver/marketdata/snapshot"
QUERY = [("conids", "265598,8314"), ("fields", "31,84,86")]


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert body["statusCode"] == response.status_code
    return response.status_code, body["error"]


async def raw_request(url: str, data: bytes) -> bytes:
    """Send raw bytes to the simulator and read until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_lst_request_deviations(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    creds = shared_credentials()
    cases: list[tuple[Client, dict[str, str], str]] = [
        (Client(creds, url, prepend_override="00" * 32), {}, "invalid signature"),
        (Client(creds, url, realm="test_realm"), {}, "invalid realm"),
        (Client(dataclasses.replace(creds, consumer_key="WRONGKEYX"), url), {}, "invalid consumer"),
        (Client(dataclasses.replace(creds, access_token="f" * 20), url), {}, "invalid token"),
        (Client(creds, url), {"timestamp": str(int(time.time()) - 301)}, "timestamp out of range"),
        (Client(creds, url), {"timestamp": str(int(time.time()) + 400)}, "timestamp out of range"),
        (Client(creds, url), {"timestamp": str(int(time.time() * 1000))}, "invalid timestamp"),
        (Client(creds, url), {"challenge_hex": "xyz"}, "invalid diffie_hellman_challenge"),
        (Client(creds, url), {"challenge_hex": "1"}, "invalid diffie_hellman_challenge"),
        (Client(creds, url), {"challenge_hex": "f" * 600}, "invalid diffie_hellman_challenge"),
        (Client(creds, url, user_agent=None), {}, "missing user-agent"),
    ]
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            for client, kwargs, reason in cases:
                if client.user_agent is None:
                    http.headers.pop("user-agent", None)
                result = await client.get_lst(http, **kwargs)
                expected_status = 403 if reason == "missing user-agent" else 401
                assert (result.status, result.body) == (
                    expected_status,
                    {"error": reason, "statusCode": expected_status},
                )
                assert sim.records[-1].reason == reason
                assert not sim.records[-1].accepted
                http.headers["user-agent"] = "sim-test-client/1.0"
            ok = Client(creds, url)
            assert (await ok.get_lst(http, nonce="nonce-1")).valid
            again = await ok.get_lst(http, nonce="nonce-1")
            assert (again.status, again.body["error"]) == (401, "nonce reused")
    assert sim.counts["/v1/api/oauth/live_session_token"] == len(cases) + 2


async def test_missing_sign_byte_breaks_validation_and_requests(nursery: trio.Nursery) -> None:
    """K encoded without Java's 0x00: when K's top bit is set, the client's LST validation fails and a request
    signed with that wrong LST is refused. Loop handshakes (bounded) until such a K occurs."""
    sim, url = await start_simulator(nursery)
    client = Client(shared_credentials(), url, k_encoding="minimal")
    seen_ok = False
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            for _ in range(64):
                result = await client.get_lst(http)
                assert result.status == 200
                if not result.k_top_bit_set:
                    assert result.valid  # without the top bit, minimal and Java encodings coincide
                    seen_ok = True
                    continue
                assert not result.valid
                r = await client.request(http, "GET", "/v1/api/portfolio/accounts")
                assert error_of(r) == (401, "invalid signature")
                break
            else:
                pytest.fail("no K with its top bit set in 64 handshakes")
    assert seen_ok or sim.counts["/v1/api/oauth/live_session_token"] == 1


async def test_ordinary_request_deviations(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    creds = shared_credentials()
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = Client(creds, url)
            r = await http.get(f"{url}/v1/api/tickle")
            assert error_of(r) == (401, "missing authorization header")
            client.lst = b"\x00" * 20
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert error_of(r) == (401, "no live session token")
            client = await ready_client(http, url)

            r = await client.request(http, "GET", SNAPSHOT, QUERY, nonce="n-1")
            assert r.status_code == 200
            r = await client.request(http, "GET", SNAPSHOT, QUERY, nonce="n-1")
            assert error_of(r) == (401, "nonce reused")
            r = await client.request(http, "GET", "/v1/api/tickle", timestamp=str(int(time.time()) - 600))
            assert error_of(r) == (401, "timestamp out of range")

            for knobs, reason in [
                ({"realm": "test_realm"}, "invalid realm"),
                ({"query_mode": "omit"}, "invalid signature"),
                ({"query_mode": "in_url"}, "invalid signature"),
            ]:
                other = Client(creds, url, **knobs)  # type: ignore[arg-type]
                other.lst = client.lst
                r = await other.request(http, "GET", SNAPSHOT, QUERY)
                assert error_of(r) == (401, reason)

            url_, headers = client.sign("GET", "/v1/api/tickle")
            r = await http.get(
                url_, headers={**headers, "Authorization": headers["Authorization"].replace("HMAC", "RSA")}
            )
            assert error_of(r) == (401, "invalid signature method")
            r = await http.get(url_, headers={"Authorization": 'OAuth realm="x', "User-Agent": "x"})
            assert error_of(r) == (401, "malformed authorization header")
            url_, headers = client.sign("GET", "/v1/api/tickle")
            r = await http.get(url_, headers={**headers, "Authorization": headers["Authorization"] + ', x="1"'})
            assert error_of(r) == (401, "invalid signature")  # an unsigned extra header parameter breaks the MAC

            http.headers.pop("user-agent")
            client.user_agent = None
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert error_of(r) == (403, "missing user-agent")
            client.user_agent = "x"
            http.headers["user-agent"] = "x"

            r = await client.request(http, "GET", "/v1/api/iserver/nope")
            assert error_of(r) == (404, "not found")
            r = await client.request(http, "GET", "/v1/api/logout")
            assert error_of(r) == (405, "method not allowed")
            r = await http.get(f"{url}/elsewhere")
            assert error_of(r) == (404, "not found")

    reasons = [rec.reason for rec in sim.records if not rec.accepted]
    assert "nonce reused" in reasons
    assert "missing user-agent" in reasons


async def test_lenient_mode_accepts_other_query_rules(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, lenient=True)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            base = await ready_client(http, url)
            for mode in ("include", "omit", "in_url"):
                client = Client(shared_credentials(), url, query_mode=mode)
                client.lst = base.lst
                r = await client.request(http, "GET", SNAPSHOT, QUERY)
                assert r.status_code == 200, r.text
                assert sim.records[-1].rule == {"include": "guide"}.get(mode, mode)
            bad = Client(shared_credentials(), url, prepend_override="00" * 32)
            assert (await bad.get_lst(http)).status == 401  # lenient is only about the query string


async def test_bodies_lengths_and_handler_input(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url, init=False)
            init = "/v1/api/iserver/auth/ssodh/init"
            for kwargs, reason in [
                ({"content": b"{nope", "headers": {"Content-Type": "application/json"}}, "invalid json body"),
                ({"json": [1, 2]}, "json body must be an object"),
                ({"json": {"publish": False}}, "publish must be true"),
                ({"json": {"compete": True}}, "publish is required"),
                ({"json": {"publish": True, "compete": "maybe"}}, "compete must be a boolean"),
                ({"content": b"x" * 70_000}, "request body too large"),
            ]:
                r = await client.request(http, "POST", init, **kwargs)  # type: ignore[arg-type]
                assert error_of(r)[1] == reason
                assert 400 <= r.status_code < 500
            # the guide's example: a urlencoded body, whose parameters are part of the signature
            form = [("compete", "false"), ("publish", "true")]
            url_, headers = client.sign("POST", init, nonce="form-unsigned")
            r = await http.post(url_, data=dict(form), headers=headers)
            assert error_of(r) == (401, "invalid signature")
            url_, headers = client.sign("POST", init, form, raw_query="")
            r = await http.post(url_, data=dict(form), headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["authenticated"] is True

            for query, reason in [
                ([("conids", "abc")], "invalid conids"),
                ([], "conids is required"),
                ([("conids", ",")], "invalid conids"),
            ]:
                r = await client.request(http, "GET", SNAPSHOT, query)
                assert error_of(r) == (400, reason)
            history = "/v1/api/iserver/marketdata/history"
            for query, reason in [
                ([("conid", "265598"), ("bar", "1x")], "invalid bar"),
                ([("conid", "265598"), ("bar", "1h"), ("period", "0d")], "invalid period"),
                ([("conid", "1"), ("bar", "1h")], "chart data unavailable"),
                ([("bar", "1h")], "conid is required"),
                ([("conid", "265598")], "bar is required"),
            ]:
                r = await client.request(http, "GET", history, query)
                assert error_of(r) == (400, reason)
            r = await client.request(http, "GET", "/v1/api/iserver/secdef/search")
            assert error_of(r) == (400, "symbol is required")
            r = await client.request(http, "GET", "/v1/api/sim/stream", [("bytes", "-1")])
            assert error_of(r) == (400, "invalid bytes")

    url_, headers = client.sign("POST", "/v1/api/logout")
    target = url_.removeprefix(url)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = await raw_request(
        url, f"POST {target} HTTP/1.1\r\nHost: {url[7:]}\r\n{head}Connection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 411")
    assert b'"error":"length required"' in raw
    assert all(r.status < 500 for r in sim.records)


async def test_expired_and_superseded_lst(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, lst_ttl_s=0.3)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url, init=False)
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200
            await trio.sleep(0.4)
            r = await client.request(http, "GET", "/v1/api/tickle")
            assert error_of(r) == (401, "live session token expired")
            old = client.lst
            assert (await client.get_lst(http)).valid
            stale = Client(shared_credentials(), url)
            stale.lst = old
            r = await stale.request(http, "GET", "/v1/api/tickle")
            assert error_of(r) == (401, "live session token superseded")
            assert (await client.request(http, "GET", "/v1/api/tickle")).status_code == 200
    assert [r.reason for r in sim.records if not r.accepted] == [
        "live session token expired",
        "live session token superseded",
    ]


@cache
def _testcons_credentials() -> SimulatorCredentials:
    return generate_credentials(consumer_key="TESTCONS")


async def test_testcons_uses_test_realm(nursery: trio.Nursery) -> None:
    from gateway.simulator import Simulator

    creds = _testcons_credentials()
    sim = Simulator(creds)
    url = await nursery.start(sim.serve, "127.0.0.1", 0)
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            assert (await Client(creds, url).get_lst(http)).valid
            wrong = await Client(creds, url, realm="limited_poa").get_lst(http)
            assert (wrong.status, wrong.body["error"]) == (401, "invalid realm")


async def test_websocket_handshake_rejections(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery)
    token = shared_credentials().access_token
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = (await client.request(http, "POST", "/v1/api/tickle")).json()["session"]
        for ws_target, headers, status, reason in [
            (ws_url(url, token), ws_headers("0" * 32), 401, "invalid session cookie"),
            (ws_url(url, "f" * 20), ws_headers(session), 401, "invalid oauth_token"),
            (ws_url(url, None), ws_headers(session), 401, "missing oauth_token"),
            (ws_url(url, token), ws_headers(session, user_agent=False), 403, "missing user-agent"),
            (ws_url(url, token).replace("/ws", "/wsx"), ws_headers(session), 404, "not found"),
        ]:
            got_status, body = await ws_rejected(ws_target, headers)
            assert got_status == status
            assert body is not None
            assert json.loads(body) == {"error": reason, "statusCode": status}
            assert sim.records[-1].reason == reason
            assert not sim.records[-1].accepted

        # alternative flow: no cookie -> "waiting for session" -> {"session": ...}
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(None)) as ws:
            assert await next_json(ws) == {"message": "waiting for session"}
            await ws.send_message("tic")
            assert await next_json(ws) == {"message": "waiting for session"}
            await ws.send_message(json.dumps({"session": session}))
            assert (await next_json(ws))["topic"] == "system"
            assert (await next_json(ws))["topic"] == "act"
            assert (await next_json(ws))["topic"] == "sts"
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(None)) as ws:
            await next_json(ws)
            await ws.send_message(json.dumps({"session": "nope"}))
            reason_ = await wait_closed(ws)
            assert (reason_.code, reason_.reason) == (1008, "invalid session")
        assert sim.records[-1].reason == "closed by server: invalid session"


async def test_websocket_messages_and_binary_frames(nursery: trio.Nursery) -> None:
    sim, url = await start_simulator(nursery, ws_binary=True)
    token = shared_credentials().access_token
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = (await client.request(http, "POST", "/v1/api/tickle")).json()["session"]
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            raw = await ws.get_message()
            assert isinstance(raw, bytes)
            assert json.loads(raw)["topic"] == "system"
            for message, expected in [
                ("smd+999+{}", {"topic": "smd+999", "error": "invalid conid"}),
                ("smd+abc+{}", {"topic": "smd+abc", "error": "invalid conid"}),
                ('smd+8314+{"fields":"31"}', {"topic": "smd+8314", "error": "invalid arguments"}),
                ("smd+8314+{bad", {"topic": "smd+8314", "error": "invalid arguments"}),
                ("sbd+DU1+8314", {"error": "Topic unknown: sbd", "code": 1}),
                ('{"x":1}', {"error": "unexpected message", "code": 1}),
            ]:
                await ws.send_message(message)
                got = await next_json(ws, None)
                while got.get("topic") in ("act", "sts", "system"):
                    got = await next_json(ws, None)
                assert got == expected
            await ws.send_message(b"\xff\xfe")
            got = await next_json(ws)
            while got.get("topic") in ("act", "sts", "system"):
                got = await next_json(ws)
            assert got == {"error": "message is not UTF-8", "code": 1}
    assert [m.text for m in sim.ws_messages][:2] == ["smd+999+{}", "smd+abc+{}"]
