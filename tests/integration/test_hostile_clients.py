"""What no single client may do to the gateway: end the process, leak the API key upstream, get a traceback, keep a
closed connection open, hold upstream resources with a slow body, or take control of the IBKR session.

Every test talks to a real gateway in front of the simulator over loopback, most of them with raw sockets, because
the point is what arrives on the wire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import httpx
import pytest
import trio

from gateway.proxy.http import HttpProxy
from gateway.simulator import SimulatorCredentials
from gateway.testing import TEST_ROUTES, TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket

KEY = "k3y-for-hostile-tests-0123456789"


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gateway:
        yield gateway


@pytest.fixture
async def keyed(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway({"server": {"api_keys": KEY}}, credentials=ibkr_sim_credentials) as gateway:
        yield gateway


def _address(gw: TestGateway) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _connect(gw: TestGateway) -> trio.SocketStream:
    return await trio.open_tcp_stream(*_address(gw))


async def _read_to_eof(stream: trio.SocketStream, limit_s: float) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the connection, and how long that took (fails after
    ``limit_s``)."""
    started = trio.current_time()
    data = b""
    with trio.fail_after(limit_s):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: closed too
                break
            if not chunk:
                break
            data += chunk
    return data, trio.current_time() - started


async def _exchange(gw: TestGateway, request: bytes, limit_s: float = 5.0) -> bytes:
    stream = await _connect(gw)
    async with stream:
        await stream.send_all(request)
        data, _ = await _read_to_eof(stream, limit_s)
    return data


def _status(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
    assert match, answer[:200]
    return int(match.group(1))


def _json_body(answer: bytes) -> dict[str, object]:
    body = answer.split(b"\r\n\r\n", 1)[1]
    parsed = json.loads(body)
    assert isinstance(parsed, dict)
    return parsed


async def _until(condition: Callable[[], object], limit_s: float = 5.0, step_s: float = 0.01) -> None:
    """Poll ``condition`` (a counter or record list owned by the gateway or simulator) until it is truthy."""
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - polls state owned by the gateway or the simulator
            await trio.sleep(step_s)


async def _still_serving(gw: TestGateway) -> None:
    async with gw.client() as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200


# --- 1. HTTP/2 is not spoken; nothing about it can end the process ------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/v1/api/iserver/accounts", "/session", "/v1/api/pa/summary"])
async def test_http2_prior_knowledge_with_a_body_gets_505_and_the_gateway_lives(gw: TestGateway, path: str) -> None:
    """The attack that ended the process: HEADERS without END_STREAM to a path answered at once, then DATA."""
    client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
    client.send_headers(1, headers, end_stream=False)
    stream = await _connect(gw)
    async with stream:
        await stream.send_all(client.data_to_send())
        await trio.sleep(0.2)  # let the gateway answer the headers, as the attack did
        client.send_data(1, b"x" * 100, end_stream=True)
        with contextlib.suppress(trio.BrokenResourceError):  # the gateway may have closed already: fine
            await stream.send_all(client.data_to_send())
        answer, _ = await _read_to_eof(stream, 5)
    assert _status(answer) == 505
    assert _json_body(answer)["code"] == "http_version_not_supported"
    assert "HTTP/1.1" in str(_json_body(answer)["error"])
    await _still_serving(gw)


async def test_h2c_upgrade_is_ignored_and_answered_over_http11(gw: TestGateway) -> None:
    request = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = await _exchange(gw, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert b" 101 " not in answer
    assert answer.count(b"HTTP/1.1 200") == 2  # the connection stayed HTTP/1.1 for the next request
    await _still_serving(gw)


async def test_an_h2_flood_on_many_connections_leaves_the_gateway_serving(gw: TestGateway) -> None:
    async def one(path: str) -> None:
        client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        for stream_id in (1, 3, 5):
            headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "x")]
            client.send_headers(stream_id, headers, end_stream=False)
            client.send_data(stream_id, b"y", end_stream=False)
        stream = await _connect(gw)
        async with stream:
            try:
                await stream.send_all(client.data_to_send())
            except trio.BrokenResourceError:
                return
            await _read_to_eof(stream, 5)

    async with trio.open_nursery() as nursery:
        for index in range(30):
            nursery.start_soon(one, ("/nope", "/health", "/v1/api/iserver/accounts")[index % 3])
    await _still_serving(gw)


# --- 2. the API key never leaks upstream through an encoded name -------------------------------------------------


@pytest.mark.parametrize("name", ["access_key", "%61ccess_key", "access%5Fkey", "access%5fkey", "%61%63cess_key"])
async def test_every_spelling_of_the_key_parameter_authenticates_and_is_stripped(keyed: TestGateway, name: str) -> None:
    request = (f"GET /v1/api/sim/echo?a=1&{name}={KEY}&b=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    answer = await _exchange(keyed, request)
    assert _status(answer) == 200, answer[:300]
    (record,) = [r for r in keyed.simulator.records if r.path == "/v1/api/sim/echo"]
    assert record.raw_query == "a=1&b=2"
    assert KEY not in record.raw_query
    assert all(KEY not in value for _, value in record.headers)


@pytest.mark.parametrize(
    "query", [f"access_key={KEY}&%61ccess_key={KEY}", f"access_key={KEY}&access_key=other-key-0123456789abc"]
)
async def test_two_key_parameters_in_any_spelling_are_refused(keyed: TestGateway, query: str) -> None:
    before = len(keyed.simulator.records)
    answer = await _exchange(
        keyed, f"GET /v1/api/sim/echo?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert _status(answer) == 400
    body = _json_body(answer)
    assert body["code"] == "bad_query"
    assert "2 access_key" in str(body["error"])
    assert KEY not in answer.decode("latin-1")
    assert {r.path for r in keyed.simulator.records[before:]} <= {"/v1/api/tickle"}


async def test_an_encoded_key_name_on_a_websocket_is_stripped_too(keyed: TestGateway) -> None:
    stream = await _connect(keyed)
    async with stream:
        await stream.send_all(_ws_handshake(f"/v1/api/ws?%61ccess_key={KEY}"))
        head = await _read_head(stream)
        assert head.startswith(b"HTTP/1.1 101"), head
    await _until(lambda: [r for r in keyed.simulator.records if r.path == "/v1/api/ws"])
    (handshake,) = [r for r in keyed.simulator.records if r.path == "/v1/api/ws"]
    assert KEY not in handshake.raw_query
    assert handshake.raw_query.startswith("oauth_token=")


# --- 3. malformed query strings get 400 JSON, never a 500 ---------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "says"),
    [
        (b"a=%zz", b"two hex digits"),
        (b"a=%", b"two hex digits"),
        (b"a=%2", b"two hex digits"),
        (b"a=%%", b"two hex digits"),
        (b"a=%E9", b"UTF-8"),
        (b"a=1#x", b"fragment"),
        (b"a=%C3%28", b"UTF-8"),
    ],
)
async def test_malformed_query_strings_get_400_json(
    gw: TestGateway, caplog: pytest.LogCaptureFixture, query: bytes, says: bytes
) -> None:
    before = len(gw.simulator.records)
    for path in (b"/v1/api/iserver/accounts", b"/session", b"/v1/api/sim/echo"):
        answer = await _exchange(
            gw, b"GET " + path + b"?" + query + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert _status(answer) == 400, (path, answer[:200])
        body = _json_body(answer)
        assert body["code"] == "bad_query"
        assert says in str(body["error"]).encode()
    assert {r.path for r in gw.simulator.records[before:]} <= {"/v1/api/tickle"}
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    await _still_serving(gw)


async def test_a_malformed_query_on_a_websocket_upgrade_is_refused_before_accept(gw: TestGateway) -> None:
    stream = await _connect(gw)
    async with stream:
        await stream.send_all(_ws_handshake("/v1/api/ws?a=%zz"))
        head = await _read_head(stream)
    assert head.startswith(b"HTTP/1.1 400"), head  # bad_query: the answer says what is wrong with it
    assert not [r for r in gw.simulator.records if r.path == "/v1/api/ws"]


# --- 6. Connection: close (and HTTP/1.0) close at once, whatever answered -----------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /session HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /v1/api/iserver/accounts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /v1/api/tickle HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /v1/api/iserver/accounts HTTP/1.0\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ],
)
async def test_a_closing_request_is_closed_right_after_its_answer(gw: TestGateway, request_line: bytes) -> None:
    assert gw.gateway.config.server.read_timeout_s == 30  # what the socket used to wait for
    stream = await _connect(gw)
    async with stream:
        await stream.send_all(request_line)
        answer, took = await _read_to_eof(stream, 3)
    assert re.match(rb"HTTP/1\.1 [24]0\d", answer), answer[:100]
    assert took < 1.0


# --- 8. the session belongs to the gateway ------------------------------------------------------------------------

WIDE_ROUTES = (*TEST_ROUTES, {"path": "/v1/api/*"})


@pytest.fixture
async def wide(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    """Every /v1/api path allow-listed, and no tickle of the gateway's own during a test (an hour apart)."""
    async with open_test_gateway(
        {"session": {"tickle_interval_s": 3600}}, routes=WIDE_ROUTES, credentials=ibkr_sim_credentials
    ) as gateway:
        yield gateway


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/api/iserver/auth/ssodh/init"),
        ("POST", "/v1/api/iserver/reauthenticate"),
        ("GET", "/v1/api/iserver/reauthenticate"),
        ("POST", "/v1/api/logout"),
        ("POST", "/v1/api/oauth/live_session_token"),
        ("POST", "/v1/api/oauth/request_token"),
    ],
)
async def test_session_control_endpoints_are_never_forwarded(wide: TestGateway, method: str, path: str) -> None:
    before = len(wide.simulator.records)
    generation = wide.manager.stats.handshakes
    async with wide.client() as http:
        r = await http.request(method, path, json={"publish": True, "compete": True})
        assert r.status_code == 403
        assert r.json()["code"] == "session_owned"
        assert "owns" in r.json()["error"]
    assert wide.simulator.records[before:] == []
    assert wide.manager.stats.handshakes == generation
    await _still_serving(wide)


@pytest.mark.parametrize("path", ["/v1/api/logout", "/v1/api/iserver/accounts", "/v1/api/ws/x", "/v1/api/tickle"])
async def test_websocket_upgrades_are_relayed_on_the_websocket_endpoint_only(wide: TestGateway, path: str) -> None:
    """The relay presents IBKR's session cookie; under a wildcard route no other endpoint may receive it."""
    first = len(wide.simulator.records)  # the session's warm-up reads /iserver/accounts itself
    stream = await _connect(wide)
    async with stream:
        await stream.send_all(_ws_handshake(path))
        head = await _read_head(stream)
    assert head.startswith(b"HTTP/1.1 403"), head
    assert not [r for r in wide.simulator.records[first:] if r.path == path and r.method == "GET"]


async def test_read_only_session_endpoints_are_ordinary_routes(wide: TestGateway) -> None:
    async with wide.client() as http:
        r = await http.get("/v1/api/iserver/auth/status")
    assert r.status_code != 403
    assert [rec.path for rec in wide.simulator.records if rec.path == "/v1/api/iserver/auth/status"]


async def test_a_client_tickle_is_answered_by_the_gateway_with_an_opaque_session(wide: TestGateway) -> None:
    tickles_before = len([r for r in wide.simulator.records if r.path == "/v1/api/tickle"])
    cookie = wide.manager.active.cookie.reveal() if wide.manager.active else ""
    assert cookie
    async with wide.client() as http:
        first = await http.post("/v1/api/tickle")
        second = await http.get("/v1/api/tickle")
    for r in (first, second):
        assert r.status_code == 200
        body = r.json()
        assert re.fullmatch(r"[0-9a-f]{32}", body["session"])
        assert body["session"] != cookie
        assert cookie not in r.text
        assert body["iserver"]["authStatus"]["authenticated"] is True
    assert first.json()["session"] == second.json()["session"]  # the same for the life of one session
    assert len([r for r in wide.simulator.records if r.path == "/v1/api/tickle"]) == tickles_before

    generation = wide.manager.active.generation if wide.manager.active else 0
    wide.simulator.faults.expire_lst()
    async with wide.client() as http:
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200  # 401 → new session
        await wide.wait_new_session(generation)
        third = await http.post("/v1/api/tickle")
    assert third.json()["session"] != first.json()["session"]


async def test_the_session_value_a_client_sends_on_its_websocket_reaches_ibkr_as_the_real_one(
    wide: TestGateway,
) -> None:
    """ibind authenticates a socket with ``{"session": <value from /tickle>}``; the gateway's tickle hands out an
    opaque value, and the relay sends IBKR the session's real one in its place."""
    async with wide.client() as http:
        opaque = (await http.post("/v1/api/tickle")).json()["session"]
    real = wide.manager.active.cookie.reveal() if wide.manager.active else ""
    async with open_websocket(wide.ws_url) as ws:
        await ws.get_message()
        await ws.send_message(json.dumps({"session": opaque}))
        await ws.send_message('{"session": 5}')  # not a session value: passed on as sent
        await _until(lambda: len([m for m in wide.simulator.ws_messages if "session" in m.text]) >= 2)
    sent = [json.loads(m.text) for m in wide.simulator.ws_messages if "session" in m.text]
    assert sent == [{"session": real}, {"session": 5}]


async def test_a_client_tickle_without_a_session_gets_503(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(
        {"session": {"ready_timeout_s": 0.2}}, routes=WIDE_ROUTES, credentials=ibkr_sim_credentials
    ) as gw:
        gw.simulator.faults.fail_next(1000, status=500, path_prefix="/v1/api/oauth/")  # no new session can start
        gw.simulator.faults.expire_lst()
        async with gw.client() as http:
            assert (await http.get("/v1/api/iserver/accounts")).status_code in (502, 503)  # the 401 ends the session
            await _until(lambda: gw.manager.active is None)
            r = await http.post("/v1/api/tickle")
        gw.simulator.faults.reset()
    assert r.status_code == 503
    assert r.json()["code"] == "session_not_ready"
    assert "retry-after" in r.headers


# --- 10. slow bodies, HTTP/1.0 framing, WebSocket protocol violations, idle upstream sockets ------------------------


async def test_a_trickled_body_is_cut_at_the_body_deadline_without_holding_upstream(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    async with open_test_gateway({"server": {"body_timeout_s": 1}}, credentials=ibkr_sim_credentials) as gw:

        async def trickle(size: int) -> tuple[bytes, float]:
            stream = await _connect(gw)
            async with stream:
                head = f"POST /v1/api/sim/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
                await stream.send_all(head.encode())
                started = trio.current_time()
                answer = b""
                with trio.move_on_after(5):
                    for _ in range(size):
                        try:
                            await stream.send_all(b"x")
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                        await trio.sleep(0.2)
                answer, _ = await _read_to_eof(stream, 3)
                return answer, trio.current_time() - started

        results: list[tuple[bytes, float]] = []

        async def one(size: int) -> None:
            results.append(await trickle(size))

        async with trio.open_nursery() as nursery:
            for size in (20, 20, 200_000):  # two small ones (read whole first), one large (streamed upstream)
                nursery.start_soon(one, size)
        for answer, took in results:
            assert _status(answer) == 408, answer[:200]
            assert _json_body(answer)["code"] == "body_timeout"
            assert took < 2.5
        echo = [r for r in gw.simulator.records if r.path == "/v1/api/sim/echo"]
        assert all(not r.accepted for r in echo)  # nothing complete reached IBKR
        assert len(echo) <= 1  # the small bodies never went upstream at all
        await _still_serving(gw)


async def test_a_small_body_is_read_whole_before_it_goes_upstream(gw: TestGateway) -> None:
    async with gw.client() as http:
        r = await http.post("/v1/api/sim/echo", content=b'{"a": 1}', headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    (record,) = [rec for rec in gw.simulator.records if rec.path == "/v1/api/sim/echo"]
    assert record.accepted


async def test_an_oversized_chunked_body_never_reaches_ibkr(gw: TestGateway) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 10_000  # 100 kB against the default 64 KiB limit

    async with gw.client() as http:  # an ordinary route: the default 64 KiB limit (sim/* allows more)
        r = await http.post("/v1/api/iserver/secdef/search", content=chunks())
    assert r.status_code == 413
    assert "nothing was forwarded" in r.json()["error"]
    assert not [rec for rec in gw.simulator.records if rec.path == "/v1/api/iserver/secdef/search"]


async def test_a_small_chunked_body_goes_upstream_with_a_content_length(gw: TestGateway) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"a": '
        yield b"1}"

    async with gw.client() as http:
        r = await http.post("/v1/api/sim/echo", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    (record,) = [rec for rec in gw.simulator.records if rec.path == "/v1/api/sim/echo"]
    assert record.header("content-length") == "8"
    assert record.header("transfer-encoding") is None
    assert r.json()["body_length"] == 8


async def test_a_client_that_stops_reading_a_download_is_let_go_after_read_timeout(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    """The server wrote to clients with no deadline: a client that asked for a large answer and read nothing held
    its connection and the proxied exchange (an upstream connection) for as long as it kept the socket open."""
    overrides = {"server": {"read_timeout_s": 2, "websocket_ping_interval_s": 0.5}}
    caplog.set_level(logging.INFO, logger="gateway.server")
    async with open_test_gateway(overrides, credentials=ibkr_sim_credentials) as gw:
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(_address(gw))
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(b"GET /v1/api/sim/stream?bytes=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            proxy = gw.gateway.dispatcher._http
            assert isinstance(proxy, HttpProxy)
            await _until(lambda: proxy.in_flight == 1)
            started = trio.current_time()
            await _until(lambda: proxy.in_flight == 0, limit_s=10, step_s=0.1)  # reads nothing meanwhile
            took = trio.current_time() - started
        assert took < 2 + 3, took
        assert "closed: the client took none of our bytes for 2 s" in caplog.text
        await _still_serving(gw)


async def test_http10_with_transfer_encoding_is_refused(gw: TestGateway) -> None:
    request = b"POST /v1/api/sim/echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    answer = await _exchange(gw, request)
    assert _status(answer) == 400
    body = _json_body(answer)
    assert body["code"] == "bad_framing"
    assert "HTTP/1.0" in str(body["error"])
    assert not [r for r in gw.simulator.records if r.path == "/v1/api/sim/echo"]


def _ws_handshake(target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


_leftover: dict[int, bytes] = {}


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    _leftover[id(stream)] = rest
    return head


def _frame(opcode: int, payload: bytes, *, masked: bool = True, rsv: int = 0) -> bytes:
    first = 0x80 | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if len(payload) < 126:
        head = bytes([first, mask_bit | len(payload)])
    else:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", len(payload))
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Server frames (unmasked) in ``data``: ``(opcode, payload)``; a trailing partial frame is ignored."""
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (_frame(0x1, b"\xff\xfe tic"), 1007),  # text that is not UTF-8
        (_frame(0x1, b"tic", masked=False), 1002),  # a client frame must be masked
        (_frame(0x1, b"tic", rsv=0x40), 1002),  # RSV1 without an extension that defines it
        (_frame(0x3, b"x"), 1002),  # a reserved opcode
    ],
)
async def test_a_websocket_protocol_violation_gets_a_close_frame_with_its_code(
    gw: TestGateway, frame: bytes, code: int
) -> None:
    stream = await _connect(gw)
    async with stream:
        await stream.send_all(_ws_handshake("/v1/api/ws"))
        head = await _read_head(stream)
        assert head.startswith(b"HTTP/1.1 101"), head
        await _until(lambda: gw.gateway.relays.open)
        await stream.send_all(frame)
        rest, _ = await _read_to_eof(stream, 5)
    frames = _frames(_leftover.pop(id(stream), b"") + rest)
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    assert closes, frames
    assert struct.unpack("!H", closes[-1][:2])[0] == code
    await _until(lambda: not gw.gateway.relays.open)  # the relay ended and its upstream socket closed


def _close_wait_to(port: int) -> int:
    """This process's TCP sockets in CLOSE-WAIT (state 08) whose peer is ``port`` on loopback."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                if fields[3] == "08" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def test_idle_upstream_connections_the_server_closed_do_not_linger_in_close_wait(gw: TestGateway) -> None:
    port = int(gw.simulator_url.rsplit(":", 1)[1])
    gw.simulator.faults.set_delay(0.3)
    async with gw.client(limits=httpx.Limits(max_connections=20)) as http, trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(http.get, "/v1/api/iserver/accounts")
    gw.simulator.faults.set_delay(0)
    await gw.simulator.faults.down()  # every connection closed by the server: a fault storm's end
    await gw.simulator.faults.up()
    # Closed by the pool's tidy-up within about a second, not at the next request.
    await _until(lambda: not _close_wait_to(port), limit_s=3, step_s=0.1)
    await _still_serving(gw)
