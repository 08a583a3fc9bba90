"""Start, stop and measure the benchmark's subprocesses: process groups, log files, waits and /proc figures."""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
WANTED_NOFILE = 65536


class StepFailed(Exception):
    """A benchmark step failed; ``log`` names the component whose log tail explains it (if any)."""

    def __init__(self, step: str, detail: str, proc: Proc | None = None) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail
        self.proc = proc


def raise_nofile(wanted: int = WANTED_NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE (inherited by every child started after) and return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):  # not root: go as far as the hard limit allows
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(eq=False)
class Proc:
    """A subprocess in its own process group, with stdout and stderr going to ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started_at: float  # time.monotonic() just before the spawn

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the log (empty when there is none)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 10.0) -> int | None:
        """Signal the whole process group, wait up to ``timeout_s``, then SIGKILL the group; returns the status."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children left in the group (e.g. an nginx worker whose master died) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode


def start(name: str, argv: Sequence[str], log: Path, *, env: Mapping[str, str] | None = None) -> Proc:
    """Start ``argv`` in a new process group with output to ``log`` (no stdin)."""
    with log.open("ab") as out:
        began = time.monotonic()
        popen = subprocess.Popen(  # noqa: S603 - argv is built by the harness, never from input
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            process_group=0,
        )
    return Proc(name=name, popen=popen, log=log, started_at=began)


class Group:
    """Every process the harness started, stopped in reverse order of start (or an explicit order)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        """Track ``proc`` so :meth:`stop_all` stops it."""
        self.procs.append(proc)
        return proc

    def stop_all(self) -> dict[str, int | None]:
        """Stop everything still running, last started first; returns exit statuses by name."""
        statuses: dict[str, int | None] = {}
        for proc in reversed(self.procs):
            timeout = 25.0 if proc.name == "gateway" else 10.0  # the gateway drains, then logs out
            statuses[proc.name] = proc.stop(timeout_s=timeout)
        return statuses


# ---------------------------------------------------------------- waits


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """One GET to 127.0.0.1:port (status, body); raises OSError or http.client errors."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_http_ok(step: str, proc: Proc, port: int, path: str, timeout_s: float, poll_s: float = 0.01) -> float:
    """Poll ``GET path`` until 200; returns time.monotonic() of the first 200. Raises StepFailed on exit/timeout."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StepFailed(step, f"{proc.name} exited with status {proc.popen.returncode}", proc)
        try:
            status, body = http_get(port, path, timeout_s=1.0)
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return time.monotonic()
            last = f"HTTP {status} {body[:200]!r}"
        time.sleep(poll_s)
    raise StepFailed(step, f"{proc.name}: GET {path} not 200 within {timeout_s:g} s (last: {last})", proc)


def wait_port(step: str, proc: Proc, port: int, timeout_s: float) -> None:
    """Wait until 127.0.0.1:port accepts a TCP connection."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StepFailed(step, f"{proc.name} exited with status {proc.popen.returncode}", proc)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise StepFailed(step, f"{proc.name}: port {port} not accepting within {timeout_s:g} s", proc)


def wait_file(step: str, proc: Proc, path: Path, timeout_s: float) -> None:
    """Wait until ``path`` exists and is not empty."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StepFailed(step, f"{proc.name} exited with status {proc.popen.returncode}", proc)
        if path.exists() and path.stat().st_size > 0:
            return
        time.sleep(0.02)
    raise StepFailed(step, f"{proc.name}: {path} not written within {timeout_s:g} s", proc)


# ---------------------------------------------------------------- /proc figures


def cpu_ms(pid: int) -> float:
    """User + system CPU time of the whole process (all threads), in milliseconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after "pid (comm)"
    return (utime + stime) * 1000.0 / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    """Resident set size now, KiB."""
    return status_kib(pid, "VmRSS")


def hwm_kib(pid: int) -> int:
    """Peak resident set size (since start or the last :func:`reset_peak`), KiB."""
    return status_kib(pid, "VmHWM")


def reset_peak(pid: int) -> bool:
    """Reset the peak RSS (``echo 5 > /proc/<pid>/clear_refs``); False when the kernel or permissions refuse."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def fd_count(pid: int) -> int:
    """Open file descriptors of the process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> int | None:
    """The process's soft ``Max open files`` from /proc/<pid>/limits (None if unlimited or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return int(value) if value.isdigit() else None
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/*/stat)."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)
