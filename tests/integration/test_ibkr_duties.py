"""IBKR's runtime rules that the gateway follows for its clients, against the simulator (which enforces them)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gateway:
        yield gateway


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
