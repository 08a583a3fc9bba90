"""Fault soak: steady mixed traffic through a real gateway while the simulator misbehaves at random.

For ``SOAK_SECONDS`` (default 60) eight HTTP workers send echo GETs, unique-id POSTs, stream downloads and uploads
above the gateway's 64 KiB body buffer, and four WebSocket clients subscribe to market data and reconnect whenever
they are closed, while a fault injector flips one of the simulator's faults every 0.2–0.6 s (``FAULTS``), each
undone within about a second. Pacing is on (with a rate far above the soak's), so injected IBKR 429s trip the
pacer's breaker. Then the faults stop, the gateway must recover, a short quiet window must be clean, and the
process must be back where it started. Everything is seeded (``SOAK_SEED``); timing, of course, is not.

What is asserted (each violation is collected and all are reported at once, with the seed):

- nothing hangs: every request answers within a client-side deadline above the sum of the gateway's own; every
  WebSocket client gets a handshake answer, then a message or a close, within a bound; after the faults, the session
  is ready and ``/health`` 200 within a bound; the whole test runs under ``trio.fail_after``;
- nothing is replayed: a non-idempotent request (a POST with a unique id) is accepted by the simulator at most once,
  and one the gateway answered 503 "not re-sent" not at all (checked against every ``simulator.records`` entry);
- nothing is corrupted: a 200 echo carries exactly its own query, body hash and request id; a download the client
  saw complete has exactly the expected bytes and length; a cut one is an error to the client, never a short body;
  WebSocket messages are JSON objects;
- only deliberate statuses: every answer is one the gateway or the injected faults explain, with a JSON error body;
- the process is healthy after: trio tasks, file descriptors and live objects back at their baseline, RSS growth
  bounded, as many relays as open clients (then none), no ERROR line and no traceback in the logs.

Every request carries ``X-Request-Id: soak-N`` and the violations name it; the run's log, with request ids, is kept
as the ``soak_log`` ARTIFACT. Run it longer by hand, e.g.
``SOAK_SECONDS=600 SOAK_SEED=7 .venv/bin/pytest tests/integration/test_soak.py``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from gateway.logs import RedactingFilter, RequestIdFilter
from gateway.session.state import State
from gateway.simulator import SimulatorCredentials, stream_pattern
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.conftest import Artifact, Figure
from tests.probes import live_tasks, open_fds, rss_kib, sockets_on_port

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SEED = int(os.environ.get("SOAK_SEED", "20240611"))

HTTP_WORKERS = 8
WS_CLIENTS = 4
ECHO = "/v1/api/sim/echo"
STREAM = "/v1/api/sim/stream"
UPLOAD = "/v1/api/sim/upload"
SUBSCRIBE = 'smd+265598+{"fields":["31","84"]}'
MAX_DOWNLOAD = 400_000
PATTERN = stream_pattern(MAX_DOWNLOAD)

# The gateway's own deadlines, kept short so the client-side bounds below can sit well above them.
READY_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 3.0
POOL_TIMEOUT_S = 1.0
PACING_MAX_WAIT_S = 1.0
OVERRIDES: dict[str, dict[str, object]] = {
    "session": {
        "tickle_interval_s": 1,
        "ready_timeout_s": READY_TIMEOUT_S,
        "reconnect_delay_s": 0.05,
        "reconnect_max_delay_s": 0.5,
    },
    "upstream": {
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "read_timeout_s": READ_TIMEOUT_S,
        "write_timeout_s": READ_TIMEOUT_S,
        "pool_timeout_s": POOL_TIMEOUT_S,
    },
    # Pacing on, so the pacer's bookkeeping (grants given back on cancellation, the 429 breaker and its probe) runs
    # under the faults too; the rate is set far above what the soak sends, and the breaker's cool-down short, so
    # 429s come from the injected IBKR 429s (passed through, or the breaker holding traffic for 1–2 s after them).
    "pacing": {
        "enabled": True,
        "global_requests_per_s": 1000,
        "global_burst": 1000,
        "max_wait_s": PACING_MAX_WAIT_S,
        "breaker_cooldown_s": 1,
        "breaker_max_cooldown_s": 2,
    },
}

# One proxied attempt may take ready + pacing wait + pool wait + connect + read of the head (8 s here); a request gets
# at most two (the second after a 401, possibly after waiting ready_timeout_s for an LST refresh): 18 s. A client
# deadline above that means hitting it is a hang, not a slow answer.
ATTEMPT_BOUND_S = READY_TIMEOUT_S + PACING_MAX_WAIT_S + POOL_TIMEOUT_S + CONNECT_TIMEOUT_S + READ_TIMEOUT_S
CLIENT_DEADLINE_S = 2 * ATTEMPT_BOUND_S + READY_TIMEOUT_S + 4
# A relay handshake waits for a session (ready_timeout_s), then for the upstream TCP connect and WebSocket handshake
# (10 s each in the relay).
WS_CONNECT_BOUND_S = READY_TIMEOUT_S + 2 * 10 + 5
# The simulator sends a heartbeat every second (and ticks every 0.2 s on a subscription).
WS_MESSAGE_BOUND_S = 10.0
RECOVERY_BOUND_S = 10.0
QUIET_S = 3.0
SETTLE_BOUND_S = 10.0  # hypercorn's WebSocket ping task outlives a closed socket by up to one ping interval (5 s)

# Answers the gateway itself may give under these faults: (status, code).
GATEWAY_ANSWERS = {
    (429, "pacing"),
    (502, "upstream_closed"),
    (502, "upstream_connect"),
    (502, "upstream_error"),
    (502, "upstream_protocol"),
    (503, "session_not_ready"),
    (503, "session_renewing"),
    (504, "upstream_timeout"),
}
UPSTREAM_FAULT_STATUSES = (500, 502, 503, 401)
WS_CLOSE_CODES = {1011, 1012, 1013}  # upstream closed/failed, session restart, try again later
WS_REJECT_STATUSES = {502, 503}  # refused before accept: the upstream handshake failed (502), no session in time (503)
# Fault kinds and their weights. Those that end the session (an expired LST, a failed or unauthenticated tickle,
# IBKR down) are drawn half as often as the others: at one fault every 0.2-0.6 s, equal weights kept the session
# ready under a third of the time, most of the traffic then waiting for a session rather than meeting faults on one.
FAULTS: dict[str, int] = {
    "expire_lst": 1,
    "fail_tickle": 1,
    "unauthenticated": 1,
    "down": 1,
    "fail_next": 2,
    "close_ws": 2,
    "delay": 2,
    "rate_limit": 2,
    "drop": 2,
}


@dataclass
class Tally:
    """Everything the soak counts; ``violations`` collects every broken promise."""

    seed: int
    phase: str = "warmup"
    violations: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    max_latency_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    downloads_complete: int = 0
    downloads_cut: int = 0
    other_cuts: int = 0
    posts: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (status, gateway code or "")
    accepted: Counter[str] = field(default_factory=Counter)  # id -> accepted by the simulator
    injected: Counter[str] = field(default_factory=Counter)
    ws_opened: int = 0
    ws_messages: int = 0
    ws_closes: Counter[int] = field(default_factory=Counter)
    ws_rejects: Counter[int] = field(default_factory=Counter)
    ws_tick_at: dict[int, float] = field(default_factory=dict)
    ws_open_now: set[int] = field(default_factory=set)
    records_seen: int = 0
    last_record_seq: int = 0
    log_problems: list[str] = field(default_factory=list)
    log_levels: Counter[str] = field(default_factory=Counter)
    rss_during_faults: list[int] = field(default_factory=list)  # KiB, once a second while the faults run

    def violate(self, message: str) -> None:
        self.violations.append(f"[{self.phase}] {message}")


@dataclass(frozen=True)
class Request:
    """One client request: what it is (the worker's operation), its number, and the phase it started in."""

    op: str
    seq: int
    worker: int
    phase: str

    @property
    def kind(self) -> str:
        return {"echo_get": "get", "echo_post": "post"}.get(self.op, self.op)

    @property
    def method(self) -> str:
        return "POST" if self.op in ("echo_post", "upload") else "GET"

    @property
    def id(self) -> str:
        """Sent as ``X-Request-Id``: the gateway's log lines about this request carry it."""
        return f"soak-{self.seq}"

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


class ClientCut(Exception):
    """The answer started but the connection was cut before its end (visible to the client as an error)."""


def _error_source(status: int, body: bytes) -> tuple[str, str] | None:
    """``("gateway", code)`` or ``("upstream", "")`` for a well-formed error body, ``None`` if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str) or data.get("statusCode") != status:
        return None
    if data.get("source") == "gateway":
        return "gateway", str(data.get("code"))
    return "upstream", ""


class Soak:
    """The traffic, the fault injector and the watchers around one test gateway."""

    def __init__(self, gw: TestGateway, tally: Tally, caplog: pytest.LogCaptureFixture) -> None:
        self.gw = gw
        self.tally = tally
        self.caplog = caplog
        self.seq = 0
        self.stop = trio.Event()
        self.down = False

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ------------------------------------------------------------------------------------------- HTTP traffic

    async def http_worker(self, http: httpx.AsyncClient, wid: int) -> None:
        rng = random.Random(f"{self.tally.seed}-http-{wid}")
        ops: list[Callable[[httpx.AsyncClient, random.Random, Request], Awaitable[int]]] = [
            self.echo_get,
            self.echo_post,
            self.download,
            self.upload,
        ]
        while not self.stop.is_set():
            op = rng.choices(ops, weights=(40, 25, 25, 10))[0]
            request = Request(op.__name__, self.next_seq(), wid, self.tally.phase)
            started = trio.current_time()
            try:
                with trio.fail_after(CLIENT_DEADLINE_S):
                    status = await op(http, rng, request)
            except trio.TooSlowError:
                self.tally.violate(f"{request}: no answer within {CLIENT_DEADLINE_S:g} s")
                continue
            except ClientCut:
                status = -1
            except httpx.TransportError as exc:
                self.tally.violate(f"{request}: no response at all ({type(exc).__name__}: {exc})")
                continue
            latency = trio.current_time() - started
            self.tally.requests += 1
            self.tally.latencies.append(latency)
            self.tally.max_latency_s = max(self.tally.max_latency_s, latency)
            self.tally.statuses[f"{request.kind}:{status}"] += 1
            if request.phase == "quiet" and status != 200:
                self.tally.violate(f"{request}: {status} after the faults stopped and the gateway recovered")
            # A refused request is retried soon, not at once: spinning on the pacer's instant 429s would be most of
            # the traffic while its breaker holds (and a real client waits, if not the whole Retry-After).
            await trio.sleep(rng.uniform(0, 0.01) if status == 200 else rng.uniform(0.05, 0.2))

    def check_error(self, request: Request, status: int, body: bytes) -> None:
        """An answer other than 200 must be a deliberate one: a gateway error or an injected upstream fault."""
        source = _error_source(status, body)
        if source is None:
            self.tally.violate(f"{request}: {status} with a body that is no JSON error: {body[:200]!r}")
            return
        origin, code = source
        self.tally.sources[f"{origin}:{status}:{code}" if code else f"{origin}:{status}"] += 1
        if origin == "gateway":
            if (status, code) not in GATEWAY_ANSWERS:
                self.tally.violate(f"{request}: unexpected gateway answer {status} {code}")
            elif code == "session_renewing" and request.method != "POST":
                self.tally.violate(f"{request}: an idempotent request got 503 session_renewing, not a re-send")
            return
        # Passed through from the simulator: only what a fault injected. A 401 reaches a client only after the
        # gateway confirmed the token still works: for a GET when its re-signed second attempt is refused too, for a
        # POST at once (never re-sent: the replay check below sees every record).
        if status not in (*UPSTREAM_FAULT_STATUSES, 429):
            self.tally.violate(f"{request}: upstream {status} that no fault injected")

    async def _fetch(
        self, http: httpx.AsyncClient, request: Request, url: str, **kwargs: Any
    ) -> tuple[int, bytes, httpx.Headers]:
        """One request; the whole body. A body cut short raises :class:`ClientCut` (the head had arrived)."""
        headers = {"x-request-id": request.id, **kwargs.pop("headers", {})}
        async with http.stream(request.method, url, headers=headers, **kwargs) as response:
            if response.headers.get("x-request-id") != request.id:
                self.tally.violate(f"{request}: answer carries request id {response.headers.get('x-request-id')!r}")
            try:
                body = await response.aread()
            except httpx.TransportError as exc:
                if response.status_code != 200:
                    self.tally.violate(f"{request}: {response.status_code} answer cut short ({exc!r})")
                self.tally.other_cuts += 1
                raise ClientCut(request.kind) from None
            return response.status_code, body, response.headers

    async def echo_get(self, http: httpx.AsyncClient, rng: random.Random, request: Request) -> int:
        query = f"seq={request.seq}&w={request.worker}&pad={rng.getrandbits(64):x}"
        status, body, _ = await self._fetch(http, request, f"{ECHO}?{query}")
        if status != 200:
            self.check_error(request, status, body)
            return status
        echo = json.loads(body)
        if echo.get("method") != "GET" or echo.get("path") != ECHO or echo.get("query") != query:
            self.tally.violate(f"{request}: echo of another request: {echo.get('method')} {echo.get('query')!r}")
        if [request.id] != [value for name, value in echo.get("headers", []) if name.lower() == "x-request-id"]:
            self.tally.violate(f"{request}: upstream saw another request id")
        return status

    async def echo_post(self, http: httpx.AsyncClient, rng: random.Random, request: Request) -> int:
        pid = f"p{self.tally.seed}-{request.seq}"
        payload = json.dumps({"id": pid, "pad": "x" * rng.randrange(0, 4000)}).encode()
        self.tally.posts[pid] = (-1, "")
        status, body, _ = await self._fetch(
            http, request, f"{ECHO}?id={pid}", content=payload, headers={"content-type": "application/json"}
        )
        self.tally.posts[pid] = (status, _gateway_code(status, body))
        if status != 200:
            self.check_error(request, status, body)
            return status
        echo = json.loads(body)
        expected = {"method": "POST", "path": ECHO, "query": f"id={pid}", "body_length": len(payload)}
        if {k: echo.get(k) for k in expected} != expected or echo.get("body_sha256") != _sha(payload):
            self.tally.violate(f"{request}: echo does not match the request: {echo!r:.300}")
        return status

    async def upload(self, http: httpx.AsyncClient, rng: random.Random, request: Request) -> int:
        """A body above the gateway's 64 KiB buffer: it streams up after the session wait (non-idempotent)."""
        pid = f"u{self.tally.seed}-{request.seq}"
        payload = rng.randbytes(rng.randrange(70_000, 200_000))
        self.tally.posts[pid] = (-1, "")
        status, body, _ = await self._fetch(http, request, f"{UPLOAD}?id={pid}", content=payload)
        self.tally.posts[pid] = (status, _gateway_code(status, body))
        if status != 200:
            self.check_error(request, status, body)
            return status
        if json.loads(body) != {"bytes": len(payload), "sha256": _sha(payload)}:
            self.tally.violate(f"{request}: upstream received other bytes: {body[:200]!r}")
        return status

    async def download(self, http: httpx.AsyncClient, rng: random.Random, request: Request) -> int:
        size = rng.randrange(100_000, MAX_DOWNLOAD + 1)
        chunk = rng.choice((8192, 16384, 65536))
        url = f"{STREAM}?bytes={size}&chunk={chunk}&seq={request.seq}"
        async with http.stream("GET", url, headers={"x-request-id": request.id}) as response:
            received = bytearray()
            try:
                async for piece in response.aiter_raw():
                    received += piece
            except httpx.TransportError as exc:
                if response.status_code != 200:
                    self.tally.violate(f"{request}: {response.status_code} answer cut short ({exc!r})")
                self.tally.downloads_cut += 1
                raise ClientCut(request.kind) from None
            status = response.status_code
            if status != 200:
                self.check_error(request, status, bytes(received))
                return status
            length = response.headers.get("content-length")
            if length != str(size) or len(received) != size or received != PATTERN[:size]:
                self.tally.violate(
                    f"{request}: {size} bytes seen complete but wrong: content-length={length}, got {len(received)}"
                    f" bytes, {'the same' if received == PATTERN[: len(received)] else 'a different'} prefix"
                )
            self.tally.downloads_complete += 1
            return status

    # ------------------------------------------------------------------------------------------- WebSockets

    async def ws_client(self, index: int) -> None:
        rng = random.Random(f"{self.tally.seed}-ws-{index}")
        url = self.gw.ws_base_url + "/v1/api/ws"
        while not self.stop.is_set():
            phase = self.tally.phase
            request_id = f"soak-ws-{self.next_seq()}"  # the relay's log lines carry it
            opened_at: float | None = None
            received = 0
            try:
                async with open_websocket(
                    url, connect_timeout_s=WS_CONNECT_BOUND_S, extra_headers=[(b"x-request-id", request_id.encode())]
                ) as ws:
                    opened_at = trio.current_time()
                    self.tally.ws_opened += 1
                    self.tally.ws_open_now.add(index)
                    try:
                        await ws.send_message(SUBSCRIBE)
                        while not self.stop.is_set():
                            phase = self.tally.phase
                            with trio.fail_after(WS_MESSAGE_BOUND_S):
                                message = await ws.get_message()
                            received += 1
                            self._check_ws_message(index, message)
                    finally:
                        self.tally.ws_open_now.discard(index)
            except trio_websocket.ConnectionClosed as closed:
                code = closed.reason.code if closed.reason is not None else 1006
                self.tally.ws_closes[code] += 1
                if code not in WS_CLOSE_CODES:
                    self.tally.violate(f"ws {request_id}: closed with unexpected code {code}")
                if phase == "quiet":
                    self.tally.violate(f"ws {request_id}: closed ({code}) after the gateway recovered")
            except trio_websocket.ConnectionRejected as rejected:
                self.tally.ws_rejects[rejected.status_code] += 1
                if rejected.status_code not in WS_REJECT_STATUSES or phase == "quiet":
                    self.tally.violate(f"ws {request_id}: handshake refused with HTTP {rejected.status_code}")
            except trio.TooSlowError:
                if opened_at is None:
                    self.tally.violate(f"ws {request_id}: no handshake answer within {WS_CONNECT_BOUND_S:g} s")
                else:
                    self.tally.violate(
                        f"ws {request_id}: no message and no close for {WS_MESSAGE_BOUND_S:g} s, after {received}"
                    )
            except (trio_websocket.HandshakeError, OSError, trio.BrokenResourceError) as exc:
                self.tally.violate(f"ws {request_id}: connection failed: {type(exc).__name__}: {exc}")
            if not self.stop.is_set():
                await trio.sleep(rng.uniform(0.05, 0.3))

    def _check_ws_message(self, index: int, message: str | bytes) -> None:
        self.tally.ws_messages += 1
        try:
            data = json.loads(message)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.tally.violate(f"ws {index}: relayed message is no JSON object: {message[:200]!r}")
            return
        if data.get("topic") == "smd+265598" and "error" not in data:
            self.tally.ws_tick_at[index] = trio.current_time()

    # ------------------------------------------------------------------------------------------- faults

    async def inject_faults(self, until: float) -> None:
        """A random bounded fault every 0.2–0.6 s until ``until``; every undo has happened when this returns."""
        rng = random.Random(f"{self.tally.seed}-faults")
        faults = self.gw.simulator.faults
        async with trio.open_nursery() as undo:

            def later(delay: float, action: Callable[[], object]) -> None:
                async def run() -> None:
                    await trio.sleep(delay)
                    result = action()
                    if isinstance(result, Awaitable):
                        await result

                undo.start_soon(run)

            while trio.current_time() < until:
                await trio.sleep(rng.uniform(0.2, 0.6))
                kind = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
                if kind == "down" and self.down:
                    kind = "expire_lst"
                self.tally.injected[kind] += 1
                if kind == "expire_lst":
                    faults.expire_lst()
                elif kind == "fail_next":
                    status = rng.choice(UPSTREAM_FAULT_STATUSES)
                    prefix = rng.choice((ECHO, STREAM, UPLOAD, "/v1/api/sim/", "/v1/api/oauth/live_session_token"))
                    faults.fail_next(rng.randint(1, 3), status, path_prefix=prefix)
                    self.tally.injected[f"fail_next_{status}"] += 1
                elif kind == "fail_tickle":
                    status = rng.choice(UPSTREAM_FAULT_STATUSES)
                    faults.fail_next(rng.randint(1, 2), status, path_prefix="/v1/api/tickle")
                elif kind == "unauthenticated":
                    faults.set_tickle_unauthenticated(True)
                    later(rng.uniform(0.3, 1.5), lambda: faults.set_tickle_unauthenticated(False))
                elif kind == "close_ws":
                    await faults.close_websockets(1011)
                elif kind == "delay":
                    faults.set_delay(rng.uniform(0.2, 1.0))
                    later(rng.uniform(0.3, 1.5), lambda: faults.set_delay(0))
                elif kind == "down":
                    self.down = True
                    await faults.down()

                    async def back_up() -> None:
                        await faults.up()
                        self.down = False

                    later(rng.uniform(0.2, 1.0), back_up)
                elif kind == "rate_limit":
                    if rng.random() < 0.5:
                        faults.rate_limit(n=rng.randint(1, 5), path_prefix="/v1/api/sim/")
                    else:
                        faults.rate_limit(seconds=rng.uniform(0.2, 1.0), path_prefix="/v1/api/sim/")
                elif kind == "drop":
                    faults.drop_mid_response(1)

    # ------------------------------------------------------------------------------------------- watchers

    def collect_records(self) -> None:
        """Take the simulator's new records, then drop them there: it would keep the last 10,000 (~20 MiB with
        their headers), which would hide the gateway's own memory growth, and drop older ones unseen."""
        simulator = self.gw.simulator
        fresh = [r for r in simulator.records if r.seq > self.tally.last_record_seq]
        simulator.clear_records()  # no checkpoint since the snapshot: nothing was recorded in between
        if not fresh:
            return
        if fresh[0].seq != self.tally.last_record_seq + 1:
            self.tally.violate(f"simulator records {self.tally.last_record_seq + 1}..{fresh[0].seq - 1} missed")
        self.tally.last_record_seq = fresh[-1].seq
        self.tally.records_seen += len(fresh)
        for record in fresh:
            if record.accepted and record.method == "POST" and record.path in (ECHO, UPLOAD):
                key, _, pid = record.raw_query.partition("=")
                if key == "id":
                    self.tally.accepted[pid] += 1

    def scan_logs(self) -> None:
        """Note every ERROR line and every traceback, then forget the records (bounded memory)."""
        for record in self.caplog.records:
            self.tally.log_levels[record.levelname] += 1
            text = record.getMessage()
            if record.levelno >= logging.ERROR or record.exc_info or "Traceback" in text:
                self.tally.log_problems.append(f"{record.levelname} {record.name}: {text[:300]}")
        self.caplog.clear()

    async def watch(self) -> None:
        ticks = 0
        while True:
            self.collect_records()
            self.scan_logs()
            ticks += 1
            if self.tally.phase == "soak" and ticks % 5 == 0:
                self.tally.rss_during_faults.append(rss_kib())
            await trio.sleep(0.2)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gateway_code(status: int, body: bytes) -> str:
    source = _error_source(status, body) if status != 200 else None
    return source[1] if source is not None else ""


async def _wait_for(predicate: Callable[[], bool], bound_s: float) -> float | None:
    """Seconds until ``predicate()`` held (polled every 50 ms), or ``None`` if it did not within ``bound_s``."""
    started = trio.current_time()
    with trio.move_on_after(bound_s):
        while not predicate():  # noqa: ASYNC110 - polls counters that have no event to wait on
            await trio.sleep(0.05)
        return trio.current_time() - started
    return None


@contextmanager
def _request_log(path: Path) -> Iterator[Path]:
    """Every log line of the run, secrets scrubbed, with the request id that the violations name (``soak-N``)."""
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.addFilter(RedactingFilter())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(created).3f %(levelname)s %(name)s: %(request_tag)s%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield path
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _gateway_tasks() -> int:
    return live_tasks(skip="simulator")


def _breaker_closed(gw: TestGateway) -> bool:
    breaker = gw.gateway.pacer.snapshot().get("breaker")
    return not isinstance(breaker, dict) or breaker.get("state") == "closed"


@dataclass
class Probe:
    """The process's numbers at one moment."""

    tasks: int
    fds: int
    upstream_sockets: int
    rss_kib: int
    objects: int  # live objects the garbage collector tracks, after a full collection
    gateway_objects: int  # those of them that are instances of the gateway's own classes (not the simulator's)

    @classmethod
    def take(cls, upstream_port: int) -> Probe:
        gc.collect()
        objects = gc.get_objects()
        ours = sum(1 for o in objects if _is_gateway_object(o))
        return cls(_gateway_tasks(), open_fds(), sockets_on_port(upstream_port), rss_kib(), len(objects), ours)


def _is_gateway_object(obj: object) -> bool:
    module = type(obj).__module__
    return module.startswith("gateway.") and not module.startswith("gateway.simulator")


@dataclass
class Run:
    """What one soak measured besides the tally."""

    before: Probe
    after: Probe
    handshakes: int
    failures: dict[str, int]
    recovered_s: float | None
    relays_with_clients: int
    tasks_settled_s: float | None
    ready_fraction: float  # of the time under faults, how much the session was ready


async def _recover(soak: Soak) -> float | None:
    """Faults off; seconds until the session is ready, ``/health`` 200 and the pacer's breaker closed."""
    gw, tally = soak.gw, soak.tally
    tally.phase = "recovery"
    gw.simulator.faults.reset()
    await gw.simulator.faults.up()
    started = trio.current_time()
    async with httpx.AsyncClient(base_url=gw.url, timeout=5) as probe:
        with trio.move_on_after(RECOVERY_BOUND_S):
            while True:
                ready = gw.manager.active is not None and _breaker_closed(gw)
                if ready and (await probe.get("/health")).status_code == 200:
                    return trio.current_time() - started
                await trio.sleep(0.05)
    tally.violate(f"not ready with /health 200 within {RECOVERY_BOUND_S:g} s of the faults stopping")
    return None


async def _quiet(soak: Soak) -> int:
    """A window without faults: every answer 200, every WebSocket client ticking, one relay per open client."""
    gw, tally = soak.gw, soak.tally
    await _wait_for(lambda: len(tally.ws_open_now) == WS_CLIENTS, WS_CONNECT_BOUND_S)
    tally.phase = "quiet"
    started = trio.current_time()
    await trio.sleep(QUIET_S)
    not_ticking = [i for i in range(WS_CLIENTS) if tally.ws_tick_at.get(i, 0.0) < started]
    if not_ticking:
        tally.violate(f"ws clients {not_ticking} got no tick after the gateway recovered")
    if await _wait_for(lambda: gw.gateway.relays.open == len(tally.ws_open_now), 5) is None:
        tally.violate(f"{gw.gateway.relays.open} relays open for {len(tally.ws_open_now)} open clients")
    return gw.gateway.relays.open


async def _soak(gw: TestGateway, soak: Soak) -> Run:
    tally = soak.tally
    upstream_port = int(gw.simulator_url.rsplit(":", 1)[1])
    # Warm-up: the allocator, the upstream pool, every code path once; then the baseline.
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        rng = random.Random(0)
        for op in (soak.echo_get, soak.echo_post, soak.download, soak.upload) * 3:
            await op(http, rng, Request(op.__name__, soak.next_seq(), -1, "warmup"))
    async with trio.open_nursery() as watchers:
        watchers.start_soon(soak.watch)  # before the baseline: it is one of the tasks counted
        await trio.sleep(0.5)
        before = Probe.take(upstream_port)
        handshakes_before = gw.manager.stats.handshakes
        failures_before = dict(gw.manager.stats.failures)
        states_before = gw.manager.state_seconds()
        tally.statuses.clear()
        tally.phase = "soak"
        async with (
            httpx.AsyncClient(base_url=gw.url, timeout=CLIENT_DEADLINE_S + 10) as http,
            trio.open_nursery() as traffic,
        ):
            for wid in range(HTTP_WORKERS):
                traffic.start_soon(soak.http_worker, http, wid)
            for index in range(WS_CLIENTS):
                traffic.start_soon(soak.ws_client, index)
            await soak.inject_faults(trio.current_time() + SOAK_SECONDS)
            states = {k: v - states_before[k] for k, v in gw.manager.state_seconds().items()}
            ready_fraction = states[State.READY] / max(sum(states.values()), 1e-9)
            recovered_s = await _recover(soak)
            relays_with_clients = await _quiet(soak)
            tally.phase = "stopping"
            soak.stop.set()
        # Every client is closed: the gateway's side must come back to the baseline.
        if await _wait_for(lambda: gw.gateway.relays.open == 0, 5) is None:
            tally.violate(f"{gw.gateway.relays.open} relays still open with no client")
        tasks_settled_s = await _wait_for(lambda: _gateway_tasks() <= before.tasks, SETTLE_BOUND_S)
        after = Probe.take(upstream_port)
        watchers.cancel_scope.cancel()
    soak.collect_records()
    failures = {k: v - failures_before.get(k, 0) for k, v in gw.manager.stats.failures.items()}
    return Run(
        before=before,
        after=after,
        handshakes=gw.manager.stats.handshakes - handshakes_before,
        failures=failures,
        recovered_s=recovered_s,
        relays_with_clients=relays_with_clients,
        tasks_settled_s=tasks_settled_s,
        ready_fraction=ready_fraction,
    )


def _replay_problems(tally: Tally) -> list[str]:
    """Each non-idempotent request against what the simulator accepted."""
    problems: list[str] = []
    for pid, (status, code) in tally.posts.items():
        accepted = tally.accepted.get(pid, 0)
        if accepted > 1:
            problems.append(f"POST {pid} accepted {accepted} times upstream (client saw {status} {code})")
        elif code == "session_renewing" and accepted:
            problems.append(f"POST {pid} answered 503 not re-sent, yet accepted upstream")
        elif status == 200 and accepted != 1:
            problems.append(f"POST {pid} answered 200 but accepted upstream {accepted} times")
    return problems


# Two fds per idle pooled upstream connection (both ends live in this process), at most 20 idle, plus the listener.
MAX_UPSTREAM_SOCKETS = 2 * 20 + 1
MAX_FDS_DELTA = 2
# RSS grew 8-16 MiB over the default 60 s while tracemalloc showed the Python heap flat: allocator high-water and
# fragmentation from the 100-400 kB bodies, and pytest keeping the run's log records. A longer soak keeps more of
# them, so it is allowed proportionally more. The sharp leak checks are the tasks, the fds, and the gateway's objects.
MAX_RSS_GROWTH_MIB = 24 + 12 * max(0.0, SOAK_SECONDS - 60) / 60
# Live instances of the gateway's classes may grow by what is bounded by design: up to 20 idle pooled upstream
# connections and the 10 recent session errors, plus slack; measured ~20. (All live objects together grew by
# 4,000-6,000: pytest's log records, plus what varies with the idle connections' tasks on the simulator's side and
# trio's lazily pruned deadline heap. Reported only.)
MAX_GATEWAY_OBJECT_GROWTH = 40


@pytest.mark.slow
async def test_fault_soak(
    ibkr_sim_credentials: SimulatorCredentials,
    caplog: pytest.LogCaptureFixture,
    figure: Figure,
    artifact: Artifact,
    tmp_path: Path,
) -> None:
    print(f"soak: seed={SEED} (SOAK_SEED to override), {SOAK_SECONDS:g} s of traffic (SOAK_SECONDS)")
    caplog.set_level(logging.DEBUG)
    tally = Tally(seed=SEED)
    started = trio.current_time()
    with _request_log(tmp_path / "soak.log") as log_path, trio.fail_after(SOAK_SECONDS + 60):
        artifact("soak_log", log_path)
        async with open_test_gateway(
            OVERRIDES,
            credentials=ibkr_sim_credentials,
            # IBKR's pacing rule off in the simulator: the soak drives the gateway far above IBKR's 50/s on purpose
            # (the pacer's bookkeeping under faults, above), and a penalty box would end the run at the first
            # burst. The rule itself is proven by test_pacing.py and test_sim_ibkr_rules.py.
            simulator_options={"tick_interval_s": 0.2, "heartbeat_s": 1.0, "pacing": False},
        ) as gw:
            soak = Soak(gw, tally, caplog)
            run = await _soak(gw, soak)
        soak.scan_logs()  # the drain's lines too
    elapsed = trio.current_time() - started
    replay_problems = _replay_problems(tally)
    _figures(figure, tally, run, elapsed, replay_problems)

    before, after = run.before, run.after
    problems = tally.violations + replay_problems
    if after.tasks > before.tasks:
        problems.append(f"gateway tasks {before.tasks} -> {after.tasks} after {SETTLE_BOUND_S:g} s")
    fds_delta = (after.fds - after.upstream_sockets) - (before.fds - before.upstream_sockets)
    if fds_delta > MAX_FDS_DELTA:
        problems.append(f"fds other than upstream sockets grew by {fds_delta}")
    if after.upstream_sockets > MAX_UPSTREAM_SOCKETS:
        problems.append(f"{after.upstream_sockets} sockets to the simulator after the soak (pool keeps <= 20)")
    if after.gateway_objects - before.gateway_objects > MAX_GATEWAY_OBJECT_GROWTH:
        grown = after.gateway_objects - before.gateway_objects
        problems.append(f"{grown} more live instances of the gateway's classes after the soak than before")
    if (after.rss_kib - before.rss_kib) / 1024 > MAX_RSS_GROWTH_MIB:
        problems.append(f"RSS grew by {(after.rss_kib - before.rss_kib) / 1024:.1f} MiB")
    problems += [f"log: {line}" for line in tally.log_problems]
    # The soak itself worked: traffic of every kind got through, and the faults did end sessions.
    served = {key.split(":")[0] for key, count in tally.statuses.items() if key.endswith(":200") and count}
    if served != {"get", "post", "download", "upload"}:
        problems.append(f"no 200 at all for {sorted({'get', 'post', 'download', 'upload'} - served)}")
    if run.handshakes < 1 or not sum(run.failures.values()):
        problems.append("the faults never ended a session: the soak tested nothing")
    assert not problems, f"seed={SEED}: {len(problems)} problem(s):\n" + "\n".join(problems[:40])


def _figures(figure: Figure, tally: Tally, run: Run, elapsed: float, replay_problems: list[str]) -> None:
    before, after = run.before, run.after
    figure("soak_seed", SEED, "seed", "-", True)
    figure("soak_traffic_seconds", SOAK_SECONDS, "s", "-", True)
    figure("soak_test_seconds", round(elapsed, 1), "s", "<120", elapsed < 120)
    figure("soak_requests", tally.requests, "count", ">0", tally.requests > 0)
    for key, count in sorted(tally.statuses.items()):
        kind, status = key.split(":")
        figure(f"soak_{kind}_{'cut' if status == '-1' else status}", count, "count", "-", True)
    for key, count in sorted(tally.sources.items()):
        figure(f"soak_error_{key.replace(':', '_')}", count, "count", "explained", True)
    for key, count in sorted(tally.injected.items()):
        figure(f"soak_fault_{key}", count, "count", "-", True)
    figure("soak_downloads_complete_exact", tally.downloads_complete, "count", "all exact", True)
    figure("soak_downloads_cut", tally.downloads_cut, "count", "seen as errors", True)
    figure("soak_other_answers_cut", tally.other_cuts, "count", "200s only, seen as errors", True)
    figure("soak_non_idempotent_requests", len(tally.posts), "count", "-", True)
    figure("soak_simulator_records_checked", tally.records_seen, "count", "all, none missed", True)
    replays = sum(1 for n in tally.accepted.values() if n > 1)
    figure("soak_replayed", replays, "count", "0", not replay_problems)
    figure("soak_handshakes", run.handshakes, "count", "-", True)
    figure("soak_session_ready_fraction", round(run.ready_fraction, 2), "ratio", "-", True)
    for kind, count in sorted(run.failures.items()):
        figure(f"soak_sessions_ended_{kind}", count, "count", "-", True)
    figure("soak_ws_opened", tally.ws_opened, "count", "-", True)
    figure("soak_ws_messages", tally.ws_messages, "count", "all JSON", True)
    for code, count in sorted(tally.ws_closes.items()):
        figure(f"soak_ws_closed_{code}", count, "count", "1011/1012/1013", code in WS_CLOSE_CODES)
    for http_status, count in sorted(tally.ws_rejects.items()):
        figure(f"soak_ws_refused_http_{http_status}", count, "count", "502/503", http_status in WS_REJECT_STATUSES)
    latencies = sorted(tally.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    figure("soak_max_latency", round(tally.max_latency_s, 3), "s", f"<{CLIENT_DEADLINE_S:g}", True)
    figure("soak_p99_latency", round(p99, 3), "s", "-", True)
    recovered = run.recovered_s
    figure("soak_recovery", round(recovered or -1, 3), "s", f"<={RECOVERY_BOUND_S:g}", recovered is not None)
    figure("soak_relays_with_clients_open", run.relays_with_clients, "count", f"={WS_CLIENTS}", True)
    figure("soak_tasks_before", before.tasks, "count", "-", True)
    figure("soak_tasks_after", after.tasks, "count", f"<={before.tasks}", after.tasks <= before.tasks)
    figure("soak_tasks_settle", round(run.tasks_settled_s or -1, 2), "s", f"<={SETTLE_BOUND_S:g}", True)
    fds_delta = (after.fds - after.upstream_sockets) - (before.fds - before.upstream_sockets)
    figure("soak_fds_before", before.fds, "count", "-", True)
    figure("soak_fds_after", after.fds, "count", "-", True)
    figure("soak_fds_delta_besides_upstream", fds_delta, "count", f"<={MAX_FDS_DELTA}", fds_delta <= MAX_FDS_DELTA)
    ok = after.upstream_sockets <= MAX_UPSTREAM_SOCKETS
    figure("soak_upstream_sockets_after", after.upstream_sockets, "count", f"<={MAX_UPSTREAM_SOCKETS}", ok)
    growth = (after.rss_kib - before.rss_kib) / 1024
    figure("soak_rss_before", round(before.rss_kib / 1024, 1), "MiB", "-", True)
    figure("soak_rss_after", round(after.rss_kib / 1024, 1), "MiB", "-", True)
    ok = growth <= MAX_RSS_GROWTH_MIB
    figure("soak_rss_growth", round(growth, 1), "MiB", f"<={MAX_RSS_GROWTH_MIB:g}", ok)
    samples = tally.rss_during_faults
    if len(samples) >= 4:
        half = len(samples) // 2
        figure("soak_rss_growth_first_half", round((samples[half] - samples[0]) / 1024, 1), "MiB", "-", True)
        figure("soak_rss_growth_second_half", round((samples[-1] - samples[half]) / 1024, 1), "MiB", "-", True)
    figure("soak_objects_growth", after.objects - before.objects, "count", "-", True)
    grown = after.gateway_objects - before.gateway_objects
    ok = grown <= MAX_GATEWAY_OBJECT_GROWTH
    figure("soak_gateway_objects_before", before.gateway_objects, "count", "-", True)
    figure("soak_gateway_objects_growth", grown, "count", f"<={MAX_GATEWAY_OBJECT_GROWTH}", ok)
    figure("soak_log_lines", sum(tally.log_levels.values()), "count", "-", True)
    figure("soak_log_warnings", tally.log_levels["WARNING"], "count", "-", True)
    figure("soak_log_errors_or_tracebacks", len(tally.log_problems), "count", "0", not tally.log_problems)
    figure("soak_violations", len(tally.violations), "count", "0", not tally.violations)
