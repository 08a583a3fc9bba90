"""Composition root: builds the gateway from a loaded config and runs it in one trio task tree.

::

    serve_gateway ── root nursery ── simulator (only when [simulator] enabled)
                                  ├── systemd watchdog + status line (only under systemd, see gateway.notify)
                                  ├── WebSocketRelay.run                   client writers of relays, write deadlines
                                  │   (or SharedHub.run in shared mode:    client writers, timer, per-session loop
                                  │    that starts IBKR's one socket in each session's nursery)
                                  ├── web.server.serve(Dispatcher)         listening socket: survives session restarts
                                  └── SessionManager.run ── per-session nursery (tickle, refresh, relay tasks)

Contract: :func:`serve_gateway` reports a :class:`Gateway` handle through ``task_status`` once the socket is
bound and the session loop runs (not necessarily ready). :meth:`Gateway.request_shutdown` drains: the session
ends with 1001 to WebSocket clients, ``/health`` turns 503, hypercorn stops accepting and lets in-flight requests
finish, then the gateway logs out of IBKR and everything stops. :meth:`Gateway.apply_config` swaps in what a
reloaded config may change live (:mod:`gateway.config.reload`) without touching the session, relays or
connections. :func:`run_gateway` is the process entry point: it handles SIGINT/SIGTERM (drain) and SIGHUP (reload
the config file) and returns the exit status. Under systemd it sends ``READY=1`` once the socket listens
and the session loop runs (not when IBKR is reachable: an IBKR outage must not make systemd restart the gateway),
``STATUS=`` on every session state change, ``WATCHDOG=1`` from the event loop, and ``STOPPING=1`` as the drain starts.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import ssl
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import cast

import httpx
import trio
from hypercorn.config import Config as HypercornConfig

from gateway.asgi import ASGIApp
from gateway.config.exposure import exposure_problem
from gateway.config.load import LoadedConfig, load_config
from gateway.config.model import Config, Credentials, ServerConfig
from gateway.config.pacing import pacing_settings
from gateway.config.reload import ReloadPlan, plan_reload
from gateway.edge.auth import ApiKeys
from gateway.errors import ConfigError, ListenError
from gateway.logs import configure_logging, register_secret, set_level
from gateway.metrics import RequestMetrics
from gateway.notify import Notifier, status_line
from gateway.oauth.basestring import QueryRule
from gateway.oauth.dh import parse_dh_params_pem
from gateway.oauth.keys import decrypt_access_token_secret, load_rsa_private_key
from gateway.oauth.signer import OAuthIdentity
from gateway.pacing import Pacer
from gateway.proxy.http import HttpProxy, ProxySettings
from gateway.proxy.websocket import RelayCounters, RelaySettings, WebSocketRelay
from gateway.redact import Secret
from gateway.session.paths import WEBSOCKET_PATH
from gateway.session.state import Backoff
from gateway.session.supervisor import SessionManager, SessionSettings
from gateway.shared.feed import FeedSettings
from gateway.shared.hub import SharedHub, SharedSettings
from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials
from gateway.upstream.client import build_client
from gateway.upstream.http1 import Http1Pool
from gateway.upstream.transport import Timeouts, tls_context
from gateway.web.dispatch import Dispatcher, DispatchSettings
from gateway.web.examples import ExamplesApp
from gateway.web.metrics import MetricsPage
from gateway.web.pages import build_pages_app
from gateway.web.server import serve as serve_http
from gateway.web.status import StatusSource
from gateway.web.tickle import LocalTickle

log = logging.getLogger("gateway")

MAX_WS_MESSAGE_BYTES = 1 << 20
GRACEFUL_TIMEOUT_S = 20.0
UPSTREAM_MAX_CONNECTIONS = 100


@dataclass(eq=False)
class Gateway:
    """A running gateway: where it listens, its session manager, and (in simulator mode) the simulator."""

    url: str
    config: Config
    manager: SessionManager
    relays: RelayCounters
    upstream_url: str
    dispatcher: Dispatcher
    pacer: Pacer
    metrics: RequestMetrics
    simulator: Simulator | None = None
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)

    def request_shutdown(self) -> None:
        """Begin the graceful drain (idempotent); :meth:`wait_stopped` returns when it is over."""
        self._shutdown.set()

    async def wait_stopped(self) -> None:
        """Return once the gateway has drained, logged out and stopped."""
        await self._stopped.wait()

    def apply_config(self, loaded: LoadedConfig) -> ReloadPlan:
        """Apply what ``loaded`` may change live (routes, pacing, request checks, log level; see
        :mod:`gateway.config.reload`) and return the plan. The session, relays and connections are untouched;
        requests already past the checks finish under the settings they started with."""
        plan = plan_reload(self.config, loaded.config)
        config = plan.config
        pacing = pacing_settings(config.pacing)
        if pacing != self.pacer.settings:
            self.pacer.reconfigure(pacing)
        self.dispatcher.settings = dispatch_settings(config, loaded.api_keys.reveal())  # one atomic swap
        set_level(config.logging.level)
        self.config = config
        return plan

    @property
    def ws_base_url(self) -> str:
        """The gateway's own ``ws://host:port`` (append a path: ``ws_base_url + "/v1/api/ws"``)."""
        return "ws" + self.url.removeprefix("http")

    @property
    def ws_url(self) -> str:
        """The gateway's WebSocket endpoint, ``ws://host:port/v1/api/ws`` (IBKR's streaming API)."""
        return self.ws_base_url + WEBSOCKET_PATH


def simulator_credentials(creds: SimulatorCredentials, query_rule: QueryRule = QueryRule.INCLUDE) -> Credentials:
    """Load the simulator's throwaway credentials exactly as IBKR-issued ones are loaded."""
    encryption_key = load_rsa_private_key(creds.encryption_key_pem, what="simulator encryption key")
    return Credentials(
        identity=OAuthIdentity(consumer_key=creds.consumer_key, access_token=creds.access_token, realm=creds.realm),
        signature_key=load_rsa_private_key(creds.signature_key_pem, what="simulator signature key"),
        prepend=Secret(decrypt_access_token_secret(encryption_key, creds.access_token_secret)),
        dh=parse_dh_params_pem(creds.dh_param_pem),
        query_rule=query_rule,
    )


def _hypercorn_config(server: ServerConfig, host: str, port: int) -> HypercornConfig:
    """hypercorn's settings from ``[server]``. Its keep-alive timer also runs while headers arrive, so it is the
    header deadline too; ``read_timeout`` cuts silent connections, and pings keep idle WebSockets talking."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.include_server_header = False
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = server.keep_alive_timeout_s
    config.read_timeout = math.ceil(server.read_timeout_s)  # hypercorn takes whole seconds here
    config.websocket_ping_interval = server.websocket_ping_interval_s
    config.websocket_max_message_size = MAX_WS_MESSAGE_BYTES
    config.h11_max_incomplete_size = server.max_header_bytes + 1024  # request line + slack; the app enforces it
    return config


def dispatch_settings(config: Config, api_keys: tuple[str, ...]) -> DispatchSettings:
    """The dispatcher's checks from ``config`` (and the loaded API keys)."""
    return DispatchSettings(
        routes=config.routes,
        allowed_origins=frozenset(config.server.allowed_origins),
        trusted_proxies=config.server.trusted_proxies,
        api_keys=ApiKeys(api_keys),
        max_body_bytes=config.server.max_body_bytes,
        max_header_bytes=config.server.max_header_bytes,
        max_header_count=config.server.max_header_count,
        metrics=config.server.metrics,
    )


def _register_secrets(credentials: Credentials, access_token_secret: str) -> None:
    register_secret(credentials.prepend.reveal())
    register_secret(access_token_secret)
    register_secret(credentials.identity.access_token)


@dataclass(frozen=True, slots=True)
class _Upstream:
    """Where the gateway's IBKR is: the base URL, the credentials to sign with, and the simulator when it is one."""

    base_url: str
    credentials: Credentials
    simulator: Simulator | None


async def _start_upstream(loaded: LoadedConfig, simulator: Simulator | None, root: trio.Nursery) -> _Upstream:
    """IBKR from the config, or the built-in simulator started in ``root``; registers the secrets for scrubbing."""
    config = loaded.config
    if config.simulator.enabled:
        if simulator is None:
            simulator = Simulator(generate_credentials(), **config.simulator.simulator_options())
        base_url = await root.start(simulator.serve, "127.0.0.1", config.simulator.port)
        credentials = simulator_credentials(simulator.credentials, config.ibkr.query_rule)
        _register_secrets(credentials, simulator.credentials.access_token_secret)
        log.info("simulator mode: the built-in IBKR simulator listens on %s (this is NOT IBKR)", base_url)
        return _Upstream(base_url, credentials, simulator)
    if loaded.credentials is None:
        raise RuntimeError("credentials are required when the simulator is disabled")
    _register_secrets(loaded.credentials, config.ibkr.access_token_secret.reveal())
    return _Upstream(config.ibkr.base_url, loaded.credentials, None)


def _session_manager(config: Config, upstream: _Upstream, client: httpx.AsyncClient, pacer: Pacer) -> SessionManager:
    return SessionManager(
        pacer=pacer,
        client=client,
        credentials=upstream.credentials,
        settings=SessionSettings(
            base_url=upstream.base_url,
            user_agent=config.ibkr.user_agent,
            compete=config.ibkr.compete,
            tickle_interval_s=config.session.tickle_interval_s,
            backoff=Backoff(config.session.reconnect_delay_s, config.session.reconnect_max_delay_s),
        ),
    )


def _websockets(
    config: Config, upstream: _Upstream, manager: SessionManager, tls: ssl.SSLContext
) -> WebSocketRelay | SharedHub:
    """The WebSocket side of ``[websocket] mode``: a relay per client, or one shared IBKR socket."""
    ws_base_url = "ws" + upstream.base_url.removeprefix("http")
    access_token = upstream.credentials.identity.access_token
    if config.websocket.mode == "shared":
        return SharedHub(
            manager=manager,
            settings=SharedSettings(
                ws_base_url=ws_base_url,
                access_token=access_token,
                user_agent=config.ibkr.user_agent,
                tls=tls,
                max_message_bytes=MAX_WS_MESSAGE_BYTES,
                max_clients=config.server.max_websockets,
                client_buffer=config.websocket.client_buffer,
                upstream_keepalive_s=config.websocket.upstream_keepalive_s,
                feed=FeedSettings(
                    unsubscribe_delay_s=config.websocket.unsubscribe_delay_s,
                    renew_s=config.websocket.renew_subscriptions_s,
                    batch_interval_s=config.websocket.batch_interval_ms / 1000,
                ),
            ),
        )
    return WebSocketRelay(
        manager=manager,
        settings=RelaySettings(
            ws_base_url=ws_base_url,
            access_token=access_token,
            user_agent=config.ibkr.user_agent,
            ready_timeout_s=config.session.ready_timeout_s,
            max_message_bytes=MAX_WS_MESSAGE_BYTES,
            max_relays=config.server.max_websockets,
            tls=tls,
            # A client that takes none of our bytes for a whole ping interval has not taken the ping either: it
            # is as dead as the ping would find it. Toward IBKR, the upstream write timeout.
            client_write_timeout_s=config.server.websocket_ping_interval_s,
            upstream_write_timeout_s=config.upstream.write_timeout_s,
            upstream_keepalive_s=config.websocket.upstream_keepalive_s,
        ),
    )


def _http_proxy(
    config: Config, base_url: str, manager: SessionManager, pool: Http1Pool, pacer: Pacer, metrics: RequestMetrics
) -> HttpProxy:
    return HttpProxy(
        manager=manager,
        upstream=pool,
        pacer=pacer,
        metrics=metrics,
        settings=ProxySettings(
            base_url=base_url,
            user_agent=config.ibkr.user_agent.encode("ascii"),
            ready_timeout_s=config.session.ready_timeout_s,
            body_timeout_s=config.server.body_timeout_s,
        ),
    )


def _dispatcher(
    loaded: LoadedConfig,
    source: StatusSource,
    proxy: HttpProxy,
    websockets: WebSocketRelay | SharedHub,
    metrics: RequestMetrics,
) -> Dispatcher:
    """The edge: every request's checks, then the proxy, the WebSocket side or the gateway's own pages."""
    config = loaded.config
    return Dispatcher(
        settings=dispatch_settings(config, loaded.api_keys.reveal()),
        pages=cast(ASGIApp, build_pages_app(source)),
        http_proxy=proxy,
        relay=websockets,
        examples_app=ExamplesApp() if config.server.examples else None,
        metrics=metrics,
        metrics_page=MetricsPage(source, metrics),
        tickle=LocalTickle(source.manager, config.session.ready_timeout_s),
    )


async def _drain(
    manager: SessionManager,
    proxy: HttpProxy,
    websockets: WebSocketRelay | SharedHub,
    stop_accepting: trio.Event,
    notifier: Notifier,
) -> None:
    """SIGTERM's order: close WebSockets (1001), stop accepting, let requests in flight finish (bounded by
    :data:`GRACEFUL_TIMEOUT_S`), then log out of IBKR."""
    log.info("shutting down: closing WebSockets, draining requests")
    notifier.stopping("shutting down: closing WebSockets, draining requests")
    await manager.stop()
    stop_accepting.set()  # hypercorn stops accepting and closes idle keep-alive connections
    with trio.move_on_after(GRACEFUL_TIMEOUT_S) as drain:
        await proxy.wait_idle()
        await websockets.wait_all_closed()  # they were told to close (1001); wait until they have
    if drain.cancelled_caught:
        log.warning("drain deadline passed with %d request(s) in flight", proxy.in_flight)
    await manager.logout()


async def serve_gateway(
    loaded: LoadedConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    simulator: Simulator | None = None,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until :meth:`Gateway.request_shutdown`; see the module contract.

    ``host``/``port`` override ``[server]`` (tests bind port 0 and read the real port from the handle's URL).
    ``simulator`` is a not-yet-started simulator to use in simulator mode instead of a default one (tests pass
    one with short timers or shared credentials). ``notifier`` reports to systemd (:func:`run_gateway` passes one).
    """
    config = loaded.config
    started_at = time.time()
    notifier = notifier or Notifier(None)
    async with trio.open_nursery() as root:
        if notifier.watchdog_s is not None:
            root.start_soon(_watchdog, notifier, notifier.watchdog_s)
        upstream = await _start_upstream(loaded, simulator, root)
        base_url = upstream.base_url
        tls = tls_context()
        up = config.upstream
        timeouts = Timeouts(up.connect_timeout_s, up.read_timeout_s, up.write_timeout_s, up.pool_timeout_s)
        async with build_client(timeouts, tls=tls) as client:
            pacer = Pacer(pacing_settings(config.pacing))
            manager = _session_manager(config, upstream, client, pacer)
            websockets = _websockets(config, upstream, manager, tls)
            await root.start(websockets.run)  # client writers and write deadlines: beside the server, not inside it
            pool = Http1Pool(base_url, timeouts, tls=tls, max_connections=UPSTREAM_MAX_CONNECTIONS)
            root.start_soon(pool.keep_tidy)  # idle connections IBKR closed do not linger in CLOSE-WAIT
            metrics = RequestMetrics()
            proxy = _http_proxy(config, base_url, manager, pool, pacer, metrics)
            source = StatusSource(
                manager=manager,
                relays=websockets.counters,
                pacer=pacer,
                upstream=base_url,
                simulator=upstream.simulator is not None,
                started_at=started_at,
                label=config.ibkr.label,
                shared=websockets.snapshot if isinstance(websockets, SharedHub) else None,
            )
            app = _dispatcher(loaded, source, proxy, websockets, metrics)
            stop_accepting = trio.Event()
            hconfig = _hypercorn_config(
                config.server, host or config.server.host, config.server.port if port is None else port
            )
            # hypercorn's protocol on the gateway's own accept loop (web/server.py says why). Its drain waits
            # for busy connections; the gateway's own in-flight accounting in _drain decides when to stop.
            urls = await root.start(partial(serve_http, app, hconfig, stop_accepting))
            await root.start(manager.run)
            gateway = Gateway(
                url=urls[0],
                config=config,
                manager=manager,
                relays=websockets.counters,
                upstream_url=base_url,
                dispatcher=app,
                pacer=pacer,
                metrics=metrics,
                simulator=upstream.simulator,
            )
            log.info("gateway listening on %s, upstream %s", gateway.url, base_url)
            if notifier.enabled:
                notifier.ready(_status(manager, gateway.url))
                root.start_soon(_report_status, notifier, manager, gateway.url)
            task_status.started(gateway)
            try:
                await gateway._shutdown.wait()
                await _drain(manager, proxy, websockets, stop_accepting, notifier)
            finally:
                root.cancel_scope.cancel()
                pool.close()
                gateway._stopped.set()
    log.info("gateway stopped")


def _status(manager: SessionManager, url: str) -> str:
    session = manager.active
    return status_line(
        manager.state.value,
        generation=session.generation if session is not None else 0,
        last_error=manager.stats.last_error,
        listening=url,
    )


async def _report_status(notifier: Notifier, manager: SessionManager, url: str) -> None:
    """A systemd ``STATUS=`` line whenever the session moves (``systemctl status`` shows the latest)."""
    sent = _status(manager, url)
    while True:
        await manager.wait_changed()
        line = _status(manager, url)
        if line != sent:
            notifier.status(line)
            sent = line


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    """``WATCHDOG=1`` every ``interval_s`` from a task of the root nursery: the ping proves trio's loop still
    schedules tasks, so a wedged loop (a blocking call, a busy loop) stops the pings and systemd restarts us."""
    while True:
        notifier.watchdog()
        await trio.sleep(interval_s)


async def reload_config_file(gateway: Gateway, path: str) -> ReloadPlan | None:
    """Re-read ``path`` (with the environment's ``GATEWAY__*`` overrides) and apply it live (SIGHUP).

    A config that does not load is rejected with one error line naming every problem; the running config stays in
    force. So is one that would leave the gateway on a network address without API keys: the listen address needs
    a restart, so the check runs against the address in force, not only the file's. Returns the plan applied, or
    ``None`` when rejected.
    """
    try:
        loaded = await trio.to_thread.run_sync(load_config, path)
        server = plan_reload(gateway.config, loaded.config).config.server
        exposure = exposure_problem(server, has_api_keys=bool(loaded.api_keys.reveal()), source=path)
        if exposure is not None and exposure.severity == "error":
            message = (
                f"the gateway listens on {server.host!r} until it restarts, and this config has no API key for it; "
                "keep the keys until it has restarted on a loopback host, or set "
                "server.allow_network_without_api_keys = true"
            )
            raise ConfigError([replace(exposure, message=message)])
    except ConfigError as exc:
        errors = [str(p) for p in exc.problems if p.severity == "error"]
        log.error("config reload rejected, the running config stays in force: %s", "; ".join(errors))
        return None
    plan = gateway.apply_config(loaded)
    log.info(
        "config reloaded from %s: %s%s",
        path,
        "changed " + ", ".join(plan.applied) if plan.applied else "nothing changed",
        "; NOT applied until restart: " + ", ".join(plan.restart_needed) if plan.restart_needed else "",
    )
    if exposure is not None:  # the opt-in: said on every start and every reload
        log.warning("%s", exposure)
    return plan


async def _main(loaded: LoadedConfig) -> None:
    notifier = Notifier.from_environment()
    try:
        await _run_until_signalled(loaded, notifier)
    finally:
        notifier.close()


async def _run_until_signalled(loaded: LoadedConfig, notifier: Notifier) -> None:
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(partial(serve_gateway, loaded, notifier=notifier))
        # Everything built at start (modules, the app, the config) lives for the whole run: moved out of the
        # collector's way, full collections no longer walk it; and young collections run every 50,000 allocations,
        # not 700. Collections paused the shared WebSocket's deliveries (bench, 100 clients at 2,000 messages/s:
        # p99 added 68 ms with neither, about 7 ms with the freeze, 1.6 ms with both).
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if not gateway._shutdown.is_set():
                        log.info("SIGHUP received: reloading %s", loaded.config.source)
                        await reload_config_file(gateway, loaded.config.source)
                    continue
                if gateway._shutdown.is_set():
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return
                log.info("%s received", signal.Signals(signum).name)
                gateway.request_shutdown()
                nursery.start_soon(_exit_when_stopped, gateway, nursery.cancel_scope)


async def _exit_when_stopped(gateway: Gateway, scope: trio.CancelScope) -> None:
    await gateway.wait_stopped()
    scope.cancel()


def run_gateway(loaded: LoadedConfig) -> int:
    """Process entry point for ``python -m gateway``: run until SIGINT/SIGTERM (SIGHUP reloads the config file),
    return the exit status."""
    configure_logging(loaded.config.logging.level, loaded.config.logging.format)
    try:
        trio.run(_main, loaded)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:  # the task tree reports a failed start as a group
        listen, rest = group.split(ListenError)
        if listen is None or rest is not None:
            raise
        log.error("%s", _listen_advice(_first(listen), loaded.config.source))
        return 2
    except ListenError as exc:
        log.error("%s", _listen_advice(exc, loaded.config.source))
        return 2
    return 0


def _first(group: BaseExceptionGroup[ListenError]) -> ListenError:
    """The first leaf of a (possibly nested) group of listen errors."""
    first = group.exceptions[0]
    return first if isinstance(first, ListenError) else _first(first)


def _listen_advice(error: ListenError, source: str) -> str:
    """One line: what failed, and the setting that moves the gateway elsewhere."""
    return (
        f"{error} — another program may hold the port (on macOS, the AirPlay receiver uses 5000); "
        f"set [server] port (and host) in {source}, or GATEWAY__SERVER__PORT=<free port>"
    )
