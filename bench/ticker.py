"""An IBKR-like market-data WebSocket upstream for the fan-out benchmark (RFC 6455 by hand on epoll; 127.0.0.1).

``/v1/api/ws`` speaks as much of IBKR's protocol as the benchmark needs. On connect it sends
``{"topic":"system","success":"bench"}``, ``{"topic":"act","args":{}}`` and
``{"topic":"sts","args":{"authenticated":true}}``; it answers ``tic`` (``{"topic":"tic","alive":true,…}``) and
``ech+hb``; ``smd+CONID+{…}`` subscribes the socket to CONID and ``umd+CONID+…`` ends that; anything else is
ignored. While the rate R is above 0, every socket gets one tick per subscribed conid every 1/R s:
``{"topic":"smd+CONID","conid":CONID,"_updated":<ms>,"31":"<price>","84":"<bid>","86":"<ask>","t":<ns>}``, where
``t`` is ``time.monotonic_ns()`` taken just before that frame is written (CLOCK_MONOTONIC is system-wide, so a
client on this machine subtracts it from its own receive time). So R is the rate per socket and per subscription:
100 sockets with one subscription each get 100·R frames/s, one socket fanned out by a proxy gets R.

``/bench/control`` (not counted as an IBKR socket) takes text commands: ``rate <R>`` (0 stops the ticks) answers
``rate <R>``; ``stats`` answers ``{"sockets":…,"subscriptions":…,"frames":…,"dropped":…,"late":…}`` — IBKR sockets
open, (socket, conid) subscriptions, tick frames written and dropped since start (a socket whose unsent backlog
reached 1 MiB is not keeping up: its ticks are dropped and counted), and ticks the scheduler itself was late for by
more than 10 periods (skipped: this process did not get the CPU).

It must cost less than the proxies it feeds, so it has no task per socket: one epoll loop, non-blocking ``send``
straight from the timer, frames built from a per-tick prefix. Usage: ``python bench/ticker.py --port P``; SIGTERM or
SIGINT stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from types import FrameType

from wsecho import _accept_key, _frame, _unmask

MAX_HEAD = 16 << 10
MAX_BACKLOG = 1 << 20  # unsent bytes per socket before its ticks are dropped
MAX_CATCH_UP = 10  # periods the scheduler may be behind before it skips ahead
RECEIVE_SIZE = 1 << 16
_TEXT, _CLOSE, _PING, _PONG = 0x1, 0x8, 0x9, 0xA
_GREETING = [
    _frame(_TEXT, b'{"topic":"system","success":"bench"}'),
    _frame(_TEXT, b'{"topic":"act","args":{}}'),
    _frame(_TEXT, b'{"topic":"sts","args":{"authenticated":true}}'),
]
_HEADS = [bytes((0x80 | _TEXT, n)) for n in range(126)]


class _Stop(Exception):
    """SIGTERM/SIGINT."""


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)  # unsent bytes (only while the socket's buffer is full)
    kind: str = ""  # "" during the handshake, then "ibkr" or "control"
    conids: set[int] = field(default_factory=set)


class Ticker:
    """The server: listening socket, connections, the tick schedule and the counters ``stats`` reports."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", port), backlog=4096)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, _Conn] = {}
        self.rate = 0.0
        self.next_at = 0.0
        self.seq = 0
        self.frames = 0
        self.dropped = 0
        self.late = 0

    # ------------------------------------------------------------ loop

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT."""
        while True:
            timeout = -1.0
            if self.rate > 0:
                timeout = max(0.0, self.next_at - time.monotonic())
            for fd, events in self.epoll.poll(timeout):
                if fd == self.listener.fileno():
                    self._accept()
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if events & select.EPOLLOUT:
                    self._flush(conn)
                if events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP) and fd in self.conns:
                    self._read(conn)
            if self.rate > 0 and time.monotonic() >= self.next_at:
                self._ticks()

    def _ticks(self) -> None:
        period = 1.0 / self.rate
        now = time.monotonic()
        behind = int((now - self.next_at) / period)
        if behind > MAX_CATCH_UP:
            self.late += behind
            self.next_at = now
        while self.next_at <= now:
            self.next_at += period
            self._tick()

    def _tick(self) -> None:
        """One tick on every subscription: each frame stamped just before it is written."""
        self.seq += 1
        price = 100 + self.seq % 200 / 100
        fields = b'"_updated":%d,"31":"%.2f","84":"%.2f","86":"%.2f","t":' % (
            time.time_ns() // 1_000_000,
            price,
            price - 0.01,
            price + 0.01,
        )
        clock = time.monotonic_ns
        heads = _HEADS
        for conn in list(self.conns.values()):
            for conid in conn.conids:
                body = b'{"topic":"smd+%d","conid":%d,%s%d}' % (conid, conid, fields, clock())
                self._send(conn, heads[len(body)] + body if len(body) < 126 else _frame(_TEXT, body), tick=True)

    # ------------------------------------------------------------ sockets

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = _Conn(sock)
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self.conns.pop(fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)
        conn.sock.close()

    def _send(self, conn: _Conn, data: bytes, *, tick: bool = False) -> None:
        if conn.out:
            if tick and len(conn.out) >= MAX_BACKLOG:
                self.dropped += 1
                return
            conn.out += data
        else:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(conn)
                return
            if sent < len(data):
                conn.out += data[sent:]
                self.epoll.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        if tick:
            self.frames += 1

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            self.epoll.modify(conn.sock.fileno(), select.EPOLLIN)

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        conn.buf += chunk
        if not conn.kind:
            self._handshake(conn)
        if conn.kind and conn.sock.fileno() in self.conns:
            self._frames(conn)

    def _handshake(self, conn: _Conn) -> None:
        head, found, rest = bytes(conn.buf).partition(b"\r\n\r\n")
        if not found:
            if len(conn.buf) > MAX_HEAD:
                self._drop(conn)
            return
        target = head.split(b"\r\n", 1)[0].split(b" ")
        path = target[1].partition(b"?")[0] if len(target) == 3 else b""
        status, accept = _accept_key(head)
        if status != 101 or path not in (b"/v1/api/ws", b"/bench/control"):
            with contextlib.suppress(OSError):
                conn.sock.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._drop(conn)
            return
        conn.kind = "ibkr" if path == b"/v1/api/ws" else "control"
        conn.buf = bytearray(rest)
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self._send(conn, answer + (b"".join(_GREETING) if conn.kind == "ibkr" else b""))

    def _frames(self, conn: _Conn) -> None:
        buf = conn.buf
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            start = pos + 6
            if length == 126:
                if len(buf) - pos < 8:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 8
            elif length == 127:
                self._drop(conn)  # nothing the benchmark sends is that long
                return
            if not b1 & 0x80:
                self._drop(conn)
                return
            end = start + length
            if end > len(buf):
                break
            pos = end
            opcode = b0 & 0x0F
            payload = _unmask(buf, start, end)
            if opcode == _CLOSE:
                self._send(conn, _frame(_CLOSE, payload[:2]))  # the peer then closes the connection
                conn.conids.clear()
                return
            if opcode == _PING:
                self._send(conn, _frame(_PONG, payload))
            elif opcode == _TEXT:
                self._command(conn, payload.decode("utf-8", "replace").strip())
        del buf[:pos]

    def _command(self, conn: _Conn, text: str) -> None:
        if conn.kind == "control":
            self._control(conn, text)
            return
        if text == "tic":
            answer = {"topic": "tic", "alive": True, "id": "bench", "lastAccessed": time.time_ns() // 1_000_000}
            self._send(conn, _frame(_TEXT, json.dumps(answer, separators=(",", ":")).encode()))
        elif text == "ech+hb":
            self._send(conn, _frame(_TEXT, b"ech+hb"))
        elif text.startswith(("smd+", "umd+")):
            conid = text[4:].partition("+")[0]
            if conid.isdigit():
                if text[0] == "s":
                    conn.conids.add(int(conid))
                else:
                    conn.conids.discard(int(conid))

    def _control(self, conn: _Conn, text: str) -> None:
        if text.startswith("rate "):
            rate = max(0.0, float(text[5:]))
            if rate > 0 and self.rate == 0:
                self.next_at = time.monotonic()
            self.rate = rate
            answer = f"rate {rate:g}"
        elif text == "stats":
            ibkr = [c for c in self.conns.values() if c.kind == "ibkr"]
            answer = json.dumps(
                {
                    "sockets": len(ibkr),
                    "subscriptions": sum(len(c.conids) for c in ibkr),
                    "frames": self.frames,
                    "dropped": self.dropped,
                    "late": self.late,
                }
            )
        else:
            answer = f"unknown command {text[:40]!r}"
        self._send(conn, _frame(_TEXT, answer.encode()))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="IBKR-like tick server for bench/run.py (127.0.0.1 only).")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    ticker = Ticker(args.port)
    with contextlib.suppress(_Stop):
        ticker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
