"""The simulator handle: serve the ASGI app with hypercorn's trio worker, go down and up on the same port, and
expose faults, records and counters to tests and to the gateway.

Readiness is reported through ``task_status`` (``url = await nursery.start(sim.serve, "127.0.0.1", 0)``).
"down" cancels the running hypercorn instance - listener and every connection, as an upstream crash would -
and "up" starts a new one bound to the same port.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import hypercorn.trio
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config

from gateway.simulator.app import SimulatorApp
from gateway.simulator.core import SimConfig, SimCore, WsMessage
from gateway.simulator.credentials import ServerView, SimulatorCredentials, write_credentials
from gateway.simulator.faults import Faults
from gateway.simulator.market import Market
from gateway.simulator.records import Record
from gateway.simulator.verify import QueryRule

log = logging.getLogger("gateway.simulator")


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Simulator:
    """An in-process IBKR Web API simulator (server side of the OAuth 1.0a variant, REST and WebSocket).

    IBKR's session rules, each switchable: ``accounts_first`` (snapshot and order calls answer 400 "Please query
    /accounts first" until ``/iserver/accounts`` was read in the brokerage session; ``/portfolio/{acct}/...``
    likewise until ``/portfolio/accounts`` was read with the current LST), ``snapshot_preflight`` (a conid's first
    snapshot in a brokerage session has no price fields) and ``pacing`` (IBKR's global and per-endpoint limits,
    429 and then ``penalty_box_s`` seconds of 429 for everything). ``paper`` is the account's ``isPaper`` in
    ``/iserver/accounts`` and on the WebSocket: ``True`` (a paper account, the default), ``False`` (live) or ``None``
    (the field left out).

    Only :class:`~gateway.simulator.credentials.ServerView` - what IBKR's server knows - reaches the protocol
    code; the client half of ``creds`` is kept solely so :meth:`write_credentials` can hand it out.

    Misconfiguration modes, for first-contact diagnosis (each makes ``creds`` wrong the way a user's set-up can
    be): ``consumer_active=False`` (the consumer key is unknown or not active yet: every request 401 "invalid
    consumer"), ``registered_signature_key`` (the portal holds another public signature key),
    ``registered_dh_prime`` (other DH parameters were registered), ``clock_skew_s`` (IBKR's clock - its ``Date``
    header and the timestamp window - differs from this machine's), ``accepted_query_rules`` (which query-signing
    rules IBKR accepts; default: by ``lenient``) and ``terse_errors`` (401 bodies as terse as IBKR's:
    ``{"error": "id: N, error: invalid signature", "statusCode": 401}``).
    """

    def __init__(
        self,
        creds: SimulatorCredentials,
        lenient: bool = False,
        lst_ttl_s: float = 86400,
        heartbeat_s: float = 10,
        tick_interval_s: float = 1.0,
        subscription_ttl_s: float = 900,
        *,
        timestamp_window_s: float = 300,
        accounts_first: bool = True,
        snapshot_preflight: bool = True,
        pacing: bool = True,
        penalty_box_s: float = 600,
        paper: bool | None = True,
        seed: int | None = None,
        ws_binary: bool = False,
        ws_idle_close_s: float | None = 60.0,
        clock: Callable[[], float] = time.time,
        accepted_query_rules: Sequence[QueryRule] | None = None,
        consumer_active: bool = True,
        registered_signature_key: rsa.RSAPublicKey | None = None,
        registered_dh_prime: int | None = None,
        clock_skew_s: float = 0.0,
        terse_errors: bool = False,
    ) -> None:
        self._creds = creds
        config = SimConfig(
            lenient=lenient,
            lst_ttl_s=lst_ttl_s,
            heartbeat_s=heartbeat_s,
            tick_interval_s=tick_interval_s,
            subscription_ttl_s=subscription_ttl_s,
            timestamp_window_s=timestamp_window_s,
            ws_idle_close_s=ws_idle_close_s,
            accounts_first=accounts_first,
            snapshot_preflight=snapshot_preflight,
            pacing=pacing,
            penalty_box_s=penalty_box_s,
            accepted_query_rules=tuple(accepted_query_rules) if accepted_query_rules is not None else None,
            consumer_active=consumer_active,
            terse_errors=terse_errors,
            paper=paper,
        )
        view = ServerView.from_credentials(creds)
        if registered_signature_key is not None:
            view = replace(view, signature_public_key=registered_signature_key)
        if registered_dh_prime is not None:
            view = replace(view, dh_prime=registered_dh_prime)
        self.faults = Faults(self)
        self._core = SimCore(
            view=view,
            config=config,
            faults=self.faults,
            market=Market(seed),
            clock=(lambda: clock() + clock_skew_s) if clock_skew_s else clock,
            ws_binary=ws_binary,
        )
        self._app = SimulatorApp(self._core)
        self._nursery: trio.Nursery | None = None
        self._host: str | None = None
        self._port: int | None = None
        self._url: str | None = None
        self._listener_scope: trio.CancelScope | None = None
        self._listener_done: trio.Event | None = None
        self._updown = trio.Lock()

    def __repr__(self) -> str:
        return f"Simulator(url={self._url!r}, lenient={self._core.config.lenient})"

    # ------------------------------------------------------------------ read-only views

    @property
    def credentials(self) -> SimulatorCredentials:
        """The client half of the throwaway credentials (what a gateway configures to talk to this simulator)."""
        return self._creds

    @property
    def url(self) -> str | None:
        """``http://host:port`` once serving (kept while down), else None."""
        return self._url

    @property
    def records(self) -> list[Record]:
        """Every retained request record, oldest first (full headers, unredacted)."""
        return self._core.recorder.records

    @property
    def counts(self) -> dict[str, int]:
        """Requests received per endpoint (e.g. ``/v1/api/tickle``; ``unknown`` for no route)."""
        return self._core.recorder.counts

    @property
    def ws_messages(self) -> list[WsMessage]:
        """Messages received on WebSockets."""
        return list(self._core.ws_messages)

    @property
    def current_session(self) -> str | None:
        """The tickle ``session`` value (the WebSocket ``api`` cookie), or None."""
        return self._core.state.session_id

    @property
    def bridge(self) -> bool:
        """True while a brokerage session (``ssodh/init``) is open."""
        return self._core.state.bridge

    @property
    def lst_expires_ms(self) -> int | None:
        """Expiration (epoch ms) of the current live session token, or None before the first one."""
        return self._core.state.lst_expires_ms if self._core.state.lst is not None else None

    @property
    def websocket_count(self) -> int:
        """Number of open WebSockets."""
        return len(self._core.hub)

    @property
    def ws_binary(self) -> bool:
        """Whether JSON goes out in binary frames (IBKR sometimes does that)."""
        return self._core.ws_binary

    @ws_binary.setter
    def ws_binary(self, value: bool) -> None:
        self._core.ws_binary = value

    @property
    def app(self) -> SimulatorApp:
        """The ASGI application (for driving it without sockets)."""
        return self._app

    def per_second(self, endpoint: str | None = None) -> dict[int, int]:
        """Retained requests (optionally of one endpoint) per wall-clock second: ``{epoch_second: count}``."""
        out: dict[int, int] = {}
        for record in self._core.recorder.records:
            if record.method != "WS" and (endpoint is None or record.endpoint == endpoint):
                second = int(record.time)
                out[second] = out.get(second, 0) + 1
        return out

    def clear_records(self) -> None:
        """Forget records and counters."""
        self._core.recorder.clear()

    def write_credentials(self, directory: str | os.PathLike[str], gateway_port: int = 5000) -> Path:
        """Write the client half (PEMs, ``gateway.toml`` pointing at this simulator) into ``directory``.

        Needs the simulator to be serving (the TOML records its URL). Returns the TOML's path.
        """
        if self._url is None:
            raise RuntimeError("write_credentials needs a serving simulator (its URL goes into the TOML)")
        return write_credentials(self._creds, directory, base_url=self._url, gateway_port=gateway_port)

    # ------------------------------------------------------------------ serving

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (0 = any free port) and serve until cancelled.

        Reports ``"http://host:port"`` through ``task_status`` once the socket accepts connections.
        """
        if self._nursery is not None:
            raise RuntimeError("this simulator is already serving")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._host = host
                self._core.schedule_down = self._schedule_down
                url = await nursery.start(self._listen, host, port)
                task_status.started(url)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._core.schedule_down = None
            self._listener_scope = None

    def _hypercorn_config(self, host: str, port: int) -> Config:
        config = Config()
        config.bind = [_bind(host, port)]
        config.h11_pass_raw_headers = True  # record header names as received
        config.include_server_header = False
        config.include_date_header = False  # the app sends its own, from its (possibly skewed) clock
        config.accesslog = None
        config.errorlog = logging.getLogger("gateway.simulator.hypercorn")
        config.graceful_timeout = 1.0
        return config

    async def _listen(self, host: str, port: int, *, task_status: trio.TaskStatus[str]) -> None:
        done = trio.Event()
        scope = trio.CancelScope()
        self._listener_scope, self._listener_done = scope, done
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(
                        partial(hypercorn.trio.serve, cast("Any", self._app), self._hypercorn_config(host, port))
                    )
                    url = str(binds[0])
                    self._port = int(url.rsplit(":", 1)[1])
                    self._url = url
                    log.info("simulator listening on %s", url)
                    task_status.started(url)
        finally:
            done.set()

    async def go_down(self) -> None:
        """FaultHooks: cancel the hypercorn instance; returns once the listening socket is closed."""
        async with self._updown:
            scope, done = self._listener_scope, self._listener_done
            if scope is None or done is None or done.is_set():
                return
            scope.cancel()
            await done.wait()
            log.info("simulator down (fault)")

    async def go_up(self) -> None:
        """FaultHooks: listen again on the same port; returns once connections are accepted."""
        async with self._updown:
            if self._nursery is None or self._host is None or self._port is None:
                raise RuntimeError("the simulator is not serving")
            if self._listener_done is not None and not self._listener_done.is_set():
                return
            await self._nursery.start(self._listen, self._host, self._port)
            log.info("simulator up again")

    def _schedule_down(self, seconds: float) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._down_for, seconds)

    async def _down_for(self, seconds: float) -> None:
        await trio.sleep(0.1)  # let the admin reply leave before the listener (and its connection) goes
        await self.faults.down()
        await trio.sleep(seconds)
        await self.faults.up()

    def expire_lst(self) -> None:
        """FaultHooks: expire the current live session token now."""
        self._core.state.expire_lst(self._core.now_ms())

    def set_other_session(self, active: bool) -> None:
        """FaultHooks: another platform takes (or leaves) the brokerage session."""
        if active:
            self._core.state.take_elsewhere()
        else:
            self._core.state.held_elsewhere = False

    def end_brokerage_session(self) -> None:
        """FaultHooks: the brokerage session ends (nightly reset)."""
        self._core.state.end_bridge()

    async def close_websockets(self, code: int, reason: str) -> int:
        """FaultHooks: close every open WebSocket with ``code``."""
        return await self._core.hub.close_all(code, reason)
