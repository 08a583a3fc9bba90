"""Test helper: a simulator process and a gateway process on loopback, and readers of their /proc figures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import httpx
import trio


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def gateway_process(
    tmp_path: Path, *, tick_interval_s: float = 1.0, log_path: Path | None = None, **env_overrides: str
) -> Iterator[tuple[int, int]]:
    """A simulator process and a gateway process in front of it; yields ``(gateway pid, gateway port)``.

    Separate processes, so the figures read from ``/proc/<pid>`` are the gateway's own. The gateway's config is
    ``tmp_path / "gateway.toml"``; its log goes to ``log_path`` when given (readable while it runs).
    """
    with gateway_popen(tmp_path, tick_interval_s=tick_interval_s, env_overrides=env_overrides, log_path=log_path) as (
        gateway,
        port,
    ):
        yield gateway.pid, port


@contextmanager
def gateway_popen(
    tmp_path: Path,
    *,
    tick_interval_s: float = 1.0,
    extra_env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    env_overrides: Mapping[str, str] | None = None,
    wrapper: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """:func:`gateway_process` yielding the gateway's ``Popen`` (to signal it and read its exit status).

    ``env_overrides`` are ``section__key`` config overrides (as :func:`gateway_process` takes them as keywords);
    ``extra_env`` adds plain environment variables (e.g. ``NOTIFY_SOCKET``); ``preexec_fn`` runs in the gateway's
    child process before it starts (e.g. to restrict it as systemd would); ``wrapper`` is a command the gateway's
    command line is appended to (e.g. ``strace``), whose process is then the one yielded; the gateway's log goes
    to ``log_path`` when given (readable while it runs).
    """
    sim_port, gw_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    simulator = subprocess.Popen(
        [sys.executable, "-m", "gateway.simulator", "--port", str(sim_port), "--write-credentials", str(tmp_path),
         "--gateway-port", str(gw_port), "--tick-interval-s", str(tick_interval_s), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    gateway: subprocess.Popen[str] | None = None
    log_file: TextIO | None = None
    try:
        toml = tmp_path / "gateway.toml"
        deadline = time.monotonic() + 20
        while not toml.exists():
            assert time.monotonic() < deadline and simulator.poll() is None, "simulator did not write its config"
            time.sleep(0.05)
        env["GATEWAY__LOGGING__LEVEL"] = "warning"
        env |= {f"GATEWAY__{k.upper()}": v for k, v in (env_overrides or {}).items()} | dict(extra_env or {})
        if log_path is not None:
            log_file = open(log_path, "w")  # noqa: SIM115 - closed in the finally below
        gateway = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "gateway", "--config", str(toml)],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file or subprocess.PIPE, text=True, preexec_fn=preexec_fn,
        )  # fmt: skip
        yield gateway, gw_port
    finally:
        for proc in (gateway, simulator):
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, stderr = proc.communicate()
            if proc is gateway and log_path is not None:
                stderr = log_path.read_text()
            assert "Traceback" not in (stderr or ""), stderr
        if log_file is not None:
            log_file.close()


async def wait_healthy(http: httpx.AsyncClient) -> None:
    with trio.fail_after(30):
        while True:
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)
