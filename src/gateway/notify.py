"""Tells systemd how the gateway is doing over the sd_notify protocol (``NOTIFY_SOCKET``), with no dependency.

The protocol (systemd's ``sd_notify(3)``): newline-separated ``KEY=VALUE`` assignments in one datagram on the
``AF_UNIX`` ``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` — a path, or an abstract-namespace name written with a
leading ``@``. The gateway sends ``READY=1`` (with ``MAINPID``) once it listens, ``STATUS=…`` lines as its session
changes state, ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while its event loop runs, and ``STOPPING=1`` when the
graceful drain starts.

Contract: the pure helpers (:func:`encode`, :func:`socket_address`, :func:`watchdog_interval_s`,
:func:`status_line`) do no I/O. :class:`Notifier` never raises: without ``NOTIFY_SOCKET`` it does nothing, and a
socket that cannot be reached logs one warning (the first failure) and is retried silently afterwards, so a
passing fault does not silence the watchdog for good. A send never blocks the event loop (non-blocking socket).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from gateway.logs import scrub

log = logging.getLogger("gateway.notify")

STATUS_MAX_CHARS = 200


def encode(fields: Mapping[str, str | int]) -> bytes:
    """One notification datagram: ``KEY=VALUE`` lines in the given order.

    Keys are upper-case names; a value must be a single line (a newline would start a new assignment), so one is
    rejected with :class:`ValueError` rather than sent half-understood.
    """
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"sd_notify key {key!r} is not an upper-case name")
        if "\n" in text or "\0" in text:
            raise ValueError(f"sd_notify value of {key} must be one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


def socket_address(value: str | None) -> str | bytes | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``: a filesystem path, or ``b"\\0name"`` for ``@name``.

    Returns ``None`` when the variable is unset or empty (not running under systemd's notify supervision).
    Raises :class:`ValueError` for a value that is neither (systemd only hands out those two forms).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    raise ValueError("NOTIFY_SOCKET is neither an absolute path nor an @abstract name")


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``), or ``None`` when no watchdog is asked of us.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for; any other process must not ping.
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1_000_000


def status_line(state: str, *, generation: int = 0, last_error: str = "", listening: str = "") -> str:
    """One short human line for ``systemctl status`` (no secrets: only what ``/session`` shows anyway)."""
    text = f"IBKR session {state}"
    if state == "ready" and generation:
        text += f" (session #{generation})"
    elif state in ("backoff", "handshaking") and last_error:
        text += f"; last error: {last_error}"
    if listening:
        text += f"; listening on {listening}"
    text = " ".join(text.split())  # one line whatever the error text held
    return text if len(text) <= STATUS_MAX_CHARS else text[: STATUS_MAX_CHARS - 1] + "…"


class Notifier:
    """Sends sd_notify datagrams to ``$NOTIFY_SOCKET``; see the module contract."""

    def __init__(self, address: str | bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for this process as systemd started it (a disabled one outside systemd)."""
        env = os.environ if env is None else env
        try:
            address = socket_address(env.get("NOTIFY_SOCKET"))
        except ValueError as exc:
            log.warning("systemd notifications disabled: %s", exc)
            address = None
        return cls(address, watchdog_s=watchdog_interval_s(env, os.getpid()))

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; returns whether it was delivered (never raises)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            # Scrubbed like a log line: a status may quote an upstream error text.
            self._sock.sendto(encode({key: scrub(str(value)) for key, value in fields.items()}), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                where = self.address if isinstance(self.address, str) else "@" + self.address[1:].decode()
                log.warning("cannot notify systemd at %s: %s (further failures are not logged)", where, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1`` with our pid and a first status line."""
        return self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def status(self, status: str) -> bool:
        """A new ``STATUS=`` line."""
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.send(WATCHDOG=1)

    def stopping(self, status: str) -> bool:
        """``STOPPING=1``: the graceful drain has begun."""
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        """Release the socket (idempotent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
