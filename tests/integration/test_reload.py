"""SIGHUP reload on a real gateway process: routes and pacing change live; the session and relays do not notice."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import tomllib
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
import trio_websocket

from gateway.runtime import reload_config_file
from gateway.simulator import SimulatorCredentials
from gateway.testing import open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.processes import gateway_process, wait_healthy

ECHO = "/v1/api/sim/echo"
BELOW_ECHO = "/v1/api/sim/echo/below"
PORTFOLIO = "/v1/api/portfolio/accounts"


def test_sighup_reloads_routes_and_pacing_without_dropping_anything(tmp_path: Path) -> None:
    log_path = tmp_path / "gateway.log"
    with gateway_process(tmp_path, log_path=log_path, logging__level="info") as (pid, port):
        trio.run(partial(_reload_scenario, pid, port, tmp_path / "gateway.toml", log_path))


async def _lst_requests(sim: httpx.AsyncClient) -> int:
    counts: dict[str, Any] = (await sim.get("/_sim/counts")).json()
    return sum(n for key, n in counts.items() if "live_session_token" in key)


async def _next_tick(ws: trio_websocket.WebSocketConnection) -> None:
    with trio.fail_after(5):
        while json.loads(await ws.get_message()).get("topic") != "smd+265598":
            pass


async def _hup_and_wait_for(pid: int, log_path: Path, needle: str, seen_before: int) -> str:
    os.kill(pid, signal.SIGHUP)
    with trio.fail_after(10):
        while True:
            lines = [line for line in (await trio.Path(log_path).read_text()).splitlines() if needle in line]
            if len(lines) > seen_before:
                return lines[-1]
            await trio.sleep(0.05)


async def _reload_scenario(pid: int, port: int, toml_path: Path, log_path: Path) -> None:
    original = tomllib.loads(await trio.Path(toml_path).read_text())
    sim_url = original["ibkr"]["base_url"]
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
        httpx.AsyncClient(base_url=sim_url, timeout=10) as sim,
    ):
        await wait_healthy(http)
        generation = (await http.get("/session")).json()["generation"]
        handshakes = await _lst_requests(sim)
        assert (await http.get(PORTFOLIO)).status_code == 200
        assert (await http.get(BELOW_ECHO)).status_code == 200  # under the simulator's "/v1/api/sim/*" route

        async with open_websocket(f"ws://127.0.0.1:{port}/v1/api/ws") as ws:
            await ws.send_message('smd+265598+{"fields":["31"]}')
            await _next_tick(ws)

            # 1. A good new config: two routes removed, an exact one added, pacing changed, a restart-only key changed.
            updated = dict(original)
            gone = ("/v1/api/portfolio/*", "/v1/api/sim/*")
            updated["routes"] = [r for r in original["routes"] if r["path"] not in gone] + [{"path": ECHO}]
            updated["pacing"] = {
                **original["pacing"],
                "global_requests_per_s": 7,
                "max_wait_s": 0,
                "limits": [{"path": ECHO, "method": "GET", "requests": 1, "per_s": 60}],
            }
            updated["session"] = {**original["session"], "tickle_interval_s": 30}
            await trio.Path(toml_path).write_text(tomli_w.dumps(updated))
            line = await _hup_and_wait_for(pid, log_path, "config reloaded", 0)
            assert "routes" in line and "pacing.global_requests_per_s" in line
            assert "NOT applied until restart: session.tickle_interval_s" in line

            assert (await http.get(ECHO)).status_code == 200  # the new exact route works
            paced = await http.get(ECHO)  # the new pacing rule: one a minute, no waiting
            assert paced.status_code == 429, paced.text
            for removed in (PORTFOLIO, BELOW_ECHO):
                refused = await http.get(removed)
                assert refused.status_code == 404 and refused.json()["code"] == "not_routed", removed
            metrics = (await http.get("/metrics")).text
            assert 'gateway_http_requests_total{route="/v1/api/sim/echo",method="GET",status="200"} 1' in metrics
            status = (await http.get("/session")).json()
            assert status["pacing"]["global"]["requests_per_s"] == 7
            assert status["generation"] == generation and status["state"] == "ready"
            assert await _lst_requests(sim) == handshakes, "the reload must not re-handshake"
            await _next_tick(ws)  # the relay opened before the reload still streams
            assert status["relays"]["open"] == 1

            # 2. Broken TOML, then a valid TOML with a bad value: each rejected with one line; old config stays.
            await trio.Path(toml_path).write_text(tomli_w.dumps(updated) + "\n[pacing\nbroken = \n")
            line = await _hup_and_wait_for(pid, log_path, "config reload rejected", 0)
            assert str(toml_path) in line and "is not valid TOML" in line
            bad_value = dict(updated, pacing={**updated["pacing"], "global_burst": 0})
            await trio.Path(toml_path).write_text(tomli_w.dumps(bad_value))
            line = await _hup_and_wait_for(pid, log_path, "config reload rejected", 1)
            assert "pacing.global_burst" in line and "must be between 1 and 1000" in line

            assert (await http.get(PORTFOLIO)).status_code == 404
            assert (await http.get(BELOW_ECHO)).status_code == 404
            assert (await http.get(ECHO + "?again=1")).status_code == 429  # still paced as reloaded
            status = (await http.get("/session")).json()
            assert status["pacing"]["global"]["requests_per_s"] == 7
            assert status["generation"] == generation
            await _next_tick(ws)

    log = await trio.Path(log_path).read_text()
    assert log.count("config reload rejected") == 2
    assert "Traceback" not in log
    os.kill(pid, 0)  # still alive (raises if not)


async def _release_fifo_after(fifo: Path, seconds: float) -> None:
    """Open ``fifo`` for writing after ``seconds``, so a reader blocked opening it goes on (and the test fails on
    its clock instead of hanging: a worker thread cannot be cancelled)."""
    await trio.sleep(seconds)
    with contextlib.suppress(OSError):  # ENXIO: nobody is blocked reading it
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_hostile_reload_is_rejected_in_one_line_and_the_running_config_stays(
    tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "{a = " * 50_000 + "1" + "}" * 50_000)
    big = tmp_path / "big.toml"
    big.write_text('[simulator]\nenabled = true\n[[routes]]\npath = "/v1/api/ws"\n' + "#\n" * (1 << 20))
    cases = (
        (fifo, "config file is not a regular file (it is a named pipe)"),
        (deep, "nests arrays or tables too deeply"),
        (big, "config file is larger than the 1 MiB limit"),
    )
    caplog.set_level(logging.INFO, logger="gateway")
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw:
        running, settings = gw.gateway.config, gw.gateway.dispatcher.settings
        for path, reason in cases:
            caplog.clear()
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_release_fifo_after, fifo, 5)
                assert await reload_config_file(gw.gateway, str(path)) is None
                nursery.cancel_scope.cancel()
            assert trio.current_time() - started < 5, f"{path.name}: the reload blocked"
            (line,) = [r.getMessage() for r in caplog.records if "config reload" in r.getMessage()]
            assert line.startswith(f"config reload rejected, the running config stays in force: {path}: {reason}")
            assert "\n" not in line
        assert gw.gateway.config is running and gw.gateway.dispatcher.settings is settings
        async with gw.client() as http:
            assert (await http.get("/health")).status_code == 200
