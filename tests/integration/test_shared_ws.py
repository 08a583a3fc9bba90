"""Shared WebSocket mode against the simulator over loopback: one IBKR socket and one subscription per conid for many
clients, routing, field unions, the late subscriber's snapshot, the grace period, slow clients, session restarts."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.integration.test_relay_stalls import FloodClient

WS_PATH = "/v1/api/ws"
AAPL, MSFT = 265598, 272093


def smd(conid: int, *fields: str) -> str:
    return f"smd+{conid}+" + json.dumps({"fields": list(fields)})


async def next_json(ws: trio_websocket.WebSocketConnection, topic: str | None = None, timeout_s: float = 5) -> Any:
    """The next JSON message (of ``topic``, skipping others)."""
    with trio.fail_after(timeout_s):
        while True:
            message = json.loads(await ws.get_message())
            if topic is None or message.get("topic") == topic:
                return message


def upstream_sent(gw: TestGateway, prefix: str) -> list[str]:
    """What the gateway sent on IBKR's socket(s), starting with ``prefix``."""
    return [m.text for m in gw.simulator.ws_messages if m.text.startswith(prefix)]


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "unsubscribe_delay_s": 0.5}, "session": {"tickle_interval_s": 1}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05},
    ) as gateway:
        yield gateway


async def test_many_clients_one_socket_one_subscription(gw: TestGateway) -> None:
    """Forty dashboards on the same symbol: one IBKR socket, one subscription."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_websocket(gw.ws_base_url + WS_PATH)) for _ in range(40)]
        for ws in clients:
            assert (await next_json(ws))["topic"] == "system"  # IBKR's greeting, replayed to each
            await ws.send_message(smd(AAPL, "31", "84"))
        for ws in clients:
            tick = await next_json(ws, f"smd+{AAPL}")
            assert "31" in tick or "84" in tick
        assert gw.simulator.websocket_count == 1
        async with gw.client() as http:
            metrics = (await http.get("/metrics")).text
        assert f'gateway_websocket_shared_subscribers{{topic="smd+{AAPL}"}} 40' in metrics
        assert "gateway_websocket_shared_upstream_subscriptions 1" in metrics
        assert "gateway_websocket_relays_open 40" in metrics
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 1


async def test_routing_by_conid_and_fields(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + WS_PATH) as a, open_websocket(gw.ws_base_url + WS_PATH) as b:
        await a.send_message(smd(AAPL, "31"))
        await b.send_message(smd(MSFT, "31", "84"))
        for _ in range(20):
            message = await next_json(a)
            if message["topic"].startswith("smd+"):
                assert message["topic"] == f"smd+{AAPL}"
                assert set(message) & {"84", "86"} == set()  # only what it asked for


async def test_late_subscriber_gets_all_fields_at_once(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + WS_PATH) as first:
        await first.send_message(smd(AAPL, "31", "84", "86"))
        full = await next_json(first, f"smd+{AAPL}")
        assert {"31", "84", "86"} <= set(full)
        await trio.sleep(0.3)  # IBKR now sends only what changes
        async with open_websocket(gw.ws_base_url + WS_PATH) as late:
            await late.send_message(smd(AAPL, "31", "84", "86"))
            first_for_late = await next_json(late, f"smd+{AAPL}")
            assert {"31", "84", "86"} <= set(first_for_late)
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 1


async def test_union_grows_and_last_unsubscribe_waits_for_the_grace(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + WS_PATH) as a:
        await a.send_message(smd(AAPL, "31"))
        await next_json(a, f"smd+{AAPL}")
        async with open_websocket(gw.ws_base_url + WS_PATH) as b:
            await b.send_message(smd(AAPL, "84"))
            await next_json(b, f"smd+{AAPL}")
            sent = [m.text for m in gw.simulator.ws_messages if m.text.startswith(("smd+", "umd+"))]
            assert sent[-2:] == [f"umd+{AAPL}+{{}}", smd(AAPL, "31", "84").replace(" ", "")]  # umd first
        with trio.fail_after(5):  # b left: the union shrinks back
            while upstream_sent(gw, f"smd+{AAPL}")[-1] != smd(AAPL, "31").replace(" ", ""):  # noqa: ASYNC110
                await trio.sleep(0.02)
        await a.send_message(f"umd+{AAPL}+{{}}")
        await trio.sleep(0.2)
        umds = len(upstream_sent(gw, f"umd+{AAPL}"))
        await trio.sleep(0.6)  # the grace period (0.5 s) passes
        assert len(upstream_sent(gw, f"umd+{AAPL}")) == umds + 1


async def test_session_restart_keeps_clients_and_resubscribes(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
        await ws.send_message(smd(AAPL, "31"))
        await next_json(ws, f"smd+{AAPL}")
        generation = gw.manager.active.generation if gw.manager.active else 0
        gw.simulator.expire_lst()  # the next tickle fails: the session restarts
        assert (await next_json(ws, "gateway", timeout_s=10))["state"] == "restarting"
        assert (await next_json(ws, "gateway", timeout_s=15))["state"] == "ready"
        assert await gw.wait_new_session(generation) > generation
        await next_json(ws, f"smd+{AAPL}", timeout_s=5)  # prices flow again without the client asking
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 2


async def test_ibkr_closing_the_shared_socket_reopens_it_under_the_same_session(
    gw: TestGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """IBKR closes its socket while the session lives: the hub says why, clients stay and hear the notice, the socket
    is reopened and re-subscribed — and the session is not disturbed (the close never escapes into its nursery)."""
    async with open_websocket(gw.ws_url) as ws:
        await ws.send_message(smd(AAPL, "31"))
        await next_json(ws, f"smd+{AAPL}")
        generation = gw.manager.active.generation if gw.manager.active else 0
        assert await gw.simulator.faults.close_websockets(1011, "maintenance") == 1
        assert (await next_json(ws, "gateway", timeout_s=5))["state"] == "restarting"
        assert (await next_json(ws, "gateway", timeout_s=10))["state"] == "ready"
        await next_json(ws, f"smd+{AAPL}", timeout_s=5)
        assert gw.manager.active is not None and gw.manager.active.generation == generation
    assert "IBKR closed its socket (1011 maintenance)" in caplog.text
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 2


async def test_keepalives_are_answered_by_the_gateway(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
        await ws.send_message("tic")
        assert (await next_json(ws, "tic"))["alive"] is True
        async with gw.client() as http:
            session = (await http.get("/session")).json()
            page = (await http.get("/")).text
        assert session["websocket_mode"] == "shared" and session["shared"]["clients"] == 1
        assert session["shared"]["upstream_connected"] is True
        assert "shared: 1 client(s), IBKR socket open" in page
        await ws.send_message("bogus+command")
        assert "error" in await next_json(ws, "gateway")


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (RFC 6455 §5.2: clients mask), for a raw socket that never reads."""
    payload = text.encode()
    mask = os.urandom(4)
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_stops_reading_is_closed_and_slows_nobody(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    conids = (AAPL, MSFT, 8314, 756733, 76792991, 4815747, 3691937)
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "client_buffer": 10}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.002},
    ) as gw:
        stalled = await FloodClient.connect(gw)  # a receive window of a few KiB, and it never reads
        async with open_websocket(gw.ws_base_url + WS_PATH) as healthy:
            for conid in conids:
                await stalled.stream.send_all(masked_text_frame(smd(conid, "31", "84", "86")))
                await healthy.send_message(smd(conid, "31", "84", "86"))
            gaps: list[float] = []
            last = trio.current_time()
            with trio.fail_after(30):
                while gw.gateway.relays.open > 1:
                    await next_json(healthy, None, timeout_s=2)
                    now = trio.current_time()
                    gaps.append(now - last)
                    last = now
            for _ in range(50):  # and the healthy one goes on
                assert (await next_json(healthy, None, timeout_s=2))["topic"]
            assert max(gaps) < 1.0, max(gaps)
        stalled.close()
    assert any("websocket.client_buffer" in r.getMessage() for r in caplog.records)


async def test_subscriptions_are_renewed_before_ibkr_lets_them_lapse(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "renew_subscriptions_s": 1}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05, "subscription_ttl_s": 1.5},  # IBKR: ~15 minutes
    ) as gw:
        async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
            await ws.send_message(smd(AAPL, "31", "84"))
            started = trio.current_time()
            while trio.current_time() - started < 4:  # well past the simulator's lapse
                await next_json(ws, f"smd+{AAPL}", timeout_s=1)
        assert len(upstream_sent(gw, f"smd+{AAPL}")) >= 3


async def test_disconnect_releases_and_shutdown_closes_with_1001(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "unsubscribe_delay_s": 0}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05},
    ) as gw:
        async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
            await ws.send_message(smd(AAPL, "31"))
            await next_json(ws, f"smd+{AAPL}")
        with trio.fail_after(5):
            while not upstream_sent(gw, f"umd+{AAPL}"):  # noqa: ASYNC110 - the simulator's record
                await trio.sleep(0.02)
        async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
            await next_json(ws, "sts")
            gw.gateway.request_shutdown()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(10):
                    while True:
                        await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1001


async def test_relay_mode_is_unchanged_by_default(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """The default mode relays: IBKR's own tic answer comes through, and each client has its own IBKR socket."""
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        async with open_websocket(gw.ws_base_url + WS_PATH) as a, open_websocket(gw.ws_base_url + WS_PATH) as b:
            await next_json(a, "sts")
            await next_json(b, "sts")
            assert gw.simulator.websocket_count == 2
        async with gw.client() as http:
            assert (await http.get("/session")).json()["websocket_mode"] == "relay"


async def test_batching_sends_one_merged_message_per_interval(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "batch_interval_ms": 250}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.01},  # IBKR: ~100 ticks a second
    ) as gw:
        async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
            await ws.send_message(smd(AAPL, "31", "84", "86"))
            await next_json(ws, f"smd+{AAPL}")
            started = trio.current_time()
            count = 0
            while trio.current_time() - started < 1.0:
                message = await next_json(ws, f"smd+{AAPL}", timeout_s=1)
                count += 1
                assert set(message) & {"31", "84", "86"}
        assert 2 <= count <= 6, count  # one per 250 ms, not ~100


async def test_a_hostile_client_gets_errors_and_disturbs_nobody(gw: TestGateway) -> None:
    junk = [
        "",
        "smd",
        "smd+",
        "smd+-1+{}",
        "smd+99999999999999+{}",
        'smd+265598+{"fields":"31"}',
        'smd+265598+{"fields":[' + ",".join(['"31"'] * 500) + "]}",
        "smd+265598+" + "[" * 10000,
        "umd+abc",
        "sor+" + "x" * 5000,
        "\x00\xff",
        "{" * 3000,
        "tic" * 1000,
    ]
    async with open_websocket(gw.ws_base_url + WS_PATH) as watcher, open_websocket(gw.ws_base_url + WS_PATH) as hostile:
        await watcher.send_message(smd(AAPL, "31"))
        await next_json(watcher, f"smd+{AAPL}")
        for _ in range(20):
            for text in junk:
                await hostile.send_message(text)
            await hostile.send_message(b"\xff\xfe binary junk")
        for _ in range(200):  # each command is answered by an error, never a close
            message = await next_json(hostile)
            assert message["topic"] in ("system", "act", "sts", "gateway"), message
        for _ in range(5):  # the watcher streams on, unaware
            await next_json(watcher, f"smd+{AAPL}", timeout_s=2)
        for _ in range(300):  # one client may hold only so many subscriptions
            await hostile.send_message(smd(8314 + _, "31"))
        assert gw.simulator.websocket_count == 1
    async with gw.client() as http:
        shared = (await http.get("/session")).json()["shared"]
    assert shared["subscribers"].get(f"smd+{AAPL}") in (None, 1)


async def test_max_websockets_caps_shared_clients_with_1013(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with (
        open_test_gateway(
            {"websocket": {"mode": "shared"}, "server": {"max_websockets": 2}}, credentials=ibkr_sim_credentials
        ) as gw,
        open_websocket(gw.ws_base_url + WS_PATH) as a,
        open_websocket(gw.ws_base_url + WS_PATH) as b,
    ):
        await next_json(a, "sts")
        await next_json(b, "sts")
        async with open_websocket(gw.ws_base_url + WS_PATH) as third:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await third.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1013
        assert "server.max_websockets" in (closed.value.reason.reason or "")
        await a.send_message("tic")
        assert (await next_json(a, "tic"))["alive"] is True


async def _read_frame(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """One unmasked server frame (opcode, payload), parsed by hand: a cut or interleaved frame fails here."""

    async def need(n: int) -> None:
        while len(buffer) < n:
            data = await stream.receive_some(512)  # small reads: the socket stays nearly full
            assert data, "connection closed"
            buffer.extend(data)

    await need(2)
    first, second = buffer[0], buffer[1]
    assert first & 0x70 == 0 and second & 0x80 == 0, buffer[:2]  # no RSV bits, unmasked
    size, head = second & 0x7F, 2
    if size == 126:
        await need(4)
        size, head = int.from_bytes(buffer[2:4], "big"), 4
    elif size == 127:
        await need(10)
        size, head = int.from_bytes(buffer[2:10], "big"), 10
    await need(head + size)
    payload = bytes(buffer[head : head + size])
    del buffer[: head + size]
    return first & 0x0F, payload


async def test_direct_frame_writes_never_cut_or_reorder_a_frame(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """A client with a tiny receive window that reads slowly while pinging: the frames the gateway writes straight to
    the socket (partly, when the socket is nearly full) and hypercorn's pongs interleave, and every frame still
    arrives whole and in order."""
    async with open_test_gateway(
        {"websocket": {"mode": "shared", "client_buffer": 100_000}}, credentials=ibkr_sim_credentials
    ) as gw:
        client = await FloodClient.connect(gw)
        try:
            count = 3000
            pad = "x" * 40
            for n in range(count):
                await client.stream.send_all(masked_text_frame(f"bogus+{n}+{pad}"))
            ping = bytes([0x89, 0x80 | 4]) + bytes(4) + b"ping"  # masked with a zero key
            buffer = bytearray()
            expected, pongs = 0, 0
            with trio.fail_after(60):
                while expected < count:
                    opcode, payload = await _read_frame(client.stream, buffer)
                    if opcode == 0xA:
                        pongs += 1
                        continue
                    if opcode == 0x9:
                        continue  # the server's own ping (websocket_ping_interval_s): a control frame, whole
                    assert opcode == 0x1, opcode
                    message = json.loads(payload)
                    if message.get("topic") != "gateway" or "command" not in message:
                        continue  # the greeting, accounts and status replayed on join
                    assert message["command"] == f"bogus+{expected}+{pad}", (message, expected)
                    expected += 1
                    if expected % 100 == 0:
                        await client.stream.send_all(ping)
            assert pongs >= 1
        finally:
            client.close()
