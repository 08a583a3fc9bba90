"""The gateway speaks sd_notify for real: a gateway process (in front of a simulator process) notifies a datagram
socket the test binds, as systemd's would be, at a path and at an abstract address.

Checked: ``READY=1`` (with ``MAINPID``) once the port listens, ``STATUS=`` lines that follow the session to ready,
``WATCHDOG=1`` at half ``WATCHDOG_USEC``, and ``STOPPING=1`` on SIGTERM before a clean exit. In-process: a broken
socket path costs one warning and nothing else.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from gateway.notify import Notifier
from gateway.runtime import Gateway, serve_gateway
from gateway.simulator import Simulator, SimulatorCredentials
from gateway.testing import make_test_config
from tests.conftest import Figure
from tests.processes import gateway_popen, wait_healthy

WATCHDOG_USEC = 400_000


@dataclass
class Inbox:
    """Every datagram received, with its arrival time (monotonic)."""

    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    async def receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            data = await sock.recv(4096)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append((time.monotonic(), fields))
            self.arrived.set()
            self.arrived = trio.Event()

    async def wait_for(self, key: str, value: str | None = None, *, after: int = 0) -> int:
        """Index of the first message from ``after`` on that assigns ``key`` (to ``value`` if given)."""
        while True:
            for index in range(after, len(self.messages)):
                got = self.messages[index][1].get(key)
                if got is not None and (value is None or value in got):
                    return index
            await self.arrived.wait()

    def keyed(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, fields) for at, fields in self.messages if key in fields]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_gateway_process_notifies_systemd(tmp_path: Path, kind: str, figure: Figure) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        name = str(tmp_path / "notify.sock")
        await sock.bind(name)
    else:
        name = f"@ibkr-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
        await sock.bind("\0" + name[1:])
    inbox = Inbox()
    env = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with sock, gateway_popen(tmp_path, extra_env=env) as (proc, port):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inbox.receive, sock)
            with trio.fail_after(30):
                ready = await inbox.wait_for("READY", "1")
                assert _listening(port), "READY=1 arrived before the port listens"
                fields = inbox.messages[ready][1]
                assert fields["MAINPID"] == str(proc.pid)
                assert fields["STATUS"].startswith("IBKR session ") and f"127.0.0.1:{port}" in fields["STATUS"]
                # Readiness does not wait for IBKR: the session comes ready later, and the status line says so.
                session_ready = await inbox.wait_for("STATUS", "IBKR session ready (session #1)")
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    await wait_healthy(http)
            statuses = [f["STATUS"] for _, f in inbox.keyed("STATUS")]
            assert statuses[0] != statuses[-1] and "ready" not in statuses[0].split(";")[0], statuses
            assert session_ready >= ready

            # Watchdog pings at about half WATCHDOG_USEC for a while.
            first = len(inbox.keyed("WATCHDOG"))
            await trio.sleep(2.0)
            pings = [at for at, _ in inbox.keyed("WATCHDOG")][first:]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            expected = WATCHDOG_USEC / 2 / 1e6
            median = statistics.median(gaps)
            figure(f"g7_sd_watchdog_interval_{kind}_s", median, "s", f"{expected}±30%", abs(median - expected) < 0.06)
            assert 7 <= len(pings) <= 12, pings
            assert abs(median - expected) < 0.3 * expected, gaps
            assert max(gaps) < 2 * WATCHDOG_USEC / 1e6, gaps  # never close to systemd's timeout

            # SIGTERM: STOPPING=1, then a clean exit.
            before = len(inbox.messages)
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                await inbox.wait_for("STOPPING", "1", after=before)
                while proc.poll() is None:  # noqa: ASYNC110 - a child process has no trio wait
                    await trio.sleep(0.05)
            assert proc.returncode == 0
            nursery.cancel_scope.cancel()
    keys = [next(iter(f)) for _, f in inbox.messages if "WATCHDOG" not in f]
    assert keys.index("READY") < keys.index("STOPPING")
    ibkr = tomllib.loads((tmp_path / "gateway.toml").read_text())["ibkr"]
    sent = repr(inbox.messages)
    assert ibkr["access_token_secret"] not in sent and ibkr["access_token"] not in sent


async def test_broken_notify_socket_warns_once_and_the_gateway_serves(
    tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "no-such-dir" / "notify.sock"), watchdog_s=0.02)
    loaded = make_test_config()
    simulator = Simulator(ibkr_sim_credentials)
    with caplog.at_level(logging.WARNING, logger="gateway.notify"):
        async with trio.open_nursery() as nursery:
            gateway: Gateway = await nursery.start(
                partial(serve_gateway, loaded, host="127.0.0.1", port=0, simulator=simulator, notifier=notifier)
            )
            await gateway.manager.wait_ready(10)
            await trio.sleep(0.2)  # ten watchdog pings into the void
            async with httpx.AsyncClient(base_url=gateway.url) as http:
                assert (await http.get("/health")).status_code == 200
            gateway.request_shutdown()
            await gateway.wait_stopped()
    notifier.close()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.notify"]
    assert len(warnings) == 1 and "no-such-dir" in warnings[0], warnings
