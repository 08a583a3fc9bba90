"""A client's ``/v1/api/tickle``, answered by the gateway from its own session; never forwarded to IBKR.

The gateway tickles IBKR itself (:mod:`gateway.session.supervisor`), so a client's tickle needs no upstream call —
and IBKR's answer must not reach a client as is: its ``session`` value is the brokerage session's cookie. Clients
written for IBKR's Client Portal Gateway still call it, some to read ``session`` before they open a WebSocket
(which the relay authenticates with its own cookie, whatever the client sends).

Contract: waits (``ready_timeout_s``) for a ready session like a proxied request, then answers 200 with IBKR's
latest tickle answer in which ``session`` is an opaque value: 32 hex digits, the same for every client for the
life of one session and different for the next one, derived from nothing IBKR sent. No session in time → 503
``session_not_ready`` with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from gateway.asgi import Receive, Scope, Send, send_error, send_json
from gateway.errors import SessionNotReady
from gateway.session.supervisor import SessionManager


class LocalTickle:
    """The ASGI app the dispatcher hands a client's tickle to; see the module contract."""

    def __init__(self, manager: SessionManager, ready_timeout_s: float) -> None:
        self._manager = manager
        self._ready_timeout_s = ready_timeout_s
        self._key = secrets.token_bytes(32)  # per process: the opaque value says nothing but "which session"

    def session_value(self, generation: int) -> str:
        """The opaque ``session`` value clients see for session ``generation``."""
        return hmac.new(self._key, str(generation).encode(), hashlib.sha256).hexdigest()[:32]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one tickle (any method the route allows; a body, if any, is ignored)."""
        try:
            session = await self._manager.wait_ready(self._ready_timeout_s, brokerage=False)
        except SessionNotReady as exc:
            hint = str(self._manager.retry_after_s()).encode()
            await send_error(send, exc.status, exc.code, str(exc), headers=[(b"retry-after", hint)])
            return
        answer = {**self._manager.last_tickle, "session": self.session_value(session.generation)}
        await send_json(send, 200, json.dumps(answer).encode())
