"""How an admitted request is rewritten for IBKR, and IBKR's answer for the client: header allow-lists, the
query without the API key, the upstream URL (pure).

The checks of what a request may be (path, query, route, framing, header limits) are the edge's, in
:mod:`gateway.edge.request`. Everything here works on bytes as they arrived (ASGI ``raw_path``, ``query_string``
and header pairs), so the request that goes upstream is exactly the one that was checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from gateway.edge.request import QueryParam

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
    """The first value of header ``name`` (lower-case) in a list of pairs that is not the client's request (the
    client's headers are read from its :class:`~gateway.edge.request.Request`), or ``None``."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
