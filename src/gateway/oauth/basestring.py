"""Build the OAuth 1.0a signature base string exactly as IBKR's variant defines it (docs/protocol.md §4.2, §8.1).

``[prepend] + METHOD + "&" + pct(base_url) + "&" + pct(param_list)`` where ``param_list`` is every
parameter as ``key=value`` (values *raw*, not individually encoded), sorted by key then value and joined
with ``&``; the joined list is percent-encoded once as a whole. ``oauth_signature`` and ``realm`` are never
part of it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from urllib.parse import SplitResult, urlsplit

from gateway.errors import OAuthError
from gateway.oauth.encoding import percent_decode, percent_encode

__all__ = [
    "EXCLUDED_PARAMS",
    "QueryRule",
    "decode_query_pair",
    "normalized_url",
    "parse_query",
    "signature_base_string",
]

#: Names that belong in the Authorization header but never in the base string.
EXCLUDED_PARAMS = frozenset({"oauth_signature", "realm"})

_METHOD = re.compile(r"[A-Za-z]+")
_WIRE_URL = re.compile(r"[\x21-\x7e]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class QueryRule(enum.StrEnum):
    """How a URL's query string enters the base string; IBKR's implementations disagree (docs/protocol.md §8.1).

    ``INCLUDE`` is IBKR's guide rule and the default: query parameters are URL-decoded and merged into the
    sorted parameter list, and the URL part carries no query. ``OMIT`` ignores the query entirely (ibind,
    nsirons). ``IN_URL`` keeps the raw query inside the URL part and adds nothing to the parameter list
    (ibkr-conduit, marchenko, IBKR's C# sample).
    """

    INCLUDE = "include"
    OMIT = "omit"
    IN_URL = "in_url"


def _split(url: str) -> SplitResult:
    if not _WIRE_URL.fullmatch(url):
        raise OAuthError(
            "cannot sign a URL with spaces, control or non-ASCII characters (pass it as sent on the wire, "
            "already percent-encoded)"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OAuthError(f"cannot sign a malformed URL: {exc}") from None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        raise OAuthError("cannot sign a URL that is not an absolute http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise OAuthError("cannot sign a URL that carries user information before the host")
    if "#" in url:
        raise OAuthError("cannot sign a URL with a fragment ('#...' is never sent to the server)")
    if port is not None and port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        # RFC 5849 §3.4.1.2: the default port is not part of the base string URI.
        netloc = parts.netloc.rsplit(":", 1)[0]
        parts = parts._replace(netloc=netloc)
    return parts


def normalized_url(url: str, *, with_query: bool = False) -> str:
    """Return the URL part of the base string (before percent-encoding).

    Scheme and host are lower-cased, a default port (``:80`` for http, ``:443`` for https) is dropped, an
    empty path becomes ``/`` and the path is otherwise kept exactly as sent (no decoding, no dot-segment
    removal). With ``with_query`` the raw query (as sent, not re-encoded) is appended after ``?`` when
    non-empty.

    ``url`` must be the URL as sent on the wire: printable ASCII only, anything else already percent-encoded
    (otherwise the string signed here would differ from the one the server rebuilds).

    Raises:
        OAuthError: the URL is not an absolute ``http``/``https`` URL with a host, contains spaces, control or
            non-ASCII characters, has user information or a fragment, or has an invalid port.
    """
    parts = _split(url)
    path = parts.path or "/"
    base = f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"
    if with_query and parts.query:
        base += "?" + parts.query
    return base


def parse_query(query: str) -> list[tuple[str, str]]:
    """Split a raw query string into decoded ``(name, value)`` pairs, keeping order and repeats.

    The query is read as ``application/x-www-form-urlencoded`` (RFC 5849 §3.4.1.3.1): pairs are separated by
    ``&``, a pair without ``=`` has the empty value, empty pieces (``a=1&&b=2``) are skipped, ``+`` means a
    space, and ``%XX`` escapes are decoded strictly.

    Raises:
        OAuthError: a malformed ``%`` escape or escapes that are not valid UTF-8.
    """
    return [decode_query_pair(piece) for piece in query.split("&") if piece]


def decode_query_pair(piece: str) -> tuple[str, str]:
    """Decode one ``name=value`` piece of a query string (no ``=``: the empty value; ``+`` is a space).

    Raises:
        OAuthError: a malformed ``%`` escape or escapes that are not valid UTF-8.
    """
    name, _, value = piece.partition("=")
    return percent_decode(name.replace("+", " ")), percent_decode(value.replace("+", " "))


def signature_base_string(
    method: str,
    url: str,
    oauth_params: Mapping[str, str],
    *,
    query_rule: QueryRule = QueryRule.INCLUDE,
    form_params: Sequence[tuple[str, str]] = (),
    prepend: str = "",
) -> str:
    """Return the signature base string for one request.

    Args:
        method: the HTTP method actually sent; upper-cased here.
        url: the absolute URL actually sent, query included. See :func:`normalized_url` for how it is
            normalised and :class:`QueryRule` for what happens to its query.
        oauth_params: the ``oauth_*`` parameters (and ``diffie_hellman_challenge`` for the LST request), raw.
        query_rule: how the query string is treated (docs/protocol.md §8.1); IBKR's guide rule by default.
        form_params: decoded parameters of an ``application/x-www-form-urlencoded`` body. The caller decides
            whether the body is of that type; JSON and other bodies are never signed.
        prepend: text placed in front of the method with no separator; the lower-case hex of the decrypted
            access-token secret for ``/oauth/live_session_token``, empty otherwise.

    The parameter list holds ``oauth_params``, the query parameters (``INCLUDE`` only) and ``form_params``,
    sorted by name and then value in code-point order (= UTF-8 byte order), repeated names kept. Values enter
    the list raw; the joined list is percent-encoded once.

    Raises:
        OAuthError: ``oauth_params`` contains ``oauth_signature`` or ``realm`` (they are header-only, and a
            caller passing them has mixed up header and base string, so this is an error rather than silently
            dropped); an unknown ``query_rule``; the method is not a plain token of letters; the URL is
            unusable (see :func:`normalized_url`) or its query is malformed (see :func:`parse_query`).
    """
    excluded = EXCLUDED_PARAMS.intersection(oauth_params)
    if excluded:
        raise OAuthError(f"{', '.join(sorted(excluded))} must not be part of the signature base string")
    if not _METHOD.fullmatch(method):
        raise OAuthError("HTTP method must be a non-empty run of ASCII letters")

    try:
        rule = QueryRule(query_rule)
    except ValueError:
        raise OAuthError(f"unknown query rule {query_rule!r}") from None

    params: list[tuple[str, str]] = list(oauth_params.items())
    if rule is QueryRule.INCLUDE:
        params.extend(parse_query(_split(url).query))
    params.extend(form_params)
    params.sort()
    param_list = "&".join(f"{name}={value}" for name, value in params)

    base_url = normalized_url(url, with_query=rule is QueryRule.IN_URL)
    return f"{prepend}{method.upper()}&{percent_encode(base_url)}&{percent_encode(param_list)}"
