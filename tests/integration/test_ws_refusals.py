"""Every refused WebSocket upgrade says why, over loopback: the HTTP status, the JSON error's code, a message naming
the config key that fixes it, and one log line naming the code, route, client and Origin — and an API key (a
secret) is never echoed in the answer or the log, while an Origin (not a secret) is."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket

KEY = "ws-refusal-key-0123456789abcdef"
WRONG = "not-the-key-for-ws-0123456789abcdef"
ALLOWED = "https://dash.example.com"
WS_PATH = "/v1/api/ws"
SETTINGS: dict[str, dict[str, object]] = {
    "server": {"api_keys": KEY, "allowed_origins": [ALLOWED], "max_websockets": 1},
    "session": {"ready_timeout_s": 0.5},
}


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(SETTINGS, credentials=ibkr_sim_credentials) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


@dataclass(frozen=True)
class Refused:
    """A refused handshake as the client saw it."""

    status: int
    headers: Mapping[str, str]
    body: Mapping[str, object]
    raw: str  # status, headers and body as text, to look for secrets in

    @property
    def code(self) -> object:
        return self.body["code"]

    @property
    def message(self) -> str:
        return str(self.body["error"])


async def refused(
    url: str, *, headers: list[tuple[bytes, bytes]] | None = None, subprotocols: list[str] | None = None
) -> Refused:
    """Open a WebSocket the gateway must refuse before accept; the refusal."""
    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionRejected) as caught:
        async with open_websocket(url, extra_headers=headers, subprotocols=subprotocols):
            pass
    exc = caught.value
    pairs = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in exc.headers or ()]
    body = (exc.body or b"").decode()
    parsed = json.loads(body)
    assert parsed["source"] == "gateway" and parsed["statusCode"] == exc.status_code
    return Refused(exc.status_code, dict(pairs), parsed, f"{exc.status_code} {pairs} {body}")


def refusal_lines(caplog: pytest.LogCaptureFixture, code: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"WebSocket upgrade refused ({code}):")]


def one_line(caplog: pytest.LogCaptureFixture, code: str, level: int = logging.WARNING) -> str:
    """The single log line of a refusal with ``code``: at ``level``, naming the client address."""
    (record,) = refusal_lines(caplog, code)
    assert record.levelno == level
    text = record.getMessage()
    assert "client=127.0.0.1" in text
    return text


async def test_unrouted_path_names_the_websocket_endpoint(gw: TestGateway, caplog: pytest.LogCaptureFixture) -> None:
    answer = await refused(gw.ws_base_url + f"/v1/api/other?access_key={KEY}")
    assert (answer.status, answer.code) == (403, "websocket_not_routed")
    assert "/v1/api/other" in answer.message and WS_PATH in answer.message
    assert "x-request-id" in answer.headers
    line = one_line(caplog, "websocket_not_routed", logging.INFO)
    assert "route=/v1/api/other " in line and "origin=-" in line
    assert KEY not in caplog.text  # the query is never logged: it may hold a key


async def test_websocket_endpoint_missing_from_routes_names_routes(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    routes = [{"path": "/v1/api/iserver/*"}]
    async with open_test_gateway(SETTINGS, routes=routes, credentials=ibkr_sim_credentials) as gateway:
        answer = await refused(gateway.ws_base_url + WS_PATH, subprotocols=[f"access_key.{KEY}"])
    assert (answer.status, answer.code) == (403, "websocket_not_routed")
    assert "[[routes]]" in answer.message and f'path = "{WS_PATH}"' in answer.message
    assert f"route={WS_PATH} " in one_line(caplog, "websocket_not_routed", logging.INFO)


async def test_missing_key_is_401_naming_where_keys_go(gw: TestGateway, caplog: pytest.LogCaptureFixture) -> None:
    answer = await refused(gw.ws_base_url + WS_PATH)
    assert (answer.status, answer.code) == (401, "unauthorized")
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.message.startswith("missing API key")
    assert "server.api_keys_file" in answer.message and "access_key.<key>" in answer.message
    line = one_line(caplog, "unauthorized")
    assert f"route={WS_PATH} " in line and "missing API key" in line


@pytest.mark.parametrize("way", ["subprotocol", "query", "bearer"])
async def test_wrong_key_is_401_and_never_echoed(gw: TestGateway, caplog: pytest.LogCaptureFixture, way: str) -> None:
    url, headers, subprotocols = gw.ws_base_url + WS_PATH, None, None
    if way == "subprotocol":
        subprotocols = [f"access_key.{WRONG}"]
    elif way == "query":
        url += f"?access_key={WRONG}"
    else:
        headers = [(b"Authorization", f"Bearer {WRONG}".encode())]
    answer = await refused(url, headers=headers, subprotocols=subprotocols)
    assert (answer.status, answer.code) == (401, "unauthorized")
    assert answer.message.startswith("wrong API key") and "server.api_keys" in answer.message
    assert "wrong API key" in one_line(caplog, "unauthorized")
    for secret in (WRONG, KEY):
        assert secret not in answer.raw
        assert secret not in caplog.text
    assert not gw.gateway.relays.opened_total


async def test_foreign_origin_is_403_naming_it_and_allowed_origins(
    gw: TestGateway, caplog: pytest.LogCaptureFixture
) -> None:
    evil = "https://evil.test"
    answer = await refused(
        gw.ws_base_url + WS_PATH, headers=[(b"Origin", evil.encode())], subprotocols=[f"access_key.{KEY}"]
    )
    assert (answer.status, answer.code) == (403, "origin_not_allowed")
    assert evil in answer.message and "server.allowed_origins" in answer.message  # an Origin is not a secret
    line = one_line(caplog, "origin_not_allowed")
    assert f"origin={evil}" in line and f"route={WS_PATH} " in line
    assert KEY not in answer.raw and KEY not in caplog.text
    # A log line shows an Origin escaped (nothing but printable ASCII) and cut short; so does the answer.
    long_origin = b"https://caf\xe9" + b"a" * 2000 + b".test"
    answer = await refused(
        gw.ws_base_url + WS_PATH, headers=[(b"Origin", long_origin)], subprotocols=[f"access_key.{KEY}"]
    )
    assert "https://caf\\xe9aaa" in answer.message and len(answer.message) < 400
    last = refusal_lines(caplog, "origin_not_allowed")[-1].getMessage()
    assert "origin=https://caf\\xe9aaa" in last and len(last) < 800 and last.isascii()


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        (f"{WS_PATH}?a=%zz&access_key={KEY}", 400, "bad_query"),
        (f"{WS_PATH}?access_key={KEY}&%61ccess_key={KEY}", 400, "bad_query"),
        (f"{WS_PATH}?oauth_token=mine&access_key={KEY}", 400, "bad_query"),
        (f"/v1/api//ws?access_key={KEY}", 400, "bad_path"),
    ],
    ids=["bad-escape", "two-keys", "reserved-parameter", "empty-segment"],
)
async def test_malformed_upgrade_says_what_is_wrong(
    gw: TestGateway, caplog: pytest.LogCaptureFixture, target: str, status: int, code: str
) -> None:
    answer = await refused(gw.ws_base_url + target)
    assert (answer.status, answer.code) == (status, code)
    assert answer.message.endswith("upgrade refused")
    one_line(caplog, code, logging.INFO)
    assert KEY not in answer.raw and KEY not in caplog.text


async def test_limit_closes_1013_with_a_reason_naming_max_websockets(
    gw: TestGateway, caplog: pytest.LogCaptureFixture
) -> None:
    url = gw.ws_base_url + WS_PATH
    async with open_websocket(url, subprotocols=[f"access_key.{KEY}"]) as first:
        await first.get_message()
        async with open_websocket(url, subprotocols=[f"access_key.{KEY}"]) as second:
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await second.get_message()
    reason = closed.value.reason
    assert reason is not None and reason.code == 1013
    assert reason.reason == "websocket_limit: server.max_websockets (1) reached; try again later"
    assert "server.max_websockets (1)" in one_line(caplog, "websocket_limit")
    assert KEY not in caplog.text


async def test_no_session_is_503_with_retry_after_and_the_last_error(
    gw: TestGateway, caplog: pytest.LogCaptureFixture
) -> None:
    await gw.simulator.faults.down()
    session = await gw.manager.wait_ready(5)
    gw.manager.report_unauthorized(session, "test")
    async with gw.client() as http:
        with trio.fail_after(10):  # until every handshake fails the same way, so the last error stays put
            while "cannot connect" not in str((await http.get("/health")).json().get("last_error")):  # noqa: ASYNC110
                await trio.sleep(0.05)
        answer = await refused(gw.ws_base_url + WS_PATH, subprotocols=[f"access_key.{KEY}"])
        health = (await http.get("/health")).json()
    assert (answer.status, answer.code) == (503, "session_not_ready")
    assert int(answer.headers["retry-after"]) >= 1
    assert f"last error: {health['last_error']};" in answer.message  # the error /health reports
    assert "session.ready_timeout_s" in answer.message
    assert "last error: " in one_line(caplog, "session_not_ready")
    assert KEY not in answer.raw and KEY not in caplog.text
    await gw.simulator.faults.up()


async def test_ibkr_refusing_the_upgrade_is_502_saying_so(gw: TestGateway, caplog: pytest.LogCaptureFixture) -> None:
    gw.simulator.faults.fail_next(1, status=503, path_prefix=WS_PATH)
    answer = await refused(gw.ws_base_url + WS_PATH, subprotocols=[f"access_key.{KEY}"])
    assert (answer.status, answer.code) == (502, "upstream_websocket_failed")
    assert "IBKR refused the WebSocket upgrade: HTTP 503" in answer.message
    assert "HTTP 503" in one_line(caplog, "upstream_websocket_failed")
