"""Benchmark the gateway against a direct baseline and a plain nginx reverse proxy, in one run on loopback.

Usage (from the repository root)::

    .venv/bin/python bench/run.py            # full run, ~8 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # short durations, 64 MiB transfers, ~2 minutes
    .venv/bin/python bench/run.py --out /tmp/results.json --keep
    .venv/bin/python bench/run.py --only shared-fanout [--quick]   # only the fan-out (~4 minutes; ~1 quick)

What it starts (each a subprocess in its own process group, on a free 127.0.0.1 port, all stopped at the end):

- ``bench/sink.py``   an HTTP sink that reads upload bodies to the end and reports the byte count;
- ``bench/wsecho.py`` a WebSocket echo/ticker server;
- ``bench/ticker.py`` an IBKR-like market-data WebSocket (greeting, ``tic``, ``smd`` ticks stamped with their send
  time at a rate set over its control socket);
- the IBKR simulator  ``python -m gateway.simulator --write-credentials DIR``;
- nginx "A"           the upstream: ``/v1/api/bench/small`` (``{"ok":true}``), ``/v1/api/bench/big`` (a sparse
  1 GiB file by sendfile), ``/v1/api/bench/upload`` (→ sink), ``/v1/api/ws`` (→ echo), ``/`` (→ simulator); on a
  second port ``/v1/api/ws`` (→ ticker) and ``/`` (→ simulator);
- nginx "B"           a plain keep-alive reverse proxy to A (the comparison point);
- the gateway         ``python -m gateway --config DIR/bench-gateway.toml``, upstream = nginx A.

What it measures on three paths — direct (client → A), nginx (client → B → A), gateway (client → gateway → A):
wrk small-GET throughput and the proxy's CPU per request (/proc utime+stime); open-loop fixed-rate latency
(50 req/s, latency from each request's scheduled time); 1 GiB download and upload by curl, best of 2 after a
warm-up (MB/s = 10^6 B/s; proxy peak RSS = VmHWM after a clear_refs reset, plus 20 ms RSS sampling); WebSocket
one-way message rates and echo round trips; 1,000 idle WebSockets held open through nginx B and through the
gateway, twice (RSS per relay, fds, RSS kept after closing and over a second cycle); the gateway's cold start
(spawn → first ``/health`` 200, and its CPU until then).

Shared fan-out (``shared-fanout``, last, as it stops the main gateway: the simulator has one brokerage session):
one upstream tick delivered to 100 WebSocket clients (``bench/fanout.py``, one process) — straight to the ticker
through nginx A (the floor: 100 upstream sockets and subscriptions), through a gateway in relay mode (the same 100)
and through one in shared mode (one socket, one subscription); each a fixed rate, then a ramp that stops where
delivery falls behind; delay = receive time − the tick's send time (CLOCK_MONOTONIC in both processes); CPU of the
gateway, nginx A's worker, the ticker and the clients per delivered message; RSS per idle client in both modes.

Output: JSON (``--out``, default ``bench/results.json``) with every figure and the machine, and a Markdown table
on stdout. Missing nginx/wrk/curl are installed with apt-get (exit 2 if that fails). Any failed step prints its
name and the tail of the relevant component's log, stops everything and exits 1.

Lint: ``.venv/bin/ruff check bench && .venv/bin/ruff format --check bench && .venv/bin/mypy --strict bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import loadgen
import nginx
import procs
import profiling
import report
import tomli_w
import trio
import wsbench
from procs import Proc, StepFailed

HERE = Path(__file__).resolve().parent
PATHS = report.PATHS
SMALL = "/v1/api/bench/small"
BIG = "/v1/api/bench/big"
UPLOAD = "/v1/api/bench/upload"
WS = "/v1/api/ws"
GIB = 1 << 30
METHOD_NOTES = (
    "open-loop latency counts from each request's scheduled send time; the client's own timer lateness "
    "(about 1 ms) is in every path and cancels out in the 'added' rows (service_* figures in the JSON exclude it)",
    "WebSocket rates: the client writes hand-built frames in bulk and bench/wsecho.py is a hand-written raw "
    "WebSocket server (>1 million messages/s in, ~1 million/s out); the direct and nginx down-direction figures are "
    "bounded by the Python client's frame parser (~250,000-330,000 messages/s), far above what the proxies reach",
    "nginx B is stock apart from streaming request bodies (proxy_request_buffering off) and no temp files "
    "(proxy_max_temp_file_size 0); nginx A's upload location uses client_body_buffer_size 1m so it is not "
    "the bottleneck",
    "CPU figures come from /proc/<pid>/stat utime+stime (10 ms ticks), of the gateway process or nginx B's worker",
)


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and durations of one mode."""

    name: str
    wrk_warmup_s: int
    wrk_s: int
    rate: float
    rate_requests: int
    transfer_bytes: int
    ws_messages: int
    ws_round_trips: int
    idle_relays: int
    idle_cycles: int
    settle_s: float
    transfer_runs: int
    fanout_clients: int  # the fan-out measurement: clients subscribed to one conid
    fanout_rate: float  # client-messages/s of the fixed-rate step
    fanout_fixed_s: float
    fanout_ramp: tuple[float, ...]  # client-messages/s of the ramp's steps
    fanout_step_s: float
    fanout_warmup_s: float
    fanout_idle: int  # idle clients held for RSS per client


FULL = Plan(
    "full", 2, 10, 50.0, 1500, GIB, 20_000, 2_000, 1_000, 2, 1.0, 2,
    100, 2_000.0, 10.0,
    (2e3, 2.5e3, 3e3, 4e3, 5e3, 6e3, 8e3, 10e3, 12.5e3, 15e3, 20e3, 25e3, 30e3, 35e3, 40e3, 50e3, 60e3, 80e3),
    3.0, 1.0, 1_000,
)  # fmt: skip
QUICK = Plan(
    "quick", 1, 3, 50.0, 250, 64 << 20, 3_000, 300, 1_000, 1, 0.5, 1,
    100, 2_000.0, 3.0, (2e3, 4e3, 6e3, 8e3, 12e3, 16e3, 20e3, 25e3, 30e3, 40e3, 60e3), 1.5, 0.5, 300,
)  # fmt: skip


class Interrupted(Exception):
    """SIGTERM/SIGINT while running: stop everything and exit."""


def _log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(name: str, proc: Proc | None = None) -> Iterator[None]:
    """Name a step; any exception inside becomes :class:`StepFailed` naming it (and ``proc`` for its log)."""
    _log(name)
    try:
        yield
    except (StepFailed, Interrupted):
        raise
    except Exception as exc:
        raise StepFailed(name, f"{type(exc).__name__}: {exc}", proc) from exc


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------- tools and machine


@dataclass(frozen=True, slots=True)
class Tools:
    """Absolute paths of the external tools."""

    nginx: str
    wrk: str
    curl: str


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def ensure_tools() -> Tools:
    """Find nginx, wrk and curl; apt-get install the missing ones (one ``apt-get update`` first). Exit 2 on failure."""
    missing = [name for name in ("nginx", "wrk", "curl") if _which(name) is None]
    if missing:
        apt = _which("apt-get")
        if apt is None:
            print(f"bench: cannot install {' '.join(missing)}: apt-get not found", file=sys.stderr)
            raise SystemExit(2)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _log(f"installing {' '.join(missing)} with apt-get")
        for argv in ([apt, "update", "-q"], [apt, "install", "-y", "-q", *missing]):
            try:
                done = subprocess.run(  # noqa: S603 - fixed argv
                    argv, env=env, capture_output=True, text=True, timeout=600, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"bench: {' '.join(argv)} failed: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            if done.returncode != 0:
                last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
                print(f"bench: {' '.join(argv[1:3])} failed (exit {done.returncode}): {last[0]}", file=sys.stderr)
                raise SystemExit(2)
    found = {name: _which(name) for name in ("nginx", "wrk", "curl")}
    if None in found.values():
        gone = [name for name, path in found.items() if path is None]
        print(f"bench: still missing after apt-get install: {' '.join(gone)}", file=sys.stderr)
        raise SystemExit(2)
    return Tools(nginx=str(found["nginx"]), wrk=str(found["wrk"]), curl=str(found["curl"]))


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def machine(tools: Tools) -> dict[str, Any]:
    """What the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_total_kib": _meminfo_total(),
        "nginx": _version([tools.nginx, "-v"]),
        "wrk": _version([tools.wrk, "--version"]),
        "curl": _version([tools.curl, "--version"]),
    }


def source_state() -> dict[str, Any]:
    """Which gateway code was measured: HEAD and the files under src/ that differ from it (read-only git)."""
    git = _which("git")
    if git is None:
        return {"commit": None}
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(  # noqa: S603 - fixed argv
            [git, "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(  # noqa: S603 - fixed argv
            [git, "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": head.stdout.strip() or None, "src_changes_not_committed": dirty.stdout.splitlines()}


def _meminfo_total() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return None


# ---------------------------------------------------------------- the run


class Bench:
    """One benchmark run: its temp dir, processes, ports and results."""

    def __init__(self, plan: Plan, tools: Tools, workdir: Path, nofile: int) -> None:
        self.plan = plan
        self.nofile = nofile
        self.tools = tools
        self.dir = workdir
        self.group = procs.Group()
        self.results: dict[str, Any] = {}
        self.notes: list[str] = []
        self.ports: dict[str, int] = {}
        self.gateway: Proc | None = None
        self.nginx_a: Proc | None = None
        self.nginx_b: Proc | None = None
        self.worker_a = 0
        self.worker_b = 0
        self.ticker: Proc | None = None
        self.python = sys.executable

    # ------------------------------------------------------------ starting

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        return self.group.add(procs.start(name, argv, self.dir / f"{name}.log"))

    def start_backends(self) -> None:
        """Sink, echo server and simulator (with its credentials written)."""
        for name in ("sink", "wsecho", "ticker", "simulator", "nginx_a", "nginx_a_ticker", "nginx_b", "gateway"):
            self.ports[name] = procs.free_port()
        with step("start upload sink"):
            sink = self._spawn("sink", [self.python, str(HERE / "sink.py"), "--port", str(self.ports["sink"])])
            procs.wait_port("start upload sink", sink, self.ports["sink"], 15)
        with step("start WebSocket echo server"):
            echo = self._spawn("wsecho", [self.python, str(HERE / "wsecho.py"), "--port", str(self.ports["wsecho"])])
            procs.wait_port("start WebSocket echo server", echo, self.ports["wsecho"], 15)
        with step("start IBKR-like ticker"):
            self.ticker = self._spawn(
                "ticker", [self.python, str(HERE / "ticker.py"), "--port", str(self.ports["ticker"])]
            )
            procs.wait_port("start IBKR-like ticker", self.ticker, self.ports["ticker"], 15)
        with step("start simulator"):
            creds = self.dir / "creds"
            sim = self._spawn(
                "simulator",
                [
                    self.python,
                    "-m",
                    "gateway.simulator",
                    "--port",
                    str(self.ports["simulator"]),
                    "--write-credentials",
                    str(creds),
                    "--log-level",
                    "warning",
                    # Five gateways log in one after the other in a full run (the main one, then two per WebSocket
                    # mode for the fan-out): IBKR's limits on the login calls would put the fifth in the penalty box.
                    "--no-pacing",
                ],
            )
            procs.wait_file("start simulator", sim, creds / "gateway.toml", 30)
            procs.wait_port("start simulator", sim, self.ports["simulator"], 15)

    def _start_nginx(self, name: str, conf_text: str) -> tuple[Proc, int]:
        tag = name[-1]
        conf = self.dir / f"{name}.conf"
        conf.write_text(conf_text)
        nginx.prepare_dirs(self.dir, tag)
        argv = [self.tools.nginx, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / f"{tag}.error.log")]
        check = subprocess.run(  # noqa: S603 - fixed argv
            [*argv, "-t", "-q"], capture_output=True, text=True, timeout=30, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}: {(check.stderr or check.stdout).strip()}")
        proc = self._spawn(name, argv)
        procs.wait_http_ok(f"start {name}", proc, self.ports[name], SMALL, 15)
        workers: list[int] = []
        deadline = time.monotonic() + 10
        while not workers and time.monotonic() < deadline:
            workers = procs.children(proc.pid)
            time.sleep(0.02)
        if len(workers) != 1:
            raise StepFailed(f"start {name}", f"expected 1 nginx worker, found {workers}", proc)
        return proc, workers[0]

    def start_nginx(self, big_file: Path) -> None:
        """nginx A (upstream) then nginx B (reverse proxy to A)."""
        with step("start nginx A (upstream)"):
            ports = nginx.UpstreamPorts(
                listen=self.ports["nginx_a"],
                simulator=self.ports["simulator"],
                wsecho=self.ports["wsecho"],
                sink=self.ports["sink"],
                ticker_listen=self.ports["nginx_a_ticker"],
                ticker=self.ports["ticker"],
            )
            self.nginx_a, self.worker_a = self._start_nginx(
                "nginx_a", nginx.render_upstream(self.dir, ports, big_file, self.nofile)
            )
        with step("start nginx B (reverse proxy)"):
            text = nginx.render_proxy(self.dir, self.ports["nginx_b"], self.ports["nginx_a"], self.nofile)
            self.nginx_b, self.worker_b = self._start_nginx("nginx_b", text)

    def write_gateway_config(self, name: str = "gateway", upstream: str = "nginx_a", ws_mode: str = "relay") -> Path:
        """The simulator's gateway.toml, pointed at nginx A, with the benchmark routes and warning-level logs.
        ``name`` is the port's key (and the file's name), ``upstream`` the key of nginx A's port the gateway uses
        (``nginx_a_ticker``: WebSockets go to the ticker), ``ws_mode`` the ``[websocket] mode``."""
        creds = self.dir / "creds"
        with (creds / "gateway.toml").open("rb") as handle:
            document = tomllib.load(handle)
        document["server"]["port"] = self.ports[name]
        document["ibkr"]["base_url"] = f"http://127.0.0.1:{self.ports[upstream]}"
        if name != "gateway":  # a fan-out gateway: room for the idle clients, the mode under test
            document["server"]["max_websockets"] = max(1000, self.plan.fanout_idle + 100)
            document["websocket"] = {**document.get("websocket", {}), "mode": ws_mode}
        document["logging"] = {"level": "warning", "format": "text"}
        # The bench measures the hop itself: IBKR's pacing (10 requests/s) would be the only thing measured otherwise.
        document["pacing"] = {"enabled": False}
        document["routes"] = [{"path": "/v1/api/bench/*", "max_body_bytes": 2_000_000_000}, {"path": WS}]
        path = creds / f"bench-{name.replace('_', '-')}.toml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            tomli_w.dump(document, out)
        return path

    def start_gateway(self) -> None:
        """Start the gateway and measure its cold start: spawn → first /health 200, and its CPU until then."""
        with step("write gateway config"):
            config = self.write_gateway_config()
        name = "start gateway (cold start)"
        with step(name):
            self.gateway = self._spawn("gateway", [self.python, "-m", "gateway", "--config", str(config)])
            ready_at = procs.wait_http_ok(name, self.gateway, self.ports["gateway"], "/health", 60, poll_s=0.005)
            cpu = procs.cpu_ms(self.gateway.pid)
            pid = self.gateway.pid
            self.results["cold_start"] = {
                "time_to_health_ms": round((ready_at - self.gateway.started_at) * 1000, 1),
                "cpu_ms_until_ready": cpu,
                "rss_kib_at_ready": procs.rss_kib(pid),
                "fds_at_ready": procs.fd_count(pid),
                "nofile_limit": procs.nofile_limit(pid),
                "note": "includes interpreter start, imports, key loading, LST handshake, ssodh/init and tickle "
                "through nginx A to the simulator; /health polled every 5 ms; CPU resolution 1/CLK_TCK",
            }

    # ------------------------------------------------------------ helpers

    def port(self, path: str) -> int:
        """The port a client uses for ``path`` (direct / nginx / gateway)."""
        return self.ports[{"direct": "nginx_a", "nginx": "nginx_b", "gateway": "gateway"}[path]]

    def proxy_pid(self, path: str) -> int | None:
        """The process that proxies on ``path`` (None for direct)."""
        if path == "nginx":
            return self.worker_b
        if path == "gateway":
            assert self.gateway is not None
            return self.gateway.pid
        return None

    def proc_for(self, path: str) -> Proc | None:
        """The component whose log explains a failure on ``path``."""
        return {"direct": self.nginx_a, "nginx": self.nginx_b, "gateway": self.gateway}[path]

    def session(self, port: int | None = None) -> dict[str, Any]:
        """The gateway's /session document (of the gateway on ``port``: the main one by default)."""
        status, body = procs.http_get(port or self.ports["gateway"], "/session")
        if status != 200:
            raise RuntimeError(f"/session answered {status}")
        document: dict[str, Any] = json.loads(body)
        return document

    def gateway_relays_closed(self) -> bool:
        """True when the gateway reports no open WebSocket relay."""
        return int(self.session()["relays"]["open"]) == 0

    def check_alive(self, name: str) -> None:
        """Fail the step if any component has exited."""
        for proc in self.group.procs:
            if not proc.alive():
                raise StepFailed(name, f"{proc.name} exited with status {proc.popen.returncode}", proc)

    # ------------------------------------------------------------ measurements

    def sanity(self) -> None:
        """Each path answers the small GET correctly and echoes a WebSocket message."""
        for path in PATHS:
            with step(f"sanity check: {path}", self.proc_for(path)):
                status, body = procs.http_get(self.port(path), SMALL)
                if status != 200 or body != nginx.SMALL_BODY.encode():
                    raise RuntimeError(f"GET {SMALL} answered {status} {body[:200]!r}")
                trips = trio.run(partial(wsbench.round_trips, self.ws_url(path), count=5, timeout_s=20))
                if trips.mismatches or len(trips.rtt_ms) != 5:
                    raise RuntimeError(f"WebSocket echo failed: {trips}")

    def ws_url(self, path: str) -> str:
        """WebSocket URL of ``path``."""
        return f"ws://127.0.0.1:{self.port(path)}{WS}"

    def small_get(self) -> None:
        """wrk -t2 -c16 on the small GET, with the proxy's and nginx A's CPU per request."""
        out: dict[str, Any] = {}
        plan = self.plan
        for path in PATHS:
            with step(f"wrk small GET: {path} ({plan.wrk_s} s)", self.proc_for(path)):
                url = f"http://127.0.0.1:{self.port(path)}{SMALL}"
                loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=plan.wrk_warmup_s)
                pid = self.proxy_pid(path)
                cpu0 = procs.cpu_ms(pid) if pid else 0.0
                cpu_a0 = procs.cpu_ms(self.worker_a)
                result = loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=plan.wrk_s)
                cpu1 = procs.cpu_ms(pid) if pid else 0.0
                cpu_a1 = procs.cpu_ms(self.worker_a)
                if result.socket_errors or result.non_2xx:
                    problem = f"{result.socket_errors} socket errors, {result.non_2xx} non-2xx answers"
                    if (result.socket_errors + result.non_2xx) * 100 > result.requests:
                        raise RuntimeError(f"more than 1% failures: {problem} of {result.requests} requests")
                    self.notes.append(f"wrk {path}: {problem}")
                requests = max(result.requests, 1)
                figures = asdict(result)
                figures.pop("raw")
                figures["proxy_cpu_ms"] = cpu1 - cpu0 if pid else None
                figures["proxy_cpu_ms_per_request"] = (cpu1 - cpu0) / requests if pid else None
                figures["proxy_cpu_share_of_one_core"] = (cpu1 - cpu0) / 1000 / result.duration_s if pid else None
                figures["origin_cpu_ms_per_request"] = (cpu_a1 - cpu_a0) / requests
                out[path] = figures
                self.check_alive(f"wrk small GET: {path}")
        self.results["small_get"] = {
            "load": f"wrk -t2 -c16 -d{plan.wrk_s}s --latency (after a {plan.wrk_warmup_s} s warm-up run)",
            **out,
        }

    def fixed_rate(self) -> None:
        """Open-loop 50 req/s latency per path and the added latency versus direct."""
        plan = self.plan
        out: dict[str, Any] = {}
        for path in PATHS:
            seconds = plan.rate_requests / plan.rate
            with step(
                f"open-loop {plan.rate:g} req/s × {plan.rate_requests}: {path} ({seconds:g} s)", self.proc_for(path)
            ):
                result = loadgen.run_open_loop(
                    self.port(path), SMALL, rate=plan.rate, count=plan.rate_requests, expect=nginx.SMALL_BODY.encode()
                )
                if result.errors or result.bad_answers:
                    self.notes.append(
                        f"open loop {path}: {result.errors} errors, {result.bad_answers} bad answers "
                        f"(first: {result.first_error})"
                    )
                if not result.ok:
                    raise RuntimeError(f"no successful request (first error: {result.first_error})")
                out[path] = {
                    "requests": result.scheduled,
                    "ok": result.ok,
                    "errors": result.errors,
                    "bad_answers": result.bad_answers,
                    "connections_opened": result.connections_opened,
                    "max_in_flight": result.max_in_flight,
                    "duration_s": round(result.duration_s, 2),
                    "achieved_rate": round(result.ok / result.duration_s, 2),
                    "p50_ms": pct(result.latency_ms, 50),
                    "p90_ms": pct(result.latency_ms, 90),
                    "p99_ms": pct(result.latency_ms, 99),
                    "max_ms": max(result.latency_ms),
                    "service_p50_ms": pct(result.service_ms, 50),
                    "service_p99_ms": pct(result.service_ms, 99),
                }
        added = {
            path: {
                "p50_ms": out[path]["p50_ms"] - out["direct"]["p50_ms"],
                "p99_ms": out[path]["p99_ms"] - out["direct"]["p99_ms"],
            }
            for path in ("nginx", "gateway")
        }
        self.results["fixed_rate"] = {
            "load": f"open loop, {plan.rate:g} req/s, {plan.rate_requests} GETs, keep-alive (h11 over trio); "
            "latency from each request's scheduled send time",
            **out,
            "added_vs_direct": added,
        }

    def ws(self) -> None:
        """One-way message rates and echo round trips per path."""
        plan = self.plan
        rates: dict[str, Any] = {}
        trips: dict[str, Any] = {}
        for path in PATHS:
            with step(f"WebSocket rates ({plan.ws_messages} msgs each way): {path}", self.proc_for(path)):
                pid = self.proxy_pid(path)
                cpu0 = procs.cpu_ms(pid) if pid else 0.0
                result = trio.run(partial(wsbench.rates, self.port(path), WS, messages=plan.ws_messages))
                cpu1 = procs.cpu_ms(pid) if pid else 0.0
                rates[path] = {
                    **asdict(result),
                    "proxy_cpu_ms_per_message": (cpu1 - cpu0) / (2 * plan.ws_messages) if pid else None,
                }
                if not result.down_in_order:
                    self.notes.append(f"WebSocket {path}: pushed messages arrived out of order")
            with step(f"WebSocket round trips (×{plan.ws_round_trips}): {path}", self.proc_for(path)):
                rt = trio.run(partial(wsbench.round_trips, self.ws_url(path), count=plan.ws_round_trips))
                if rt.mismatches:
                    self.notes.append(f"WebSocket {path}: {rt.mismatches} echoes differed from what was sent")
                trips[path] = {
                    "round_trips": len(rt.rtt_ms),
                    "mismatches": rt.mismatches,
                    "p50_ms": pct(rt.rtt_ms, 50),
                    "p99_ms": pct(rt.rtt_ms, 99),
                    "max_ms": max(rt.rtt_ms) if rt.rtt_ms else math.nan,
                }
        trips["added_vs_direct"] = {
            path: {
                "p50_ms": trips[path]["p50_ms"] - trips["direct"]["p50_ms"],
                "p99_ms": trips[path]["p99_ms"] - trips["direct"]["p99_ms"],
            }
            for path in ("nginx", "gateway")
        }
        self.results["ws_rates"] = {
            "load": f"one connection; {plan.ws_messages} 32-byte text frames client→server written in one go "
            "(hand-built frames; confirmed by the server's count), then as many pushed server→client",
            **rates,
        }
        self.results["ws_round_trips"] = {
            "load": f"one connection; {plan.ws_round_trips} sequential echoes of a ~35-byte JSON text frame "
            "(50 warm-up excluded); the echo must be identical",
            **trips,
        }

    def idle(self) -> None:
        """Many idle WebSockets through nginx B and through the gateway (twice in a full run: retention vs leak)."""
        plan = self.plan
        out: dict[str, Any] = {}
        for path in ("nginx", "gateway"):
            cycles: list[dict[str, Any]] = []
            for cycle in range(1, plan.idle_cycles + 1):
                name = f"{plan.idle_relays} idle WebSockets: {path}, cycle {cycle}/{plan.idle_cycles}"
                with step(name, self.proc_for(path)):
                    cycles.append(self._idle_cycle(path))
                    self.check_alive(name)
            figures = cycles[0]
            if len(cycles) > 1:
                figures["second_cycle"] = cycles[1]
                figures["second_cycle_rss_closed_kib"] = cycles[1]["rss_closed_kib"]
                figures["second_cycle_fds_closed"] = cycles[1]["fds_closed"]
            out[path] = figures
        self.results["idle_websockets"] = {
            "load": f"{plan.idle_relays} WebSockets opened 50 handshakes at a time and held; one echo on each; "
            f"all closed; {plan.idle_cycles} cycle(s); RSS/fds of the proxy process (nginx B's worker, the gateway) "
            "before, while open and after closing",
            **out,
        }

    def _idle_cycle(self, path: str) -> dict[str, Any]:
        plan = self.plan
        pid = self.proxy_pid(path)
        assert pid is not None
        wait_closed: Callable[[], bool] | None = None
        if path == "gateway":
            wait_closed = self.gateway_relays_closed
            deadline = time.monotonic() + 15
            while not wait_closed() and time.monotonic() < deadline:
                time.sleep(0.05)
        result = trio.run(
            partial(
                wsbench.idle_relays,
                self.ws_url(path),
                count=plan.idle_relays,
                concurrency=50,
                pid=pid,
                settle_s=plan.settle_s,
                wait_closed=wait_closed,
            )
        )
        figures = asdict(result)
        opened = max(result.opened, 1)
        figures["kib_per_relay_idle"] = (result.rss_open_kib - result.rss_before_kib) / opened
        figures["kib_per_relay_after_one_echo"] = (result.rss_after_echo_kib - result.rss_before_kib) / opened
        figures["fds_per_relay"] = (result.fds_open - result.fds_before) / opened
        if result.failed or result.live != plan.idle_relays:
            self.notes.append(
                f"idle WebSockets {path}: {result.opened} opened, {result.failed} failed, {result.live} "
                f"answered the echo (first error: {result.first_error})"
            )
        return figures

    def floor(self) -> None:
        """The server stack alone: bench/floor.py (hypercorn with the gateway's settings, a no-op app) under the
        same small-GET, WebSocket-rate and idle-WebSocket loads, so the gateway's figures can be read against
        what its server costs before the gateway does anything."""
        plan = self.plan
        port = procs.free_port()
        self.ports["floor"] = port
        with step("start the floor (hypercorn, no-op app)"):
            proc = self._spawn("floor", [self.python, str(HERE / "floor.py"), "--port", str(port)])
            procs.wait_http_ok("start the floor", proc, port, SMALL, 30)
        out: dict[str, Any] = {}
        url = f"http://127.0.0.1:{port}{SMALL}"
        with step(f"floor: wrk small GET ({plan.wrk_s} s)", proc):
            loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=plan.wrk_warmup_s)
            cpu0 = procs.cpu_ms(proc.pid)
            result = loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=plan.wrk_s)
            cpu1 = procs.cpu_ms(proc.pid)
            out["small_get"] = {
                "requests_per_s": result.rps,
                "latency_ms": result.latency_ms,
                "cpu_ms_per_request": (cpu1 - cpu0) / max(result.requests, 1),
            }
        with step(f"floor: open-loop {plan.rate:g} req/s × {plan.rate_requests}", proc):
            loop = loadgen.run_open_loop(
                port, SMALL, rate=plan.rate, count=plan.rate_requests, expect=nginx.SMALL_BODY.encode()
            )
            out["fixed_rate"] = {
                "ok": loop.ok,
                "p50_ms": pct(loop.latency_ms, 50),
                "p99_ms": pct(loop.latency_ms, 99),
            }
        size = plan.transfer_bytes
        for kind, url in (
            ("download", f"http://127.0.0.1:{port}{BIG}?bytes={size}"),
            ("upload", f"http://127.0.0.1:{port}{UPLOAD}"),
        ):
            with step(f"floor: {size >> 20} MiB {kind}", proc):
                moved = loadgen.curl_transfer(
                    self.tools.curl,
                    url,
                    size=size,
                    upload=self.dir / "upload.bin" if kind == "upload" else None,
                    answer_file=self.dir / "floor-upload-answer.json",
                    watch_pid=proc.pid,
                    timeout_s=60 + size / 10e6,
                )
                if not moved.ok:
                    raise RuntimeError(moved.detail)
                out[kind] = {"mb_per_s": moved.mb_per_s, "hwm_kib": moved.hwm_kib}
        with step(f"floor: WebSocket rates ({plan.ws_messages} msgs each way)", proc):
            cpu0 = procs.cpu_ms(proc.pid)
            rates = trio.run(partial(wsbench.rates, port, WS, messages=plan.ws_messages))
            cpu1 = procs.cpu_ms(proc.pid)
            out["ws_rates"] = {**asdict(rates), "cpu_ms_per_message": (cpu1 - cpu0) / (2 * plan.ws_messages)}
        with step(f"floor: {plan.idle_relays} idle WebSockets", proc):
            idle = trio.run(
                partial(
                    wsbench.idle_relays,
                    f"ws://127.0.0.1:{port}{WS}",
                    count=plan.idle_relays,
                    concurrency=50,
                    pid=proc.pid,
                    settle_s=plan.settle_s,
                )
            )
            out["idle_websockets"] = {
                **asdict(idle),
                "kib_per_connection_idle": (idle.rss_open_kib - idle.rss_before_kib) / max(idle.opened, 1),
            }
        proc.stop()
        self.results["floor"] = {
            "what": "bench/floor.py: hypercorn configured by gateway.runtime._hypercorn_config (default [server]), "
            "a no-op ASGI app; same loads as the three paths",
            **out,
        }

    # ------------------------------------------------------------ fan-out: one upstream tick to many clients

    def start_fanout_gateway(self, ws_mode: str) -> Proc:
        """A gateway in ``ws_mode`` whose upstream is nginx A's ticker server (REST → simulator, /v1/api/ws →
        bench/ticker.py); returns once its session is ready and, in shared mode, IBKR's socket is authenticated."""
        name = f"gateway_{ws_mode}"
        self.ports[name] = procs.free_port()
        config = self.write_gateway_config(name, "nginx_a_ticker", ws_mode)
        proc = self._spawn(name, [self.python, "-m", "gateway", "--config", str(config)])
        port = self.ports[name]
        procs.wait_http_ok(f"start {name}", proc, port, "/health", 60)
        deadline = time.monotonic() + 30
        while True:
            document = self.session(port)
            shared = document.get("shared") or {}
            if document.get("ready") and (ws_mode == "relay" or shared.get("ready")):
                return proc
            if time.monotonic() > deadline:
                raise StepFailed(f"start {name}", f"not ready within 30 s: {document.get('state')}", proc)
            time.sleep(0.05)

    def _fanout_process(self, name: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
        """Run bench/fanout.py with ``argv`` as its own process; its JSON document."""
        out = self.dir / f"{name}.json"
        proc = self._spawn(name, [self.python, str(HERE / "fanout.py"), *argv, "--out", str(out)])
        try:
            status = proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.stop()
            raise StepFailed(name, f"bench/fanout.py did not finish within {timeout_s:g} s", proc) from None
        if status != 0:
            raise StepFailed(name, f"bench/fanout.py exited with status {status}", proc)
        document: dict[str, Any] = json.loads(out.read_text())
        return document

    def _fanout_run(
        self, name: str, port: int, pids: dict[str, int], targets: list[float], fixed_s: float
    ) -> dict[str, Any]:
        plan = self.plan
        seconds = plan.fanout_warmup_s + fixed_s + (len(targets) - 1) * (plan.fanout_warmup_s + plan.fanout_step_s)
        seconds += len(targets) * 0.5  # bench/fanout.py's --grace
        argv = [
            "fanout",
            "--url", f"ws://127.0.0.1:{port}{WS}",
            "--control-port", str(self.ports["ticker"]),
            "--clients", str(plan.fanout_clients),
            "--targets", ",".join(f"{t:g}" for t in targets),
            "--fixed-seconds", str(fixed_s),
            "--seconds", str(plan.fanout_step_s),
            "--warmup", str(plan.fanout_warmup_s),
        ]  # fmt: skip
        for key, pid in pids.items():
            argv += ["--pid", f"{key}={pid}"]
        return self._fanout_process(name, argv, timeout_s=120 + 2 * seconds)

    def _fanout_pids(self, gateway: Proc | None) -> dict[str, int]:
        assert self.ticker is not None
        pids = {"nginx_a": self.worker_a, "ticker": self.ticker.pid}
        if gateway is not None:
            pids["gateway"] = gateway.pid
        return pids

    def stop_main_gateway(self) -> None:
        """The fan-out gateways log in as the simulator's one user, so the main gateway logs out first."""
        if self.gateway is not None and self.gateway.alive():
            with step("stop the main gateway (the fan-out gateways use the same brokerage session)", self.gateway):
                self.gateway.stop(timeout_s=25)

    def _stop_fanout_gateway(self, ws_mode: str, gateway: Proc) -> dict[str, Any]:
        """Read the fan-out gateway's /session (its end state), then stop it."""
        with step(f"fan-out {ws_mode}: stop the gateway", gateway):
            end = self.session(self.ports[f"gateway_{ws_mode}"])
            gateway.stop(timeout_s=25)
        if end.get("sessions_ended") or end.get("handshakes") != 1:
            self.notes.append(f"fan-out {ws_mode}: the gateway's session restarted during the run")
        keys = ("handshakes", "sessions_ended", "relays", "shared", "websocket_mode")
        return {key: end.get(key) for key in keys}

    def shared_fanout(self) -> None:
        """One upstream tick delivered to ``fanout_clients`` clients: straight to the ticker (the floor), through a
        relay-mode gateway (a socket and a subscription per client) and a shared-mode one (one of each); a fixed
        rate, then a ramp until delivery falls behind; then, on a fresh gateway, RSS per idle client in each mode."""
        plan = self.plan
        self.stop_main_gateway()
        targets = [plan.fanout_rate, *plan.fanout_ramp]
        out: dict[str, Any] = {}
        name = f"fan-out direct: {plan.fanout_clients} clients → nginx A → ticker, {len(targets)} steps at most"
        with step(name, self.ticker):
            out["direct"] = {
                "fanout": self._fanout_run(
                    "fanout_direct", self.ports["nginx_a_ticker"], self._fanout_pids(None), targets, plan.fanout_fixed_s
                )
            }
        for ws_mode in ("relay", "shared"):
            # Each part on a freshly started gateway: the ramp's figures do not depend on what the idle clients
            # left in the heap, nor RSS per idle client on what the ramp did.
            with step(f"fan-out {ws_mode}: start a gateway in {ws_mode} mode"):
                gateway = self.start_fanout_gateway(ws_mode)
            port = self.ports[f"gateway_{ws_mode}"]
            with step(f"fan-out {ws_mode}: {plan.fanout_clients} clients, {len(targets)} steps at most", gateway):
                fanout = self._fanout_run(
                    f"fanout_{ws_mode}", port, self._fanout_pids(gateway), targets, plan.fanout_fixed_s
                )
            end = self._stop_fanout_gateway(ws_mode, gateway)
            with step(f"fan-out {ws_mode}: start a gateway in {ws_mode} mode (idle clients)"):
                gateway = self.start_fanout_gateway(ws_mode)
            port = self.ports[f"gateway_{ws_mode}"]
            with step(f"fan-out {ws_mode}: {plan.fanout_idle} idle clients", gateway):
                argv = ["idle", "--url", f"ws://127.0.0.1:{port}{WS}", "--count", str(plan.fanout_idle),
                        "--rss-pid", str(gateway.pid), "--session-port", str(port),
                        "--settle", str(plan.settle_s)]  # fmt: skip
                idle = self._fanout_process(f"fanout_idle_{ws_mode}", argv, timeout_s=180)
            self._stop_fanout_gateway(ws_mode, gateway)
            out[ws_mode] = {"fanout": fanout, "idle": idle, "gateway_end": end}
        self.results["shared_fanout"] = {
            "load": f"{plan.fanout_clients} WebSocket clients in one process (bench/fanout.py, one epoll loop), "
            "each subscribed to the same conid with smd+CONID+{}; bench/ticker.py stamps each tick with "
            "time.monotonic_ns() and sends it on every subscribed socket at R ticks/s, R = client-messages/s due "
            f"/ {plan.fanout_clients}; direct: clients → nginx A → ticker (100 sockets and subscriptions), relay: "
            "clients → gateway (relay mode) → nginx A → ticker (the same), shared: clients → gateway (shared mode) "
            f"→ one socket with one subscription; first step {plan.fanout_rate:g}/s for {plan.fanout_fixed_s:g} s, "
            f"then a ramp ({plan.fanout_step_s:g} s per step after {plan.fanout_warmup_s:g} s warm-up) that stops at "
            "the first step that fell behind (<98 % of the ticks sent during the step delivered by 0.5 s after it, "
            "ticks dropped at the ticker, a "
            "client closed, or the median delay > 50 ms); idle: clients held open, one tic each, RSS of the gateway",
            **out,
            "summary": report.fanout_summary(out),
        }

    def transfers(self, upload_file: Path) -> None:
        """Big download and upload through each path, with the proxy's peak RSS: one unmeasured direct warm-up,
        then ``plan.transfer_runs`` rounds over the three paths; the best MB/s and the highest peak RSS count."""
        size = self.plan.transfer_bytes
        runs = self.plan.transfer_runs
        for kind in ("download", "upload"):
            with step(f"{size >> 20} MiB {kind}: warm-up (direct, not measured)", self.nginx_a):
                self._transfer(kind, "direct", upload_file)
            measured: dict[str, list[loadgen.Transfer]] = {path: [] for path in PATHS}
            for run in range(1, runs + 1):
                for path in PATHS:
                    with step(f"{size >> 20} MiB {kind} {run}/{runs}: {path}", self.proc_for(path)):
                        measured[path].append(self._transfer(kind, path, upload_file))
                        self.check_alive(f"{kind}: {path}")
            out: dict[str, Any] = {}
            for path, results in measured.items():
                hwms = [r.hwm_kib for r in results if r.hwm_kib is not None]
                out[path] = {
                    "mb_per_s": max(r.mb_per_s for r in results),
                    "hwm_kib": max(hwms) if hwms else None,
                    "rss_before_kib": results[0].rss_before_kib,
                    "rss_after_kib": results[-1].rss_after_kib,
                    "runs": [asdict(r) for r in results],
                }
            self.results[kind] = {
                "bytes": size,
                "load": ("curl -o /dev/null" if kind == "download" else "curl -X POST -T file (streamed from disk)")
                + f"; best of {runs}; MB = 10^6 bytes; peak RSS = VmHWM after a clear_refs reset before each run",
                **out,
            }

    def _transfer(self, kind: str, path: str, upload_file: Path) -> loadgen.Transfer:
        size = self.plan.transfer_bytes
        url = f"http://127.0.0.1:{self.port(path)}{BIG if kind == 'download' else UPLOAD}"
        result = loadgen.curl_transfer(
            self.tools.curl,
            url,
            size=size,
            upload=upload_file if kind == "upload" else None,
            answer_file=self.dir / "upload-answer.json",
            watch_pid=self.proxy_pid(path),
            timeout_s=60 + size / 10e6,  # slower than 10 MB/s is a failure
        )
        if not result.ok:
            raise RuntimeError(result.detail)
        return result

    def profile(self, seconds: int, load: str, stem: Path, fanout_rate: float) -> None:
        """py-spy the gateway for ``seconds`` under ``load`` ("small": wrk -t2 -c16 small GETs; "ws": one WebSocket
        carrying message floods both ways; "download"/"upload": curl transfers of the big file; "shared-fanout" /
        "relay-fanout": a gateway in that WebSocket mode delivering ticks to ``plan.fanout_clients`` clients at
        ``fanout_rate`` client-messages/s); write ``stem``.folded (collapsed stacks, for flamegraph.pl or speedscope)
        and ``stem``.txt (top functions), print the gateway's CPU per request, message or MB."""
        spy = profiling.ensure_py_spy(self.python)
        if load.endswith("-fanout"):
            self.stop_main_gateway()
            with step(f"start a gateway in {load.removesuffix('-fanout')} mode"):
                self.gateway = self.start_fanout_gateway(load.removesuffix("-fanout"))
        assert self.gateway is not None
        pid = self.gateway.pid
        url = f"http://127.0.0.1:{self.ports['gateway']}{SMALL}"
        with step(f"profile the gateway under {load} load for {seconds} s", self.gateway):
            if load == "small":
                loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=self.plan.wrk_warmup_s)
            cpu0 = procs.cpu_ms(pid)
            work: Callable[[], tuple[int, float]] = {
                "small": partial(self._wrk_for, url, seconds + 1),
                "ws": partial(self._ws_for, seconds + 1),
                "download": partial(self._transfers_for, seconds + 1, None),
                "upload": partial(self._transfers_for, seconds + 1, self.dir / "upload.bin"),
                "shared-fanout": partial(self._fanout_for, "shared", seconds + 1, fanout_rate),
                "relay-fanout": partial(self._fanout_for, "relay", seconds + 1, fanout_rate),
            }[load]
            (count, rate), folded = profiling.record(spy, pid, seconds, work)
            cpu1 = procs.cpu_ms(pid)
            stem.with_suffix(".folded").write_text(folded)
            summary = profiling.summarise(folded)
            stem.with_suffix(".txt").write_text(summary)
            print(summary)
            unit = {"small": "request", "download": "MB", "upload": "MB"}.get(load, "message")
            print(
                f"gateway: {rate:,.0f} {unit}s/s, {(cpu1 - cpu0) / max(count, 1):.3f} ms CPU per {unit} while "
                f"sampled (py-spy's sampling pauses add a little); {stem.with_suffix('.folded')}, "
                f"{stem.with_suffix('.txt')}"
            )

    def _fanout_for(self, ws_mode: str, seconds: int, rate: float) -> tuple[int, float]:
        """The fan-out clients at ``rate`` client-messages/s for ``seconds``: messages delivered and messages/s."""
        port = self.ports[f"gateway_{ws_mode}"]
        assert self.gateway is not None
        document = self._fanout_run("fanout_profile", port, self._fanout_pids(self.gateway), [rate], seconds)
        fixed = document["steps"][0]
        print(
            f"fan-out: {fixed['delivered_per_s']:,.0f} of {rate:,.0f} client-messages/s delivered, delay p50 "
            f"{fixed['p50_ms']:.2f} ms, p99 {fixed['p99_ms']:.2f} ms"
            + (f"; closes {document['closes']}" if document["closes"] else "")
        )
        return int(fixed["delivered"]), float(fixed["delivered_per_s"])

    def _wrk_for(self, url: str, seconds: int) -> tuple[int, float]:
        result = loadgen.run_wrk(self.tools.wrk, url, threads=2, connections=16, duration_s=seconds)
        return result.requests, result.rps

    def _transfers_for(self, seconds: int, upload: Path | None) -> tuple[int, float]:
        """Downloads of the big file (or uploads of ``upload``) through the gateway until ``seconds`` have passed:
        MB (10^6 B) and MB/s."""
        began = time.monotonic()
        moved = 0
        port = self.ports["gateway"]
        while time.monotonic() - began < seconds:
            if upload is None:
                argv = [
                    self.tools.curl,
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{size_download}",
                    f"http://127.0.0.1:{port}{BIG}",
                ]
            else:
                argv = [self.tools.curl, "-sS", "-o", "/dev/null", "-w", "%{size_upload}", "-H", "Expect:",
                        "-X", "POST", "-T", str(upload), f"http://127.0.0.1:{port}{UPLOAD}"]  # fmt: skip
            got = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)  # noqa: S603
            moved += int(got.stdout)
        return round(moved / 1e6), moved / 1e6 / (time.monotonic() - began)

    def _ws_for(self, seconds: int) -> tuple[int, float]:
        """Message floods (up then down) on one relay until ``seconds`` have passed: messages and messages/s."""
        began = time.monotonic()
        count = 0
        while time.monotonic() - began < seconds:
            rates = trio.run(partial(wsbench.rates, self.ports["gateway"], WS, messages=5_000))
            count += rates.up_messages + rates.down_messages
        return count, count / (time.monotonic() - began)

    def finish(self) -> None:
        """The gateway's state at the end: it must still be on its first session."""
        with step("gateway state at the end", self.gateway):
            assert self.gateway is not None
            session = self.session()
            pid = self.gateway.pid
            self.results["gateway_end"] = {
                "handshakes": session.get("handshakes"),
                "sessions_ended": session.get("sessions_ended"),
                "handshake_failures": session.get("handshake_failures"),
                "relays": session.get("relays"),
                "rss_kib": procs.rss_kib(pid),
                "peak_rss_kib_since_last_reset": procs.hwm_kib(pid),
                "fds": procs.fd_count(pid),
                "cpu_ms_total": procs.cpu_ms(pid),
            }
            if session.get("sessions_ended") or session.get("handshakes") != 1:
                self.notes.append(
                    f"the gateway's session restarted during the run (handshakes {session.get('handshakes')}, "
                    f"sessions ended {session.get('sessions_ended')}): figures may include a re-handshake"
                )


# ---------------------------------------------------------------- main


def _make_file(path: Path, size: int) -> None:
    """A sparse file of ``size`` bytes (reads as zeros; no disk blocks)."""
    with path.open("wb") as handle:
        handle.truncate(size)


def _read_through(path: Path) -> None:
    """Read a file once (page cache warm-up)."""
    with path.open("rb", buffering=0) as handle:
        buffer = bytearray(1 << 20)
        while handle.readinto(buffer):
            pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit status."""
    plan = QUICK if args.quick else FULL
    began = time.monotonic()
    tools = ensure_tools()
    nofile = procs.raise_nofile()
    source = source_state()  # before the gateway starts: the code it loads
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    bench = Bench(plan, tools, workdir, nofile)
    if nofile < procs.WANTED_NOFILE:
        bench.notes.append(f"RLIMIT_NOFILE {nofile} for every process (hard limit; {procs.WANTED_NOFILE} refused)")
    status = 1
    failed: StepFailed | None = None
    try:
        big = workdir / "big.bin"
        upload = workdir / "upload.bin"
        with step(f"create two sparse {plan.transfer_bytes >> 20} MiB files in {workdir}"):
            _make_file(big, plan.transfer_bytes)
            _make_file(upload, plan.transfer_bytes)
            _read_through(big)  # sparse pages enter the page cache now, not during the first (direct) transfer
            _read_through(upload)
        bench.start_backends()
        bench.start_nginx(big)
        bench.start_gateway()
        bench.sanity()
        if args.profile:
            bench.profile(args.profile, args.profile_load, HERE / "profile", args.profile_rate)
        else:
            steps: dict[str, Callable[[], None]] = {
                "small": bench.small_get,
                "rate": bench.fixed_rate,
                "transfers": partial(bench.transfers, upload),
                "ws": bench.ws,
                "idle": bench.idle,
                "floor": bench.floor,
            }
            for name, measure in steps.items():
                if args.only is None or name in args.only:
                    measure()
            bench.finish()
            if args.only is None or "shared-fanout" in args.only:
                bench.shared_fanout()  # last: it stops the main gateway
        status = 0
    except StepFailed as exc:
        failed = exc
    except Interrupted as exc:
        _log(f"interrupted ({exc}): stopping everything")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _log("stopping all processes")
        exits = bench.group.stop_all()
        if failed is not None:
            _report_failure(failed, bench)
        if args.keep:
            _log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if status != 0 or args.profile:
        return status
    if plan.transfer_bytes != GIB:
        bench.notes.append(f"--quick: transfers use {plan.transfer_bytes >> 20} MiB instead of 1 GiB")
    document = {
        "mode": plan.name,
        "plan": asdict(plan),
        "runtime_s": round(time.monotonic() - began, 1),
        "machine": machine(tools),
        "gateway_source": source,
        "client_nofile_limit": nofile,
        "ports": bench.ports,
        "exit_statuses": exits,
        "notes": bench.notes,
        "method_notes": list(METHOD_NOTES),
        **bench.results,
    }
    size_label = "1 GiB" if plan.transfer_bytes == GIB else f"{plan.transfer_bytes >> 20} MiB"
    table = report.rows(bench.results, size_label=size_label, rate=plan.rate, idle_count=plan.idle_relays)
    document["table"] = [row._asdict() for row in table]
    text = report.markdown(table)
    document["table_markdown"] = text
    floor_text = report.floor_markdown(bench.results)
    document["floor_markdown"] = floor_text
    fanout_text = report.fanout_markdown(bench.results)
    document["shared_fanout_markdown"] = fanout_text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(text)
    print()
    if floor_text:
        print("The server stack alone (bench/floor.py) next to the gateway:\n")
        print(floor_text)
        print()
    if fanout_text:
        print(f"One upstream tick to {plan.fanout_clients} WebSocket clients, relay mode and shared mode:\n")
        print(fanout_text)
        print()
    for note in (*bench.notes, *METHOD_NOTES):
        print(f"- {note}")
    print(f"\nmode {plan.name}, {document['runtime_s']} s; JSON: {args.out}")
    return 0


def _report_failure(failed: StepFailed, bench: Bench) -> None:
    print(f"bench: step failed: {failed.step}: {failed.detail}", file=sys.stderr)
    shown: list[Proc] = [failed.proc] if failed.proc is not None else []
    shown += [proc for proc in bench.group.procs if proc not in shown and proc.popen.returncode not in (None, 0, -15)]
    if not shown and bench.gateway is not None:
        shown = [bench.gateway]
    for proc in shown:
        print(f"--- tail of {proc.name} log ({proc.log}) ---", file=sys.stderr)
        print(proc.tail() or "(empty)", file=sys.stderr)
        if proc.name.startswith("nginx_"):
            error_log = bench.dir / f"{proc.name[-1]}.error.log"
            with contextlib.suppress(OSError):
                print("\n".join(error_log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=(__doc__ or "").split("\n\n", 1)[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short durations and 64 MiB transfers (~2 minutes)")
    parser.add_argument(
        "--out", type=Path, default=HERE / "results.json", help="JSON output (default bench/results.json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    parser.add_argument(
        "--only",
        type=lambda text: frozenset(text.split(",")),
        help="comma-separated subset of small,rate,transfers,ws,idle,floor,shared-fanout (the table then has gaps)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        metavar="SECONDS",
        help="instead of measuring: py-spy the gateway under wrk small-GET load for SECONDS, write "
        "bench/profile.svg (flame graph) and bench/profile.txt (top functions), print CPU per request",
    )
    parser.add_argument(
        "--profile-load",
        choices=("small", "ws", "download", "upload", "shared-fanout", "relay-fanout"),
        default="small",
        help="with --profile: small GETs under wrk (default), WebSocket message floods on one relay, repeated "
        "downloads / uploads of the big file, or ticks to 100 WebSocket clients through a gateway in shared or "
        "relay mode (at --profile-rate)",
    )
    parser.add_argument(
        "--profile-rate",
        type=float,
        default=5_000.0,
        metavar="N",
        help="with --profile-load shared-fanout / relay-fanout: client-messages/s due (default 5000)",
    )
    args = parser.parse_args(argv)
    steps = {"small", "rate", "transfers", "ws", "idle", "floor", "shared-fanout"}
    if args.only is not None and not args.only <= steps:
        parser.error(f"--only: unknown step(s) {sorted(args.only - steps)}")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
