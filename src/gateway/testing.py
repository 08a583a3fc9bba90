"""A testing API for trio test suites: the gateway and its IBKR simulator on loopback, inside the caller's task tree.

Example (pytest-trio; ``pip install 'ibkr-oauth-gateway[testing]'`` brings pytest and pytest-trio)::

    from gateway.testing import open_test_gateway

    async def test_my_bot_reads_accounts():
        async with open_test_gateway() as gw:
            async with gw.client() as http:
                r = await http.get("/v1/api/iserver/accounts")
            assert r.status_code == 200
            async with gw.websocket() as ws:     # the gateway's /v1/api/ws, as a trio-websocket connection
                print(await ws.get_message())
            gw.simulator.faults.expire_lst()     # rehearse a failure: the gateway re-handshakes by itself
            await gw.restart_session()           # or end the session now and wait for the next one

Contract: :func:`open_test_gateway` starts a simulator and a gateway bound to port 0 on 127.0.0.1, waits (bounded)
until the session is ready unless ``wait_ready=False``, yields a :class:`TestGateway`, and on exit drains the gateway
exactly like SIGTERM does (WebSockets closed 1001, logout upstream). Nothing listens beyond loopback.

Faults (``gw.simulator.faults``, :class:`gateway.simulator.faults.Faults`) take effect at once and are plain calls,
except three that wait for sockets and must be awaited: ``await faults.down()``, ``await faults.up()`` and
``await faults.close_websockets(code, reason)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection

from gateway.config.load import LoadedConfig
from gateway.config.parse import parse_config
from gateway.config.render import DEFAULT_ROUTES
from gateway.errors import ConfigError
from gateway.runtime import Gateway, serve_gateway
from gateway.session.paths import WEBSOCKET_PATH
from gateway.session.supervisor import SessionManager
from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials
from gateway.testing_websocket import open_websocket

TEST_ROUTES: tuple[Mapping[str, object], ...] = (*DEFAULT_ROUTES, {"path": "/v1/api/sim/*", "max_body_bytes": 1 << 34})
"""The default routes plus the simulator's echo/stream/upload routes (``/v1/api/sim/*``, large uploads allowed)."""

_TEST_DEFAULTS: dict[str, dict[str, object]] = {
    "session": {"reconnect_delay_s": 0.05, "reconnect_max_delay_s": 1, "ready_timeout_s": 5},
    # The simulator enforces IBKR's limits (50 requests/s, per-endpoint limits, a penalty box after a 429), so the
    # gateway paces as it would toward IBKR: 40/s leaves room for the session's own calls; a short breaker keeps a
    # test that provokes a 429 from waiting IBKR's ten minutes.
    "pacing": {
        "enabled": True,
        "global_requests_per_s": 40,
        "global_burst": 40,
        "breaker_cooldown_s": 2,
        "breaker_max_cooldown_s": 8,
    },
    "logging": {"level": "debug"},
}


@dataclass(frozen=True, slots=True)
class TestGateway:
    """A running test gateway: its URLs, a client and a WebSocket to it, its ``simulator`` (faults and records)."""

    __test__ = False  # not a pytest test class

    gateway: Gateway
    simulator: Simulator

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the gateway."""
        return self.gateway.url

    @property
    def ws_url(self) -> str:
        """The gateway's WebSocket endpoint, ``ws://127.0.0.1:PORT/v1/api/ws``."""
        return self.gateway.ws_url

    @property
    def ws_base_url(self) -> str:
        """``ws://127.0.0.1:PORT`` of the gateway, for other paths (``ws_base_url + "/v1/api/other"``)."""
        return self.gateway.ws_base_url

    @property
    def simulator_url(self) -> str:
        """The simulator's own base URL (what the gateway talks to)."""
        return self.gateway.upstream_url

    @property
    def manager(self) -> SessionManager:
        """The gateway's session manager (state, stats, ``wait_ready``)."""
        return self.gateway.manager

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` pointed at the gateway (caller closes it, e.g. ``async with``)."""
        kwargs.setdefault("timeout", 10.0)
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    @asynccontextmanager
    async def websocket(
        self,
        path: str = WEBSOCKET_PATH,
        *,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        subprotocols: Sequence[str] = (),
        max_message_size: int = 1 << 20,
        timeout_s: float = 10.0,
    ) -> AsyncIterator[WebSocketConnection]:
        """``async with gw.websocket() as ws:`` — a trio-websocket connection to the gateway's ``path`` (default
        :attr:`ws_url`'s ``/v1/api/ws``; a query string may follow the path).

        The handshake is bounded by ``timeout_s`` (``trio.TooSlowError``); a refused upgrade raises trio-websocket's
        ``ConnectionRejected`` (status and the gateway's JSON reason in ``body``). On exit the WebSocket is closed
        and its TCP socket with it — also when the gateway closed first, which trio-websocket's
        ``open_websocket_url`` leaves open (see :mod:`gateway.testing_websocket`).
        """
        async with open_websocket(
            self.ws_base_url + path,
            extra_headers=list(extra_headers),
            subprotocols=subprotocols,
            max_message_size=max_message_size,
            connect_timeout_s=timeout_s,
        ) as ws:
            yield ws

    async def restart_session(self, timeout_s: float = 10.0) -> int:
        """End the gateway's IBKR session now, as a failure would, and wait for the next ready one (a full
        handshake: live session token, brokerage session, warm-up); returns its generation. Relay-mode WebSockets
        are closed with 1012, shared-mode clients hear the restart notices; HTTP requests in flight get 503."""
        session = await self.manager.wait_ready(timeout_s)
        session.end("restarted by the test (TestGateway.restart_session)", kind="other")
        return await self.wait_new_session(session.generation, timeout_s)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until the gateway holds a ready session and its warm-up is done, the background
        ``/portfolio/accounts`` read included (raises ``SessionNotReady`` after ``timeout_s``), so the simulator's
        records that follow are the test's own."""
        session = await self.manager.wait_ready(timeout_s)
        with trio.fail_after(timeout_s):
            await session.portfolio_read.wait()

    async def wait_new_session(self, after_generation: int, timeout_s: float = 10.0) -> int:
        """Wait for a ready session newer than ``after_generation`` (a new handshake or a re-opened brokerage
        session); returns its generation."""
        with trio.fail_after(timeout_s):
            while True:
                session = await self.manager.wait_ready(timeout_s)
                if session.generation > after_generation:
                    return session.generation
                await self.manager.wait_changed()


def make_test_config(
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    *,
    routes: Sequence[Mapping[str, object]] = TEST_ROUTES,
) -> LoadedConfig:
    """A simulator-mode config with fast back-off for tests; ``overrides`` are merged per section.

    Raises :class:`~gateway.errors.ConfigError` for bad overrides, like a bad config file would.
    """
    sections: dict[str, dict[str, object]] = {section: dict(values) for section, values in _TEST_DEFAULTS.items()}
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    sections.setdefault("simulator", {})["enabled"] = True
    sections["server"] = {"host": "127.0.0.1", "port": 0, **sections.get("server", {})}
    data: dict[str, object] = {**sections, "routes": [dict(route) for route in routes]}
    config, warnings = parse_config(data, source="<test config>", base_dir=Path.cwd(), env={})
    if any(w.severity == "error" for w in warnings):  # pragma: no cover - parse_config raises instead
        raise ConfigError(warnings)
    return LoadedConfig(config=config, credentials=None, warnings=tuple(warnings), api_keys=config.server.api_keys)


@asynccontextmanager
async def open_test_gateway(
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    *,
    routes: Sequence[Mapping[str, object]] = TEST_ROUTES,
    credentials: SimulatorCredentials | None = None,
    simulator_options: Mapping[str, Any] | None = None,
    wait_ready: bool = True,
    start_timeout_s: float = 15.0,
) -> AsyncIterator[TestGateway]:
    """Run a simulator and a gateway for the body of the ``async with``; see the module contract.

    ``credentials`` lets a suite reuse one set of throwaway keys (RSA generation costs ~0.3 s);
    ``simulator_options`` go to :class:`~gateway.simulator.Simulator` (e.g. ``lst_ttl_s``, ``tick_interval_s``,
    ``accounts_first``; ``ws_idle_close_s`` shortens, or with ``None`` switches off, the simulator's close of silent
    WebSockets) and win over the ``[simulator]`` section of ``overrides``.
    """
    loaded = make_test_config(overrides, routes=routes)
    options: dict[str, Any] = {**loaded.config.simulator.simulator_options(), **(simulator_options or {})}
    simulator = Simulator(credentials or generate_credentials(), **options)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(start_timeout_s):
            gateway: Gateway = await nursery.start(
                partial(serve_gateway, loaded, host="127.0.0.1", port=0, simulator=simulator)
            )
            handle = TestGateway(gateway=gateway, simulator=simulator)
            if wait_ready:
                await handle.wait_ready(start_timeout_s)
        try:
            yield handle
        finally:
            gateway.request_shutdown()
            with trio.move_on_after(30) as scope:
                scope.shield = True
                await gateway.wait_stopped()
            nursery.cancel_scope.cancel()
