"""The typed, immutable configuration the rest of the gateway reads (no parsing, no I/O here)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.oauth.basestring import QueryRule
from gateway.oauth.dh import DHParams
from gateway.oauth.signer import OAuthIdentity
from gateway.redact import Secret

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
MetricsAccess = Literal["loopback", "api_key", "off"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: where the gateway listens and whom it trusts."""

    host: str = "127.0.0.1"
    port: int = 5000
    trusted_proxies: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    allowed_origins: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    api_keys: Secret[tuple[str, ...]] = field(default_factory=lambda: Secret(()))
    allow_network_without_api_keys: bool = False
    max_body_bytes: int = 65536
    max_header_bytes: int = 16384
    max_header_count: int = 100
    max_websockets: int = 1000
    keep_alive_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    body_timeout_s: float = 30.0
    websocket_ping_interval_s: float = 5.0
    examples: bool = False
    metrics: MetricsAccess = "loopback"


@dataclass(frozen=True, slots=True)
class IbkrConfig:
    """``[ibkr]``: the upstream and the credentials IBKR issued (key paths already resolved)."""

    base_url: str = "https://api.ibkr.com"
    consumer_key: str = ""
    access_token: str = ""
    access_token_secret: Secret[str] = field(default_factory=lambda: Secret(""))
    signature_key: Path | None = None
    encryption_key: Path | None = None
    dh_param: Path | None = None
    realm: str = "limited_poa"
    user_agent: str = "ibkr-oauth-gateway"
    compete: bool = True
    query_rule: QueryRule = QueryRule.INCLUDE
    label: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[upstream]``: deadlines for talking to IBKR."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    write_timeout_s: float = 15.0
    pool_timeout_s: float = 2.0


@dataclass(frozen=True, slots=True)
class PacingConfig:
    """``[pacing]``: how upstream traffic is held to IBKR's limits (see :mod:`gateway.pacing`)."""

    enabled: bool = True
    global_requests_per_s: float = 10.0
    global_burst: int = 10
    max_wait_s: float = 5.0
    breaker_cooldown_s: float = 600.0
    breaker_max_cooldown_s: float = 3600.0
    send_margin_s: float = 0.0
    limits: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """``[session]``: tickle cadence, reconnect back-off and how long requests wait for a session."""

    tickle_interval_s: float = 60.0
    reconnect_delay_s: float = 1.0
    reconnect_max_delay_s: float = 300.0
    ready_timeout_s: float = 10.0


class SimulatorOptions(TypedDict):
    """The :class:`~gateway.simulator.Simulator` keyword options a ``[simulator]`` section sets."""

    lenient: bool
    accounts_first: bool
    snapshot_preflight: bool
    pacing: bool
    penalty_box_s: float


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """``[websocket]``: what each relay does on IBKR's side of the socket."""

    upstream_keepalive_s: float = 45.0
    mode: Literal["relay", "shared"] = "relay"
    unsubscribe_delay_s: float = 5.0
    client_buffer: int = 1000
    renew_subscriptions_s: float = 600.0
    batch_interval_ms: int = 0


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """``[simulator]``: run the built-in IBKR simulator on loopback instead of talking to IBKR."""

    enabled: bool = False
    port: int = 0
    lenient: bool = False
    accounts_first: bool = True
    snapshot_preflight: bool = True
    pacing: bool = True
    penalty_box_s: float = 600.0

    def simulator_options(self) -> SimulatorOptions:
        """The :class:`~gateway.simulator.Simulator` options this section sets."""
        return {
            "lenient": self.lenient,
            "accounts_first": self.accounts_first,
            "snapshot_preflight": self.snapshot_preflight,
            "pacing": self.pacing,
            "penalty_box_s": self.penalty_box_s,
        }


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """``[logging]``: level and format of the log lines written to stderr."""

    level: LogLevel = "info"
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One ``[[routes]]`` entry: an allow-listed path (``/x/*`` = everything below ``/x/``) and its methods.

    ``methods`` is ``None`` when any method is allowed; otherwise upper-case method names.
    """

    path: str
    methods: tuple[str, ...] | None = None
    max_body_bytes: int | None = None

    @property
    def is_prefix(self) -> bool:
        """True when the route ends in ``/*`` and so matches everything below its prefix."""
        return self.path.endswith("/*")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` is the file it came from (for messages)."""

    source: str
    server: ServerConfig = field(default_factory=ServerConfig)
    ibkr: IbkrConfig = field(default_factory=IbkrConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    pacing: PacingConfig = field(default_factory=PacingConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    routes: tuple[RouteConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class Credentials:
    """Key material loaded and checked at start-up: everything the OAuth handshake needs.

    ``prepend`` is the lower-case hex of the decrypted access-token secret (a secret); ``query_rule`` is how
    ordinary requests' query strings are signed (``ibkr.query_rule``).
    """

    identity: OAuthIdentity
    signature_key: RSAPrivateKey = field(repr=False)
    prepend: Secret[str]
    dh: DHParams
    query_rule: QueryRule = QueryRule.INCLUDE
