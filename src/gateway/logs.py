"""Logging to stderr in text or JSON, with third-party loggers capped and known secrets scrubbed.

Contract: after :func:`configure_logging`, every record from any logger passes through :class:`RedactingFilter`,
which replaces each registered secret (raw, base64, hex and URL-encoded forms) with ``***`` before formatting.
Secrets are registered with :func:`register_secret` as soon as they exist (access-token secret, prepend, LST,
session cookie, access token). This is defence in depth: the code never logs secrets on purpose.
Third-party loggers (httpx, httpcore, hpack, trio-websocket, hypercorn access) are capped at WARNING because
they log URLs and headers at lower levels. Every record also gets ``request_id`` (:data:`REQUEST_ID`, set by the
dispatcher for the request being handled; trio tasks inherit it): ``[id]`` in text lines, a field in JSON lines.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import TextIO
from urllib.parse import quote

THIRD_PARTY_LOGGERS = ("httpx", "httpcore", "hpack", "trio-websocket", "trio_websocket", "hypercorn.access", "quart")

_lock = threading.Lock()
_secrets: set[str] = set()
_rotating: dict[str, list[set[str]]] = {}
_KEEP_PER_SLOT = 2

REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
"""The id of the HTTP request (or WebSocket upgrade) the current task is handling; ``None`` outside requests."""

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(request_tag)s%(message)s"


def secret_forms(value: str | bytes) -> set[str]:
    """The textual forms a secret could appear in: itself, base64, hex and URL-encoded."""
    raw = value.encode() if isinstance(value, str) else value
    forms = {base64.b64encode(raw).decode(), raw.hex()}
    if isinstance(value, str):
        forms |= {value, quote(value, safe="")}
    else:
        with contextlib.suppress(UnicodeDecodeError):
            forms.add(raw.decode("ascii"))
    return {form for form in forms if len(form) >= 8}


def register_secret(value: str | bytes, *, slot: str | None = None) -> None:
    """Scrub ``value`` (in all its forms) from every log record from now on.

    Values that are replaced over time (the live session token, the session cookie) name a ``slot``: only the
    newest two per slot are kept, so a long-running gateway's list does not grow without bound.
    """
    forms = secret_forms(value)
    with _lock:
        if slot is None:
            _secrets.update(forms)
            return
        history = _rotating.setdefault(slot, [])
        history.append(forms)
        if len(history) > _KEEP_PER_SLOT:
            _secrets.difference_update(history.pop(0))
        _secrets.update(forms)


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message once, scrubs registered secrets from it and from exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            try:
                message = record.getMessage()
            except Exception:  # a malformed log call: report it, never raise into the caller
                message = f"{record.msg!s} (unformattable arguments: {record.args!r})"
            record.msg = scrub(message)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the id or ``None``) and ``request_tag`` (``"[id] "`` or ``""``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_tag = f"[{request_id}] " if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ``request_id`` when handling a request, and the
    exception text if any."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            payload["request_id"] = request_id
        if record.exc_text:
            payload["exception"] = record.exc_text
        elif record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> logging.Handler:
    """Send all logs to ``stream`` (stderr) at ``level`` in ``fmt`` (``text`` or ``json``); returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level: str) -> None:
    """Set the root level (``debug`` … ``error``), keeping third-party loggers capped at WARNING."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
