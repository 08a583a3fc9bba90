"""HTTP load generators: wrk (closed loop), an open-loop fixed-rate client (trio + h11), curl streaming transfers."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import procs
import trio

# ---------------------------------------------------------------- wrk


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run reported."""

    requests: int
    duration_s: float
    rps: float
    latency_ms: dict[str, float]  # "50%", "75%", "90%", "99%"
    socket_errors: int
    non_2xx: int
    raw: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """Parse wrk's text report (run with ``--latency``); raises ValueError when a figure is missing."""
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", output, re.M)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", output, re.M)
    if total is None or rps is None:
        raise ValueError("wrk report has no request count / Requests/sec line")
    latency = {m[1] + "%": _to_ms(m[2]) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(total[1]),
        duration_s=_to_ms(total[2] + total[3]) / 1000.0,
        rps=float(rps[1]),
        latency_ms=latency,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        raw=output,
    )


def run_wrk(wrk: str, url: str, *, threads: int, connections: int, duration_s: int) -> WrkResult:
    """Run ``wrk --latency`` against ``url``; bounded by wrk's own duration plus a timeout margin."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s", "--latency", url]
    done = subprocess.run(  # noqa: S603 - fixed argv
        argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


# ---------------------------------------------------------------- open-loop fixed-rate client


@dataclass
class OpenLoopResult:
    """Latencies of a fixed-rate run; ``latency_ms`` counts from each request's *scheduled* time (no coordinated
    omission), ``service_ms`` from when it was actually written."""

    scheduled: int = 0
    ok: int = 0
    errors: int = 0
    bad_answers: int = 0
    connections_opened: int = 0
    max_in_flight: int = 0
    duration_s: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    service_ms: list[float] = field(default_factory=list)
    first_error: str = ""


class _Conn:
    """One keep-alive HTTP/1.1 client connection (h11 over a trio socket)."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> _Conn:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), f"127.0.0.1:{port}")

    async def get(self, path: str) -> tuple[int, bytes, bool]:
        """GET ``path``; returns (status, body, reusable)."""
        out = self.h11.send(h11.Request(method="GET", target=path, headers=[("Host", self.host)])) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        status = 0
        body = bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed before the response ended")
        reusable = self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE
        if reusable:
            self.h11.start_next_cycle()
        return status, bytes(body), reusable

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


async def open_loop(
    port: int, path: str, *, rate: float, count: int, expect: bytes, grace_s: float = 15.0
) -> OpenLoopResult:
    """Send ``count`` GETs at exactly ``rate``/s (a new one every 1/rate s whatever the completions), reusing idle
    keep-alive connections and opening new ones only when none is idle. Bounded by count/rate + grace_s."""
    result = OpenLoopResult(scheduled=count)
    idle: list[_Conn] = []
    in_flight = 0

    async def one(at: float) -> None:
        nonlocal in_flight
        in_flight += 1
        result.max_in_flight = max(result.max_in_flight, in_flight)
        conn: _Conn | None = None
        try:
            if idle:
                conn = idle.pop()
            else:
                conn = await _Conn.open(port)
                result.connections_opened += 1
            sent = trio.current_time()
            status, body, reusable = await conn.get(path)
            done = trio.current_time()
            if status != 200 or body != expect:
                result.bad_answers += 1
                result.first_error = result.first_error or f"HTTP {status} {body[:120]!r}"
            else:
                result.ok += 1
                result.latency_ms.append((done - at) * 1000.0)
                result.service_ms.append((done - sent) * 1000.0)
            if reusable:
                idle.append(conn)
                conn = None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            result.errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
        finally:
            in_flight -= 1
            if conn is not None:
                await conn.aclose()

    began = time.monotonic()
    try:
        with trio.fail_after(count / rate + grace_s):
            async with trio.open_nursery() as nursery:
                start = trio.current_time() + 0.05
                for index in range(count):
                    at = start + index / rate
                    await trio.sleep_until(at)
                    nursery.start_soon(one, at)
    finally:
        result.duration_s = time.monotonic() - began
        for conn in idle:
            await conn.aclose()
    return result


def run_open_loop(port: int, path: str, *, rate: float, count: int, expect: bytes) -> OpenLoopResult:
    """:func:`open_loop` in its own trio run."""
    return trio.run(lambda: open_loop(port, path, rate=rate, count=count, expect=expect))


# ---------------------------------------------------------------- curl transfers


@dataclass(frozen=True, slots=True)
class Transfer:
    """One streamed transfer and what the watched proxy process did meanwhile."""

    ok: bool
    detail: str
    status: int
    nbytes: int
    seconds: float
    mb_per_s: float
    rss_before_kib: int | None
    rss_after_kib: int | None
    rss_sampled_peak_kib: int | None
    hwm_kib: int | None  # VmHWM after the transfer (reset just before it when the kernel allows)
    hwm_was_reset: bool


def curl_transfer(
    curl: str,
    url: str,
    *,
    size: int,
    upload: Path | None,
    answer_file: Path,
    watch_pid: int | None,
    timeout_s: float,
) -> Transfer:
    """GET ``url`` into /dev/null, or POST ``upload`` streamed from disk (``-T``, never loaded into memory).

    While curl runs, the RSS of ``watch_pid`` is sampled every 20 ms; its VmHWM is reset before and read after.
    """
    write_out = "%{http_code} %{size_download} %{size_upload} %{time_total}"
    argv = [curl, "-sS", "--max-time", str(int(timeout_s)), "-w", write_out, "-H", "Expect:"]
    if upload is None:
        argv += ["-o", "/dev/null", url]
    else:
        argv += ["-X", "POST", "-T", str(upload), "-H", "Content-Type: application/octet-stream"]
        argv += ["-o", str(answer_file), url]
    reset = procs.reset_peak(watch_pid) if watch_pid else False
    rss_before = procs.rss_kib(watch_pid) if watch_pid else None
    peak = rss_before
    began = time.monotonic()
    with subprocess.Popen(  # noqa: S603 - fixed argv
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        while proc.poll() is None:
            if time.monotonic() - began > timeout_s + 10:
                proc.kill()
                break
            if watch_pid and peak is not None:
                peak = max(peak, procs.rss_kib(watch_pid))
            time.sleep(0.02)
        out, err = proc.communicate(timeout=10)
    hwm = procs.hwm_kib(watch_pid) if watch_pid else None
    rss_after = procs.rss_kib(watch_pid) if watch_pid else None
    fields = out.split()
    status = int(fields[0]) if fields and fields[0].isdigit() else 0
    moved = 0
    seconds = 0.0
    if len(fields) == 4:
        moved = int(float(fields[2] if upload is not None else fields[1]))
        seconds = float(fields[3])
    ok = proc.returncode == 0 and status == 200 and moved == size
    detail = "" if ok else f"curl exit {proc.returncode}, HTTP {status}, moved {moved}/{size}: {err.strip()[:200]}"
    if ok and upload is not None:
        try:
            received = json.loads(answer_file.read_text())["received"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            ok, detail = False, f"upload answer unreadable: {exc}"
        else:
            if received != size:
                ok, detail = False, f"sink received {received} of {size} bytes"
    return Transfer(
        ok=ok,
        detail=detail,
        status=status,
        nbytes=moved,
        seconds=seconds,
        mb_per_s=moved / seconds / 1e6 if seconds > 0 else 0.0,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        rss_sampled_peak_kib=peak,
        hwm_kib=hwm,
        hwm_was_reset=reset,
    )
