"""WebSocket measurements against bench/wsecho.py: one-way rates, round-trip latency, many idle relays."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import procs
import trio
import trio_websocket


def _connect(url: str) -> contextlib.AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
    return trio_websocket.open_websocket_url(
        url, message_queue_size=64, receive_buffer_size=65536, connect_timeout=15, disconnect_timeout=5
    )


class RawWebSocket:
    """A minimal WebSocket client with a hand-made handshake and pre-built frames, so that the load generator
    costs next to nothing per message (one ``send_all`` for thousands of frames, a cheap frame parser)."""

    _GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.offset = 0
        self.mask = os.urandom(4)

    @classmethod
    async def connect(cls, port: int, path: str) -> RawWebSocket:
        """Open ``ws://127.0.0.1:port/path``; raises ConnectionError if the server does not switch protocols."""
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        ws = cls(stream)
        try:
            key = base64.b64encode(os.urandom(16))
            await stream.send_all(
                b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
            )
            while b"\r\n\r\n" not in ws.buffer:
                await ws._fill()
            head, _, rest = bytes(ws.buffer).partition(b"\r\n\r\n")
            accept = base64.b64encode(hashlib.sha1(key + cls._GUID, usedforsecurity=False).digest())
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
            }
            if not head.startswith(b"HTTP/1.1 101") or headers.get(b"sec-websocket-accept") != accept:
                raise ConnectionError(f"handshake refused: {head.splitlines()[0]!r}")
            ws.buffer = bytearray(rest)
        except BaseException:
            await stream.aclose()
            raise
        return ws

    def frame(self, text: str, opcode: int = 0x1) -> bytes:
        """One masked client frame carrying ``text`` (or raw bytes for control frames via ``opcode``)."""
        payload = text.encode("latin-1" if opcode == 0x8 else "utf-8")
        length = len(payload)
        if length < 126:
            header = bytes([0x80 | opcode, 0x80 | length])
        elif length < 1 << 16:
            header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
        masked = bytes(byte ^ self.mask[index % 4] for index, byte in enumerate(payload))
        return header + self.mask + masked

    async def send_raw(self, data: bytes) -> None:
        """Write pre-built frames."""
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(1 << 16)
        if not chunk:
            raise ConnectionError("connection closed")
        if self.offset > 1 << 16:
            del self.buffer[: self.offset]
            self.offset = 0
        self.buffer += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        buf, pos = self.buffer, self.offset
        if len(buf) - pos < 2:
            return None
        opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
        start = pos + 2
        if length == 126:
            if len(buf) - pos < 4:
                return None
            length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
        elif length == 127:
            if len(buf) - pos < 10:
                return None
            length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
        if buf[pos + 1] & 0x80:
            raise ConnectionError("server frame is masked")
        if len(buf) < start + length:
            return None
        self.offset = start + length
        return opcode, bytes(buf[start : start + length])

    async def receive_text(self) -> str:
        """The next text frame's payload; pings are answered, other control frames skipped, a close raises."""
        while True:
            parsed = self._parse()
            if parsed is None:
                await self._fill()
                continue
            opcode, payload = parsed
            if opcode == 0x1:
                return payload.decode()
            if opcode == 0x8:
                raise ConnectionError(f"server closed: {payload[:2].hex()}")
            if opcode == 0x9:
                await self.send_raw(self.frame(payload.decode("latin-1"), opcode=0xA))

    async def aclose(self) -> None:
        """Send a 1000 close frame, wait up to 1 s for the server's, close the socket."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.send_raw(self.frame((1000).to_bytes(2, "big").decode("latin-1"), opcode=0x8))
                while True:
                    parsed = self._parse()
                    if parsed is not None and parsed[0] == 0x8:
                        break
                    if parsed is None:
                        await self._fill()
            except (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.stream.aclose()


@dataclass(frozen=True, slots=True)
class Rates:
    """One-way message rates on one connection."""

    up_messages: int
    up_per_s: float  # client → server, confirmed by the server's count
    down_messages: int
    down_per_s: float  # server → client pushes
    down_in_order: bool


async def rates(port: int, path: str, *, messages: int, size: int = 32, timeout_s: float = 120.0) -> Rates:
    """Write ``messages`` small text frames in one go (the proxies take them as fast as they can), ask the server
    for its count, then have it push as many back; frames are hand-built so the client is not the limit."""
    with trio.fail_after(timeout_s):
        ws = await RawWebSocket.connect(port, path)
        try:
            count = ws.frame("c" + "x" * (size - 1))
            ask = ws.frame("?")
            await ws.send_raw(count * 200 + ask)  # warm-up, excluded
            warm = int((await ws.receive_text()).removeprefix("n="))
            blob = count * messages + ask
            began = time.monotonic()
            await ws.send_raw(blob)
            answer = await ws.receive_text()
            up_s = time.monotonic() - began
            if answer != f"n={warm + messages}":
                raise RuntimeError(f"server counted {answer!r}, expected n={warm + messages}")

            began = time.monotonic()
            await ws.send_raw(ws.frame(f"p{messages}"))
            in_order = True
            for seq in range(messages):
                if not (await ws.receive_text()).startswith(f"t{seq} "):
                    in_order = False
            down_s = time.monotonic() - began
        finally:
            await ws.aclose()
    return Rates(messages, messages / up_s, messages, messages / down_s, in_order)


@dataclass
class RoundTrips:
    """Sequential echo round trips (one message in flight)."""

    rtt_ms: list[float] = field(default_factory=list)
    mismatches: int = 0


async def round_trips(url: str, *, count: int, timeout_s: float = 120.0) -> RoundTrips:
    """``count`` sequential echoes of a JSON message carrying a monotonic timestamp; the echo must be identical."""
    out = RoundTrips()
    with trio.fail_after(timeout_s):
        async with _connect(url) as ws:
            for seq in range(-50, count):  # 50 warm-up round trips, excluded
                sent = time.monotonic_ns()
                message = json.dumps({"seq": seq, "ts": sent})
                await ws.send_message(message)
                echo = await ws.get_message()
                rtt = (time.monotonic_ns() - sent) / 1e6
                if echo != message:
                    out.mismatches += 1
                elif seq >= 0:
                    out.rtt_ms.append(rtt)
    return out


@dataclass
class IdleRelays:
    """Many idle WebSockets held open at once through a proxy, and the proxy's memory and fds around them."""

    target: int
    opened: int = 0
    failed: int = 0
    live: int = 0  # answered one echo while all were open
    open_s: float = 0.0
    rss_before_kib: int = 0
    rss_open_kib: int = 0  # all open, idle
    rss_after_echo_kib: int = 0  # all open, each carried one echo
    rss_closed_kib: int = 0
    fds_before: int = 0
    fds_open: int = 0
    fds_closed: int = 0
    close_s: float = 0.0
    first_error: str = ""


async def idle_relays(
    url: str,
    *,
    count: int,
    concurrency: int,
    pid: int,
    settle_s: float,
    wait_closed: Callable[[], bool] | None = None,
    timeout_s: float = 120.0,
) -> IdleRelays:
    """Open ``count`` WebSockets (at most ``concurrency`` handshakes at a time), hold them, echo once on each,
    close them all; measure ``pid``'s RSS and fds before, while open and after. ``wait_closed`` is polled after
    the close until it returns True (e.g. the gateway reports no open relay)."""
    out = IdleRelays(target=count)
    out.rss_before_kib, out.fds_before = procs.rss_kib(pid), procs.fd_count(pid)
    gate = trio.Semaphore(concurrency)
    settled = trio.Event()
    echo_now = trio.Event()
    close_now = trio.Event()
    echoed = trio.Event()
    attempts = 0
    echo_done = 0

    def attempt_done() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == count:
            settled.set()

    async def hold(index: int) -> None:
        nonlocal echo_done
        acquired = True
        await gate.acquire()
        try:
            async with _connect(url) as ws:
                gate.release()
                acquired = False
                out.opened += 1
                attempt_done()
                await echo_now.wait()
                try:
                    await ws.send_message(f"e{index}")
                    if await ws.get_message() == f"e{index}":
                        out.live += 1
                finally:
                    echo_done += 1
                    if echo_done == out.opened:
                        echoed.set()
                await close_now.wait()
        except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
            out.failed += 1
            out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
            if acquired:
                attempt_done()
        finally:
            if acquired:
                gate.release()

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            began = time.monotonic()
            for index in range(count):
                nursery.start_soon(hold, index)
            await settled.wait()
            out.open_s = time.monotonic() - began
            await trio.sleep(settle_s)
            out.rss_open_kib, out.fds_open = procs.rss_kib(pid), procs.fd_count(pid)
            echo_now.set()
            if out.opened:
                await echoed.wait()
            await trio.sleep(settle_s)
            out.rss_after_echo_kib = procs.rss_kib(pid)
            began = time.monotonic()
            close_now.set()
        if wait_closed is not None:
            for _ in range(int(timeout_s / 0.05)):  # another process's state: poll it, bounded
                if wait_closed():
                    break
                await trio.sleep(0.05)
        out.close_s = time.monotonic() - began
        await trio.sleep(settle_s)
    out.rss_closed_kib, out.fds_closed = procs.rss_kib(pid), procs.fd_count(pid)
    return out
