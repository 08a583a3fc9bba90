"""Shared WebSocket mode's core: many clients speaking IBKR's protocol over one IBKR socket (pure, sans-IO).

The shell (:mod:`gateway.shared.hub`) feeds this object what happens - a client joined, left or sent a text; IBKR's
socket opened, closed or sent a text; time passed - and carries out the :class:`ToUpstream` and :class:`ToClients`
actions it returns, in order. Nothing here does I/O or reads a clock: every method that needs the time takes ``now``
(seconds, any monotonic origin), and :meth:`Feed.next_deadline` says when :meth:`Feed.due` wants to run.

Contract, as IBKR's protocol and its clients need it:

- Market data (``smd+CONID+{"fields":[…]}``): the first subscriber of a conid subscribes upstream; a later one that
  asks for more fields re-subscribes upstream with the union (``umd`` first, then ``smd``: IBKR keeps a conid's first
  field list otherwise), and the union shrinks when a subscriber leaves. Ticks (``{"topic":"smd+CONID",…}``) go only
  to that conid's subscribers, each with the fields it asked for (plus IBKR's bookkeeping keys), encoded once per
  distinct field list. IBKR sends only changed fields, so the latest value of every field is kept: a client joining
  a live subscription gets one message with all its fields at once. The last subscriber leaving (``umd``, or its
  disconnect) unsubscribes upstream after ``unsubscribe_delay_s`` (a page reload resubscribes within it).
- Other subscription topics (``sor``, ``str``, ``spl``, ``sbd``, ``smh``, ``ssd``, … and their ``u…`` forms) are
  reference-counted by their command without arguments; IBKR's messages on them go to their subscribers.
- Unsolicited messages (``system`` heartbeats, ``sts``, ``act``, ``ntf``, ``blt``, anything nobody subscribed to) go
  to every client. The latest ``system`` greeting, ``act`` and ``sts`` are replayed to each client that joins, as if
  it had its own socket.
- ``tic`` and ``ech+hb`` are answered here; answers to the gateway's own keep-alive are dropped.
- Nothing is subscribed upstream before IBKR's ``sts`` says authenticated; then every live subscription is
  (re)established. When IBKR's socket closes (a session restart), clients stay and get
  ``{"topic":"gateway","state":"restarting"}``; once the next socket is authenticated they get ``"ready"`` and their
  subscriptions are re-established upstream by themselves.
- IBKR lets market-data subscriptions lapse after about 15 minutes: each is re-sent every ``renew_s``.
- A malformed or unknown command gets an error message back to its sender only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_FIELDS", "ClientId", "Feed", "FeedSettings", "ToClients", "ToUpstream", "notice"]

ClientId = int
MAX_FIELDS = 100
MAX_COMMAND_CHARS = 4096
_CONID = re.compile(r"[0-9]{1,12}")
_FIELD = re.compile(r"[0-9]{1,6}")
# Keys of an smd tick that are not market-data fields the client chose: passed to every subscriber.
_TICK_META = frozenset({"topic", "conid", "conidEx", "_updated", "server_id", "6119", "6509"})
_BROADCAST_TOPICS = frozenset({"system", "sts", "act", "ntf", "blt"})
_REPLAYED = ("system", "act", "sts")
_SUBSCRIPTION_TOPICS = frozenset({"sor", "str", "spl", "sbd", "smh", "ssd", "sld", "sle"})


def _encode(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def notice(state: str) -> str:
    """The gateway's own message about the upstream: ``{"topic":"gateway","state":<state>}``."""
    return _encode({"topic": "gateway", "state": state})


def _error(command: str, reason: str) -> str:
    shown = command[:60]
    return _encode({"topic": "gateway", "error": reason, "command": shown})


@dataclass(frozen=True, slots=True)
class ToUpstream:
    """Send ``text`` on IBKR's socket."""

    text: str


@dataclass(frozen=True, slots=True)
class ToClients:
    """Send ``text`` (encoded once) to each of ``clients``."""

    clients: tuple[ClientId, ...]
    text: str


Action = ToUpstream | ToClients


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """``unsubscribe_delay_s``: grace before the last unsubscribe goes up; ``renew_s``: market-data re-subscription
    period; ``max_subscriptions``: subscriptions one client may hold; ``batch_interval_s``: when above 0, a conid's
    ticks are merged for this long and delivered as one message (latest value of each field), else each tick goes
    out as it comes."""

    unsubscribe_delay_s: float = 5.0
    renew_s: float = 600.0
    max_subscriptions: int = 200
    batch_interval_s: float = 0.0


@dataclass(slots=True)
class _MarketData:
    """One conid: who wants which fields, what is subscribed upstream, and the latest value of each field."""

    wanted: dict[ClientId, tuple[str, ...]] = field(default_factory=dict)
    upstream: tuple[str, ...] | None = None  # the field list subscribed upstream, None: not subscribed
    values: dict[str, Any] = field(default_factory=dict)
    unsubscribe_at: float | None = None
    renew_at: float | None = None

    def union(self) -> tuple[str, ...]:
        """Every field some subscriber wants, in numeric order; ``()`` (IBKR's default fields) if one named none."""
        if any(not fields for fields in self.wanted.values()):
            return ()
        return tuple(sorted({f for fields in self.wanted.values() for f in fields}, key=lambda f: (len(f), f)))


@dataclass(slots=True)
class _Topic:
    """One other subscription topic: its subscribe command (as the first subscriber sent it) and its subscribers."""

    command: str
    subscribers: set[ClientId] = field(default_factory=set)
    upstream: bool = False


@dataclass(slots=True)
class _Client:
    conids: set[int] = field(default_factory=set)
    topics: set[str] = field(default_factory=set)


def _parse_fields(args_text: str) -> tuple[str, ...] | None:
    """The ``fields`` of an ``smd`` argument object (``()`` when absent), or ``None`` when malformed."""
    if not args_text.strip():
        return ()
    try:
        args = json.loads(args_text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(args, dict):
        return None
    raw = args.get("fields", [])
    if not isinstance(raw, list) or len(raw) > MAX_FIELDS:
        return None
    fields: list[str] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, str | int):
            return None
        text = str(item)
        if not _FIELD.fullmatch(text):
            return None
        if text not in fields:
            fields.append(text)
    return tuple(fields)


def _topic_key(command: str) -> str:
    """A subscription command without its JSON arguments: ``smh+265598+{…}`` → ``smh+265598``, ``sor+{}`` → ``sor``."""
    head, brace, _ = command.partition("{")
    return head.rstrip("+") if brace else command


class Feed:
    """The shared mode's state: see the module contract."""

    def __init__(self, settings: FeedSettings | None = None) -> None:
        self.settings = settings or FeedSettings()
        self._clients: dict[ClientId, _Client] = {}
        self._md: dict[int, _MarketData] = {}
        self._topics: dict[str, _Topic] = {}
        self._last: dict[str, str] = {}  # topic → the latest system greeting / act / sts text
        self._upstream_open = False
        self._ready = False  # IBKR's sts said authenticated on the current socket
        self._batch: dict[int, dict[str, Any]] = {}  # conid → ticks merged since the last flush (batching on)
        self._flush_at: float | None = None
        self._waiting = "connecting"  # what a client is told while not ready: "connecting", then "restarting"
        self._told_waiting = False  # some client was told the upstream is not ready: it hears "ready" next

    # ------------------------------------------------------------------ views

    @property
    def ready(self) -> bool:
        """True while IBKR's socket is open and authenticated (subscriptions are live)."""
        return self._ready

    @property
    def clients(self) -> int:
        """Clients joined."""
        return len(self._clients)

    def snapshot(self) -> dict[str, object]:
        """Counts for ``/session`` and ``/metrics`` (no secrets): clients, upstream subscriptions, subscribers per
        topic (``smd+CONID`` and the other topics)."""
        subscribers = {f"smd+{conid}": len(md.wanted) for conid, md in sorted(self._md.items()) if md.wanted}
        subscribers.update({key: len(t.subscribers) for key, t in sorted(self._topics.items()) if t.subscribers})
        upstream = sum(md.upstream is not None for md in self._md.values()) + sum(
            t.upstream for t in self._topics.values()
        )
        return {
            "clients": len(self._clients),
            "ready": self._ready,
            "upstream_subscriptions": upstream,
            "subscribers": subscribers,
        }

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`due` has work (a grace period ending, a renewal), or ``None``."""
        times = [t for md in self._md.values() for t in (md.unsubscribe_at, md.renew_at) if t is not None]
        if self._flush_at is not None:
            times.append(self._flush_at)
        return min(times) if times else None

    # ------------------------------------------------------------------ clients

    def join(self, client: ClientId) -> list[Action]:
        """A client connected: it gets IBKR's latest greeting, accounts and status, and a notice while not ready."""
        self._clients[client] = _Client()
        out: list[Action] = [ToClients((client,), self._last[t]) for t in _REPLAYED if t in self._last]
        if not self._ready:
            out.append(ToClients((client,), notice(self._waiting)))
            self._told_waiting = True
        return out

    def leave(self, client: ClientId, now: float) -> list[Action]:
        """A client disconnected (or was closed): its subscriptions are released."""
        state = self._clients.pop(client, None)
        if state is None:
            return []
        out: list[Action] = []
        for conid in sorted(state.conids):
            out += self._release_md(client, conid, now)
        for key in sorted(state.topics):
            out += self._release_topic(client, key)
        return out

    def from_client(self, client: ClientId, text: str, now: float) -> list[Action]:
        """One text message from ``client`` (IBKR's protocol)."""
        if client not in self._clients:
            return []
        command = text.strip()
        if len(command) > MAX_COMMAND_CHARS:
            return [ToClients((client,), _error(command, "command too long"))]
        if command == "tic":
            return [ToClients((client,), _encode({"topic": "tic", "alive": True, "lastAccessed": int(now * 1000)}))]
        if command == "ech+hb":
            return [ToClients((client,), "ech+hb")]
        prefix, _, rest = command.partition("+")
        if prefix == "smd":
            return self._subscribe_md(client, command, rest, now)
        if prefix == "umd":
            conid_text = rest.partition("+")[0]
            if not _CONID.fullmatch(conid_text):
                return [ToClients((client,), _error(command, "invalid conid"))]
            return self._release_md(client, int(conid_text), now)
        if prefix[:3] in _SUBSCRIPTION_TOPICS and len(prefix) == 3:
            return self._subscribe_topic(client, command)
        if len(prefix) == 3 and prefix[0] == "u" and "s" + prefix[1:] in _SUBSCRIPTION_TOPICS:
            return self._unsubscribe_topic(client, command)
        return [ToClients((client,), _error(command, "unknown or malformed command"))]

    # ------------------------------------------------------------------ IBKR's socket

    def upstream_opened(self) -> list[Action]:
        """A new IBKR socket is open; nothing is subscribed on it until its ``sts`` says authenticated."""
        self._upstream_open = True
        self._ready = False
        return []

    def upstream_closed(self) -> list[Action]:
        """IBKR's socket closed (a session restart): subscriptions wait for the next one; clients are told."""
        self._upstream_open = False
        self._ready = False
        for conid, md in list(self._md.items()):
            md.upstream = None
            md.renew_at = None
            md.unsubscribe_at = None
            if not md.wanted:
                del self._md[conid]
        for key, topic in list(self._topics.items()):
            topic.upstream = False
            if not topic.subscribers:
                del self._topics[key]
        if self._waiting == "restarting" and self._told_waiting:
            return []  # already told
        self._waiting = "restarting"
        self._told_waiting = bool(self._clients)
        return self._to_all(notice("restarting"))

    def from_upstream(self, text: str, now: float) -> list[Action]:
        """One text message from IBKR."""
        if not text.startswith("{"):
            return []  # "ech+hb" echoes and other bare words answer the gateway's own keep-alive
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            return self._to_all(text)
        if not isinstance(message, dict):
            return self._to_all(text)
        topic = message.get("topic")
        if not isinstance(topic, str):
            return self._to_all(text)
        if topic == "tic":
            return []  # the answer to the gateway's own keep-alive (clients' tics are answered here)
        if topic.startswith("smd+"):
            return self._tick(topic, message, text, now)
        if topic in _BROADCAST_TOPICS:
            return self._unsolicited(topic, message, text, now)
        key = self._route_key(topic)
        if key is not None:
            subscribers = self._topics[key].subscribers
            return [ToClients(tuple(sorted(subscribers)), text)] if subscribers else []
        return self._to_all(text)

    def due(self, now: float) -> list[Action]:
        """Grace periods that ended (unsubscribe upstream), renewals that are due (subscribe again), and the batch
        of merged ticks when its interval is over."""
        out: list[Action] = []
        if self._flush_at is not None and self._flush_at <= now:
            self._flush_at = None
            batch, self._batch = self._batch, {}
            for conid, merged in batch.items():
                md = self._md.get(conid)
                if md is not None and md.wanted:
                    out += self._deliver(md, {"topic": f"smd+{conid}", **merged}, None)
        for conid, md in list(self._md.items()):
            if md.unsubscribe_at is not None and md.unsubscribe_at <= now and not md.wanted:
                if md.upstream is not None and self._ready:
                    out.append(ToUpstream(f"umd+{conid}+{{}}"))
                del self._md[conid]
                continue
            if md.renew_at is not None and md.renew_at <= now and md.upstream is not None and self._ready:
                out.append(ToUpstream(_smd(conid, md.upstream)))
                md.renew_at = now + self.settings.renew_s
        return out

    # ------------------------------------------------------------------ market data

    def _subscribe_md(self, client: ClientId, command: str, rest: str, now: float) -> list[Action]:
        conid_text, _, args_text = rest.partition("+")
        if not _CONID.fullmatch(conid_text):
            return [ToClients((client,), _error(command, "invalid conid"))]
        fields = _parse_fields(args_text)
        if fields is None:
            return [ToClients((client,), _error(command, "invalid arguments"))]
        state = self._clients[client]
        conid = int(conid_text)
        if conid not in state.conids and len(state.conids) + len(state.topics) >= self.settings.max_subscriptions:
            return [ToClients((client,), _error(command, "too many subscriptions on this connection"))]
        md = self._md.setdefault(conid, _MarketData())
        state.conids.add(conid)
        md.wanted[client] = fields
        md.unsubscribe_at = None
        out = self._sync_md(conid, md, now)
        cached = self._cached_tick(conid, md, fields)
        if cached is not None:
            out.append(ToClients((client,), cached))
        return out

    def _release_md(self, client: ClientId, conid: int, now: float) -> list[Action]:
        state = self._clients.get(client)
        if state is not None:
            state.conids.discard(conid)
        md = self._md.get(conid)
        if md is None or md.wanted.pop(client, None) is None:
            return []
        if md.wanted:
            return self._sync_md(conid, md, now)
        if md.upstream is None:
            del self._md[conid]
            return []
        if self.settings.unsubscribe_delay_s <= 0:
            del self._md[conid]
            return [ToUpstream(f"umd+{conid}+{{}}")] if self._ready else []
        md.unsubscribe_at = now + self.settings.unsubscribe_delay_s
        return []

    def _sync_md(self, conid: int, md: _MarketData, now: float) -> list[Action]:
        """Make IBKR's subscription for ``conid`` carry exactly the union of the wanted fields (when ready)."""
        union = md.union()
        if not self._ready or md.upstream == union:
            return []
        out: list[Action] = []
        if md.upstream is not None:
            out.append(ToUpstream(f"umd+{conid}+{{}}"))
        out.append(ToUpstream(_smd(conid, union)))
        md.upstream = union
        md.renew_at = now + self.settings.renew_s
        return out

    def _cached_tick(self, conid: int, md: _MarketData, fields: tuple[str, ...]) -> str | None:
        """One message with every known value of ``fields`` (all fields when none were named), or ``None``."""
        values = {k: v for k, v in md.values.items() if k not in _TICK_META and (not fields or k in fields)}
        if not values:
            return None
        meta = {k: v for k, v in md.values.items() if k in _TICK_META}
        return _encode({**meta, "topic": f"smd+{conid}", "conid": conid, **values})

    def _tick(self, topic: str, message: dict[str, Any], text: str, now: float) -> list[Action]:
        conid_text = topic[4:].partition("+")[0]
        md = self._md.get(int(conid_text)) if _CONID.fullmatch(conid_text) else None
        if md is None or not md.wanted:
            return []
        update = {k: v for k, v in message.items() if k != "topic"}
        md.values.update(update)
        if self.settings.batch_interval_s > 0:
            self._batch.setdefault(int(conid_text), {}).update(update)
            if self._flush_at is None:
                self._flush_at = now + self.settings.batch_interval_s
            return []
        return self._deliver(md, message, text)

    def _deliver(self, md: _MarketData, message: dict[str, Any], text: str | None) -> list[Action]:
        """``message`` (a tick; ``text`` is its encoding when it came from IBKR as is) to each subscriber group with
        the fields the group asked for, encoded once per group."""
        groups: dict[tuple[str, ...], list[ClientId]] = {}
        for client, fields in md.wanted.items():
            groups.setdefault(fields, []).append(client)
        out: list[Action] = []
        for fields, clients in groups.items():
            if not fields or set(message) - _TICK_META <= set(fields):
                whole = text if text is not None else _encode(message)  # nothing to take out
                out.append(ToClients(tuple(sorted(clients)), whole))
                continue
            mine = {k: v for k, v in message.items() if k in _TICK_META or k in fields}
            if set(mine) - _TICK_META:
                out.append(ToClients(tuple(sorted(clients)), _encode(mine)))
        return out

    # ------------------------------------------------------------------ other topics

    def _subscribe_topic(self, client: ClientId, command: str) -> list[Action]:
        key = _topic_key(command)
        state = self._clients[client]
        if key in state.topics:
            return []
        if len(state.conids) + len(state.topics) >= self.settings.max_subscriptions:
            return [ToClients((client,), _error(command, "too many subscriptions on this connection"))]
        topic = self._topics.setdefault(key, _Topic(command=command))
        topic.subscribers.add(client)
        state.topics.add(key)
        if self._ready and not topic.upstream:
            topic.upstream = True
            topic.command = command
            return [ToUpstream(command)]
        return []

    def _unsubscribe_topic(self, client: ClientId, command: str) -> list[Action]:
        state = self._clients[client]
        wanted = "s" + _topic_key(command)[1:]
        key = wanted if wanted in state.topics else None
        if key is None:  # e.g. umh+<serverId>: match the client's only topic of that kind
            same = [k for k in state.topics if k[:3] == wanted[:3]]
            key = same[0] if len(same) == 1 else None
        if key is None:
            return []
        return self._release_topic(client, key, command)

    def _release_topic(self, client: ClientId, key: str, command: str | None = None) -> list[Action]:
        state = self._clients.get(client)
        if state is not None:
            state.topics.discard(key)
        topic = self._topics.get(key)
        if topic is None:
            return []
        topic.subscribers.discard(client)
        if topic.subscribers:
            return []
        del self._topics[key]
        if topic.upstream and self._ready:
            return [ToUpstream(command or "u" + key[1:] + "+{}")]
        return []

    def _route_key(self, topic: str) -> str | None:
        if topic in self._topics:
            return topic
        same = [key for key in self._topics if key[:3] == topic[:3]]
        return same[0] if len(same) == 1 else None

    # ------------------------------------------------------------------ unsolicited

    def _unsolicited(self, topic: str, message: Mapping[str, Any], text: str, now: float) -> list[Action]:
        if topic != "system" or "success" in message:
            self._last[topic] = text  # a greeting, accounts or status: replayed to clients that join later
        out = self._to_all(text)
        if topic == "sts":
            args = message.get("args")
            authenticated = isinstance(args, dict) and args.get("authenticated") is True
            if authenticated and not self._ready and self._upstream_open:
                out += self._became_ready(now)
            elif not authenticated and self._ready:
                self._ready = False  # the brokerage session dropped: IBKR forgets the subscriptions
                for md in self._md.values():
                    md.upstream = None
                    md.renew_at = None
                for other in self._topics.values():
                    other.upstream = False
        return out

    def _became_ready(self, now: float) -> list[Action]:
        self._ready = True
        out: list[Action] = []
        for conid, md in sorted(self._md.items()):
            if md.wanted:
                out += self._sync_md(conid, md, now)
        for _, topic in sorted(self._topics.items()):
            if topic.subscribers and not topic.upstream:
                topic.upstream = True
                out.append(ToUpstream(topic.command))
        if self._told_waiting:
            self._told_waiting = False
            out += self._to_all(notice("ready"))
        return out

    def _to_all(self, text: str) -> list[Action]:
        return [ToClients(tuple(sorted(self._clients)), text)] if self._clients else []


def _smd(conid: int, fields: tuple[str, ...]) -> str:
    return f"smd+{conid}+" + (_encode({"fields": list(fields)}) if fields else "{}")
