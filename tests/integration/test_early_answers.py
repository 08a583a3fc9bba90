"""An answer the gateway gives before the client has sent the whole request body (no session in time, pacing, an
upstream that cannot be reached): found by the fault soak (test_soak.py), whose uploads above the 64 KiB buffer met
503s and 429s while their bodies were still arriving."""

from __future__ import annotations

import contextlib

import trio

from gateway.proxy.http import HttpProxy
from gateway.simulator import SimulatorCredentials
from gateway.testing import open_test_gateway

BODY = 2_000_000  # far more than hypercorn queues for the app (10 messages of up to 64 KiB) before it stops reading


async def _post_half_a_body(url: str) -> tuple[bytes, bool]:
    """A raw upload declaring ``BODY`` bytes that sends half of them and then keeps reading: what the gateway
    answers, and whether it then closed the connection (EOF) within 5 s."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    head = f"POST /v1/api/sim/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {BODY}\r\n\r\n".encode()
    answer = b""
    closed = False
    async with stream, trio.open_nursery() as nursery:

        async def send_half() -> None:
            with contextlib.suppress(trio.BrokenResourceError):  # the gateway closed the connection: as it should
                await stream.send_all(head)
                for _ in range(BODY // 2 // 65536):
                    await stream.send_all(b"x" * 65536)

        nursery.start_soon(send_half)
        with trio.move_on_after(5):
            try:
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            except trio.BrokenResourceError:
                pass  # reset after the answer: the gateway closed with the rest of the body unread
            closed = True
        nursery.cancel_scope.cancel()
    return answer, closed


async def test_an_answer_before_the_body_arrived_closes_the_connection_and_ends_the_exchange(
    ibkr_sim_credentials: SimulatorCredentials,
) -> None:
    """No session within ``ready_timeout_s``: the gateway answers 503 while the body is still arriving. hypercorn
    then tells the app "disconnect" through the app's queue, which was full of body chunks the app had not read,
    from inside the app's own send of the last response message: the send never returned, the exchange never ended
    (in flight for ever, the connection open). The answer must also say ``Connection: close`` — the connection
    cannot carry another request — or a client that managed to write the whole body reuses it and its next request
    fails with "server disconnected"."""
    async with open_test_gateway({"session": {"ready_timeout_s": 0.3}}, credentials=ibkr_sim_credentials) as gw:
        await gw.simulator.faults.down()
        session = gw.manager.active
        assert session is not None
        gw.manager.report_unauthorized(session, "test: no session from here on")
        answer, closed = await _post_half_a_body(gw.url)
        proxy = gw.gateway.dispatcher._http
        assert isinstance(proxy, HttpProxy)
        in_flight = proxy.in_flight
        await gw.simulator.faults.up()
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 503 "), answer[:200]
    assert b"\r\nconnection: close" in head
    assert closed, "the gateway kept the connection open after its answer"
    assert in_flight == 0


async def test_answers_to_whole_requests_keep_the_connection_alive(ibkr_sim_credentials: SimulatorCredentials) -> None:
    """Only an answer that starts while the body is still arriving closes the connection."""
    async with open_test_gateway(credentials=ibkr_sim_credentials) as gw, gw.client() as http:
        for request in (
            http.build_request("GET", "/v1/api/sim/echo"),
            http.build_request("POST", "/v1/api/sim/echo", content=b"{}"),
            http.build_request("POST", "/v1/api/sim/upload", content=b"x" * 200_000),
            http.build_request("GET", "/health"),
        ):
            response = await http.send(request)
            assert response.status_code == 200
            assert "connection" not in response.headers, request
