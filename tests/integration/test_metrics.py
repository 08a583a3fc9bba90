"""``/metrics`` from a real gateway in front of the simulator, parsed with Prometheus' own text parser."""

from __future__ import annotations

import json
import math

import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.logs import scrub
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket

API_KEY = "metrics-test-key-0123456789"
ACCOUNTS = "/v1/api/iserver/accounts"
SNAPSHOT = "/v1/api/iserver/marketdata/snapshot?conids=265598&fields=31"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition as ``{(sample name, labels): value}``, via prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed[name, frozenset(labels.items())]


async def _relay_some_messages(gw: TestGateway) -> None:
    async with open_websocket(gw.ws_url) as ws:
        await ws.send_message('smd+265598+{"fields":["31"]}')
        with trio.fail_after(5):
            while json.loads(await ws.get_message()).get("topic") != "smd+265598":
                pass
    with trio.fail_after(5):
        while gw.gateway.relays.open:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.01)


async def test_metrics_count_the_traffic_made(ibkr_sim_credentials: SimulatorCredentials) -> None:
    pacing = {
        "enabled": True,
        "max_wait_s": 0.5,
        "limits": [{"path": ACCOUNTS, "method": "GET", "requests": 2, "per_s": 60}],  # one is the warm-up's
    }
    async with open_test_gateway(
        {"pacing": pacing, "session": {"tickle_interval_s": 1}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05},
    ) as gw:
        async with gw.client() as http:
            assert (await http.get(ACCOUNTS)).status_code == 200
            paced = await http.get(ACCOUNTS)  # the rule allows two a minute: the gateway answers 429 itself
            assert paced.status_code == 429, paced.text
            for _ in range(2):
                assert (await http.get(SNAPSHOT)).status_code == 200
            assert (await http.get("/v1/api/not/listed")).status_code == 404
            assert (await http.request("BREW", "/v1/api/not/listed")).status_code == 404
            await _relay_some_messages(gw)
            response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert response.headers["x-request-id"]
        text = response.text
        parsed = samples(text)
        stats = gw.manager.stats
        relays = gw.gateway.relays

    route = "/v1/api/iserver/*"
    assert value(parsed, "gateway_http_requests_total", route=route, method="GET", status="200") == 3
    assert value(parsed, "gateway_http_requests_total", route=route, method="GET", status="429") == 1
    assert value(parsed, "gateway_http_requests_total", route="unrouted", method="GET", status="404") == 1
    assert value(parsed, "gateway_http_requests_total", route="unrouted", method="OTHER", status="404") == 1
    assert not any("not/listed" in str(labels) for _, labels in parsed), "raw paths must not become labels"
    # Only IBKR's answers are upstream latencies: three 200s, not the gateway's own 429.
    assert value(parsed, "gateway_upstream_request_duration_seconds_count", route=route) == 3
    assert value(parsed, "gateway_upstream_request_duration_seconds_bucket", route=route, le="+Inf") == 3
    assert 0 < value(parsed, "gateway_upstream_request_duration_seconds_sum", route=route) < 10
    buckets = [v for (name, labels), v in parsed.items() if name.endswith("_bucket")]
    assert buckets == sorted(buckets), "buckets are cumulative"

    assert value(parsed, "gateway_session_state", state="ready") == 1
    assert value(parsed, "gateway_session_state", state="backoff") == 0
    assert value(parsed, "gateway_session_ready") == 1
    assert value(parsed, "gateway_session_handshakes_total") == stats.handshakes >= 1
    assert value(parsed, "gateway_session_failures_total", reason="handshake") == 0
    assert value(parsed, "gateway_session_state_seconds_total", state="ready") > 0
    assert value(parsed, "gateway_session_state_seconds_total", state="handshaking") > 0
    assert value(parsed, "gateway_session_lst_expiry_timestamp_seconds") > value(parsed, "process_start_time_seconds")

    assert value(parsed, "gateway_websocket_relays_open") == 0
    assert value(parsed, "gateway_websocket_relays_total") == 1
    assert value(parsed, "gateway_websocket_messages_total", direction="up") == relays.messages_up == 1
    assert value(parsed, "gateway_websocket_messages_total", direction="down") == relays.messages_down >= 1

    assert value(parsed, "gateway_pacing_rejected_total") == 1
    assert value(parsed, "gateway_upstream_429_total") == 0
    assert value(parsed, "gateway_pacing_queue_depth") == 0
    assert value(parsed, "gateway_pacing_breaker_open") == 0
    (build,) = [labels for name, labels in parsed if name == "gateway_build_info"]
    assert dict(build)["version"]

    assert scrub(text) == text, "a registered secret (token, LST, cookie, prepend) appears in /metrics"
    assert gw.simulator.credentials.access_token not in text


async def test_session_failures_are_counted_by_reason(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway({"session": {"tickle_interval_s": 1}}, credentials=ibkr_sim_credentials) as gw:
        generation = (await gw.manager.wait_ready(5)).generation
        gw.simulator.faults.set_tickle_unauthenticated(True)
        with trio.fail_after(10):
            while gw.manager.stats.failures["unauthenticated"] == 0:  # noqa: ASYNC110 - gateway-owned counter
                await trio.sleep(0.05)
        gw.simulator.faults.set_tickle_unauthenticated(False)
        await gw.wait_new_session(generation)
        gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # a failed tickle: a new handshake
        await gw.wait_new_session(generation + 1)
        async with gw.client() as http:
            parsed = samples((await http.get("/metrics")).text)
    assert value(parsed, "gateway_session_failures_total", reason="unauthenticated") == 1  # re-opened, read-only
    assert value(parsed, "gateway_session_state_seconds_total", state="read_only") > 0
    assert value(parsed, "gateway_session_failures_total", reason="tickle_error") == 1  # restarted
    assert value(parsed, "gateway_session_state_seconds_total", state="backoff") > 0
    assert value(parsed, "gateway_session_handshakes_total") == 2
    assert math.isclose(value(parsed, "gateway_session_state", state="ready"), 1)


async def test_metrics_access_loopback_mode(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """Default mode: loopback clients read it; a client behind a trusted proxy is not loopback unless it says so
    from loopback; with API keys configured, a key opens it to anyone."""
    async with (
        open_test_gateway({"server": {"api_keys": API_KEY}}, credentials=ibkr_sim_credentials) as gw,
        gw.client() as http,
    ):
        assert (await http.get("/metrics")).status_code == 200
        proxied = await http.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert proxied.status_code == 403
        assert proxied.json()["code"] == "metrics_forbidden"
        assert proxied.headers["x-request-id"]
        spoof = await http.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1, 203.0.113.9"})
        assert spoof.status_code == 403, "the rightmost untrusted hop is the client"
        keyed = await http.get(
            "/metrics", headers={"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {API_KEY}"}
        )
        assert keyed.status_code == 200
        assert API_KEY not in keyed.text
        wrong = await http.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9", "Authorization": "Bearer nope"})
        assert wrong.status_code == 403


async def test_metrics_access_api_key_and_off_modes(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with (
        open_test_gateway(
            {"server": {"api_keys": API_KEY, "metrics": "api_key"}}, credentials=ibkr_sim_credentials
        ) as gw,
        gw.client() as http,
    ):
        refused = await http.get("/metrics")
        assert refused.status_code == 401
        assert "www-authenticate" in refused.headers
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})).status_code == 200
    async with open_test_gateway({"server": {"metrics": "off"}}, credentials=ibkr_sim_credentials) as gw:
        async with gw.client() as http:
            off = await http.get("/metrics")
        assert off.status_code == 404
        assert off.json()["code"] == "metrics_off"


async def test_head_metrics_has_no_body(ibkr_sim_credentials: SimulatorCredentials) -> None:
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw, gw.client() as http:
        head = await http.head("/metrics")
        assert head.status_code == 200
        assert head.content == b""
        post = await http.post("/metrics")
        assert post.status_code == 404  # only GET/HEAD reach the endpoint
