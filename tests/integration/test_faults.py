"""Fault suite: each scenario (F1, F2, …) runs against the simulator over loopback and reports FIGUREs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from functools import partial
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio_websocket

from gateway.config import load_config
from gateway.runtime import Gateway, serve_gateway
from gateway.simulator import Simulator, SimulatorCredentials
from gateway.simulator.credentials import write_credentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.conftest import Figure
from tests.probes import live_tasks
from tests.processes import free_port, gateway_process, proc_fds, proc_status, wait_healthy

REPO = Path(__file__).resolve().parents[2]


async def test_f1_upstream_down_at_start(
    tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials, figure: Figure
) -> None:
    """Nothing listens upstream: the gateway still listens at once, /health is 503, proxied routes 503 with
    Retry-After, the handshake backs off; once IBKR is back the session is ready within 2 s."""
    port = free_port()
    simulator = Simulator(ibkr_sim_credentials)
    toml = write_credentials(ibkr_sim_credentials, tmp_path, base_url=f"http://127.0.0.1:{port}", gateway_port=0)
    text = toml.read_text().replace("reconnect_max_delay_s = 300", "reconnect_max_delay_s = 2")
    toml.write_text(text.replace("ready_timeout_s = 10", "ready_timeout_s = 1"))
    loaded = load_config(toml, env={})
    assert loaded.config.ibkr.base_url == f"http://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        gateway: Gateway = await nursery.start(serve_gateway, loaded)
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            health = await http.get("/health")
            listen_s = trio.current_time() - started
            assert health.status_code == 503
            r = await http.get("/v1/api/iserver/accounts", timeout=30)
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            await trio.sleep(6)
            attempts = gateway.manager.stats.handshakes
            came_back = trio.current_time()
            down_s = came_back - started
            await nursery.start(simulator.serve, "127.0.0.1", port)
            await gateway.manager.wait_ready(10)
            r = await http.get("/v1/api/iserver/accounts")
            recovery_s = trio.current_time() - came_back
            assert r.status_code == 200
        gateway.request_shutdown()
        await gateway.wait_stopped()
        nursery.cancel_scope.cancel()
    # Back-off 1 s, 2 s, 2 s, ... (cap 2 s) with jitter in [0.5, 1] of each step: the most attempts possible are
    # one immediately, then one per 0.5 s / 1 s; never a tight loop against the LST endpoint.
    bound = 1 + 2 + (down_s - 1.5) / 1.0
    per_minute = attempts / down_s * 60
    figure("f1_time_to_listen", round(listen_s, 3), "s", "<=1", listen_s <= 1)
    figure("f1_handshake_attempts_per_minute_while_down", round(per_minute, 1), "count/min", "<=62", per_minute <= 62)
    figure("f1_recovery_after_upstream_returns", round(recovery_s, 3), "s", "<=cap+1=3", recovery_s <= 3)
    assert listen_s <= 1
    assert 3 <= attempts <= bound
    assert recovery_s <= 3


@pytest.fixture
async def gw(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"session": {"tickle_interval_s": 1}, "logging": {"level": "warning"}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.2},
    ) as gateway:
        yield gateway


async def test_f2_upstream_dies_mid_response(gw: TestGateway, figure: Figure) -> None:
    async with gw.client() as http:
        assert (await http.get("/v1/api/sim/stream?bytes=1000")).status_code == 200
        await trio.sleep(0.2)
        baseline = live_tasks()
        truncated_as_complete = 0
        for _ in range(20):
            gw.simulator.faults.drop_mid_response(1, after_bytes=50_000)
            received = 0
            try:
                async with http.stream("GET", "/v1/api/sim/stream?bytes=400000&chunk=8192") as r:
                    async for chunk in r.aiter_raw():
                        received += len(chunk)
                truncated_as_complete += 1  # reaching here means the client saw a complete response
            except httpx.RemoteProtocolError:
                assert received < 400_000
    with trio.fail_after(3):
        while live_tasks() > baseline:  # noqa: ASYNC110 - polls the task tree, there is no event to wait on
            await trio.sleep(0.05)
    figure("f2_truncated_delivered_as_complete", truncated_as_complete, "count", "0", truncated_as_complete == 0)
    figure("f2_tasks_above_baseline", live_tasks() - baseline, "count", "<=0", live_tasks() <= baseline)
    assert truncated_as_complete == 0


async def test_f3_lst_expiry_under_steady_traffic(gw: TestGateway, figure: Figure) -> None:
    failures: list[int] = []
    done = 0

    async def steady(http: httpx.AsyncClient) -> None:
        nonlocal done
        with trio.move_on_after(9.5):
            while True:
                r = await http.get("/v1/api/iserver/accounts")
                done += 1
                if r.status_code != 200:
                    failures.append(r.status_code)

    handshakes_before = gw.manager.stats.handshakes
    async with gw.client() as http, trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(steady, http)
        for _ in range(3):  # 3 s apart: a handshake needs its own tickle (IBKR allows one a second), and a GET
            await trio.sleep(3.0)  # that meets two expiries in a row may get the second 401 (two attempts at most)
            gw.simulator.faults.expire_lst()
    handshakes = gw.manager.stats.handshakes - handshakes_before
    figure("f3_failed_gets", len(failures), "count", "0", not failures)
    figure("f3_gets_total", done, "count", ">0", done > 0)
    figure("f3_handshakes_per_3_expiries", handshakes, "count", "3", handshakes == 3)
    assert failures == []
    assert handshakes == 3  # single-flight: one handshake per expiry, however many requests saw the 401


async def test_f4_tickle_failure_closes_relays_1012_and_recovers(gw: TestGateway, figure: Figure) -> None:
    generation = (await gw.manager.wait_ready(5)).generation
    async with open_websocket(gw.ws_url) as ws:
        await ws.get_message()
        gw.simulator.faults.fail_next(1, 500, path_prefix="/v1/api/tickle")  # the LST's state is unknown: restart
        failed_at = trio.current_time()
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await ws.get_message()
        closed_after = trio.current_time() - failed_at
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1012
    await gw.wait_new_session(generation)
    async with open_websocket(gw.ws_url) as ws:
        assert '"topic":"system"' in await ws.get_message()
    figure("f4_relay_close_code", closed.value.reason.code, "code", "1012", True)
    figure("f4_time_to_close_after_tickle_fault", round(closed_after, 3), "s", "<=tickle_interval+1", closed_after <= 2)


@pytest.mark.slow
def test_f6_thousand_client_aborts_leave_nothing_behind(tmp_path: Path, figure: Figure) -> None:
    """1,000 clients hang up mid-request, mid-stream and mid-WebSocket; the gateway process returns to baseline."""
    with gateway_process(tmp_path, server__max_websockets="2000") as (pid, port):
        trio.run(partial(_aborts, pid, port, figure))


async def _aborts(pid: int, port: int, figure: Figure) -> None:
    base = f"http://127.0.0.1:{port}"

    async def abort_one(i: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            if i % 3 == 0:  # mid-request: give up while the upstream is still answering
                with trio.move_on_after(0.005):
                    await http.get("/v1/api/sim/stream?bytes=2000000")
            elif i % 3 == 1:  # mid-stream: read a little of a large body, then hang up
                async with (
                    http.stream("GET", "/v1/api/sim/stream?bytes=5000000&chunk=16384") as r,
                    aclosing(cast(AsyncGenerator[bytes, None], r.aiter_raw())) as chunks,
                ):
                    async for _ in chunks:
                        break
            else:  # mid-WebSocket
                async with open_websocket(f"ws://127.0.0.1:{port}/v1/api/ws") as ws:
                    await ws.get_message()

    limiter = trio.CapacityLimiter(50)

    async def limited(i: int) -> None:
        async with limiter:
            await abort_one(i)

    async def batch(n: int) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(limited, i)

    async with httpx.AsyncClient(base_url=base) as http:
        await wait_healthy(http)

        async def tasks() -> int:
            count: int = (await http.get("/session")).json()["tasks"]
            return count

        await batch(300)  # warm-up: allocator high-water marks, the upstream pool
        await trio.sleep(6)
        tasks_before, fds_before, rss_before = await tasks(), proc_fds(pid), proc_status(pid, "VmRSS")
        await batch(1000)
        ended = trio.current_time()
        with trio.move_on_after(10):
            while await tasks() > tasks_before:  # noqa: ASYNC110 - polls another process
                await trio.sleep(0.1)
        settled = trio.current_time() - ended
        tasks_after, fds_after, rss_after = await tasks(), proc_fds(pid), proc_status(pid, "VmRSS")
    figure("g1_tasks_delta_after_1000_aborts", tasks_after - tasks_before, "count", "<=0", tasks_after <= tasks_before)
    # hypercorn's WebSocket ping task outlives a closed socket by up to websocket_ping_interval_s (5 s).
    figure("g1_seconds_until_tasks_at_baseline", round(settled, 2), "s", "<=ping_interval+2=7", settled <= 7)
    figure("g1_fds_delta", fds_after - fds_before, "count", "<=2", fds_after - fds_before <= 2)
    figure("g1_rss_growth", round((rss_after - rss_before) / 1024, 1), "MiB", "<=10", rss_after - rss_before <= 10240)
    assert tasks_after <= tasks_before
    assert settled <= 7
    assert fds_after - fds_before <= 2
    assert rss_after - rss_before <= 10 * 1024


def test_f7_thousand_concurrent_relays_with_ticks(tmp_path: Path, figure: Figure) -> None:
    """1,000 relays through a gateway process to a simulator process pushing one tick per second on each."""
    count = int(os.environ.get("GATEWAY_TEST_RELAYS", "1000"))
    with gateway_process(tmp_path, server__max_websockets=str(count + 100)) as (pid, port):
        trio.run(partial(_many_relays, pid, port, count, figure))


async def _many_relays(pid: int, port: int, count: int, figure: Figure) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as http:
        await wait_healthy(http)
        rss_before, fds_before = proc_status(pid, "VmRSS"), proc_fds(pid)
        opened = 0
        ticked = 0
        all_ticking = trio.Event()
        release = trio.Event()
        limiter = trio.CapacityLimiter(50)

        async def one() -> None:
            nonlocal opened, ticked
            ws_cm = open_websocket(f"ws://127.0.0.1:{port}/v1/api/ws", connect_timeout_s=60)
            async with limiter:
                ws = await ws_cm.__aenter__()
                opened += 1
            try:
                await ws.send_message('smd+265598+{"fields":["31"]}')
                seen = 0
                while seen < 2:
                    if '"topic":"smd+265598"' in await ws.get_message():
                        seen += 1
                ticked += 1
                if ticked == count:
                    all_ticking.set()
                await release.wait()
            finally:
                await ws_cm.__aexit__(None, None, None)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
            with trio.fail_after(120):
                await all_ticking.wait()
            ticking_s = trio.current_time() - started
            status = (await http.get("/session")).json()
            rss_during, fds_during = proc_status(pid, "VmRSS"), proc_fds(pid)
            release.set()
        closed_at = trio.current_time()
        with trio.fail_after(10):
            while (await http.get("/session")).json()["relays"]["open"]:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)
        close_s = trio.current_time() - closed_at
        await trio.sleep(1)
        fds_after = proc_fds(pid)
    per_relay_kib = (rss_during - rss_before) / count
    fds_per_relay = (fds_during - fds_before) / count
    figure("f7_relays_open_at_peak", status["relays"]["open"], "count", f"={count}", status["relays"]["open"] == count)
    figure("f7_all_open_and_ticking_seconds", round(ticking_s, 1), "s", "<=30", ticking_s <= 30)
    figure("f7_gateway_rss_per_relay", round(per_relay_kib, 1), "KiB", "<=200", per_relay_kib <= 200)
    figure("f7_gateway_fds_per_relay", round(fds_per_relay, 2), "count", "~2", 1.5 <= fds_per_relay <= 2.5)
    figure("f7_all_closed_seconds", round(close_s, 2), "s", "<=5", close_s <= 5)
    figure("f7_gateway_fds_delta_after_close", fds_after - fds_before, "count", "<=2", fds_after - fds_before <= 2)
    assert status["relays"]["open"] == count
    assert per_relay_kib <= 200
    assert fds_after - fds_before <= 2


def test_f12_sigterm_under_load_drains_then_exits_0(tmp_path: Path, figure: Figure) -> None:
    """A real process: in-flight slow requests finish, WebSockets get 1001, exit 0 well within the drain time."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    env |= {"GATEWAY__SERVER__PORT": str(port), "GATEWAY__LOGGING__LEVEL": "warning"}
    # All 20 slow requests in flight at once: a pacing turn comes back one window after IBKR's (slow) answer.
    env |= {"GATEWAY__PACING__GLOBAL_REQUESTS_PER_S": "20", "GATEWAY__PACING__GLOBAL_BURST": "20"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", "gateway.toml"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        trio.run(partial(_drain_scenario, proc, port, figure))
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert "Traceback" not in stderr


async def _drain_scenario(proc: subprocess.Popen[str], port: int, figure: Figure) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        with trio.fail_after(20):
            while True:
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)
        upstream = (await http.get("/session")).json()["upstream"]
        await http.post(f"{upstream}/_sim/faults/delay", json={"seconds": 1.5})
        statuses: list[int] = []
        codes: list[int] = []
        sigterm_at = 0.0

        async def slow_get() -> None:
            statuses.append((await http.get("/v1/api/iserver/accounts")).status_code)

        async def websocket() -> None:
            async with open_websocket(f"ws://127.0.0.1:{port}/v1/api/ws", connect_timeout_s=10) as ws:
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as closed:
                    codes.append(closed.reason.code if closed.reason else 1006)

        await http.post(f"{upstream}/_sim/faults/delay", json={"seconds": 0})
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(websocket)
            await trio.sleep(1.0)
            await http.post(f"{upstream}/_sim/faults/delay", json={"seconds": 1.5})
            for _ in range(20):
                nursery.start_soon(slow_get)
            await trio.sleep(0.3)
            sigterm_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        exit_code = await trio.to_thread.run_sync(proc.wait)
        exit_s = time.monotonic() - sigterm_at
    figure("f12_inflight_completed", statuses.count(200), "count", "=20", statuses.count(200) == 20)
    figure("f12_ws_closed_1001", codes.count(1001), "count", "=5", codes.count(1001) == 5)
    figure("f12_exit_seconds_after_sigterm", round(exit_s, 2), "s", "<=drain+1", exit_s <= 21)
    assert statuses == [200] * 20
    assert codes == [1001] * 5
    assert exit_code == 0


async def test_f4_flapping_session_backs_off_instead_of_hammering(
    ibkr_sim_credentials: SimulatorCredentials, figure: Figure
) -> None:
    """A session that dies right after each handshake (an upstream that flaps) is retried at once twice, then backs
    off: three or more sessions ended within five minutes add a back-off step each."""
    async with open_test_gateway(
        {"session": {"reconnect_delay_s": 0.2, "reconnect_max_delay_s": 5}}, credentials=ibkr_sim_credentials
    ) as gw:
        before = gw.manager.stats.handshakes
        with trio.move_on_after(4):
            while True:
                session = await gw.manager.wait_ready(10)
                gw.manager.report_unauthorized(session, "test: flapping upstream")
                await session.ended.wait()
        handshakes = gw.manager.stats.handshakes - before
    # Delays 0.2, 0.2, 0.4, 0.8, 1.6, 3.2 s (× jitter 0.5–1): at most 6 handshakes in 4 s; a reset loop would do ~25.
    figure("f4_handshakes_in_4s_of_flapping", handshakes, "count", "<=6", handshakes <= 6)
    assert 2 <= handshakes <= 6
