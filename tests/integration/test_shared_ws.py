"""Shared WebSocket mode against the simulator over loopback: one IBKR socket and one subscription per conid for many
clients, routing, field unions, the late subscriber's snapshot, the grace period, slow clients, session restarts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from tests.twclient import open_websocket

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
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_websocket(gw.ws_url + WS_PATH)) for _ in range(10)]
        for ws in clients:
            assert (await next_json(ws))["topic"] == "system"  # IBKR's greeting, replayed to each
            await ws.send_message(smd(AAPL, "31", "84"))
        for ws in clients:
            tick = await next_json(ws, f"smd+{AAPL}")
            assert "31" in tick or "84" in tick
    assert gw.simulator.websocket_count <= 1
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 1


async def test_routing_by_conid_and_fields(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url + WS_PATH) as a, open_websocket(gw.ws_url + WS_PATH) as b:
        await a.send_message(smd(AAPL, "31"))
        await b.send_message(smd(MSFT, "31", "84"))
        for _ in range(20):
            message = await next_json(a)
            if message["topic"].startswith("smd+"):
                assert message["topic"] == f"smd+{AAPL}"
                assert set(message) & {"84", "86"} == set()  # only what it asked for


async def test_late_subscriber_gets_all_fields_at_once(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url + WS_PATH) as first:
        await first.send_message(smd(AAPL, "31", "84", "86"))
        full = await next_json(first, f"smd+{AAPL}")
        assert {"31", "84", "86"} <= set(full)
        await trio.sleep(0.3)  # IBKR now sends only what changes
        async with open_websocket(gw.ws_url + WS_PATH) as late:
            await late.send_message(smd(AAPL, "31", "84", "86"))
            first_for_late = await next_json(late, f"smd+{AAPL}")
            assert {"31", "84", "86"} <= set(first_for_late)
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 1


async def test_union_grows_and_last_unsubscribe_waits_for_the_grace(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url + WS_PATH) as a:
        await a.send_message(smd(AAPL, "31"))
        await next_json(a, f"smd+{AAPL}")
        async with open_websocket(gw.ws_url + WS_PATH) as b:
            await b.send_message(smd(AAPL, "84"))
            await next_json(b, f"smd+{AAPL}")
        sent = upstream_sent(gw, f"smd+{AAPL}")
        assert sent[-1] == smd(AAPL, "31", "84").replace(" ", "")
        assert upstream_sent(gw, f"umd+{AAPL}")  # umd before the re-subscribe with the union
        await a.send_message(f"umd+{AAPL}+{{}}")
        await trio.sleep(0.2)
        umds = len(upstream_sent(gw, f"umd+{AAPL}"))
        await trio.sleep(0.6)  # the grace period (0.5 s) passes
        assert len(upstream_sent(gw, f"umd+{AAPL}")) == umds + 1


async def test_session_restart_keeps_clients_and_resubscribes(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url + WS_PATH) as ws:
        await ws.send_message(smd(AAPL, "31"))
        await next_json(ws, f"smd+{AAPL}")
        generation = gw.manager.active.generation if gw.manager.active else 0
        gw.simulator.expire_lst()  # the next tickle fails: the session restarts
        assert (await next_json(ws, "gateway", timeout_s=10))["state"] == "restarting"
        assert (await next_json(ws, "gateway", timeout_s=15))["state"] == "ready"
        assert await gw.wait_new_session(generation) > generation
        await next_json(ws, f"smd+{AAPL}", timeout_s=5)  # prices flow again without the client asking
    assert len(upstream_sent(gw, f"smd+{AAPL}")) == 2


async def test_keepalives_are_answered_by_the_gateway(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url + WS_PATH) as ws:
        await ws.send_message("tic")
        assert (await next_json(ws, "tic"))["alive"] is True
        await ws.send_message("bogus+command")
        assert "error" in await next_json(ws, "gateway")
