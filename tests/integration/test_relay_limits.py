"""WebSocket relay limits against the simulator over loopback: the ``max_websockets`` cap under a burst of upgrades,
and the slot accounting on every way a relay can end (refused upstream, no session, client gone, session end)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket

WS_PATH = "/v1/api/ws"


def upstream_handshakes(gw: TestGateway) -> int:
    """WebSocket handshakes the simulator saw (accepted or refused; not the events recorded on open sockets)."""
    return sum(1 for r in gw.simulator.records if r.path == WS_PATH and r.method != "WS")


async def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``check`` (a gateway counter) until it holds; fail with ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls counters owned by the gateway
            await trio.sleep(0.02)
        return
    pytest.fail(f"not within {timeout_s} s: {what}")


def no_relay_left(gw: TestGateway) -> bool:
    return gw.gateway.relays.slots == 0 and gw.gateway.relays.open == 0


async def hold_relays(
    nursery: trio.Nursery, gw: TestGateway, count: int, *, timeout_s: float = 15
) -> tuple[list[object], trio.Event]:
    """Open ``count`` WebSockets at once (tasks in ``nursery``); each records ``"open"`` (first message received) or
    its close code, and the open ones stay open until the returned event is set. Returns once each has an outcome."""
    outcomes: list[object] = []
    release = trio.Event()
    settled = trio.Event()

    async def one() -> None:
        try:
            async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
                await ws.get_message()
                outcomes.append("open")
                if len(outcomes) == count:
                    settled.set()
                await release.wait()
        except trio_websocket.ConnectionClosed as exc:
            outcomes.append(exc.reason.code if exc.reason is not None else None)
            if len(outcomes) == count:
                settled.set()

    for _ in range(count):
        nursery.start_soon(one)
    with trio.fail_after(timeout_s):
        await settled.wait()
    return outcomes, release


async def test_burst_of_upgrades_never_opens_more_upstream_sockets_than_the_cap(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """40 upgrades at once with ``max_websockets = 20``: IBKR sees at most 20 handshakes, the other 20 clients get
    1013 at once; once the 20 close, 20 new ones open (no slot leaked) and one more is refused again."""
    limit, burst = 20, 40
    async with (
        open_test_gateway({"server": {"max_websockets": limit}}, credentials=ibkr_sim_credentials) as gw,
        trio.open_nursery() as nursery,
    ):
        before = upstream_handshakes(gw)
        started = trio.current_time()
        outcomes, release = await hold_relays(nursery, gw, burst)
        took = trio.current_time() - started
        assert upstream_handshakes(gw) - before <= limit
        assert outcomes.count("open") == limit
        assert outcomes.count(1013) == burst - limit
        assert took < 10  # the refusals do not wait for a session or for IBKR
        assert gw.gateway.relays.open == limit
        assert gw.gateway.relays.slots == limit
        release.set()
        await eventually(lambda: no_relay_left(gw), 10, "every slot given back")

        before = upstream_handshakes(gw)
        outcomes, release = await hold_relays(nursery, gw, limit + 1)
        assert sorted(outcomes, key=str) == [1013] + ["open"] * limit
        assert upstream_handshakes(gw) - before == limit
        release.set()
        await eventually(lambda: no_relay_left(gw), 10, "every slot given back")


async def refused_upgrade(gw: TestGateway) -> int:
    """Open a WebSocket that the gateway refuses before accepting (HTTP status) or closes at once (close code)."""
    try:
        async with open_websocket(gw.ws_base_url + WS_PATH) as ws:
            await ws.get_message()
    except trio_websocket.ConnectionRejected as exc:
        return exc.status_code
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason.code if exc.reason is not None else 0
    pytest.fail("the WebSocket was opened")


async def refused_upgrades(gw: TestGateway, count: int) -> list[int]:
    """``count`` of :func:`refused_upgrade` at once; their answers."""
    answers: list[int] = []

    async def one() -> None:
        answers.append(await refused_upgrade(gw))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return answers


async def end_session(gw: TestGateway) -> int:
    session = await gw.manager.wait_ready(10)
    gw.manager.report_unauthorized(session, "test")
    return session.generation


async def test_every_way_a_relay_ends_gives_its_slot_back(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """Refused by IBKR, no ready session, client gone during IBKR's handshake, session ended while opening and
    while open: after each, no slot is held, and at the end the whole cap is still usable."""
    limit = 3
    config: dict[str, dict[str, object]] = {"server": {"max_websockets": limit}, "session": {"ready_timeout_s": 0.5}}
    async with (
        open_test_gateway(config, credentials=ibkr_sim_credentials) as gw,
        trio.open_nursery() as nursery,
    ):
        relays = gw.gateway.relays
        with trio.fail_after(60):
            # IBKR refuses the upgrade: the client's handshake is refused too (502, before accepting).
            gw.simulator.faults.fail_next(limit, status=503, path_prefix=WS_PATH)
            for _ in range(limit):
                assert await refused_upgrade(gw) == 502
            await eventually(lambda: no_relay_left(gw), 5, "slots back after IBKR refused")

            # No ready session within ready_timeout_s: refused with 503 before accept.
            await gw.simulator.faults.down()
            generation = await end_session(gw)
            assert await refused_upgrades(gw, limit) == [503] * limit
            await eventually(lambda: no_relay_left(gw), 5, "slots back after no session")
            await gw.simulator.faults.up()
            generation = await gw.wait_new_session(generation)

            # The client hangs up while IBKR's handshake answer is still on its way.
            gw.simulator.faults.set_delay(1.0)
            with trio.move_on_after(0.3):
                await refused_upgrades(gw, limit)
            assert relays.slots == limit  # all three are still opening
            async with gw.client() as http:
                assert (await http.get("/session")).json()["relays"]["opening"] == limit
            gw.simulator.faults.set_delay(0)
            await eventually(lambda: no_relay_left(gw), 10, "slots back after the clients left mid-handshake")

            # The session ends while relays are opening (IBKR's answer delayed), then while they are open.
            gw.simulator.faults.set_delay(1.0)
            answers: list[list[int]] = []

            async def collect() -> None:
                answers.append(await refused_upgrades(gw, limit))

            async with trio.open_nursery() as several:
                several.start_soon(collect)
                await eventually(lambda: relays.slots == limit, 5, "three relays opening")
                gw.simulator.faults.set_delay(0)
                generation = await end_session(gw)
            assert answers == [[503] * limit]  # the session ended before accepting: the client sees a refused upgrade
            await eventually(lambda: no_relay_left(gw), 10, "slots back after the session ended mid-handshake")
            generation = await gw.wait_new_session(generation)
            outcomes, release = await hold_relays(nursery, gw, limit)
            assert outcomes == ["open"] * limit
            generation = await end_session(gw)
            await eventually(lambda: no_relay_left(gw), 10, "slots back after the session ended")
            release.set()
            await gw.wait_new_session(generation)

            # Nothing leaked: the whole cap opens, one more is refused.
            outcomes, release = await hold_relays(nursery, gw, limit + 1)
            assert sorted(outcomes, key=str) == [1013] + ["open"] * limit
            release.set()
            await eventually(lambda: no_relay_left(gw), 10, "every slot given back")
            async with gw.client() as http:
                counts = (await http.get("/session")).json()["relays"]
            assert (counts["open"], counts["opening"]) == (0, 0)
