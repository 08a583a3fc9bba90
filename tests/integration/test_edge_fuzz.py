"""A seeded corpus of hostile raw requests against a real gateway: whatever a client sends, the answer is a deliberate
one (never a 500 or a traceback), no connection-level error is logged, and the gateway keeps serving.

The corpus is built from parts known to trip HTTP stacks — odd methods and versions, targets with encodings and
traversal, malformed or ambiguous query strings, conflicting framing, header-block tricks, bodies that do not
match their framing — combined at random with a fixed seed, so a failure is reproducible from its index.
"""

from __future__ import annotations

import logging
import random
import re

import pytest
import trio

from gateway.simulator import SimulatorCredentials
from gateway.testing import TEST_ROUTES, open_test_gateway
from tests.conftest import Figure

SEED = 11
CASES = 400

# The first entries of METHODS and VERSIONS are the usual ones: most cases are well-formed but for one or two
# parts, so they get past the HTTP parser into the gateway's own checks, routes and the proxy.
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH",
           b"CONNECT", b"TRACE", b"PRI", b"G\x00T", b"get", b"FOO"]  # fmt: skip
USUAL_METHODS = 7
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/1.1 ", b"http/1.1", b"HTTP/11"]
USUAL_VERSIONS = 2
PATHS = [
    b"/v1/api/iserver/accounts", b"/v1/api/sim/echo", b"/v1/api/tickle", b"/v1/api/logout", b"/health", b"/session",
    b"/metrics", b"/", b"/v1/api/ws", b"/v1/api/oauth/live_session_token", b"/v1/api/iserver/auth/ssodh/init",
    b"/v1/api/iserver/%2e%2e/logout", b"/v1/api/iserver/../../etc/passwd", b"//v1/api/iserver/accounts",
    b"/v1/api/iserver/accounts/", b"/v1/api/iserver\\accounts", b"/v1/api/iserver;x=1/accounts", b"*",
    b"http://127.0.0.1/v1/api/iserver/accounts", b"/v1/api/iserver/acc\xc3\xa9", b"/v1/api/iserver/" + b"a" * 3000,
    b"/examples/dashboard/../../", b"/v1/api/iserver/accounts#frag", b"",
]  # fmt: skip
QUERIES = [
    b"", b"a=1", b"a=%zz", b"a=%", b"a=%2", b"a=%%", b"a=%E9", b"a=1#x", b"access_key=k&%61ccess_key=k",
    b"oauth_token=x", b"%6Fauth_nonce=1", b"a=%00", b"a=%0d%0a", b"conids=1,2&fields=31", b"&&&", b"=", b"a=b=c",
    b"a=" + b"x" * 5000, b"a=%C3%28", b"a=+%2B+", b"access_key=", b"a=\xff", b"a=%F0%9F%98%80",
]  # fmt: skip
HEADER_SETS = [
    [],
    [b"Content-Length: 2"],
    [b"Content-Length: 2", b"Content-Length: 3"],
    [b"Content-Length: 2", b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: chunked"],
    [b"Transfer-Encoding: gzip, chunked"],
    [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
    [b"Content-Length: -1"],
    [b"Content-Length: 1e3"],
    [b"Content-Length: 99999999999999999999"],
    [b"Content-Length : 2"],
    [b"X-Folded: a", b" continued"],
    [b"Connection: close"],
    [b"Connection: keep-alive, Upgrade", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"],
    [b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
     b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="],
    [b"Origin: null"],
    [b"Origin: http://evil.test"],
    [b"Authorization: Bearer x"],
    [b"Cookie: api=stolen"],
    [b"X-Forwarded-For: 1.2.3.4"],
    [b"Expect: 100-continue", b"Content-Length: 2"],
    [b"Host: a", b"Host: b"],
    [b"X-Null: a\x00b"],
    [b"X-Big: " + b"v" * 20000],
    [b"X-" + str(i).encode() + b": v" for i in range(150)],
]  # fmt: skip
BODIES = [b"", b"{}", b"2\r\n{}\r\n0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n", b"\x00" * 10, b"{}" * 100]


def corpus() -> list[bytes]:
    rng = random.Random(SEED)
    cases = []
    for _ in range(CASES):
        target = rng.choice(PATHS)
        query = rng.choice(QUERIES)
        if query and rng.random() < 0.8:
            target += b"?" + query
        method = rng.choice(METHODS[:USUAL_METHODS] if rng.random() < 0.85 else METHODS)
        version = rng.choice(VERSIONS[:USUAL_VERSIONS] if rng.random() < 0.85 else VERSIONS)
        lines = [method + b" " + target + b" " + version]
        if rng.random() < 0.95:
            lines.append(b"Host: 127.0.0.1")
        if rng.random() < 0.6:
            lines += rng.choice(HEADER_SETS)
        if rng.random() < 0.2:
            lines += rng.choice(HEADER_SETS)
        if rng.random() < 0.7:
            lines.append(b"Connection: close")
        separator = b"\r\n" if rng.random() < 0.9 else b"\n"
        cases.append(separator.join(lines) + separator + separator + rng.choice(BODIES))
    return cases


async def _send(address: tuple[str, int], request: bytes) -> bytes:
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        return b"<refused>"
    async with stream:
        answer = b""
        try:
            await stream.send_all(request)
            with trio.move_on_after(1):  # a keep-alive answer is complete long before; its socket may stay open
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    return answer


@pytest.mark.parametrize("api_keys", [False, True], ids=["open", "keyed"])
async def test_a_hostile_corpus_gets_deliberate_answers_only(
    ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture, figure: Figure, api_keys: bool
) -> None:
    routes = (*TEST_ROUTES, {"path": "/v1/api/*"})
    overrides: dict[str, dict[str, object]] = {"session": {"ready_timeout_s": 2}}
    if api_keys:
        overrides["server"] = {"api_keys": "fuzz-key-0123456789abcdef"}
    cases = corpus()
    statuses: dict[int, int] = {}
    with caplog.at_level(logging.WARNING):
        async with open_test_gateway(overrides, routes=routes, credentials=ibkr_sim_credentials) as gw:
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            answers: dict[int, bytes] = {}

            async def one(index: int) -> None:
                answers[index] = await _send((host, int(port)), cases[index])

            for start in range(0, len(cases), 50):
                async with trio.open_nursery() as nursery:
                    for index in range(start, min(start + 50, len(cases))):
                        nursery.start_soon(one, index)
            async with gw.client() as http:  # still serving, session intact
                assert (await http.get("/health")).status_code == 200
            assert gw.manager.stats.sessions_ended == 0
    for index, answer in answers.items():
        match = re.match(rb"HTTP/1\.1 (\d{3})", answer)
        status = int(match.group(1)) if match else 0  # 0: closed without an answer (the HTTP parser refused it)
        statuses[status] = statuses.get(status, 0) + 1
        assert status != 500, (index, cases[index][:200], answer[:300])
        assert b"Traceback" not in answer, index
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR or r.name == "gateway.server" or "Error in ASGI" in r.getMessage()
    ]
    assert problems == [], problems[:5]
    summary = " ".join(f"{status}:{count}" for status, count in sorted(statuses.items()))
    figure("edge_fuzz_cases_answered_deliberately", len(cases), "count", f"no 500 ({summary})", True)
