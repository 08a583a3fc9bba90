"""``X-Request-Id`` on every answer (proxied, errors, internal pages, WebSocket upgrades) and on every log line."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
import trio_websocket

from gateway.logs import JsonFormatter, RedactingFilter, RequestIdFilter
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket

GENERATED = re.compile(r"^[a-z0-9]{6}-[0-9a-f]+$")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The gateway's log records as JSON lines, through the same filters and formatter as production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def lines_with(stream: io.StringIO, request_id: str) -> list[dict[str, str]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [record for record in records if record.get("request_id") == request_id]


async def proxy_line(stream: io.StringIO, request_id: str) -> str:
    """The proxy's access line for ``request_id``; it is written just after the last body byte was sent."""
    with trio.fail_after(5):
        while True:
            for record in lines_with(stream, request_id):
                if record["logger"] == "gateway.proxy":
                    return record["message"]
            await trio.sleep(0.01)


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"session": {"tickle_interval_s": 1, "ready_timeout_s": 0.3}}, credentials=ibkr_sim_credentials
    ) as gateway:
        yield gateway


async def test_proxied_answer_and_its_log_line_share_the_id(gw: TestGateway, json_logs: io.StringIO) -> None:
    async with gw.client() as http:
        r = await http.get("/v1/api/iserver/accounts")
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert GENERATED.match(rid), rid
    assert (await proxy_line(json_logs, rid)).startswith("GET /v1/api/iserver/accounts -> 200")


async def test_supplied_id_is_echoed_and_logged(gw: TestGateway, json_logs: io.StringIO) -> None:
    async with gw.client() as http:
        r = await http.get("/v1/api/iserver/accounts", headers={"X-Request-Id": "bot-42.retry_1"})
        other = await http.get("/v1/api/iserver/accounts")
    assert r.headers["x-request-id"] == "bot-42.retry_1"
    assert (await proxy_line(json_logs, "bot-42.retry_1")).startswith("GET /v1/api/iserver/accounts -> 200")
    assert other.headers["x-request-id"] != r.headers["x-request-id"]


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "ünï"])
async def test_malformed_id_is_replaced(gw: TestGateway, bad: str) -> None:
    async with gw.client() as http:
        r = await http.get("/health", headers=[(b"x-request-id", bad.encode())])
    assert GENERATED.match(r.headers["x-request-id"])


async def test_errors_and_internal_pages_carry_it(gw: TestGateway) -> None:
    async with gw.client() as http:
        for path in ("/", "/session", "/health", "/metrics"):
            assert GENERATED.match((await http.get(path)).headers["x-request-id"]), path
        not_routed = await http.get("/nope", headers={"X-Request-Id": "trace-404"})
        assert (not_routed.status_code, not_routed.headers["x-request-id"]) == (404, "trace-404")
        bad_path = await http.get("/v1/api/iserver/%2e%2e/x")
        assert bad_path.status_code == 400 and GENERATED.match(bad_path.headers["x-request-id"])
        # No ready session: the gateway answers 503 itself.
        gw.simulator.faults.fail_next(1000, 500, path_prefix="/v1/api/oauth")
        gw.simulator.faults.set_tickle_unauthenticated(True)
        with trio.fail_after(10):
            while gw.manager.active is not None:  # noqa: ASYNC110 - waits on the gateway's own state
                await trio.sleep(0.05)
        unavailable = await http.get("/v1/api/iserver/accounts", headers={"X-Request-Id": "trace-503"})
        assert (unavailable.status_code, unavailable.headers["x-request-id"]) == (503, "trace-503")
        health = await http.get("/health")
        assert health.status_code == 503 and GENERATED.match(health.headers["x-request-id"])


async def test_websocket_upgrades_carry_it(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_base_url + "/v1/api/ws", extra_headers=[(b"x-request-id", b"ws-7")]) as ws:
        assert (b"x-request-id", b"ws-7") in ws.handshake_headers
    async with open_websocket(gw.ws_url) as ws:
        ids = [value for name, value in ws.handshake_headers if name == b"x-request-id"]
        assert len(ids) == 1 and GENERATED.match(ids[0].decode())
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with open_websocket(gw.ws_base_url + "/v1/api/not-listed", extra_headers=[(b"x-request-id", b"ws-8")]):
            pass
    assert refused.value.status_code == 403
    assert (b"x-request-id", b"ws-8") in (refused.value.headers or ())
