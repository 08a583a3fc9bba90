"""The testing API users build their bot tests on (``gateway.testing``): its WebSocket endpoint, the session
restart helper, and which fault switches must be awaited — each against a real gateway and simulator on loopback."""

from __future__ import annotations

import gc
import inspect
import json

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

import gateway.testing
from gateway.simulator.faults import Faults
from gateway.testing import TestGateway

LST = "/v1/api/oauth/live_session_token"


async def test_ws_url_is_the_websocket_endpoint(ibkr_gateway: TestGateway) -> None:
    assert ibkr_gateway.ws_url == ibkr_gateway.ws_base_url + "/v1/api/ws"
    assert ibkr_gateway.ws_base_url == "ws" + ibkr_gateway.url.removeprefix("http")
    async with ibkr_gateway.websocket() as ws:
        with trio.fail_after(10):
            first = json.loads(await ws.get_message())
    assert first["topic"] in {"system", "sts", "act"}, first


async def test_restart_session_runs_a_new_handshake_and_closes_relayed_websockets(
    ibkr_gateway: TestGateway,
) -> None:
    before = ibkr_gateway.simulator.counts.get(LST, 0)
    generation = (await ibkr_gateway.manager.wait_ready(5)).generation
    async with ibkr_gateway.websocket() as ws:
        new_generation = await ibkr_gateway.restart_session()
        with trio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1012
    assert new_generation > generation
    assert ibkr_gateway.simulator.counts.get(LST, 0) == before + 1
    async with ibkr_gateway.client() as http:
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200


def test_the_docs_name_exactly_the_fault_switches_that_must_be_awaited() -> None:
    awaited = sorted(
        name for name, member in inspect.getmembers(Faults, inspect.iscoroutinefunction) if not name.startswith("_")
    )
    assert awaited == ["close_websockets", "down", "up"]
    for doc in (Faults.__doc__ or "", gateway.testing.__doc__ or ""):
        for name in awaited:
            assert f"{name}" in doc, (name, doc)


async def test_websocket_helper_closes_its_socket_when_the_gateway_closes_first(ibkr_gateway: TestGateway) -> None:
    # The suite turns ResourceWarning into an error: a socket left open by the helper fails this test at collection.
    for _ in range(3):
        async with ibkr_gateway.websocket() as ws:
            await ibkr_gateway.restart_session()
            with trio.fail_after(10), pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
    gc.collect()


async def test_websocket_helper_reports_a_refused_upgrade(ibkr_gateway: TestGateway) -> None:
    with pytest.raises(ConnectionRejected) as refused:
        async with ibkr_gateway.websocket("/v1/api/not-routed"):
            pass
    assert refused.value.status_code == 403
    assert json.loads(refused.value.body or b"{}")["code"] == "websocket_not_routed"
    gc.collect()
