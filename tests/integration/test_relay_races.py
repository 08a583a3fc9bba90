"""Races between a WebSocket relay and the end of its session, found by the fault soak (test_soak.py) and pinned
down here one at a time, with the timing forced instead of waited for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

import gateway.proxy.websocket as relay_module
from gateway.simulator import SimulatorCredentials
from gateway.testing import open_test_gateway
from gateway.upstream.wsclient import UpstreamWebSocket, connect_websocket

UPGRADE = (
    b"GET /v1/api/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _raw_upgrade(url: str) -> bytes:
    """Everything the gateway sends back to a hand-written upgrade request, until it closes (bounded)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    answer = b""
    async with stream:
        await stream.send_all(UPGRADE)
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                answer += chunk
                if any(f[:1] == b"\x88" for f in _control_frames(answer.partition(b"\r\n\r\n")[2])):
                    break  # a Close frame after the head: the relay is done
    return answer


async def test_session_ending_as_the_relay_accepts_gives_the_client_a_101_then_1012(
    ibkr_sim_credentials: SimulatorCredentials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session ends (an upstream 401 elsewhere) in the instant between the relay's upstream handshake and its
    accept to the client, so the accept is sent from a cancelled task. The client must get a handshake answer — a
    101 and then Close 1012, or a refusal (503 session_ended) — and not a Close frame with no 101 before it (on
    which trio-websocket, for one, waits for the 101 forever)."""
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:

        @asynccontextmanager
        async def connect_then_lose_the_session(*args: Any, **kwargs: Any) -> AsyncIterator[UpstreamWebSocket]:
            async with connect_websocket(*args, **kwargs) as upstream:
                session = gw.manager.active
                assert session is not None
                gw.manager.report_unauthorized(session, "GET /v1/api/sim/echo")  # what the proxy does on a 401
                yield upstream

        monkeypatch.setattr(relay_module, "connect_websocket", connect_then_lose_the_session)
        answer = await _raw_upgrade(gw.url)

    head, _, frames = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.1 503 ")), answer[:80]  # 503: session_ended, before accept
    if head.startswith(b"HTTP/1.1 101 "):
        assert b"\x88\x02\x03\xf4" in _control_frames(frames)  # Close, 1012: the session restarts


def _control_frames(data: bytes) -> list[bytes]:
    """The (short, unmasked) frames a server sent, each whole: Ping, Close…"""
    frames = []
    while len(data) >= 2 and data[1] < 126:
        size = 2 + data[1]
        frames.append(data[:size])
        data = data[size:]
    return frames
