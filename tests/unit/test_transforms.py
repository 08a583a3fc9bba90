"""The edge's path, route and query checks (gateway.edge.request) and the proxy transforms: query rewriting, header
allow-lists. The request view and the client address behind trusted proxies: tests/unit/test_request.py."""

from __future__ import annotations

import string
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.model import RouteConfig
from gateway.edge.request import QueryParam, match_route, parse_query, path_problem, reserved_parameter
from gateway.errors import BadQuery
from gateway.proxy.transforms import (
    HOP_BY_HOP,
    REQUEST_HEADER_ALLOWLIST,
    downstream_response_headers,
    header_value,
    query_without,
    upstream_request_headers,
    upstream_url,
)

Headers = list[tuple[bytes, bytes]]
fast = settings(max_examples=25, deadline=None)  # pure and cheap; keep the unit suite well under a few seconds

# --- path_problem ----------------------------------------------------------------------------------------------

START = "must start with /"
PERCENT = "percent-encoded"
CHAR = "forbidden character"
DOT = "dot segment"
EMPTY = "empty segment"

HOSTILE_PATHS: list[tuple[bytes, str]] = [
    # not origin-form
    (b"", START),
    (b"v1/api/iserver/accounts", START),
    (b"http://x/", START),
    (b"https://api.ibkr.com/v1/api/iserver/accounts", START),
    (b"*", START),
    (b"\\v1\\api", START),
    (b" /v1/api", START),
    (b".", START),
    # dot segments
    (b"/v1/api/../x", DOT),
    (b"/v1/./x", DOT),
    (b"/..", DOT),
    (b"/.", DOT),
    (b"/v1/api/..", DOT),
    (b"/v1/api/.", DOT),
    (b"/../../etc/passwd", DOT),
    (b"/v1/api/x/../", DOT),
    # empty segments
    (b"//x", EMPTY),
    (b"/a//b", EMPTY),
    (b"//", EMPTY),
    (b"/v1/api//", EMPTY),
    (b"///v1/api", EMPTY),
    # anything percent-encoded: encoded dots, slashes, backslashes, NUL, double encoding
    (b"/%2e%2e/x", PERCENT),
    (b"/v1/%2E%2E/x", PERCENT),
    (b"/v1/.%2e/x", PERCENT),
    (b"/v1/%2e/x", PERCENT),
    (b"/a%2fb", PERCENT),
    (b"/a%2Fb", PERCENT),
    (b"/a%5cb", PERCENT),
    (b"/a%5Cb", PERCENT),
    (b"/a%00b", PERCENT),
    (b"/a%252e%252e/x", PERCENT),
    (b"/a%25", PERCENT),
    (b"/%", PERCENT),
    (b"/v1/api/%u002e%u002e", PERCENT),
    (b"/v1/api/iserver%3bjsessionid=1", PERCENT),
    # characters outside the canonical set
    (b"/a;jsessionid=abc", CHAR),
    (b"/v1/api;/x", CHAR),
    (b"/a\\b", CHAR),
    (b"/a\\..\\b", CHAR),
    (b"/a\x00b", CHAR),
    (b"/a\rb", CHAR),
    (b"/a\nb", CHAR),
    (b"/a\r\nHost: evil", CHAR),
    (b"/a b", CHAR),
    (b"/a\tb", CHAR),
    (b"/a\x7fb", CHAR),
    (b"/caf\xc3\xa9", CHAR),
    (b"/\xff", CHAR),
    (b"/v1/api/\xef\xbc\x8e\xef\xbc\x8e/x", CHAR),  # fullwidth full stops
    (b"/a?b=c", CHAR),
    (b"/a#frag", CHAR),
    (b'/a"b', CHAR),
    (b"/a<b>", CHAR),
    (b"/a`b", CHAR),
    (b"/a{b}", CHAR),
    (b"/a|b", CHAR),
    (b"/a^b", CHAR),
    (b"/a[b]", CHAR),
]

GOOD_PATHS: list[bytes] = [
    b"/",
    b"/v1/api/iserver/accounts",
    b"/v1/api/iserver/account/U1234567/orders",
    b"/v1/api/iserver/account/U1234567/order/1234567890",
    b"/v1/api/x/",
    b"/v1/api/iserver/secdef/info/265598,8314",
    b"/a:b",
    b"/user@host",
    b"/k=v",
    b"/a,b,c",
    b"/~user/-._",
    b"/v1/api/.well-known",
    b"/a..b",
    b"/v1/api/*",  # '*' is a sub-delim and allowed inside a segment; asterisk-form alone is rejected above
    b"/!$&'()*+",
]


@pytest.mark.parametrize(("raw_path", "reason"), HOSTILE_PATHS)
def test_hostile_path_is_rejected_with_reason(raw_path: bytes, reason: str) -> None:
    problem = path_problem(raw_path)
    assert problem is not None
    assert reason in problem


def test_hostile_path_table_is_large_and_unique() -> None:
    paths = [raw for raw, _ in HOSTILE_PATHS]
    assert len(paths) >= 40
    assert len(set(paths)) == len(paths)


@pytest.mark.parametrize("raw_path", GOOD_PATHS)
def test_good_path_is_accepted(raw_path: bytes) -> None:
    assert path_problem(raw_path) is None


def test_forbidden_character_is_named_in_hex() -> None:
    assert path_problem(b"/a;b") == "path contains a forbidden character (0x3b)"


UNRESERVED = string.ascii_letters + string.digits + "-._~"
_segment = st.text(alphabet=UNRESERVED, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_segments = st.lists(_segment, min_size=1, max_size=8)


@fast
@given(_segments, st.booleans())
def test_property_unreserved_segments_are_accepted(segments: list[str], trailing_slash: bool) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing_slash else "")
    assert path_problem(path.encode()) is None


@fast
@given(st.binary(max_size=40), st.binary(max_size=40))
def test_property_any_percent_is_rejected(before: bytes, after: bytes) -> None:
    assert path_problem(b"/" + before + b"%" + after) is not None


@fast
@given(_segments, st.integers(min_value=0), st.sampled_from([b".", b".."]), st.booleans())
def test_property_any_dot_segment_is_rejected(
    segments: list[str], where: int, dot: bytes, trailing_slash: bool
) -> None:
    parts = [s.encode() for s in segments]
    parts.insert(where % (len(parts) + 1), dot)
    path = b"/" + b"/".join(parts) + (b"/" if trailing_slash else b"")
    assert path_problem(path) is not None


@fast
@given(st.binary(max_size=60))
def test_property_accepted_paths_are_canonical(raw: bytes) -> None:
    problem = path_problem(raw)
    assert problem is None or isinstance(problem, str)
    if problem is None:
        text = raw.decode("ascii")
        segments = text.split("/")[1:]
        assert text.startswith("/")
        assert "%" not in text and "\\" not in text and ";" not in text
        assert "." not in segments and ".." not in segments
        assert "" not in segments[:-1]


def _path_problem_by_segments(raw_path: bytes) -> str | None:
    """path_problem written the slow, obvious way: byte by byte, then segment by segment."""
    allowed = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/!$&'()*+,=:@"
    if not raw_path.startswith(b"/"):
        return "path must start with /"
    if b"%" in raw_path:
        return "percent-encoded paths are not accepted"
    bad = next((byte for byte in raw_path if byte not in allowed), None)
    if bad is not None:
        return f"path contains a forbidden character (0x{bad:02x})"
    segments = raw_path.split(b"/")[1:]
    if any(segment in (b".", b"..") for segment in segments):
        return "path contains a dot segment"
    if any(segment == b"" for segment in segments[:-1]):
        return "path contains an empty segment"
    return None


_path_bytes = st.lists(
    st.sampled_from([b"/", b".", b"..", b"a", b"%", b";", b"\\", b"\x00", b"\xc3", b" ", b"~"]), max_size=12
)


@settings(max_examples=300, deadline=None)
@given(_path_bytes, st.binary(max_size=6))
def test_property_path_problem_equals_the_segment_by_segment_reading(pieces: list[bytes], tail: bytes) -> None:
    raw_path = b"".join(pieces) + tail
    assert path_problem(raw_path) == _path_problem_by_segments(raw_path)


# --- match_route -----------------------------------------------------------------------------------------------

ROUTES = (
    RouteConfig("/v1/api/*"),
    RouteConfig("/v1/api/iserver/*"),
    RouteConfig("/v1/api/iserver/accounts", ("GET",)),
    RouteConfig("/x/*"),
    RouteConfig("/tickle"),
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/api/iserver/accounts", "/v1/api/iserver/accounts"),  # exact beats a matching prefix
        ("/v1/api/iserver/account/U1234567/orders", "/v1/api/iserver/*"),  # longest prefix wins
        ("/v1/api/iserver/accounts/extra", "/v1/api/iserver/*"),
        ("/v1/api/portfolio/accounts", "/v1/api/*"),
        ("/v1/api/iserver", "/v1/api/*"),
        ("/v1/api/iserver/", "/v1/api/*"),  # nothing below /v1/api/iserver/, so the shorter prefix
        ("/x/y/z", "/x/*"),
        ("/x/y", "/x/*"),
        ("/x", None),
        ("/xy", None),
        ("/xy/z", None),
        ("/x/", None),  # "/x/*" is everything *below* /x/
        ("/tickle", "/tickle"),
        ("/tickle/", None),  # exact routes are exact
        ("/tickles", None),
        ("/v1/api", None),
        ("/v1/api/", None),
        ("/", None),
        ("/nothing", None),
    ],
)
def test_match_route(path: str, expected: str | None) -> None:
    route = match_route(ROUTES, path)
    assert (route.path if route else None) == expected


def test_match_route_returns_the_route_object_with_its_methods() -> None:
    route = match_route(ROUTES, "/v1/api/iserver/accounts")
    assert route is ROUTES[2]
    assert route.methods == ("GET",)


def test_no_routes_matches_nothing() -> None:
    assert match_route((), "/v1/api/iserver/accounts") is None


def test_root_prefix_matches_everything_below_root() -> None:
    routes = (RouteConfig("/*"),)
    assert match_route(routes, "/a") is routes[0]
    assert match_route(routes, "/a/b/c") is routes[0]
    assert match_route(routes, "/") is None


@fast
@given(st.permutations(ROUTES), st.sampled_from(["/v1/api/iserver/accounts", "/v1/api/iserver/a", "/v1/api/b", "/x/y"]))
def test_property_route_order_does_not_matter(routes: list[RouteConfig], path: str) -> None:
    assert match_route(routes, path) == match_route(ROUTES, path)


# --- parse_query / reserved_parameter / query_without -----------------------------------------------------------


def query_problem(query: bytes) -> str | None:
    """What the edge says about ``query``: the parse error, the reserved-name problem, or ``None``."""
    try:
        return reserved_parameter(parse_query(query))
    except BadQuery as exc:
        return str(exc)


@pytest.mark.parametrize(
    "query",
    [
        b"oauth_token=abc",
        b"OAUTH_nonce",
        b"a=1&oauth_signature=x",
        b"Oauth_Consumer_Key=k",
        b"oauth_=x",
        b"a=1&&oauth_timestamp=1",
        b"oauth%5Ftoken=x",  # percent-encoded underscore decodes to oauth_token
        b"%6Fauth_token=x",
        b"%4F%41%55%54%48_signature_method=RSA-SHA256",
        b"b=2&oauth_token",
    ],
)
def test_client_oauth_parameters_are_rejected(query: bytes) -> None:
    problem = query_problem(query)
    assert problem is not None
    assert "reserved" in problem


@pytest.mark.parametrize("query", [b"caf\xc3\xa9=1", b"a=\xff", b"\x80", b"a=1&b=\xe2\x82\xac"])
def test_non_ascii_query_is_rejected(query: bytes) -> None:
    problem = query_problem(query)
    assert problem is not None
    assert "printable ASCII" in problem


@pytest.mark.parametrize(
    ("query", "says"),
    [
        (b"a=%zz", "two hex digits"),
        (b"q=%ZZ", "two hex digits"),
        (b"a=%", "two hex digits"),
        (b"a=%2", "two hex digits"),
        (b"a=%%", "two hex digits"),
        (b"%g1=x", "two hex digits"),
        (b"a=%E9", "UTF-8"),  # a lone Latin-1 byte: no text the signer could sign
        (b"a=%C3", "UTF-8"),
        (b"a=1#x", "'#'"),
        (b"a=1&b=2#", "'#'"),
        (b"a=b c", "0x20"),
        (b"a=\tb", "0x09"),
        (b"a=\x7f", "0x7f"),
        (b"a=\x00", "0x00"),
    ],
)
def test_malformed_queries_are_refused_saying_what_is_wrong(query: bytes, says: str) -> None:
    with pytest.raises(BadQuery) as caught:
        parse_query(query)
    assert says in str(caught.value)
    assert caught.value.status == 400


def test_a_malformed_query_message_never_quotes_the_query() -> None:
    secret = b"access_key=very-secret-key-0123456789&x=%zz"
    with pytest.raises(BadQuery) as caught:
        parse_query(secret)
    assert "very-secret" not in str(caught.value)
    assert "parameter 2" in str(caught.value)


@pytest.mark.parametrize(
    "query",
    [
        b"",
        b"a=1",
        b"conids=265598,8314&fields=31,84,86",
        b"a=",
        b"a",
        b"a=1&b=",
        b"&&",
        b"=",
        b"oauth=1",
        b"xoauth_token=1",
        b"token=oauth_token",
        b"a=oauth_token%3Dx",
        b"a=%C3%A9",
        b"a=%e2%82%ac",
        b"period=1d&bar=5min",
        b"q=a+b",
    ],
)
def test_ordinary_queries_are_accepted(query: bytes) -> None:
    assert query_problem(query) is None


def test_parse_query_decodes_like_the_signer_and_keeps_the_raw_pieces() -> None:
    params = parse_query(b"%61ccess_key=k&x=a+b&&y=%C3%A9&z")
    assert params == (
        QueryParam(b"%61ccess_key=k", "access_key", "k"),
        QueryParam(b"x=a+b", "x", "a b"),
        QueryParam(b"y=%C3%A9", "y", "\u00e9"),
        QueryParam(b"z", "z", ""),
    )


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"a=1&access_key=k&b=2", b"a=1&b=2"),
        (b"%61ccess_key=k&b=2", b"b=2"),  # the name is compared decoded, as the key check reads it
        (b"access%5Fkey=k", b""),
        (b"access%5fkey=k&a=%2F", b"a=%2F"),  # the rest is kept byte for byte
        (b"a=1&b=2", b"a=1&b=2"),
        (b"a=1&&b=2", b"a=1&&b=2"),  # nothing stripped: unchanged, empty pieces included
        (b"access+key=k&access_keyx=1", b"access+key=k&access_keyx=1"),  # other names stay
    ],
)
def test_query_without_strips_every_spelling_of_a_name(query: bytes, expected: bytes) -> None:
    assert query_without(query, parse_query(query), "access_key") == expected


_key = st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=10).filter(
    lambda k: not k.lower().startswith("oauth_")
)
_pairs = st.lists(st.tuples(_key, st.text(max_size=10)), max_size=6)


@fast
@given(_pairs)
def test_property_queries_without_oauth_keys_are_accepted(pairs: list[tuple[str, str]]) -> None:
    assert query_problem(urlencode(pairs).encode("ascii")) is None


@fast
@given(_pairs)
def test_property_parse_query_decodes_what_urlencode_encodes(pairs: list[tuple[str, str]]) -> None:
    params = parse_query(urlencode(pairs).encode("ascii"))
    assert [(p.name, p.value) for p in params] == pairs


@fast
@given(_pairs, st.integers(min_value=0), st.sampled_from(["oauth_token", "OAuth_Nonce", "oauth_signature"]))
def test_property_an_oauth_key_anywhere_is_rejected(pairs: list[tuple[str, str]], where: int, name: str) -> None:
    pairs.insert(where % (len(pairs) + 1), (name, "x"))
    assert query_problem(urlencode(pairs).encode("ascii")) is not None


# --- upstream_url ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_path", "query", "expected"),
    [
        (b"/v1/api/iserver/accounts", b"", "https://api.ibkr.com/v1/api/iserver/accounts"),
        (
            b"/v1/api/md/snapshot",
            b"conids=1,2&fields=31",
            "https://api.ibkr.com/v1/api/md/snapshot?conids=1,2&fields=31",
        ),
        (b"/v1/api/x/", b"a=%20b", "https://api.ibkr.com/v1/api/x/?a=%20b"),
    ],
)
def test_upstream_url_keeps_path_and_query_verbatim(raw_path: bytes, query: bytes, expected: str) -> None:
    assert upstream_url("https://api.ibkr.com", raw_path, query) == expected


# --- request headers -------------------------------------------------------------------------------------------

CLIENT_HEADERS: Headers = [
    (b"Authorization", b"Bearer gateway-token"),
    (b"Accept", b"application/json"),
    (b"Cookie", b"session=abc"),
    (b"Host", b"localhost:5000"),
    (b"Proxy-Authorization", b"Basic eDp5"),
    (b"X-Forwarded-For", b"1.2.3.4"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"evil.example"),
    (b"Forwarded", b"for=1.2.3.4;proto=https"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Keep-Alive", b"timeout=5"),
    (b"TE", b"trailers"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Content-Length", b"12"),
    (b"Upgrade", b"websocket"),
    (b"User-Agent", b"curl/8.0"),
    (b"X-Api-Key", b"k"),
    (b"Content-Type", b"application/json"),
    (b"ACCEPT", b"text/plain"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"If-None-Match", b'"etag-1"'),
    (b"Proxy-Connection", b"keep-alive"),
    (b"Trailer", b"X-Checksum"),
    (b"Origin", b"https://dash.example.com"),
    (b"X-Request-Id", b"req-1"),
    (b"accept", b"*/*"),
]


def test_only_allow_listed_request_headers_go_upstream() -> None:
    assert upstream_request_headers(CLIENT_HEADERS) == [
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"accept", b"text/plain"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"if-none-match", b'"etag-1"'),
        (b"x-request-id", b"req-1"),
        (b"accept", b"*/*"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        b"authorization",
        b"cookie",
        b"host",
        b"proxy-authorization",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"content-length",
        b"upgrade",
        b"user-agent",
        b"x-api-key",
        b"origin",
    ],
)
def test_denied_request_header_never_goes_upstream(name: bytes) -> None:
    assert name not in REQUEST_HEADER_ALLOWLIST
    assert upstream_request_headers([(name, b"v"), (name.upper(), b"v"), (name.title(), b"v")]) == []


def test_headers_named_in_client_connection_are_not_forwarded() -> None:
    # A header named in Connection is hop-by-hop (RFC 9110 §7.6.1): never forwarded, even an allow-listed one.
    headers: Headers = [
        (b"Connection", b"close, X-Request-Id, Accept-Language"),
        (b"X-Request-Id", b"req-1"),
        (b"Accept-Language", b"en"),
        (b"Accept", b"application/json"),
    ]
    assert upstream_request_headers(headers) == [(b"accept", b"application/json")]


_allowed_names = sorted(REQUEST_HEADER_ALLOWLIST)
_denied_names = sorted(HOP_BY_HOP | {b"authorization", b"cookie", b"host", b"x-forwarded-for", b"content-length"})


_header_name = st.builds(
    lambda name, case: case(name),
    st.one_of(st.sampled_from(_allowed_names), st.sampled_from(_denied_names), st.binary(max_size=12)),
    st.sampled_from([bytes.lower, bytes.upper, bytes.title]),
)
_header_lists = st.lists(st.tuples(_header_name, st.binary(max_size=12)), max_size=10)


@fast
@given(_header_lists)
def test_property_request_headers_are_an_ordered_allow_listed_subset(headers: Headers) -> None:
    out = upstream_request_headers(headers)
    assert all(name in REQUEST_HEADER_ALLOWLIST for name, _ in out)
    lowered = [(n.lower(), v) for n, v in headers]
    it = iter(lowered)
    assert all(pair in it for pair in out)  # an order-preserving subsequence, values untouched
    if all(name != b"connection" for name, _ in lowered):
        assert out == [(n, v) for n, v in lowered if n in REQUEST_HEADER_ALLOWLIST]


# --- response headers ------------------------------------------------------------------------------------------


def test_response_headers_drop_cookies_hop_by_hop_and_server_identity() -> None:
    upstream: Headers = [
        (b"Set-Cookie", b"x-sess-uuid=1; Path=/"),
        (b"Content-Type", b"application/json"),
        (b"Server", b"IBKR"),
        (b"Set-Cookie", b"JSESSIONID=2; HttpOnly"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"Content-Length", b"42"),
        (b"Connection", b"close, X-Custom-Hop"),
        (b"X-Custom-Hop", b"1"),
        (b"Content-Encoding", b"gzip"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Cache-Control", b"no-store"),
        (b"set-cookie", b"third=3"),
        (b"Set-Cookie2", b"old=1"),
        (b"Alt-Svc", b'h3=":443"'),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"h2c"),
        (b"X-Request-Id", b"req-1"),
        (b"x-custom-hop", b"2"),
    ]
    assert downstream_response_headers(upstream) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"42"),
        (b"content-encoding", b"gzip"),
        (b"cache-control", b"no-store"),
        (b"x-request-id", b"req-1"),
    ]


def test_every_connection_header_names_hop_by_hop_headers() -> None:
    upstream: Headers = [
        (b"Connection", b"  X-One ,x-two"),
        (b"CONNECTION", b"X-THREE"),
        (b"x-one", b"1"),
        (b"X-Two", b"2"),
        (b"x-three", b"3"),
        (b"x-four", b"4"),
    ]
    assert downstream_response_headers(upstream) == [(b"x-four", b"4")]


@fast
@given(_header_lists)
def test_property_response_headers_never_carry_cookies_or_hop_by_hop(headers: Headers) -> None:
    out = downstream_response_headers(headers)
    names = {name for name, _ in out}
    assert not names & (HOP_BY_HOP | {b"set-cookie", b"set-cookie2", b"server", b"date"})
    lowered = [(n.lower(), v) for n, v in headers]
    it = iter(lowered)
    assert all(pair in it for pair in out)  # an order-preserving subsequence


# --- header_value ----------------------------------------------------------------------------------------------

SAMPLE: Headers = [(b"Host", b"a"), (b"accept", b"1"), (b"ACCEPT", b"2"), (b"x-empty", b"")]


@pytest.mark.parametrize(("name", "first"), [(b"host", b"a"), (b"accept", b"1"), (b"x-empty", b""), (b"missing", None)])
def test_header_lookup(name: bytes, first: bytes | None) -> None:
    assert header_value(SAMPLE, name) == first
