"""One request as the edge read it: an immutable view made once, when the request arrives (pure).

:meth:`Request.from_scope` reads an ASGI ``http`` or ``websocket`` scope once — the header list in a single pass —
and either raises the :class:`~gateway.errors.RequestRejected` that answers the request or returns the view. The
dispatcher's checks, the route match, the proxy and the relay read the view; none of them scans the scope's header
list again. :class:`Admitted` is what the dispatcher hands on: the view and its decisions about it.

Refused while parsed, in this order (the first failure is raised): an HTTP version other than 1.0 and 1.1 (505),
more header lines or bytes than the limits (431), a path that is not plain and canonical (400 ``bad_path``), a
malformed query or one carrying ``access_key`` twice (400 ``bad_query``). Ambiguous framing is not raised but
recorded in :attr:`Request.framing`: the dispatcher answers it only after the route, key, Origin and method checks
(and WebSocket upgrades, which have no body, never check it).

Everything works on bytes as they arrived (ASGI ``raw_path``, ``query_string`` and header pairs), so the request
that goes upstream is exactly the one that was checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config.model import IPNetwork, RouteConfig
from gateway.edge import auth
from gateway.errors import BadPath, BadQuery, HeadersTooLarge, OAuthError, UnsupportedHttpVersion
from gateway.oauth.basestring import decode_query_pair

HTTP_VERSIONS = frozenset({"1.0", "1.1"})
ADMITTED_KEY = "gateway.admitted"
"""The scope key under which the dispatcher hands an :class:`Admitted` request to the proxy or the relay."""

HeaderIndex = dict[bytes, tuple[bytes, ...]]

_PATH_ALLOWED = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/!$&'()*+,=:@"
# What a query string may hold: printable ASCII except "#" (a fragment is never sent to a server). Anything else
# (spaces, controls, non-ASCII) has no single reading: the signer would sign one string and IBKR rebuild another.
_QUERY_ALLOWED = frozenset(range(0x21, 0x7F)) - {ord("#")}


def path_problem(raw_path: bytes) -> str | None:
    """Why ``raw_path`` is not a plain canonical path, or ``None`` if it is.

    Rejected: anything not starting with ``/``; empty, ``.`` or ``..`` segments; any ``%`` (so no encoded dot,
    slash, backslash, NUL or double encoding can be smuggled past the route check); ``;``, ``\\``, controls,
    spaces and non-ASCII bytes.
    """
    if not raw_path.startswith(b"/"):
        return "path must start with /"
    if b"%" in raw_path:
        return "percent-encoded paths are not accepted"
    forbidden = raw_path.translate(None, _PATH_ALLOWED)  # what is left once every allowed byte is deleted
    if forbidden:
        return f"path contains a forbidden character (0x{forbidden[0]:02x})"
    # Every segment sits between two slashes once one is appended: a dot segment is "/./" or "/../", and an empty
    # segment anywhere but at the end (a trailing slash) is "//".
    slashed = raw_path + b"/"
    if b"/./" in slashed or b"/../" in slashed:
        return "path contains a dot segment"
    if b"//" in raw_path:
        return "path contains an empty segment"
    return None


def match_route(routes: Sequence[RouteConfig], path: str) -> RouteConfig | None:
    """The most specific allow-listed route for ``path`` (exact beats prefix; longer prefix beats shorter)."""
    best: RouteConfig | None = None
    best_len = -1
    for route in routes:
        if route.is_prefix:
            prefix = route.path[:-1]  # keep the trailing slash: "/x/*" matches "/x/..." but not "/xy"
            if path.startswith(prefix) and len(path) > len(prefix) and len(prefix) > best_len:
                best, best_len = route, len(prefix)
        elif path == route.path:
            return route
    return best


@dataclass(frozen=True, slots=True)
class QueryParam:
    """One ``name=value`` piece of a client's query string: the bytes as sent, and the decoded name and value."""

    raw: bytes
    name: str
    value: str


def parse_query(raw: bytes) -> tuple[QueryParam, ...]:
    """Split ``raw`` at ``&`` and decode each piece exactly as the OAuth signer will (``+`` is a space, ``%XX``
    escapes strictly, UTF-8); empty pieces are skipped. Parsed once at the edge: every check and every rewrite of
    the query reads the result, so what is checked is what is forwarded and signed.

    Raises:
        BadQuery: a byte a query may not hold, a malformed ``%`` escape, or escapes that are not UTF-8. The
            message gives positions, never the query's text (it may carry an API key).
    """
    if not raw:
        return ()
    for offset, byte in enumerate(raw):
        if byte not in _QUERY_ALLOWED:
            what = "'#' (a URL fragment)" if byte == 0x23 else f"byte 0x{byte:02x}"
            raise BadQuery(
                f"query string holds {what} at offset {offset}; only printable ASCII may be sent "
                "(percent-encode anything else)"
            )
    params = []
    for index, piece in enumerate(raw.split(b"&"), start=1):
        if not piece:
            continue
        try:
            name, value = decode_query_pair(piece.decode("ascii"))
        except OAuthError as exc:
            raise BadQuery(f"query parameter {index} is malformed: {exc}") from None
        params.append(QueryParam(piece, name, value))
    return tuple(params)


def reserved_parameter(params: Iterable[QueryParam]) -> str | None:
    """Why the query cannot be forwarded because of a reserved name, or ``None``.

    Clients may not send ``oauth_*`` parameters (in any spelling: names are compared decoded and case-blind): the
    gateway signs, and a client-supplied one would either break the signature or try to impersonate it.
    """
    for param in params:
        if param.name.lower().startswith("oauth_"):
            return f"query parameter {param.name!r} is reserved for the gateway's own signature"
    return None


def index_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[HeaderIndex, int]:
    """``raw`` by lower-case name, every value of a name in the order sent, in one pass; and the block's size as
    the header limit counts it (name + value + 4 bytes per line)."""
    index: HeaderIndex = {}
    repeated: dict[bytes, list[bytes]] | None = None  # names sent more than once, collected so the pass stays linear
    size = 0
    for name, value in raw:
        size += len(name) + len(value) + 4
        key = name.lower()
        if key not in index:
            index[key] = (value,)
        elif repeated is None:
            repeated = {key: [*index[key], value]}
        elif key in repeated:
            repeated[key].append(value)
        else:
            repeated[key] = [*index[key], value]
    if repeated is not None:
        for key, values in repeated.items():
            index[key] = tuple(values)
    return index, size


def framing_problem(lengths: Sequence[bytes], chunked: bool, http_version: str = "1.1") -> str | None:
    """Why a request's framing headers (its ``Content-Length`` values; whether it has ``Transfer-Encoding``) are
    ambiguous (400), or ``None``.

    HTTP/1.0 has no transfer codings: RFC 9112 §6.1 says such a message's framing is faulty.
    """
    if chunked and http_version == "1.0":
        return "an HTTP/1.0 request cannot carry Transfer-Encoding"
    if lengths and chunked:
        return "request has both Content-Length and Transfer-Encoding"
    if len(lengths) > 1:
        return "request has more than one Content-Length"
    if lengths and not lengths[0].strip().isdigit():
        return "Content-Length is not a number"
    return None


def client_address(
    peer: str | None,
    forwarded_for: Sequence[bytes],
    forwarded_proto: bytes | None,
    trusted: Sequence[IPNetwork],
) -> tuple[str | None, str | None]:
    """The real client address and scheme: ``X-Forwarded-For`` (every value, in order) and ``X-Forwarded-Proto``
    (its first value) are believed only from a ``trusted`` peer.

    Walks ``X-Forwarded-For`` from the right, skipping trusted hops, so a client cannot spoof its address by
    sending its own header through a trusted proxy. Returns ``(address, forwarded_proto)``; ``forwarded_proto``
    is ``None`` unless a trusted peer set it to ``http`` or ``https``.
    """
    if peer is None or not trusted:
        return peer, None

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    if not is_trusted(peer):
        return peer, None
    hops = [hop.strip() for value in forwarded_for for hop in value.decode("latin-1").split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        address = hop
        if not is_trusted(hop):
            break
    proto = forwarded_proto.decode("latin-1").strip().lower() if forwarded_proto else None
    return address, proto if proto in ("http", "https") else None


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent a request, as the client saw it: its address and scheme after trusted proxies.

    ``str()`` is the address for a log line (``-`` when the server gave none).
    """

    address: str | None
    scheme: str

    def __str__(self) -> str:
        return self.address or "-"

    def describe(self) -> dict[str, str]:
        """``{"client": address, "scheme": scheme}`` for the status page."""
        return {"client": self.address or "-", "scheme": self.scheme}

    @classmethod
    def resolve(
        cls, peer: str | None, scheme: str, headers: Mapping[bytes, Sequence[bytes]], trusted: Sequence[IPNetwork]
    ) -> Client:
        """The client behind ``peer`` (see :func:`client_address`); ``scheme`` is the hop's, which a trusted
        proxy's ``X-Forwarded-Proto`` replaces."""
        if peer is None or not trusted:  # the common case, without a look at any header
            return cls(peer, scheme)
        proto = headers.get(b"x-forwarded-proto")
        address, forwarded = client_address(
            peer, headers.get(b"x-forwarded-for", ()), proto[0] if proto else None, trusted
        )
        return cls(address, forwarded or scheme)


def scope_raw_path(scope: Mapping[str, Any]) -> bytes:
    """The scope's path as sent (``raw_path``, else ``path`` encoded back), without any query."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    return raw.split(b"?", 1)[0]


def scope_peer(scope: Mapping[str, Any]) -> str | None:
    """The TCP peer's address (the last hop: nginx when it is in front), or ``None``."""
    client = scope.get("client")
    return client[0] if client else None


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the edge parsed it (see the module docstring); made by :meth:`from_scope`.

    Contract: ``raw_headers`` is the scope's header list as it arrived (what the proxy filters for forwarding);
    ``headers`` holds the same headers by lower-case name, every value in the order sent. ``path`` is the ASCII
    text of ``raw_path`` (the canonical-path check guarantees it is ASCII). The API key candidates are as
    presented: :attr:`bearer_key` (``Authorization: Bearer``), :attr:`subprotocol_key` (WebSocket only) and
    ``query_key``; none of them is checked here. Fields are what parsing found; properties read the headers by
    name (one lookup each), so the view is built with no more work than a request needs.
    """

    websocket: bool
    method: str
    http_version: str
    raw_path: bytes
    path: str
    query: bytes
    params: tuple[QueryParam, ...]
    raw_headers: Sequence[tuple[bytes, bytes]]
    headers: Mapping[bytes, tuple[bytes, ...]]
    peer: str | None
    client: Client
    origin: bytes | None
    query_key: str | None
    subprotocol: str | None  # the ``access_key.<key>`` entry to echo on accept

    @classmethod
    def from_scope(
        cls,
        scope: Mapping[str, Any],
        *,
        trusted_proxies: Sequence[IPNetwork] = (),
        max_header_bytes: int = 16384,
        max_header_count: int = 100,
    ) -> Request:
        """The view of an ASGI ``http`` or ``websocket`` scope.

        Raises (checked in this order):
            UnsupportedHttpVersion: neither HTTP/1.0 nor HTTP/1.1.
            HeadersTooLarge: more than ``max_header_count`` lines, or more than ``max_header_bytes`` bytes.
            BadPath: see :func:`path_problem`.
            BadQuery: see :func:`parse_query`; or ``access_key`` more than once (which one would be checked,
                which one stripped?).
        """
        version: str = scope.get("http_version", "1.1")
        if version not in HTTP_VERSIONS:
            raise UnsupportedHttpVersion(version)
        raw_headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
        if len(raw_headers) > max_header_count:
            raise HeadersTooLarge(f"request has {len(raw_headers)} header lines; the limit is {max_header_count}")
        headers, size = index_headers(raw_headers)
        if size > max_header_bytes:
            raise HeadersTooLarge(f"request headers are {size} bytes; the limit is {max_header_bytes}")
        raw_path = scope_raw_path(scope)
        problem = path_problem(raw_path)
        if problem is not None:
            raise BadPath(problem)
        query: bytes = scope.get("query_string", b"")
        params = parse_query(query)
        query_keys = auth.query_keys(params) if params else ()
        if len(query_keys) > 1:
            raise BadQuery(f"query string carries {len(query_keys)} access_key parameters; send one")
        websocket = scope["type"] == "websocket"
        subprotocol = auth.subprotocol_key(scope.get("subprotocols") or ())[1] if websocket else None
        peer = scope_peer(scope)
        origin = headers.get(b"origin")
        return cls(
            websocket=websocket,
            method=scope.get("method", "GET"),
            http_version=version,
            raw_path=raw_path,
            path=raw_path.decode("ascii"),
            query=query,
            params=params,
            raw_headers=raw_headers,
            headers=headers,
            peer=peer,
            client=Client.resolve(peer, scope.get("scheme", "http"), headers, trusted_proxies),
            origin=origin[0] if origin else None,
            query_key=query_keys[0] if query_keys else None,
            subprotocol=subprotocol,
        )

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or ``None``."""
        values = self.headers.get(name)
        return values[0] if values else None

    def header_values(self, name: bytes) -> tuple[bytes, ...]:
        """Every value of header ``name`` (lower-case), in the order sent."""
        return self.headers.get(name, ())

    # Read from the headers by name on demand: each is one dictionary lookup, and most requests never ask.

    @property
    def host(self) -> bytes | None:
        """The first ``Host`` value."""
        return self.header(b"host")

    @property
    def chunked(self) -> bool:
        """Whether the request has ``Transfer-Encoding``."""
        return b"transfer-encoding" in self.headers

    @property
    def framing(self) -> str | None:
        """Why the framing headers are ambiguous (400; see :func:`framing_problem`), or ``None``."""
        lengths = self.headers.get(b"content-length", ())
        chunked = b"transfer-encoding" in self.headers
        return framing_problem(lengths, chunked, self.http_version) if lengths or chunked else None

    @property
    def content_length(self) -> int | None:
        """The one well-formed ``Content-Length``; ``None`` without one, or when :attr:`framing` is faulty."""
        lengths = self.headers.get(b"content-length")
        return int(lengths[0]) if lengths and self.framing is None else None

    @property
    def bearer_key(self) -> str | None:
        """The key of the first ``Authorization: Bearer <key>``, or ``None``."""
        authorization = self.headers.get(b"authorization")
        return auth.bearer_key(authorization) if authorization else None

    @property
    def subprotocol_key(self) -> str | None:
        """The key of the ``access_key.<key>`` subprotocol entry (WebSocket upgrades only), or ``None``."""
        return self.subprotocol[len(auth.SUBPROTOCOL_PREFIX) :] if self.subprotocol else None

    @property
    def keys_presented(self) -> tuple[str, ...]:
        """The API keys the request carries, where it may carry one: bearer, subprotocol, query (in that order)."""
        return tuple(key for key in (self.bearer_key, self.subprotocol_key, self.query_key) if key is not None)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the edge let through, with the edge's decisions about it: what the proxy and the relay read
    (under :data:`ADMITTED_KEY` in the scope they are given), never the scope's own fields.

    Contract: ``query`` is the query to forward — the client's, byte for byte, without its ``access_key``
    parameter — so no API key ever travels upstream.
    """

    request: Request
    request_id: str
    query: bytes
    route: str  # the allow-list pattern that matched: the metrics label
    max_body: int = 0  # the route's request body limit in bytes (HTTP; a WebSocket upgrade has no body)
