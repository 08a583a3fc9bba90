"""The configuration schema: every section and key, its type check, default and documentation, in one table.

The parser, the ``init`` writer and the README's configuration reference all read this table, so a key's
name, default and meaning are written down exactly once.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

Converter = Callable[[object], Any]
"""Checks a raw TOML value and returns the typed value; raises ``ValueError`` with a message on bad input."""

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]+$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~\-]+$")


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}
    return names.get(type(value), "a table" if isinstance(value, dict) else type(value).__name__)


def string(*, pattern: re.Pattern[str] | None = None, what: str = "") -> Converter:
    """A non-empty string, optionally matching ``pattern`` (``what`` describes the pattern in messages)."""

    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_type_name(value)}")
        if not value.strip():
            raise ValueError("must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return convert


def integer(low: int, high: int) -> Converter:
    """An integer in ``[low, high]`` (booleans are not integers here)."""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {_type_name(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def seconds(low: float, high: float = 86400.0 * 7) -> Converter:
    """A duration in seconds, integer or float, in ``[low, high]``."""

    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number of seconds, not {_type_name(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {value:g}")
        return float(value)

    return convert


def boolean(value: object) -> bool:
    """``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {_type_name(value)}")
    return value


def choice(*options: str) -> Converter:
    """One of ``options`` (case-insensitive; returned lower-case)."""

    def convert(value: object) -> str:
        if not isinstance(value, str) or value.lower() not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
        return value.lower()

    return convert


def array(item: Converter, *, what: str) -> Converter:
    """An array whose items each pass ``item``; returns a tuple. ``what`` names the items in messages."""

    def convert(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array of {what}, not {_type_name(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except ValueError as exc:
                raise ValueError(f"item {index} ({element!r}): {exc}") from None
        return tuple(out)

    return convert


def ip_network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP address or CIDR network such as ``127.0.0.1`` or ``10.0.0.0/8``."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("is not an IP address or CIDR network") from None


def origin(value: object) -> str:
    """A browser origin ``scheme://host[:port]`` with no path, compared exactly (lower-cased)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must look like https://host or http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must be an origin only (scheme://host[:port]), without path, query or user")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port == {"http": 80, "https": 443}[parts.scheme]:
        port = None  # browsers omit the default port from Origin
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def base_url(value: object) -> str:
    """An http(s) URL of the IBKR host, without path, query or credentials; returned without a trailing slash."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL such as https://api.ibkr.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must be scheme://host[:port] only (paths such as /v1/api are added by the gateway)")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc.lower()}"


def base64_text(value: object) -> str:
    """Base64 text such as IBKR's access-token secret (whitespace removed)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    compact = "".join(value.split())
    if not compact:
        raise ValueError("must not be empty")
    try:
        base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (paste it exactly as IBKR issued it)") from None
    return compact


MAX_LABEL_CHARS = 64


def label(value: object) -> str:
    """A short free-text name for the account a gateway serves (``"family-paper"``): printable characters only (no
    line breaks, tabs or control characters), at most :data:`MAX_LABEL_CHARS`; empty means no label."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    if len(value) > MAX_LABEL_CHARS:
        raise ValueError(f"must be at most {MAX_LABEL_CHARS} characters, got {len(value)}")
    if not value.isprintable():
        raise ValueError("must hold printable characters only (no line breaks, tabs or control characters)")
    return value


MIN_API_KEY_LENGTH = 16
_API_KEY = re.compile(r"^[\x21-\x2b\x2d-\x7e]+$")


def api_key(value: object) -> str:
    """One API key: at least 16 printable characters, no spaces or commas. Messages never quote the key."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    if len(value) < MIN_API_KEY_LENGTH:
        raise ValueError(f"an API key is shorter than {MIN_API_KEY_LENGTH} characters")
    if not _API_KEY.fullmatch(value):
        raise ValueError("an API key contains a space, comma or non-printable character")
    return value


def api_key_list(value: object) -> tuple[str, ...]:
    """API keys separated by commas or whitespace; at least one."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    keys = tuple(api_key(part) for part in re.split(r"[,\s]+", value) if part)
    if not keys:
        raise ValueError("must hold at least one key")
    return keys


_LIMIT_KEYS = ("path", "method", "requests", "per_s", "max_concurrent")


def pacing_limit(value: object) -> dict[str, object]:
    """One per-endpoint pacing rule as a table: ``path`` (exact or ``/x/*``), optional ``method``, ``requests`` per
    ``per_s`` seconds (``requests = 0``: no rate), optional ``max_concurrent``. Returned as a checked dict."""
    if not isinstance(value, dict):
        raise ValueError(f"must be a table, not {_type_name(value)}")
    unknown = sorted(set(value) - set(_LIMIT_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(_LIMIT_KEYS)})")
    if "path" not in value or "requests" not in value:
        raise ValueError("needs at least path and requests")
    checked: dict[str, object] = {"path": route_path(value["path"]), "method": None, "max_concurrent": None}
    if value.get("method") is not None:
        checked["method"] = method(value["method"])
    checked["requests"] = seconds(0.0, 100_000.0)(value["requests"])
    checked["per_s"] = seconds(0.001, 86_400.0)(value.get("per_s", 1))
    if value.get("max_concurrent") is not None:
        checked["max_concurrent"] = integer(1, 10_000)(value["max_concurrent"])
    return checked


def route_path(value: object) -> str:
    """An absolute path, exact (``/v1/api/tickle``) or a prefix (``/v1/api/iserver/*``)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_type_name(value)}")
    if not value.startswith("/"):
        raise ValueError("must start with /")
    body = value[:-2] if value.endswith("/*") else value
    if "*" in body:
        raise ValueError("may only use * as its last segment, as in /v1/api/iserver/*")
    segments = body.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "//" in value or any(c in value for c in "?#%\\ "):
        raise ValueError("must be a plain, canonical path (no //, ., .., %, ?, # or spaces)")
    return value


def method(value: object) -> str:
    """An HTTP method name; returned upper-case."""
    if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
        raise ValueError(f"must be one of {', '.join(HTTP_METHODS)}")
    return value.upper()


@dataclass(frozen=True, slots=True)
class Key:
    """One configuration key: its converter, its default (``None`` = required or absent) and its documentation.

    ``secret`` keys are never echoed; ``path`` keys are resolved relative to the config file's folder;
    ``credential`` keys are required unless the simulator is enabled.
    """

    convert: Converter
    default: object
    doc: str
    secret: bool = False
    path: bool = False
    credential: bool = False

    @property
    def takes_string(self) -> bool:
        """True when an environment override is taken verbatim rather than parsed as a TOML value."""
        return isinstance(self.default, str) or self.path or self.credential or self.secret


_KEY_TEXT = re.compile(r"^[\x21-\x7e]+$")
_PRINTABLE_NO_QUOTE = re.compile(r"^[\x21\x23-\x2b\x2d-\x7e]+$")

SECTIONS: Mapping[str, Mapping[str, Key]] = {
    "server": {
        "host": Key(
            string(), "127.0.0.1", "listen address; keep it on loopback and put nginx in front (others need API keys)"
        ),
        "port": Key(integer(0, 65535), 5000, "listen port (0 = any free port)"),
        "trusted_proxies": Key(
            array(ip_network, what="IP addresses or CIDR networks"),
            ["127.0.0.1", "::1"],
            "X-Forwarded-* headers are honoured only from these peers",
        ),
        "allowed_origins": Key(
            array(origin, what="origins such as https://dash.example.com"),
            [],
            "CORS and WebSocket Origin allow-list (exact origins)",
        ),
        "api_keys_file": Key(
            string(), None, "file with one API key per line; clients must then authenticate (see README)", path=True
        ),
        "api_keys": Key(
            api_key_list, None, "API keys separated by commas (prefer GATEWAY__SERVER__API_KEYS)", secret=True
        ),
        "allow_network_without_api_keys": Key(
            boolean,
            False,
            "true: start on a non-loopback host with no API key (anyone who can reach the port trades; see README)",
        ),
        "max_body_bytes": Key(integer(0, 1 << 40), 65536, "largest request body forwarded (413 above); per route too"),
        "max_header_bytes": Key(integer(1024, 1 << 20), 16384, "largest request header block (431 above)"),
        "max_header_count": Key(integer(8, 1000), 100, "most request header lines (431 above)"),
        "max_websockets": Key(integer(1, 100_000), 1000, "most concurrent WebSocket relays (close 1013 above)"),
        "keep_alive_timeout_s": Key(seconds(0.5, 600.0), 5, "deadline for a new connection's request headers"),
        "read_timeout_s": Key(
            seconds(1.0, 3600.0), 30, "a silent client connection (idle keep-alive, stalled body, WebSocket) is closed"
        ),
        "body_timeout_s": Key(
            seconds(1.0, 3600.0),
            30,
            "a request body must arrive whole within this many seconds of the request (408 and the connection closed)",
        ),
        "websocket_ping_interval_s": Key(
            seconds(0.5, 600.0), 5, "ping WebSocket clients this often (keeps idle relays alive, finds dead ones)"
        ),
        "examples": Key(boolean, False, "serve the WebSocket dashboard example at /examples/dashboard/"),
        "metrics": Key(
            choice("loopback", "api_key", "off"),
            "loopback",
            "who may read /metrics: loopback clients (or any client with an API key), only API-key holders, or nobody",
        ),
    },
    "ibkr": {
        "base_url": Key(base_url, "https://api.ibkr.com", "REST base; the WebSocket URL is derived from it"),
        "consumer_key": Key(
            string(pattern=_PRINTABLE_NO_QUOTE, what="printable ASCII without quotes or commas"),
            None,
            "consumer key from IBKR's self-service portal",
            credential=True,
        ),
        "access_token": Key(
            string(pattern=_PRINTABLE_NO_QUOTE, what="printable ASCII without quotes or commas"),
            None,
            "access token from IBKR's self-service portal",
            credential=True,
        ),
        "access_token_secret": Key(
            base64_text,
            None,
            "base64 RSA ciphertext exactly as IBKR issues it (prefer GATEWAY__IBKR__ACCESS_TOKEN_SECRET)",
            secret=True,
            credential=True,
        ),
        "signature_key": Key(
            string(), None, "private signature key (PEM), relative to this file", path=True, credential=True
        ),
        "encryption_key": Key(
            string(), None, "private encryption key (PEM), relative to this file", path=True, credential=True
        ),
        "dh_param": Key(
            string(), None, "Diffie-Hellman parameters (PEM), relative to this file", path=True, credential=True
        ),
        "realm": Key(
            string(pattern=_TOKEN, what="a token such as limited_poa"),
            "limited_poa",
            "limited_poa for every real consumer; test_realm only for TESTCONS",
        ),
        "user_agent": Key(
            string(pattern=re.compile(r"^[\x20-\x7e]+$"), what="printable ASCII"),
            "ibkr-oauth-gateway",
            "User-Agent sent upstream (IBKR's edge answers 403 without one)",
        ),
        "compete": Key(boolean, True, "take over a brokerage session open elsewhere for the same user"),
        "query_rule": Key(
            choice("include", "omit", "in_url"),
            "include",
            "how a query string is signed: IBKR's documented rule (include) or one of the two seen in other "
            "clients; python -m gateway doctor says which one IBKR accepts",
        ),
        "label": Key(
            label,
            "",
            "a short name for the account this gateway serves, shown on the status page and in /session",
        ),
    },
    "upstream": {
        "connect_timeout_s": Key(seconds(0.1, 120.0), 5, "seconds to open a connection to IBKR"),
        "read_timeout_s": Key(seconds(0.1, 600.0), 15, "seconds to wait for each read from IBKR (then 504)"),
        "write_timeout_s": Key(seconds(0.1, 600.0), 15, "seconds to wait for each write to IBKR"),
        "pool_timeout_s": Key(seconds(0.1, 120.0), 2, "seconds a request waits for a free upstream connection"),
    },
    "pacing": {
        "enabled": Key(boolean, True, "hold upstream traffic to IBKR's pacing limits (429 to clients beyond them)"),
        "global_requests_per_s": Key(seconds(0.01, 1000.0), 10, "global rate toward IBKR, requests per second"),
        "global_burst": Key(integer(1, 1000), 10, "most requests sent back to back"),
        "max_wait_s": Key(seconds(0.0, 60.0), 5, "how long a request may queue for its turn before a 429"),
        "breaker_cooldown_s": Key(
            seconds(1.0, 3600.0), 600, "after an IBKR 429, send nothing for this long (IBKR's penalty box: 10 min)"
        ),
        "breaker_max_cooldown_s": Key(seconds(1.0, 86400.0), 3600, "repeated 429s double the cool-down up to this"),
        "send_margin_s": Key(
            seconds(0.0, 5.0),
            0,
            "extra hold after each answer before its place in the window comes back (headroom)",
        ),
        "limits": Key(
            array(pacing_limit, what="tables {path, method, requests, per_s, max_concurrent}"),
            [],
            "per-endpoint rules added to (and overriding) IBKR's documented ones",
        ),
    },
    "session": {
        "tickle_interval_s": Key(seconds(1.0, 3600.0), 60, "seconds between tickles (never faster than 1/s)"),
        "reconnect_delay_s": Key(seconds(0.01, 3600.0), 1, "first back-off step after a failure"),
        "reconnect_max_delay_s": Key(seconds(0.01, 86400.0), 300, "back-off cap"),
        "ready_timeout_s": Key(seconds(0.0, 600.0), 10, "how long a request waits for a ready session before 503"),
    },
    "websocket": {
        "mode": Key(
            choice("relay", "shared"),
            "relay",
            "relay: one IBKR socket per client; shared: one IBKR socket for all clients, subscriptions de-duplicated",
        ),
        "unsubscribe_delay_s": Key(
            seconds(0.0, 10.0),
            5,
            "shared mode: after the last subscriber leaves, wait this long before unsubscribing upstream",
        ),
        "client_buffer": Key(
            integer(10, 100_000),
            1000,
            "shared mode: messages queued for one client; a client that lets this many pile up is closed (1008)",
        ),
        "batch_interval_ms": Key(
            integer(0, 1000),
            0,
            "shared mode: merge each conid's ticks for this long and send one message (0 = every tick as it comes)",
        ),
        "renew_subscriptions_s": Key(
            seconds(1.0, 890.0),
            600,
            "shared mode: re-send each market-data subscription this often (IBKR lets them lapse after ~15 min)",
        ),
        "upstream_keepalive_s": Key(
            seconds(1.0, 59.0),
            45,
            "each relay sends IBKR a tic after its handshake and whenever nothing went up this long (IBKR closes a "
            "socket silent for a minute)",
        ),
    },
    "simulator": {
        "enabled": Key(boolean, False, "true: run against the built-in IBKR simulator on loopback, not IBKR"),
        "port": Key(integer(0, 65535), 0, "simulator's loopback port (0 = any free port)"),
        "lenient": Key(boolean, False, "simulator also accepts the two other query-signing rules seen in clients"),
        "accounts_first": Key(
            boolean, True, "simulator refuses snapshot/order calls until /iserver/accounts was read (IBKR's rule)"
        ),
        "snapshot_preflight": Key(boolean, True, "simulator answers a conid's first snapshot without prices"),
        "pacing": Key(boolean, True, "simulator enforces IBKR's request limits: 429, then the penalty box"),
        "penalty_box_s": Key(seconds(0.0, 86400.0), 600, "how long the simulator's penalty box lasts after a 429"),
    },
    "logging": {
        "level": Key(choice("debug", "info", "warning", "error"), "info", "debug, info, warning or error"),
        "format": Key(choice("text", "json"), "text", "text or json; logs go to stderr"),
    },
}

ROUTE_KEYS: Mapping[str, Key] = {
    "path": Key(route_path, None, 'allow-listed path; "/x/*" matches everything below /x/'),
    "methods": Key(array(method, what="HTTP methods"), None, "optional; omitted = any method"),
    "max_body_bytes": Key(integer(0, 1 << 40), None, "optional; overrides server.max_body_bytes for this route"),
}

ENV_PREFIX = "GATEWAY__"
