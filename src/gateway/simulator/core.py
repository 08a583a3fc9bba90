"""The runtime context one simulator's HTTP app, WebSocket handler and admin path share: settings, state,
collaborators, clocks and the recorder."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.simulator.asgi import RequestInfo
from gateway.simulator.credentials import ServerView
from gateway.simulator.faults import Faults
from gateway.simulator.hub import WsHub
from gateway.simulator.market import Market
from gateway.simulator.pacing import Pacer
from gateway.simulator.records import Record, Recorder
from gateway.simulator.state import NonceCache, SessionState
from gateway.simulator.verify import LENIENT_RULES, STRICT_RULES, Expected, QueryRule


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Behaviour settings (units in names)."""

    lenient: bool = False
    lst_ttl_s: float = 86400.0
    heartbeat_s: float = 10.0
    tick_interval_s: float = 1.0
    subscription_ttl_s: float = 900.0
    timestamp_window_s: float = 300.0
    max_json_body: int = 64 * 1024
    ws_idle_close_s: float | None = 60.0  # None: never close a silent WebSocket
    accounts_first: bool = True
    snapshot_preflight: bool = True
    pacing: bool = True
    penalty_box_s: float = 600.0
    accepted_query_rules: tuple[QueryRule, ...] | None = None  # None: by ``lenient``
    consumer_active: bool = True
    terse_errors: bool = False
    paper: bool | None = True  # the accounts' isPaper; None: IBKR's answers leave the field out

    def __post_init__(self) -> None:
        for name in ("lst_ttl_s", "heartbeat_s", "tick_interval_s", "subscription_ttl_s", "timestamp_window_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0")
        if self.ws_idle_close_s is not None and not self.ws_idle_close_s > 0:
            raise ValueError("ws_idle_close_s must be > 0 (or None to switch the idle close off)")
        if not 0 <= self.penalty_box_s < float("inf"):
            raise ValueError("penalty_box_s must be a finite number >= 0")

    @property
    def query_rules(self) -> tuple[QueryRule, ...]:
        """The query-coverage rules accepted: ``accepted_query_rules`` when set, else by ``lenient``."""
        if self.accepted_query_rules is not None:
            return self.accepted_query_rules
        return LENIENT_RULES if self.lenient else STRICT_RULES


@dataclass(frozen=True, slots=True)
class WsMessage:
    """One message received on a simulator WebSocket (text as decoded; binary frames decoded as UTF-8)."""

    connection: int
    time: float
    text: str
    binary: bool


@dataclass
class SimCore:
    """Everything a request handler needs. ``clock`` returns wall-clock epoch seconds (injectable for tests)."""

    view: ServerView
    config: SimConfig
    faults: Faults
    market: Market
    clock: Callable[[], float]
    state: SessionState = field(default_factory=SessionState)
    recorder: Recorder = field(default_factory=Recorder)
    hub: WsHub = field(default_factory=WsHub)
    ws_binary: bool = False
    ws_messages: list[WsMessage] = field(default_factory=list)
    schedule_down: Callable[[float], None] | None = None
    nonces: NonceCache = field(init=False)
    pacer: Pacer | None = field(init=False)

    def __post_init__(self) -> None:
        self.nonces = NonceCache(keep_s=2 * self.config.timestamp_window_s)
        self.pacer = Pacer(self.config.penalty_box_s) if self.config.pacing else None

    @property
    def expected(self) -> Expected:
        """The identity requests must carry."""
        return Expected(self.view.consumer_key, self.view.access_token, self.view.realm)

    def now_s(self) -> float:
        """Wall-clock seconds."""
        return self.clock()

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds."""
        return int(self.clock() * 1000)

    @staticmethod
    def new_session_id() -> str:
        """A fresh tickle ``session`` value: 32 lower-case hex."""
        return secrets.token_hex(16)

    @staticmethod
    def new_server_secret() -> int:
        """A fresh DH server secret b (256 random bits, top bit set so it is never tiny)."""
        return secrets.randbits(256) | (1 << 255)

    def tickle_status(self) -> tuple[bool, bool]:
        """``(authenticated, competing)`` as tickle/auth status/sts should report it now."""
        if self.faults.tickle_unauthenticated:
            return False, self.faults.tickle_competing
        if self.state.held_elsewhere:
            return False, True
        return self.state.bridge, False

    def record(
        self,
        request: RequestInfo,
        endpoint: str,
        *,
        accepted: bool,
        status: int,
        reason: str,
        rule: str | None = None,
        method: str | None = None,
    ) -> Record:
        """Record one verdict about ``request``."""
        return self.recorder.add(
            time=self.now_s(),
            method=method or request.method,
            path=request.raw_path,
            raw_query=request.raw_query,
            headers=request.headers,
            endpoint=endpoint,
            accepted=accepted,
            status=status,
            reason=reason,
            rule=rule,
        )
