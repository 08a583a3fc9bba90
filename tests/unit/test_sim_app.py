"""The simulator's ASGI app driven directly (no sockets): peer checks of the admin path and fuzzing that any
input ends in an IBKR-shaped answer below 500."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials
from tests.integration.sim_client import Client

BASE = "http://sim.test"


@cache
def _creds() -> SimulatorCredentials:
    return generate_credentials()


@cache
def _sim() -> Simulator:
    # The fuzz below sends thousands of requests back to back: IBKR's pacing would answer them 429 (its own test
    # switches it on), and they probe verification, not IBKR's session rules.
    return Simulator(_creds(), pacing=False, accounts_first=False, snapshot_preflight=False)


async def call(
    sim: Simulator,
    method: str,
    path: str,
    *,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 40000),
) -> tuple[int, dict[str, str], bytes]:
    """One raw ASGI exchange (what hypercorn would deliver), returning status, headers and body."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("latin-1"),
        "query_string": query,
        "headers": headers if headers is not None else [(b"host", b"sim.test"), (b"user-agent", b"t")],
        "client": client,
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(5):
        await sim.app(scope, receive, send)
    start = sent[0]
    out_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], out_headers, b"".join(m.get("body", b"") for m in sent[1:])


async def test_admin_path_is_loopback_only() -> None:
    sim = _sim()
    for peer, status in [
        (("10.1.2.3", 1), 403),
        (("192.168.0.1", 1), 403),
        (("::ffff:10.0.0.1", 1), 403),
        (("127.0.0.1", 1), 200),
        (("127.5.6.7", 1), 200),
        (("::1", 1), 200),
        (("::ffff:127.0.0.1", 1), 200),
    ]:
        got, _, body = await call(sim, "GET", "/_sim/counts", client=peer)
        assert got == status, peer
        if status == 403:
            assert json.loads(body) == {"error": "admin path is loopback-only", "statusCode": 403}
    got, _, _ = await call(sim, "POST", "/_sim/faults/expire_lst", client=("10.1.2.3", 1))
    assert got == 403


async def test_lifespan_is_supported() -> None:
    events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await _sim().app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


PATHS = [
    "/v1/api/oauth/live_session_token",
    "/v1/api/iserver/auth/ssodh/init",
    "/v1/api/tickle",
    "/v1/api/iserver/marketdata/snapshot",
    "/v1/api/sim/echo/x",
    "/v1/api/ws",
    "/_sim/faults/fail_next",
    "/_sim/records",
    "/",
    "/v1/api/%2e%2e/x",
]
_TEXT = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=200)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(PATHS),
    query=_TEXT,
    authorization=st.one_of(st.none(), _TEXT, st.just('OAuth realm="limited_poa", oauth_consumer_key="X"')),
    content_type=st.sampled_from([None, "application/json", "application/x-www-form-urlencoded", "text/plain"]),
    body=st.binary(max_size=300),
)
def test_unsigned_garbage_never_500(
    method: str, path: str, query: str, authorization: str | None, content_type: str | None, body: bytes
) -> None:
    headers = [(b"host", b"sim.test"), (b"user-agent", b"fuzz"), (b"content-length", str(len(body)).encode())]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode("latin-1")))
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))

    async def run() -> tuple[int, dict[str, str], bytes]:
        return await call(_sim(), method, path, query=query.encode("latin-1"), headers=headers, body=body)

    try:
        status, _, out = trio.run(run)
    finally:
        _sim().faults.reset()  # the fuzz may hit /_sim/faults/* (e.g. fail_next with its default 500)
    assert 200 <= status < 500
    if status >= 400:
        parsed = json.loads(out)
        assert parsed["statusCode"] == status
        assert isinstance(parsed["error"], str)


_JSONISH = st.one_of(
    st.none(),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=10),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    ),
)
_QUERY_KEYS = st.sampled_from(["conids", "fields", "conid", "period", "bar", "symbol", "name", "bytes", "chunk",
                               "chunked", "publish", "compete", "interval_ms"])  # fmt: skip
_QUERY_VALUES = st.one_of(st.sampled_from(["265598", "8314,x", "1d", "1h", "0", "-1", "true", "AAPL", ",", ""]), _TEXT)
SIGNED_ROUTES = [
    ("POST", "/v1/api/iserver/auth/ssodh/init"),
    ("GET", "/v1/api/tickle"),
    ("POST", "/v1/api/iserver/secdef/search"),
    ("GET", "/v1/api/iserver/secdef/search"),
    ("GET", "/v1/api/iserver/marketdata/snapshot"),
    ("GET", "/v1/api/iserver/marketdata/history"),
    ("GET", "/v1/api/sim/stream"),
    ("POST", "/v1/api/sim/upload"),
    ("POST", "/v1/api/logout"),
    ("GET", "/v1/api/iserver/accounts"),
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(SIGNED_ROUTES),
    query=st.lists(st.tuples(_QUERY_KEYS, _QUERY_VALUES), max_size=4),
    payload=_JSONISH,
    raw_body=st.one_of(st.none(), st.binary(max_size=100)),
)
def test_signed_requests_with_weird_input_never_500(
    route: tuple[str, str], query: list[tuple[str, str]], payload: Any, raw_body: bytes | None
) -> None:
    """Properly signed requests (independent client, over httpx's ASGI transport) with arbitrary query and
    body values: every answer is below 500, errors are IBKR-shaped."""
    sim = _sim()
    method, path = route
    client = _fuzz_client()

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app)) as http:
            if client.lst is None or not sim.bridge:
                assert (await client.get_lst(http)).valid
                r = await client.request(http, "POST", "/v1/api/iserver/auth/ssodh/init", json={"publish": True})
                assert r.status_code == 200
            if raw_body is not None:
                return await client.request(http, method, path, query, content=raw_body)
            return await client.request(http, method, path, query, json=payload)

    response = trio.run(run)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert body["statusCode"] == response.status_code
        assert body["error"] not in ("invalid signature", "nonce reused"), body  # the signature always matches


@cache
def _fuzz_client() -> Client:
    return Client(_creds(), BASE)


async def test_a_websocket_send_refused_by_a_closing_connection_ends_the_handler_quietly() -> None:
    """Stock hypercorn writes the EOF of a connection whose peer has closed outside its send lock, so an app send
    racing it fails with ``BusyResourceError`` (the fault soak hit it when a ``close_websockets`` fault met the
    gateway closing the same upstream WebSocket). The simulator must take that as the connection ending, not raise
    it into hypercorn (an "Error in ASGI Framework" line at ERROR, with a traceback)."""
    sim = Simulator(_creds())
    query = b"oauth_token=" + _creds().access_token.encode()
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/v1/api/ws",
        "raw_path": b"/v1/api/ws",
        "query_string": query,
        "headers": [(b"host", b"sim.test"), (b"user-agent", b"t")],
        "client": ("127.0.0.1", 40000),
    }
    inbox = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop(0)
        await trio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.close":
            raise trio.BusyResourceError("another task is currently sending data on this SocketStream")
        sent.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.app, scope, receive, send)
        with trio.fail_after(5):
            while sim.websocket_count == 0:  # noqa: ASYNC110 - the handler registers itself; no event to wait on
                await trio.sleep(0.01)
            await sim.faults.close_websockets(1011)
            while sim.websocket_count:  # noqa: ASYNC110 - as above
                await trio.sleep(0.01)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send"]  # accepted, "waiting for session"
