"""The fan-out benchmark's clients: many WebSocket clients in this one process, measured against bench/ticker.py.

``fanout``: open ``--clients`` WebSockets to ``--url`` (through the gateway, or straight to the ticker for the
floor), have each subscribe with ``smd+CONID+{}``, wait until every one has had a tick, then run steps: for each,
set the ticker's rate (over its control socket) so that ``target`` client-messages/s are due, let ``warmup``
seconds pass, and measure ``seconds``: the ticks stamped meanwhile that arrive by ``--grace`` seconds after it,
each one's delay (receive time minus the ``t`` the ticker stamped on it, both CLOCK_MONOTONIC), and the CPU of the
processes named with ``--pid`` (/proc utime+stime) and of this one. Steps after the first form a ramp that stops at
the first step where delivery fell behind (fewer than ``--min-delivered`` of the messages due arrived, the ticker
had to drop ticks, a client was closed, or the median delay went over ``--max-p50-ms``: a queue growing inside the
proxy; the p99 is reported, not judged, since one pause of the proxy's process — a garbage collection — moves it
without the proxy falling behind).

``idle``: open ``--count`` WebSockets, hold them, send ``tic`` on each and wait for every answer, close them all;
the RSS and fds of ``--pid`` before, while open, after the tics and after closing.

Why not trio here: a trio task per client costs a wake-up and a non-blocking retry per message (about 30 µs), so
100 clients would need a core of their own at 30,000 messages/s on a 2-core machine shared with the gateway.
This process has one epoll loop and no task per client (about 5 µs per message), and takes one receive timestamp
per ``recv``. Output: one JSON document (``--out``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import select
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import procs

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SMD = b'{"topic":"smd+'
_T = b'"t":'
BATCH = 50  # handshakes in flight at once


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked, final client frame."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    if not length:
        return head + key
    data = int.from_bytes(payload, "little") ^ int.from_bytes((key * (length // 4 + 1))[:length], "little")
    return head + key + data.to_bytes(length, "little")


@dataclass(eq=False, slots=True)
class Client:
    """One connection: its socket, unparsed bytes and counts."""

    sock: socket.socket
    buf: bytearray
    ticks: int = 0
    counted: int = 0  # ticks that fell in a measurement window
    tics: int = 0
    close_code: int | None = None
    close_reason: str = ""


@dataclass(slots=True)
class Window:
    """The ticks the ticker stamped between ``start_ns`` and ``end_ns`` (its send time, not their arrival: a pause
    of the proxy delays them into the next moment but does not lose them), and the other messages."""

    start_ns: int = 0
    end_ns: int = sys.maxsize
    delays_us: array[int] = field(default_factory=lambda: array("q"))
    delivered: int = 0
    other: int = 0


def _handshakes(url: str, count: int, timeout_s: float = 30.0) -> list[Client]:
    """Open ``count`` WebSockets, ``BATCH`` handshakes in flight at a time; raises ConnectionError on a refusal."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out: list[Client] = []
    while len(out) < count:
        batch: list[tuple[socket.socket, bytes]] = []
        for _ in range(min(BATCH, count - len(out))):
            sock = socket.create_connection((host, port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            key = base64.b64encode(os.urandom(16))
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n".encode()
            )
            batch.append((sock, key))
        for sock, key in batch:
            buf = bytearray()
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed during the handshake after {len(out)} connections")
                buf += chunk
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            accept = base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
            }
            if not head.startswith(b"HTTP/1.1 101") or headers.get(b"sec-websocket-accept") != accept:
                first = head.split(b"\r\n", 1)[0].decode("latin-1")
                raise ConnectionError(f"handshake {len(out) + 1} refused: {first}")
            sock.setblocking(False)
            out.append(Client(sock, bytearray(rest)))
    return out


class Clients:
    """The open clients, one epoll loop over them."""

    def __init__(self, clients: list[Client]) -> None:
        self.by_fd = {c.sock.fileno(): c for c in clients}
        self.all = clients
        self.epoll = select.epoll()
        for fd in self.by_fd:
            self.epoll.register(fd, select.EPOLLIN)
        self.window = Window()
        self.closes: Counter[str] = Counter()

    def send_all(self, text: str) -> None:
        """Send ``text`` on every open client (small frames: the socket buffers take them at once)."""
        for client in self.all:
            if client.close_code is None:
                client.sock.setblocking(True)
                client.sock.sendall(_masked(text.encode()))
                client.sock.setblocking(False)

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Read and parse for ``seconds`` (or until ``until()`` is true); parse leftovers from the handshakes first."""
        for client in self.all:
            if client.buf:
                self._parse(client, time.monotonic_ns())
        deadline = time.monotonic() + seconds
        poll, by_fd, parse, clock = self.epoll.poll, self.by_fd, self._parse, time.monotonic_ns
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (until is not None and until()):
                return
            for fd, _ in poll(min(left, 0.05)):
                found = by_fd.get(fd)
                if found is None:
                    continue
                client = found
                try:
                    chunk = client.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                now = clock()
                if not chunk:
                    self._gone(client, 1006, "connection closed")
                    continue
                client.buf += chunk
                parse(client, now)

    def _gone(self, client: Client, code: int, reason: str) -> None:
        if client.close_code is None:
            client.close_code, client.close_reason = code, reason
            self.closes[f"{code} {reason}".strip()] += 1
        fd = client.sock.fileno()
        if fd in self.by_fd:
            del self.by_fd[fd]
            self.epoll.unregister(fd)

    def _parse(self, client: Client, now: int) -> None:
        buf = client.buf
        size = len(buf)
        pos = 0
        window = self.window
        while size - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + length
            if end > size:
                break
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1:
                if buf.startswith(_SMD, start):
                    at = buf.rfind(_T, start, end)
                    if at >= 0:
                        sent = int(buf[at + 4 : end - 1])
                        client.ticks += 1
                        if window.start_ns <= sent < window.end_ns:
                            window.delays_us.append((now - sent) // 1000)
                            window.delivered += 1
                            client.counted += 1
                        continue
                elif buf.find(b'"topic":"tic"', start, end) >= 0:
                    client.tics += 1
                window.other += 1
            elif opcode == 0x8:
                code = int.from_bytes(buf[start : start + 2], "big") if length >= 2 else 1005
                self._gone(client, code, bytes(buf[start + 2 : end]).decode("utf-8", "replace"))
                return
            elif opcode == 0x9:
                client.sock.setblocking(True)
                client.sock.sendall(_masked(bytes(buf[start:end]), 0xA))
                client.sock.setblocking(False)
        del buf[:pos]

    def close(self) -> None:
        """Send a 1000 close on each, wait up to 3 s for the answers, close the sockets."""
        for client in self.all:
            if client.close_code is None:
                try:
                    client.sock.send(_masked((1000).to_bytes(2, "big"), 0x8))
                except OSError:
                    self._gone(client, 1006, "connection closed")
        self.pump(3.0, until=lambda: not self.by_fd)
        for client in self.all:
            client.sock.close()
        self.epoll.close()


class Control:
    """A WebSocket straight to the ticker's ``/bench/control``: one command, one answer."""

    def __init__(self, port: int) -> None:
        self.client = _handshakes(f"ws://127.0.0.1:{port}/bench/control", 1)[0]
        self.client.sock.setblocking(True)

    def ask(self, command: str) -> str:
        """Send ``command``; the answer's text."""
        sock, buf = self.client.sock, self.client.buf
        sock.sendall(_masked(command.encode()))
        while True:
            if len(buf) >= 2 and len(buf) >= 2 + (buf[1] & 0x7F) and buf[1] & 0x7F < 126:
                length = buf[1] & 0x7F
                text = bytes(buf[2 : 2 + length]).decode()
                del buf[: 2 + length]
                return text
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the ticker closed its control socket")
            buf += chunk

    def stats(self) -> dict[str, int]:
        """The ticker's counters."""
        document: dict[str, int] = json.loads(self.ask("stats"))
        return document


def _pct(values: list[int], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))] / 1000


def _machine_ticks() -> tuple[int, int, int]:
    """The machine's (busy, steal, total) jiffies from /proc/stat's ``cpu`` line: steal is time the hypervisor gave
    this VM's CPUs to someone else."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal, sum(fields)


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {name: procs.cpu_ms(pid) for name, pid in pids.items()}
    out["clients"] = procs.cpu_ms(os.getpid())
    return out


def _step(
    clients: Clients,
    control: Control,
    pids: dict[str, int],
    target: float,
    timing: tuple[float, float, float],
) -> dict[str, Any]:
    """One rate: ``target`` client-messages/s due (tick rate = target / clients); ``timing`` is (warm-up, measured
    seconds, grace): ticks sent while measuring count if they arrive within the grace after it."""
    warmup_s, seconds, grace_s = timing
    rate = target / len(clients.all)
    control.ask(f"rate {rate:g}")
    clients.pump(warmup_s)
    before = control.stats()
    counted0 = [c.counted for c in clients.all]
    cpu0 = _cpu(pids)
    machine0 = _machine_ticks()
    window = clients.window = Window(start_ns=time.monotonic_ns())
    clients.pump(seconds)
    window.end_ns = time.monotonic_ns()
    duration = (window.end_ns - window.start_ns) / 1e9
    cpu1 = _cpu(pids)
    machine1 = _machine_ticks()
    after = control.stats()
    clients.pump(grace_s)
    clients.window = Window()
    delays = sorted(window.delays_us)
    fanout = len(clients.all) / max(after["subscriptions"], 1)
    due = (after["frames"] - before["frames"]) * fanout
    per_client = [c.counted - n for c, n in zip(clients.all, counted0, strict=True)]
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
    delivered = window.delivered
    return {
        "target_per_s": target,
        "tick_rate_per_subscription": rate,
        "seconds": round(duration, 3),
        "delivered": delivered,
        "delivered_per_s": delivered / duration,
        "due": due,
        "due_per_s": due / duration,
        "delivered_ratio": delivered / due if due else math.nan,
        "upstream_sockets": after["sockets"],
        "upstream_subscriptions": after["subscriptions"],
        "upstream_frames_per_s": (after["frames"] - before["frames"]) / duration,
        "upstream_dropped": after["dropped"] - before["dropped"],
        "ticker_late": after["late"] - before["late"],
        "closed_clients": sum(c.close_code is not None for c in clients.all),
        "per_client_min": min(per_client),
        "per_client_max": max(per_client),
        "p50_ms": _pct(delays, 50),
        "p90_ms": _pct(delays, 90),
        "p99_ms": _pct(delays, 99),
        "max_ms": delays[-1] / 1000 if delays else math.nan,
        "cpu_ms": cpu,
        "cpu_share_of_one_core": {name: ms / 1000 / duration for name, ms in cpu.items()},
        "cpu_ms_per_message": {name: ms / max(delivered, 1) for name, ms in cpu.items()},
        # Of all the machine's CPU time in the step: busy (every process) and stolen by the hypervisor.
        "machine_busy_share": (machine1[0] - machine0[0]) / max(machine1[2] - machine0[2], 1),
        "machine_steal_share": (machine1[1] - machine0[1]) / max(machine1[2] - machine0[2], 1),
    }


def _judge(step: dict[str, Any], min_delivered: float, max_p50_ms: float) -> str:
    """Why the step fell behind, or "" when it kept up."""
    reasons = []
    if not step["delivered_ratio"] >= min_delivered:
        reasons.append(f"delivered {step['delivered_ratio']:.1%} of the messages due")
    if step["upstream_dropped"]:
        reasons.append(f"the ticker dropped {step['upstream_dropped']} ticks (an upstream socket backed up)")
    if step["closed_clients"]:
        reasons.append(f"{step['closed_clients']} clients closed")
    if not step["p50_ms"] <= max_p50_ms:
        reasons.append(f"median delay {step['p50_ms']:.1f} ms > {max_p50_ms:g} ms")
    return "; ".join(reasons)


def fanout(args: argparse.Namespace) -> dict[str, Any]:
    """The ``fanout`` command."""
    pids = dict(item.split("=", 1) for item in args.pid) if args.pid else {}
    pid_map = {name: int(pid) for name, pid in pids.items()}
    control = Control(args.control_port)
    control.ask("rate 0")
    began = time.monotonic()
    clients = Clients(_handshakes(args.url, args.clients))
    connect_s = time.monotonic() - began
    out: dict[str, Any] = {"clients": args.clients, "conid": args.conid, "connect_s": round(connect_s, 3)}
    try:
        clients.send_all(f"smd+{args.conid}+{{}}")
        control.ask("rate 10")
        clients.pump(15.0, until=lambda: all(c.ticks or c.close_code is not None for c in clients.all))
        if not all(c.ticks for c in clients.all):
            missing = sum(not c.ticks for c in clients.all)
            raise RuntimeError(f"{missing} clients had no tick within 15 s (closes: {dict(clients.closes)})")
        out["subscribed"] = control.stats()
        steps: list[dict[str, Any]] = []
        for index, target in enumerate(args.targets):
            seconds = args.fixed_seconds if index == 0 else args.seconds
            step = _step(clients, control, pid_map, target, (args.warmup, seconds, args.grace))
            step["fell_behind"] = _judge(step, args.min_delivered, args.max_p50_ms)
            steps.append(step)
            print(
                f"[fanout] {target:>8,.0f}/s due: {step['delivered_per_s']:>8,.0f}/s delivered "
                f"({step['delivered_ratio']:.1%}), p50 {step['p50_ms']:.2f} ms, p99 {step['p99_ms']:.2f} ms"
                + (f" - fell behind: {step['fell_behind']}" if step["fell_behind"] else ""),
                file=sys.stderr,
                flush=True,
            )
            if step["fell_behind"] and index > 0:
                break
        out["steps"] = steps
    finally:
        control.ask("rate 0")
        clients.pump(0.3)
        out["closes"] = dict(clients.closes)
        clients.close()
    return out


def idle(args: argparse.Namespace) -> dict[str, Any]:
    """The ``idle`` command."""
    pid = args.rss_pid
    out: dict[str, Any] = {"target": args.count}
    out["rss_before_kib"], out["fds_before"] = procs.rss_kib(pid), procs.fd_count(pid)
    began = time.monotonic()
    clients = Clients(_handshakes(args.url, args.count))
    out["opened"] = len(clients.all)
    out["open_s"] = round(time.monotonic() - began, 3)
    clients.pump(args.settle)
    out["rss_open_kib"], out["fds_open"] = procs.rss_kib(pid), procs.fd_count(pid)
    clients.send_all("tic")
    clients.pump(30.0, until=lambda: all(c.tics or c.close_code is not None for c in clients.all))
    out["live"] = sum(1 for c in clients.all if c.tics and c.close_code is None)
    clients.pump(args.settle)
    out["rss_after_tic_kib"] = procs.rss_kib(pid)
    out["closes_while_open"] = dict(clients.closes)
    began = time.monotonic()
    clients.close()
    for _ in range(300):  # the gateway's own count of open WebSockets, polled (bounded)
        status, body = procs.http_get(args.session_port, "/session")
        if status == 200 and int(json.loads(body)["relays"]["open"]) == 0:
            break
        time.sleep(0.05)
    out["close_s"] = round(time.monotonic() - began, 3)
    time.sleep(args.settle)
    out["rss_closed_kib"], out["fds_closed"] = procs.rss_kib(pid), procs.fd_count(pid)
    opened = max(out["opened"], 1)
    out["kib_per_client_idle"] = (out["rss_open_kib"] - out["rss_before_kib"]) / opened
    out["kib_per_client_after_tic"] = (out["rss_after_tic_kib"] - out["rss_before_kib"]) / opened
    out["fds_per_client"] = (out["fds_open"] - out["fds_before"]) / opened
    return out


def main() -> int:
    """Parse the command line, run, write the JSON."""
    parser = argparse.ArgumentParser(description="Fan-out benchmark clients for bench/run.py (127.0.0.1 only).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("fanout", help="subscribe N clients and measure delivery at each rate")
    run.add_argument("--url", required=True)
    run.add_argument("--control-port", type=int, required=True, help="bench/ticker.py's port")
    run.add_argument("--clients", type=int, default=100)
    run.add_argument("--conid", type=int, default=265598)
    run.add_argument(
        "--targets",
        type=lambda text: [float(x) for x in text.split(",")],
        required=True,
        help="client-messages/s due per step: the first is the fixed-rate step, the rest the ramp",
    )
    run.add_argument("--fixed-seconds", type=float, default=10.0)
    run.add_argument("--seconds", type=float, default=3.0, help="measured seconds of each ramp step")
    run.add_argument("--warmup", type=float, default=1.0)
    run.add_argument("--grace", type=float, default=0.5, help="seconds a tick sent while measuring may take to arrive")
    run.add_argument("--min-delivered", type=float, default=0.98)
    run.add_argument("--max-p50-ms", type=float, default=50.0)
    run.add_argument("--pid", action="append", help="NAME=PID whose CPU is read per step (repeatable)")
    run.add_argument("--out", type=Path, required=True)
    hold = sub.add_parser("idle", help="hold N idle clients and read a process's RSS and fds")
    hold.add_argument("--url", required=True)
    hold.add_argument("--count", type=int, required=True)
    hold.add_argument("--rss-pid", type=int, required=True)
    hold.add_argument("--session-port", type=int, required=True, help="the gateway's port (/session)")
    hold.add_argument("--settle", type=float, default=1.0)
    hold.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    document = fanout(args) if args.command == "fanout" else idle(args)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
