"""The relay's keep-alive toward IBKR and the simulator's idle rule, over loopback against the simulator.

IBKR closes a WebSocket whose client sent nothing for about a minute; the simulator does the same after
``ws_idle_close_s`` (short here). Each relay sends ``tic`` right after the upstream handshake and whenever nothing
went up for ``websocket.upstream_keepalive_s``, and drops the answers to its own keep-alives on the way to the client.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.integration.sim_client import (
    next_json,
    ready_client,
    shared_credentials,
    start_simulator,
    wait_closed,
    ws_headers,
    ws_url,
)

WS_PATH = "/v1/api/ws"
IDLE_S = 2.0  # the simulator's idle limit in these tests
KEEPALIVE_S = 1.0  # the gateway's keep-alive interval in these tests (the config's lower bound)


def is_tic_answer(raw: str | bytes) -> bool:
    text = raw.decode() if isinstance(raw, bytes) else raw
    try:
        message = json.loads(text)
    except ValueError:
        return False
    return isinstance(message, dict) and message.get("topic") == "tic"


def upstream_tics(gw: TestGateway) -> list[float]:
    """When the simulator received each ``tic`` (wall-clock seconds), oldest first."""
    return [m.time for m in gw.simulator.ws_messages if m.text.strip() == "tic"]


def idle_closes(gw: TestGateway) -> int:
    return sum(1 for r in gw.simulator.records if r.method == "WS" and "idle" in r.reason)


async def listen(ws: trio_websocket.WebSocketConnection, seconds: float) -> list[str | bytes]:
    """Everything the client receives for ``seconds``, sending nothing (a listen-only dashboard)."""
    received: list[str | bytes] = []
    with trio.move_on_after(seconds):
        while True:
            received.append(await ws.get_message())
    return received


async def test_listen_only_client_stays_connected_past_the_idle_limit(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """A client that never sends keeps its relay for 2.5 idle limits: the keep-alive holds IBKR's socket open."""
    async with (
        open_test_gateway(
            {"websocket": {"upstream_keepalive_s": KEEPALIVE_S}},
            credentials=ibkr_sim_credentials,
            simulator_options={"ws_idle_close_s": IDLE_S, "heartbeat_s": 0.5},
        ) as gw,
        open_websocket(gw.ws_base_url + WS_PATH) as ws,
    ):
        received = await listen(ws, 2.5 * IDLE_S)  # ConnectionClosed here fails the test
        assert ws.closed is None
        assert any(b'"hb"' in (m if isinstance(m, bytes) else m.encode()) for m in received[-3:]), "still streaming"
        assert gw.simulator.websocket_count == 1
        assert gw.gateway.relays.open == 1
        assert idle_closes(gw) == 0


@pytest.mark.parametrize("ws_binary", [False, True], ids=["text", "binary"])
async def test_keepalive_answers_never_reach_the_client_but_its_own_tic_is_answered(
    ibkr_sim_credentials: SimulatorCredentials, ws_binary: bool
) -> None:
    """Several keep-alives go up while the client listens and none of their answers reaches it (IBKR may answer in
    binary frames); the client's own ``tic`` then gets exactly one answer."""
    async with (
        open_test_gateway(
            {"websocket": {"upstream_keepalive_s": KEEPALIVE_S}},
            credentials=ibkr_sim_credentials,
            simulator_options={"ws_idle_close_s": IDLE_S, "heartbeat_s": 0.5, "ws_binary": ws_binary},
        ) as gw,
        open_websocket(gw.ws_base_url + WS_PATH) as ws,
    ):
        received = await listen(ws, 3.5 * KEEPALIVE_S)
        assert len(upstream_tics(gw)) >= 3, "keep-alives went up"
        assert not [m for m in received if is_tic_answer(m)]
        sent_before = len(upstream_tics(gw))
        await ws.send_message("tic")
        with trio.fail_after(5):
            while not is_tic_answer(await ws.get_message()):
                pass
        assert len(upstream_tics(gw)) > sent_before
        # The client sent something, so the next keep-alive waits a full interval: no second answer comes.
        after = await listen(ws, 0.6 * KEEPALIVE_S)
        assert not [m for m in after if is_tic_answer(m)]


async def test_keepalive_goes_up_right_after_the_upstream_handshake(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """With the default 45 s interval, the first ``tic`` still reaches IBKR at once, before the client's first
    message, and its answer is not relayed."""
    async with (
        open_test_gateway(credentials=ibkr_sim_credentials) as gw,
        open_websocket(gw.ws_base_url + WS_PATH) as ws,
    ):
        await ws.send_message("ech+hb")
        with trio.fail_after(5):
            received = [await ws.get_message()]
            while received[-1] != "ech+hb":
                received.append(await ws.get_message())
        handshake = next(r for r in gw.simulator.records if r.path == WS_PATH and r.method != "WS")
        messages = gw.simulator.ws_messages
        assert [m.text for m in messages] == ["tic", "ech+hb"]
        assert messages[0].time - handshake.time < 0.5
        assert not [m for m in received if is_tic_answer(m)]


async def test_simulator_closes_a_silent_socket(nursery: trio.Nursery) -> None:
    """Straight to the simulator: a client that sends nothing is closed with 1000 ``idle`` after the limit; one that
    sends ``tic`` more often than the limit stays open."""
    sim, url = await start_simulator(nursery, ws_idle_close_s=1.0)
    token = shared_credentials().access_token
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            client = await ready_client(http, url)
            session = (await client.request(http, "POST", "/v1/api/tickle")).json()["session"]
        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            started = trio.current_time()
            reason = await wait_closed(ws)
            took = trio.current_time() - started
        assert (reason.code, reason.reason) == (1000, "idle")
        assert 0.9 <= took < 3.0
        assert any(r.method == "WS" and r.status == 1000 and "idle" in r.reason for r in sim.records)

        async with trio_websocket.open_websocket_url(ws_url(url, token), extra_headers=ws_headers(session)) as ws:
            for _ in range(5):
                await trio.sleep(0.5)
                await ws.send_message("tic")
                await next_json(ws, "tic")
            assert ws.closed is None
