"""The request view the edge makes once per request: header lookup, client behind trusted proxies, the keys a request
presents, framing, and the errors (and their order) for malformed requests, down to the dispatcher's answers."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import string
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.asgi import Message, Receive, Scope, Send
from gateway.config.model import IPNetwork, RouteConfig
from gateway.edge.request import Request, index_headers
from gateway.errors import BadPath, BadQuery, HeadersTooLarge, RequestRejected, UnsupportedHttpVersion
from gateway.web.dispatch import Dispatcher, DispatchSettings

Headers = list[tuple[bytes, bytes]]
fast = settings(max_examples=50, deadline=None)

TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("10.0.0.0/8"),
)


def scope(
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    kind: str = "http",
    peer: str | None = "203.0.113.5",
    path: bytes = b"/v1/api/iserver/accounts",
    query: bytes = b"",
    version: str = "1.1",
    **extra: Any,
) -> Scope:
    made: Scope = {
        "type": kind,
        "http_version": version,
        "scheme": "ws" if kind == "websocket" else "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "headers": list(headers),
        "client": None if peer is None else (peer, 50000),
    }
    if kind == "http":
        made["method"] = "GET"
    return {**made, **extra}


def view(headers: Sequence[tuple[bytes, bytes]] = (), **kwargs: Any) -> Request:
    trusted = kwargs.pop("trusted", TRUSTED)
    return Request.from_scope(scope(headers, **kwargs), trusted_proxies=trusted)


# --- headers by name -------------------------------------------------------------------------------------------

_names = st.one_of(
    st.sampled_from([b"host", b"Host", b"ACCEPT", b"accept", b"x-forwarded-for", b"content-length", b"origin"]),
    st.binary(max_size=8),
)
_header_lists = st.lists(st.tuples(_names, st.binary(max_size=12)), max_size=30)


@fast
@given(_header_lists, _names)
def test_property_lookup_by_name_equals_a_linear_scan(headers: Headers, name: bytes) -> None:
    request = view(headers)
    wanted = name.lower()
    every = tuple(value for key, value in headers if key.lower() == wanted)
    assert request.header_values(wanted) == every
    assert request.header(wanted) == (every[0] if every else None)
    assert request.raw_headers == headers  # kept as it arrived, for forwarding
    assert set(request.headers) == {key.lower() for key, _ in headers}


@fast
@given(_header_lists)
def test_property_index_counts_the_block_like_the_header_limit(headers: Headers) -> None:
    index, size = index_headers(headers)
    assert size == sum(len(name) + len(value) + 4 for name, value in headers)
    assert sum(len(values) for values in index.values()) == len(headers)


def test_many_repeats_of_one_name_are_indexed_in_order() -> None:
    headers = [(b"x-many", str(n).encode()) for n in range(1000)]
    index, _ = index_headers(headers)
    assert index[b"x-many"] == tuple(str(n).encode() for n in range(1000))


def test_the_view_is_immutable() -> None:
    request = view([(b"origin", b"https://a.example")])
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.origin = None  # type: ignore[misc]


def test_fields_read_once() -> None:
    request = view(
        [(b"Host", b"gw:5000"), (b"origin", b"https://a.example"), (b"origin", b"https://b.example")],
        path=b"/v1/api/iserver/accounts",
        query=b"a=1&b=%32",
    )
    assert (request.method, request.path, request.raw_path, request.query) == (
        "GET",
        "/v1/api/iserver/accounts",
        b"/v1/api/iserver/accounts",
        b"a=1&b=%32",
    )
    assert [(p.name, p.value) for p in request.params] == [("a", "1"), ("b", "2")]
    assert (request.host, request.origin) == (b"gw:5000", b"https://a.example")  # the first Origin, as before
    assert not request.websocket
    upgrade = view(kind="websocket", path=b"/v1/api/ws")
    assert upgrade.websocket and upgrade.method == "GET"


def test_a_raw_path_with_its_query_is_cut_at_the_question_mark() -> None:
    assert view(path=b"/v1/api/iserver/accounts?x=1").raw_path == b"/v1/api/iserver/accounts"


# --- client address and scheme behind trusted proxies -------------------------------------------------------------


def _xff(*values: str) -> Headers:
    return [(b"X-Forwarded-For", value.encode()) for value in values]


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        (None, _xff("198.51.100.7"), None),
        ("203.0.113.5", _xff("198.51.100.7"), "203.0.113.5"),  # untrusted peer: header ignored
        ("203.0.113.5", _xff("10.0.0.2"), "203.0.113.5"),
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", _xff(""), "127.0.0.1"),
        ("127.0.0.1", _xff(" , ,"), "127.0.0.1"),
        ("127.0.0.1", _xff("198.51.100.7"), "198.51.100.7"),
        ("127.0.0.1", _xff("6.6.6.6, 198.51.100.7"), "198.51.100.7"),  # spoofed leftmost entry ignored
        ("127.0.0.1", _xff("6.6.6.6, 127.0.0.1, 198.51.100.7"), "198.51.100.7"),
        ("127.0.0.1", _xff("198.51.100.7, 10.0.0.2, 10.0.0.3"), "198.51.100.7"),  # chain of trusted proxies
        ("127.0.0.1", _xff("1.1.1.1, 198.51.100.7, 10.0.0.2"), "198.51.100.7"),
        ("127.0.0.1", _xff("1.1.1.1", "198.51.100.7, 10.0.0.2"), "198.51.100.7"),  # several header lines
        ("127.0.0.1", _xff("10.0.0.9, 10.0.0.2"), "10.0.0.9"),  # all trusted: the leftmost hop
        ("127.0.0.1", _xff("  198.51.100.7  ,, "), "198.51.100.7"),
        ("::1", _xff("2001:db8::1"), "2001:db8::1"),
        ("::1", _xff("6.6.6.6, 2001:db8::1, ::1"), "2001:db8::1"),
        ("2001:db8::5", _xff("198.51.100.7"), "2001:db8::5"),
        ("10.1.2.3", [(b"x-forwarded-for", b"198.51.100.7")], "198.51.100.7"),
        # a garbage hop is never trusted: the walk stops there and nothing to its left is believed
        ("127.0.0.1", _xff("garbage"), "garbage"),
        ("127.0.0.1", _xff("6.6.6.6, garbage, 10.0.0.2"), "garbage"),
        ("127.0.0.1", _xff("6.6.6.6, 10.0.0.2:8080"), "10.0.0.2:8080"),
        ("127.0.0.1", _xff("6.6.6.6, unknown"), "unknown"),
        ("not-an-ip", _xff("198.51.100.7"), "not-an-ip"),
    ],
)
def test_client_address(peer: str | None, headers: Headers, expected: str | None) -> None:
    request = view(headers, peer=peer)
    assert request.client.address == expected
    assert request.peer == peer
    assert str(request.client) == (expected or "-")


@pytest.mark.parametrize(
    ("peer", "proto", "expected"),
    [
        ("127.0.0.1", b"https", "https"),
        ("127.0.0.1", b"http", "http"),
        ("127.0.0.1", b" HTTPS ", "https"),
        ("::1", b"https", "https"),
        ("127.0.0.1", b"ftp", "http"),
        ("127.0.0.1", b"wss", "http"),
        ("127.0.0.1", b"https, http", "http"),
        ("127.0.0.1", b"", "http"),
        ("127.0.0.1", None, "http"),
        ("203.0.113.5", b"https", "http"),  # only trusted peers may set it
        ("2001:db8::5", b"https", "http"),
        (None, b"https", "http"),
    ],
)
def test_forwarded_proto_sets_the_scheme_only_from_a_trusted_peer(
    peer: str | None, proto: bytes | None, expected: str
) -> None:
    headers: Headers = [(b"X-Forwarded-For", b"198.51.100.7")]
    if proto is not None:
        headers.append((b"X-Forwarded-Proto", proto))
    client = view(headers, peer=peer).client
    assert client.scheme == expected
    assert client.describe() == {"client": client.address or "-", "scheme": expected}


def test_only_the_first_forwarded_proto_counts() -> None:
    headers = [(b"x-forwarded-proto", b"https"), (b"x-forwarded-proto", b"http")]
    assert view(headers, peer="127.0.0.1").client.scheme == "https"


def test_nothing_is_trusted_without_trusted_networks() -> None:
    headers = [*_xff("198.51.100.7"), (b"x-forwarded-proto", b"https")]
    client = view(headers, peer="127.0.0.1", trusted=()).client
    assert (client.address, client.scheme) == ("127.0.0.1", "http")


_untrusted_v4 = st.ip_addresses(v=4).filter(lambda ip: not any(ip in net for net in TRUSTED)).map(str)


@fast
@given(_untrusted_v4, _header_lists)
def test_property_untrusted_peer_ignores_every_header(peer: str, headers: Headers) -> None:
    headers = [*headers, (b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-proto", b"https")]
    client = view(headers, peer=peer).client
    assert (client.address, client.scheme) == (peer, "http")


@fast
@given(st.lists(st.text(alphabet=string.printable.replace(",", ""), max_size=15), max_size=5), _untrusted_v4)
def test_property_client_cannot_spoof_past_the_rightmost_untrusted_hop(spoofed: list[str], real: str) -> None:
    value = ", ".join([*spoofed, real, "10.0.0.2"]).encode("latin-1")
    assert view([(b"x-forwarded-for", value)], peer="127.0.0.1").client.address == real


# --- keys presented --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ([b"Bearer abc"], "abc"),
        ([b"bearer  abc  "], "abc"),
        ([b"Basic eDp5", b"Bearer second"], "second"),  # the first Bearer among the values
        ([b"Bearer "], None),
        ([b"Token abc"], None),
        ([], None),
    ],
)
def test_bearer_key(authorization: list[bytes], expected: str | None) -> None:
    assert view([(b"Authorization", value) for value in authorization]).bearer_key == expected


def test_keys_presented_in_order_and_the_subprotocol_only_on_upgrades() -> None:
    headers = [(b"authorization", b"Bearer h")]
    http = view(headers, query=b"access_key=q", subprotocols=["access_key.s"])
    assert (http.subprotocol_key, http.subprotocol, http.keys_presented) == (None, None, ("h", "q"))
    upgrade = view(headers, kind="websocket", query=b"%61ccess_key=q", subprotocols=["x", "access_key.s"])
    assert upgrade.keys_presented == ("h", "s", "q")
    assert upgrade.subprotocol == "access_key.s"
    assert view().keys_presented == ()


# --- framing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "version", "problem", "length"),
    [
        ([], "1.1", None, None),
        ([(b"content-length", b"42")], "1.1", None, 42),
        ([(b"content-length", b" 7 ")], "1.0", None, 7),
        ([(b"transfer-encoding", b"chunked")], "1.1", None, None),
        ([(b"transfer-encoding", b"chunked")], "1.0", "an HTTP/1.0 request cannot carry Transfer-Encoding", None),
        (
            [(b"content-length", b"4"), (b"transfer-encoding", b"chunked")],
            "1.1",
            "request has both Content-Length and Transfer-Encoding",
            None,
        ),
        (
            [(b"content-length", b"2"), (b"content-length", b"2")],
            "1.1",
            "request has more than one Content-Length",
            None,
        ),
        ([(b"content-length", b"-1")], "1.1", "Content-Length is not a number", None),
        ([(b"content-length", b"1e3")], "1.1", "Content-Length is not a number", None),
        ([(b"content-length", b"")], "1.1", "Content-Length is not a number", None),
    ],
)
def test_framing_is_recorded_not_raised(
    headers: Headers, version: str, problem: str | None, length: int | None
) -> None:
    request = view(headers, version=version)
    assert (request.framing, request.content_length) == (problem, length)
    assert request.chunked == any(name == b"transfer-encoding" for name, _ in headers)


# --- malformed requests: the errors, their order, and the dispatcher's answers ------------------------------------

TOO_MANY = [(b"x-h", b"v")] * 101


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"version": "2", "headers": TOO_MANY, "path": b"/%2e", "query": b"a=%"}, UnsupportedHttpVersion, "HTTP/2"),
        ({"headers": TOO_MANY, "path": b"/%2e"}, HeadersTooLarge, "request has 101 header lines; the limit is 100"),
        (
            {"headers": [(b"x-big", b"v" * 16380)], "path": b"/%2e"},
            HeadersTooLarge,
            "request headers are 16389 bytes; the limit is 16384",
        ),
        ({"path": b"/a/../b", "query": b"a=%"}, BadPath, "path contains a dot segment"),
        ({"query": b"a=%"}, BadQuery, "query parameter 1 is malformed"),
        ({"query": b"access_key=a&%61ccess_key=b"}, BadQuery, "carries 2 access_key parameters; send one"),
    ],
)
def test_malformed_requests_raise_the_first_problem(
    kwargs: dict[str, Any], error: type[RequestRejected], message: str
) -> None:
    headers = kwargs.pop("headers", [])
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        view(headers, **kwargs)


async def _answer(made: Scope) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    settings = DispatchSettings(routes=(RouteConfig("/v1/api/iserver/*"),), allowed_origins=frozenset())

    async def never(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("a malformed request reached an app")

    dispatcher = Dispatcher(settings=settings, pages=never, http_proxy=never, relay=never, tickle=never)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await dispatcher(made, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), json.loads(body["body"])


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message", "closes"),
    [
        (
            {"version": "2"},
            505,
            "http_version_not_supported",
            "HTTP/2 is not spoken here: the gateway serves HTTP/1.1 (put nginx in front for HTTP/2)",
            True,
        ),
        ({"headers": TOO_MANY[:100]}, 431, "headers_too_large", "request has 101 header lines; the limit is 100", True),
        (
            {"path": b"/v1/api/iserver/%2e%2e/x"},
            400,
            "bad_path",
            "percent-encoded paths are not accepted; request not forwarded",
            False,
        ),
        (
            {"query": b"a=1#x"},
            400,
            "bad_query",
            "query string holds '#' (a URL fragment) at offset 3; only printable ASCII may be sent "
            "(percent-encode anything else); request not forwarded",
            False,
        ),
    ],
)
async def test_malformed_http_requests_get_the_same_answers(
    kwargs: dict[str, Any], status: int, code: str, message: str, closes: bool
) -> None:
    headers = [*kwargs.pop("headers", []), (b"x-request-id", b"client-id-1")]
    got_status, headers_sent, body = await _answer(scope(headers, **kwargs))
    assert got_status == status
    assert body == {"error": message, "statusCode": status, "source": "gateway", "code": code}
    assert headers_sent[b"x-request-id"] == b"client-id-1"  # the client's id, though its request was never parsed
    assert (headers_sent.get(b"connection") == b"close") is closes
