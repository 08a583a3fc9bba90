"""What a proxied request may be and how it is rewritten: route match, path checks, header allow-lists (pure).

Everything here works on bytes as they arrived (ASGI ``raw_path``, ``query_string`` and header pairs), so the
request that goes upstream is exactly the one that was checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.config.model import IPNetwork, RouteConfig
from gateway.errors import BadQuery, OAuthError
from gateway.oauth.basestring import decode_query_pair

Headers = list[tuple[bytes, bytes]]

# Request headers a client may pass upstream. Everything else is dropped: Authorization and Cookie (the
# gateway authenticates itself), Host, Proxy-*, X-Forwarded-*/Forwarded, hop-by-hop and framing headers
# (the upstream request is framed by the gateway), User-Agent (set from config).
REQUEST_HEADER_ALLOWLIST = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"content-encoding",
        b"content-type",
        b"if-match",
        b"if-modified-since",
        b"if-none-match",
        b"if-unmodified-since",
        b"pragma",
        b"x-request-id",
    }
)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Response headers never passed back: hop-by-hop, cookies (one client's cookie must not reach another; the
# gateway owns IBKR's session), and the ones the local server sets itself.
RESPONSE_HEADER_DENYLIST = HOP_BY_HOP | {b"set-cookie", b"set-cookie2", b"server", b"date", b"alt-svc"}

_PATH_ALLOWED = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/!$&'()*+,=:@")


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
    bad = next((byte for byte in raw_path if byte not in _PATH_ALLOWED), None)
    if bad is not None:
        return f"path contains a forbidden character (0x{bad:02x})"
    segments = raw_path.split(b"/")[1:]
    if any(segment in (b".", b"..") for segment in segments):
        return "path contains a dot segment"
    if any(segment == b"" for segment in segments[:-1]):
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


# What a query string may hold: printable ASCII except "#" (a fragment is never sent to a server). Anything else
# (spaces, controls, non-ASCII) has no single reading: the signer would sign one string and IBKR rebuild another.
_QUERY_ALLOWED = frozenset(range(0x21, 0x7F)) - {ord("#")}


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


def query_without(raw: bytes, params: Sequence[QueryParam], name: str) -> bytes:
    """``raw`` without the pieces whose decoded name is ``name``; unchanged (byte for byte) when there is none."""
    if not any(param.name == name for param in params):
        return raw
    return b"&".join(param.raw for param in params if param.name != name)


def upstream_url(base_url: str, raw_path: bytes, query_string: bytes) -> str:
    """The upstream URL: ``base_url`` + the path and query exactly as the client sent them."""
    url = base_url + raw_path.decode("ascii")
    if query_string:
        url += "?" + query_string.decode("ascii")
    return url


def upstream_request_headers(client_headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The client's headers that may go upstream (see ``REQUEST_HEADER_ALLOWLIST``), names lower-cased.

    A header the client names in its ``Connection`` header is hop-by-hop and is dropped even if allow-listed.
    """
    pairs = [(name.lower(), value) for name, value in client_headers]
    named = {token.strip().lower() for name, value in pairs if name == b"connection" for token in value.split(b",")}
    return [(name, value) for name, value in pairs if name in REQUEST_HEADER_ALLOWLIST and name not in named]


def downstream_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream response headers that may reach the client: no hop-by-hop, cookies or server identity.

    Headers named in the upstream's ``Connection`` header are hop-by-hop too and are dropped.
    """
    pairs = [(name.lower(), value) for name, value in upstream_headers]
    named = {
        token.strip().lower().encode()
        for name, value in pairs
        if name == b"connection"
        for token in value.decode("latin-1").split(",")
    }
    return [(name, value) for name, value in pairs if name not in RESPONSE_HEADER_DENYLIST and name not in named]


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or ``None``."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case), in order."""
    return [value for key, value in headers if key.lower() == name]


def client_address(
    peer: str | None,
    headers: Iterable[tuple[bytes, bytes]],
    trusted: Sequence[IPNetwork],
) -> tuple[str | None, str | None]:
    """The real client address and scheme: ``X-Forwarded-For``/``-Proto`` are believed only from ``trusted``.

    Walks ``X-Forwarded-For`` from the right, skipping trusted hops, so a client cannot spoof its address by
    sending its own header through a trusted proxy. Returns ``(address, forwarded_proto)``; ``forwarded_proto``
    is ``None`` unless a trusted peer set it.
    """

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    if peer is None or not is_trusted(peer):
        return peer, None
    hops = [
        hop.strip()
        for value in header_values(headers, b"x-forwarded-for")
        for hop in value.decode("latin-1").split(",")
        if hop.strip()
    ]
    address = peer
    for hop in reversed(hops):
        address = hop
        if not is_trusted(hop):
            break
    proto_raw = header_value(headers, b"x-forwarded-proto")
    proto = proto_raw.decode("latin-1").strip().lower() if proto_raw else None
    return address, proto if proto in ("http", "https") else None
