"""Stalled WebSocket relays against the simulator over loopback: a client that floods ``tic`` without reading and
then goes away (reset, half-close) or just stays, and an upstream that stops reading. Every relay must end within
a bounded time and give back IBKR's socket and its ``max_websockets`` slot.

How the stall builds up (the simulator answers each ``tic``): the gateway's write to the client blocks (the client
reads nothing, its receive buffer is tiny), so the gateway stops reading IBKR, so the simulator's writes block and
it stops reading, so the gateway's writes to IBKR block, so the gateway stops reading the client.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import replace

import pytest
import trio
import trio_websocket

from gateway.proxy.websocket import WebSocketRelay
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.probes import TCP_CLOSE_WAIT, TCP_ESTABLISHED, live_tasks, tcp_sockets
from tests.rawserver import RawConnection, open_raw_server

WS_PATH = "/v1/api/ws"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MASK = b"\x1f\x2e\x3d\x4c"
# One masked client text frame "tic"; a thousand of them per write.
_TIC = bytes([0x81, 0x80 | 3]) + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(b"tic"))
_FLOOD = _TIC * 1000
# With the default config: the client write deadline (websocket_ping_interval_s = 5 s), up to 1 s until the
# watchdog looks, up to 2 s to close IBKR's leg; plus slack for a loaded 2-core CI box.
DEFAULT_BOUND_S = 5 + 1 + 2 + 2


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def upstream_sockets(gw: TestGateway) -> set[int]:
    """Local ports of the established connections from this process to the simulator (the relays' upstream
    sockets; the HTTP pool's too)."""
    sockets = tcp_sockets(remote_port=_port(gw.simulator_url))
    return {local for (local, _), state in sockets.items() if state == TCP_ESTABLISHED}


def relay_gone(gw: TestGateway, upstream_port: int) -> bool:
    """No relay counted (open or holding a slot), and the gateway closed the relay's upstream socket."""
    relays = gw.gateway.relays
    return relays.open == 0 and relays.slots == 0 and upstream_port not in upstream_sockets(gw)


async def seconds_until(check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``check`` holds (polled); ``inf`` if it does not within ``timeout_s``."""
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls counters and kernel socket tables
            await trio.sleep(0.05)
        return trio.current_time() - started
    return float("inf")


class FloodClient:
    """A raw WebSocket client that never reads a frame: a receive buffer of a few KiB, the handshake answer read
    byte by byte, then ``tic`` frames written until the gateway stops taking them."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(sock)
        self.port = sock.getsockname()[1]

    @classmethod
    async def connect(cls, gw: TestGateway) -> FloodClient:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays tiny
        await sock.connect(("127.0.0.1", _port(gw.url)))
        client = cls(sock)
        key = base64.b64encode(os.urandom(16))
        await client.stream.send_all(
            b"GET " + WS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = await client.stream.receive_some(1)  # only the head: every frame after it stays unread
            assert byte, f"connection closed during the handshake: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        return client

    async def flood_until_stalled(self, stall_s: float = 0.5) -> int:
        """Write ``tic`` frames until one write has not gone through for ``stall_s``; the number written."""
        written = 0
        while True:
            with trio.move_on_after(stall_s) as blocked:
                await self.stream.send_all(_FLOOD)
            if blocked.cancelled_caught:
                return written
            written += 1000

    def go_away(self, mode: str) -> None:
        if mode == "reset":
            self.sock.close()  # unread data in the receive buffer: the kernel sends RST, not FIN
        elif mode == "half-close":
            self.sock.shutdown(socket.SHUT_WR)  # FIN, but still reading nothing
        else:
            assert mode == "stays", mode

    def close(self) -> None:
        self.sock.close()

    def gateway_side_state(self, gw: TestGateway) -> str | None:
        """The state of the gateway's socket for this client (``None`` once it is gone)."""
        return tcp_sockets(local_port=_port(gw.url), remote_port=self.port).get((_port(gw.url), self.port))


async def open_flood_relay(gw: TestGateway) -> tuple[FloodClient, int]:
    """A :class:`FloodClient` whose relay is open; with the local port of the relay's upstream socket."""
    before = upstream_sockets(gw)
    client = await FloodClient.connect(gw)
    with trio.fail_after(10):
        while gw.gateway.relays.open < 1:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.01)
    (upstream_port,) = upstream_sockets(gw) - before
    return client, upstream_port


def gateway_tasks() -> int:
    """Live tasks of the gateway, leaving out the simulator sharing the process (it has leaks of its own)."""
    return live_tasks(skip="simulator")


@pytest.mark.parametrize("mode", ["reset", "half-close", "stays"])
async def test_relay_ends_soon_after_a_flooding_client_goes_away_or_stops_reading(
    ibkr_sim_credentials: SimulatorCredentials, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Default config. The client floods ``tic`` and reads nothing, then resets its connection, half-closes it,
    or keeps it open: within the bound the relay is no longer counted, its slot is free, and the gateway closed
    IBKR's socket. Once the client's socket is closed, the gateway's tasks for it end too. Before the fix, the
    half-closed and the open one kept the relay for as long as the client's socket lived, and after a reset the
    server's task for the connection waited forever on the app's full message queue."""
    caplog.set_level(logging.INFO, logger="gateway.websocket")
    caplog.set_level(logging.INFO, logger="gateway.server")
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        tasks_before = gateway_tasks()
        client, upstream_port = await open_flood_relay(gw)
        try:
            with trio.fail_after(60):
                await client.flood_until_stalled()
            client.go_away(mode)
            took = await seconds_until(lambda: relay_gone(gw, upstream_port), DEFAULT_BOUND_S)
            assert took <= DEFAULT_BOUND_S, f"the relay was still there {DEFAULT_BOUND_S} s after the client: {mode}"
        finally:
            client.close()
        if mode == "stays":  # nothing but a write deadline can have ended it: the relay's or the server's (both 5 s)
            assert (
                "the client took none of our bytes for 5 s: relay closed (1008)" in caplog.text
                or "closed: the client took none of our bytes for 5 s" in caplog.text
            ), caplog.text[-2000:]
        # hypercorn's ping task outlives a connection by up to its interval (5 s).
        settled = await seconds_until(lambda: gateway_tasks() <= tasks_before, 2.0 + 5 + 3)
        assert settled <= 10, "the gateway's tasks for the client's connection did not end"


async def test_shutdown_is_not_held_by_a_client_that_stopped_reading(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway shuts down (drain, logout, every task ended) promptly while a flooding client that reads nothing
    keeps its socket open — right after the stall, before any write deadline. Before the fix the drain waited the
    whole graceful timeout (20 s) for that relay; a client write held inside the server's own task group would
    hold the shutdown until the client closed its socket; and the write in flight to that client held the end of
    the shutdown until its deadline (the ping interval, 5 s), since it is shielded — now it is abandoned as soon as
    the server's tasks are cancelled."""
    client: FloodClient | None = None
    try:
        async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
            client, _ = await open_flood_relay(gw)
            with trio.fail_after(60):
                await client.flood_until_stalled()
            started = trio.current_time()
        took = trio.current_time() - started
    finally:
        if client is not None:
            client.close()
    assert took <= 2.0 + 2, f"shutdown took {took:.1f} s"  # the relay's bounded close (2 s), + slack
    assert not [r for r in caplog.records if "took none of our bytes" in r.getMessage()], "waited for the deadline"
    logouts = [r for r in gw.simulator.records if r.path == "/v1/api/logout"]
    assert len(logouts) == 1 and logouts[0].accepted


async def test_gateway_closes_the_connection_of_a_client_that_stopped_reading(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """A client that floods, reads nothing and keeps its socket open: after the write deadline the gateway closes
    its side of the connection (FIN or RST), so the server's task and socket for that client end too."""
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        client, upstream_port = await open_flood_relay(gw)
        try:
            with trio.fail_after(60):
                await client.flood_until_stalled()
            assert await seconds_until(lambda: relay_gone(gw, upstream_port), DEFAULT_BOUND_S) <= DEFAULT_BOUND_S
            took = await seconds_until(
                lambda: client.gateway_side_state(gw) not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT), DEFAULT_BOUND_S
            )
            assert took <= DEFAULT_BOUND_S, "the gateway still holds the connection of a client that reads nothing"
        finally:
            client.close()


async def _stalling_upstream(resume: trio.Event, connection: RawConnection) -> None:
    """Accept the WebSocket handshake, then read nothing until ``resume``; then read until the peer closes."""
    head = await connection.read_head()
    assert head is not None
    key = next(
        line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())
    await connection.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    await resume.wait()
    await connection.drain()


async def test_relay_ends_when_ibkr_stops_reading(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    """IBKR's side accepts, then reads nothing while the client keeps writing: after ``upstream.write_timeout_s``
    the client is closed with 1011, the relay's slot is free and the gateway closed its socket to IBKR. Before the
    fix the relay waited on that write for as long as IBKR kept the connection."""
    caplog.set_level(logging.INFO, logger="gateway.websocket")
    write_timeout_s = 2.0
    async with (
        open_test_gateway({"upstream": {"write_timeout_s": write_timeout_s}}, credentials=ibkr_sim_credentials) as gw,
        trio.open_nursery() as nursery,
    ):
        resume = trio.Event()
        async with open_raw_server(lambda connection: _stalling_upstream(resume, connection)) as upstream:
            relay = gw.gateway.dispatcher._relay
            assert isinstance(relay, WebSocketRelay)
            relay._settings = replace(relay._settings, ws_base_url=f"ws://127.0.0.1:{upstream.port}")
            async with open_websocket(gw.ws_base_url + WS_PATH) as ws:

                async def write_until_closed() -> None:
                    payload = b"x" * 65536
                    while True:
                        try:
                            await ws.send_message(payload)
                        except trio_websocket.ConnectionClosed:
                            return

                nursery.start_soon(write_until_closed)
                started = trio.current_time()
                with (
                    trio.fail_after(write_timeout_s + 1 + 2 + 5),
                    pytest.raises(trio_websocket.ConnectionClosed) as closed,
                ):
                    while True:
                        await ws.get_message()
                took = trio.current_time() - started
            assert closed.value.reason is not None
            assert closed.value.reason.code == 1011
            assert took >= write_timeout_s
            relays = gw.gateway.relays
            assert await seconds_until(lambda: relays.open == relays.slots == 0, 2 + 2) <= 4
            # The gateway closed its socket: what IBKR's side reads next is the rest of the bytes, then the end.
            resume.set()
            (connection,) = upstream.connections
            with trio.fail_after(5):
                await connection.eof.wait()
        assert "IBKR took none of our bytes for 2 s: relay closed (1011)" in caplog.text
