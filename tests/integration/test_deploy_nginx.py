"""The documented nginx sites, run for real: a non-root-style nginx on loopback ports with a self-signed certificate,
in front of real gateways and their simulators.

The sites are ``deploy/nginx/ibkr-gateway.conf`` (one gateway) and ``deploy/nginx/ibkr-gateways.conf`` (one gateway
per IBKR account, each under a path prefix), both included verbatim in docs/deployment.md, changed only by
:func:`render_site`: listen ports (production's 80/443 become free loopback ports), the two certificate paths and the
upstream ports. Everything else — TLS, the redirect, the catch-all servers, headers, buffering, timeouts, the rate
limit and the accounts' locations — is the documented text. The client connects from 127.0.0.3, so the address the
gateway logs can only have come through ``X-Forwarded-For``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.testing_websocket import open_websocket
from tests.conftest import Figure
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "deploy" / "nginx" / "ibkr-gateway.conf"
ACCOUNTS_SITE = REPO / "deploy" / "nginx" / "ibkr-gateways.conf"
SINGLE_UPSTREAM = {"": 5000}
ACCOUNT_UPSTREAMS = {"paper": 5001, "live": 5002}
"""Each site's gateways: account prefix (``""``: the single site's one gateway) -> the port its upstream names."""
SERVER_NAME = "gateway.example.com"
CLIENT_ADDRESS = "127.0.0.3"  # the test client's source address: not a trusted proxy
ACCOUNTS = "/v1/api/iserver/accounts"
WS_PATH = "/v1/api/ws"


def render_site(
    site: str, *, http_port: int, https_port: int, upstreams: Mapping[int, int], cert: Path, key: Path
) -> str:
    """The documented site with only what a loopback test must change; each substitution must match exactly as
    often as the site is written to need it, so an edit of the site that the test no longer covers fails here.

    - ``listen 80``/``listen 443`` → ``127.0.0.1:<free port>``; ``listen [::]:80``/``[::]:443`` → ``[::1]:<port>``
    - ``ssl_certificate`` / ``ssl_certificate_key`` → the self-signed pair made by the test
    - ``server 127.0.0.1:<documented port>`` in each upstream → that test gateway's port (``upstreams`` maps the one
      to the other, and must name every upstream server of the site)
    """
    ports = {"80": http_port, "443": https_port}

    def listen(match: re.Match[str]) -> str:
        host = "[::1]" if match.group(2) else "127.0.0.1"
        return f"{match.group(1)}{host}:{ports[match.group(3)]}"

    rendered, listens = re.subn(r"(?m)^(\s*listen\s+)(\[::\]:)?(80|443)\b", listen, site)
    assert listens == 8, f"expected 8 listen lines in the site, found {listens}"
    rendered, certs = re.subn(r"(?m)^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", rendered)
    rendered, keys = re.subn(r"(?m)^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", rendered)
    assert (certs, keys) == (1, 1), (certs, keys)
    assert len(re.findall(r"(?m)^\s*server\s+\S+;", rendered)) == len(upstreams), "an upstream the test misses"
    for documented, port in upstreams.items():
        rendered, count = re.subn(
            rf"(?m)^(\s*server\s+)127\.0\.0\.1:{documented};", rf"\g<1>127.0.0.1:{port};", rendered
        )
        assert count == 1, (documented, count)
    return rendered


def wrapper_conf(prefix: Path, site: Path) -> str:
    """A minimal top-level nginx.conf around the site: everything nginx writes goes under ``prefix``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise run as nobody
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind}_temp;\n" for kind in ("client_body", "proxy", "fastcgi"))
    temp += "".join(f"    {kind}_temp_path {prefix}/{kind}_temp;\n" for kind in ("uwsgi", "scgi"))
    return (
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 512; }\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp}    include {site};\n}}\n"
    )


def self_signed(tmp: Path, openssl: str) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={SERVER_NAME}",
         "-addext", f"subjectAltName=DNS:{SERVER_NAME}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Stack:
    """nginx running a documented site in front of one test gateway per account (``""`` for the single site)."""

    gateways: Mapping[str, TestGateway]
    http_port: int
    https_port: int
    tls: ssl.SSLContext
    prefix: Path

    @property
    def gw(self) -> TestGateway:
        """The single site's one gateway."""
        return self.gateways[""]

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        """HTTPS to nginx as a browser on another machine would: SNI and Host are the server name, the certificate
        is verified against the test CA, and the connection comes from 127.0.0.3."""
        transport = httpx.AsyncHTTPTransport(verify=self.tls, local_address=CLIENT_ADDRESS, retries=0)
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.https_port}",
            headers={"Host": SERVER_NAME},
            transport=transport,
            timeout=10,
            **kwargs,  # type: ignore[arg-type]
        )

    def websocket(self, path: str) -> AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
        """A WebSocket over TLS through nginx, as :meth:`client` connects, with the browser Origin
        ``https://<server name>``."""
        return open_websocket(
            f"wss://{SERVER_NAME}{path}",
            extra_headers=[(b"origin", f"https://{SERVER_NAME}".encode())],
            ssl_context=self.tls,
            connect_to=("127.0.0.1", self.https_port),
            local_address=CLIENT_ADDRESS,
        )


SNI = {"sni_hostname": SERVER_NAME}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@asynccontextmanager
async def running_nginx(nginx_path: str, prefix: Path, site_text: str, ports: tuple[int, int]) -> AsyncIterator[None]:
    """nginx in the foreground with ``site_text`` as its only site, everything it writes under ``prefix``; returns
    once it listens on both ``ports``. On exit: SIGTERM, and its log must hold no ``[emerg]``."""
    site = prefix / "site.conf"
    site.write_text(site_text)
    conf = prefix / "nginx.conf"
    conf.write_text(wrapper_conf(prefix, site))
    base = [nginx_path, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = await trio.run_process([*base, "-t", "-q"], capture_stderr=True, check=False)
    assert check.returncode == 0, check.stderr.decode()
    stderr_path = prefix / "nginx.stderr"
    with stderr_path.open("wb") as stderr_file:
        nginx = await trio.lowlevel.open_process([*base, "-g", "daemon off;"], stderr=stderr_file)
    try:
        with trio.fail_after(10):
            while not all(_listening(port) for port in ports):
                assert nginx.poll() is None, stderr_path.read_text()
                await trio.sleep(0.05)
        yield
    finally:
        nginx.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await nginx.wait()
    stderr = stderr_path.read_text()
    errors = [line for line in (prefix / "error.log").read_text().splitlines() if "[emerg]" in line]
    assert not errors and "emerg" not in stderr, (errors, stderr)


@asynccontextmanager
async def open_stack(
    nginx_path: str, openssl_path: str, tmp_path: Path, credentials: SimulatorCredentials, site: str,
    upstreams: Mapping[str, int],
) -> AsyncIterator[Stack]:  # fmt: skip
    """A documented site (``site``, its text) in a real nginx, in front of one test gateway per entry of
    ``upstreams`` (account prefix -> the port the site names for it), each labelled with its account name and
    trusting nginx."""
    cert, key = self_signed(tmp_path, openssl_path)
    async with AsyncExitStack() as stack:
        gateways = {
            name: await stack.enter_async_context(
                open_test_gateway(
                    {"server": {"trusted_proxies": ["127.0.0.1"]}, "ibkr": {"label": name}},
                    credentials=credentials,
                    simulator_options={"tick_interval_s": 0.05, "heartbeat_s": 0.5},
                )
            )
            for name in upstreams
        }
        http_port, https_port = free_port(), free_port()
        rendered = render_site(
            site, http_port=http_port, https_port=https_port, cert=cert, key=key,
            upstreams={upstreams[name]: int(gw.url.rsplit(":", 1)[1]) for name, gw in gateways.items()},
        )  # fmt: skip
        await stack.enter_async_context(running_nginx(nginx_path, tmp_path, rendered, (http_port, https_port)))
        tls = ssl.create_default_context(cafile=str(cert))
        yield Stack(gateways=gateways, http_port=http_port, https_port=https_port, tls=tls, prefix=tmp_path)


SITES = {"single": (SITE, SINGLE_UPSTREAM), "accounts": (ACCOUNTS_SITE, ACCOUNT_UPSTREAMS)}
ACCOUNTS_STACK = pytest.mark.parametrize("stack", ["accounts"], indirect=True)
"""For a test of the accounts site: its ``stack`` runs ``ibkr-gateways.conf`` with two gateways."""


@pytest.fixture
async def stack(
    request: pytest.FixtureRequest,
    nginx_path: str,
    openssl_path: str,
    tmp_path: Path,
    ibkr_sim_credentials: SimulatorCredentials,
) -> AsyncIterator[Stack]:
    """The single site in front of one gateway, or with :data:`ACCOUNTS_STACK` the accounts site in front of two."""
    site, upstreams = SITES[getattr(request, "param", "single")]
    text = site.read_text()
    async with open_stack(nginx_path, openssl_path, tmp_path, ibkr_sim_credentials, text, upstreams) as running:
        yield running


@pytest.mark.parametrize(
    ("site", "upstreams"), [(SITE, SINGLE_UPSTREAM), (ACCOUNTS_SITE, ACCOUNT_UPSTREAMS)], ids=["single", "accounts"]
)
def test_documented_site_renders_for_loopback(tmp_path: Path, site: Path, upstreams: Mapping[str, int]) -> None:
    """The substitutions the tests below rely on still fit the documented site (no nginx needed): every listen line
    moves to loopback, both certificate lines and each upstream change, and nothing else does."""
    text = site.read_text()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    test_ports = {documented: 6000 + index for index, documented in enumerate(upstreams.values())}
    rendered = render_site(text, http_port=8080, https_port=8443, upstreams=test_ports, cert=cert, key=key)
    assert not re.search(r"(?m)^\s*listen\s+(\[::\]:)?(80|443)\b", rendered)
    assert rendered.count("listen 127.0.0.1:8080") == rendered.count("listen [::1]:8080") == 2
    assert rendered.count("listen 127.0.0.1:8443") == rendered.count("listen [::1]:8443") == 2
    assert re.search(rf"(?m)^\s*ssl_certificate\s+{re.escape(str(cert))};$", rendered)
    assert re.search(rf"(?m)^\s*ssl_certificate_key\s+{re.escape(str(key))};$", rendered)
    for port in test_ports.values():
        assert re.search(rf"(?m)^\s*server\s+127\.0\.0\.1:{port};$", rendered)
    changed = [pair for pair in zip(text.splitlines(), rendered.splitlines(), strict=True) if pair[0] != pair[1]]
    assert len(changed) == 8 + 2 + len(upstreams), changed


def _outside_routing(site: str) -> list[str]:
    """The site's directives other than its ``upstream`` and ``location`` blocks (comments and blank lines out)."""
    lines = [line for line in site.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return re.sub(r"(?ms)^\s*(upstream|location) [^{]*\{.*?^\s*\}\n", "", "\n".join(lines) + "\n").splitlines()


def test_accounts_site_is_the_single_site_but_for_its_routing() -> None:
    """The accounts site keeps every line of the single site (TLS, the catch-alls, headers, buffering, timeouts,
    limits) except its upstreams and locations, so what the single site's tests prove holds for it too."""
    single, accounts = _outside_routing(SITE.read_text()), _outside_routing(ACCOUNTS_SITE.read_text())
    assert len(single) > 40 and not any(line.lstrip().startswith(("upstream", "location")) for line in single)
    assert accounts == single


async def test_https_proxy_redirect_and_unknown_hosts(stack: Stack) -> None:
    async with stack.client() as http:
        r = await http.get(ACCOUNTS, params={"x": "1"}, extensions=SNI)
        assert r.status_code == 200, r.text
        assert r.json() == (await _direct(stack, ACCOUNTS)).json()  # the simulator's own answer, through nginx
        assert r.headers["strict-transport-security"] == "max-age=63072000"
        assert "nginx/" not in r.headers.get("server", "")  # server_tokens off
        health = await http.get("/health", extensions=SNI)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        # Bigger than client_max_body_size (= server.max_body_bytes): nginx refuses it before it travels.
        big = await http.post(ACCOUNTS, content=b"x" * 65537, extensions=SNI)
        assert big.status_code == 413
        # An unknown Host on the right TLS name (DNS rebinding): the catch-all server closes without an answer.
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(ACCOUNTS, headers={"Host": "rebind.example"}, extensions=SNI)
        # A TLS name nginx does not serve: the handshake itself is refused.
        with pytest.raises(httpx.ConnectError):
            await http.get(ACCOUNTS, extensions={"sni_hostname": "rebind.example"})

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.http_port}", timeout=10) as plain:
        r = await plain.get(ACCOUNTS + "?x=1", headers={"Host": SERVER_NAME})
        assert r.status_code == 301
        assert r.headers["location"] == f"https://{SERVER_NAME}{ACCOUNTS}?x=1"
        with pytest.raises(httpx.RemoteProtocolError):
            await plain.get(ACCOUNTS)  # Host 127.0.0.1:<port>: not the server name


async def _direct(stack: Stack, path: str) -> httpx.Response:
    async with stack.gw.client() as http:
        return await http.get(path)


async def test_forwarded_address_and_scheme_reach_the_gateway(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.proxy")
    async with stack.client() as http:
        # The browser's origin is https://<server name>: allowed only because nginx says the scheme was https.
        ok = await http.get(ACCOUNTS, headers={"Origin": f"https://{SERVER_NAME}"}, extensions=SNI)
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == f"https://{SERVER_NAME}"
        wrong = await http.get(ACCOUNTS, headers={"Origin": f"http://{SERVER_NAME}"}, extensions=SNI)
        assert wrong.status_code == 403 and wrong.json()["code"] == "origin_not_allowed"
        # A client's own X-Forwarded-For is not believed: nginx appends the real peer, which is not trusted.
        spoof = await http.get(ACCOUNTS, headers={"X-Forwarded-For": "203.0.113.9"}, extensions=SNI)
        assert spoof.status_code == 200
    # Without nginx the same https Origin is refused: the scheme really came from X-Forwarded-Proto.
    async with stack.gw.client() as direct:
        refused = await direct.get(ACCOUNTS, headers={"Origin": f"https://{SERVER_NAME}", "Host": SERVER_NAME})
        assert refused.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.proxy" and ACCOUNTS in r.getMessage()]
    through_nginx = [line for line in lines if "-> 200" in line]
    assert len(through_nginx) == 2, lines
    assert all(line.endswith(f"client={CLIENT_ADDRESS}") for line in through_nginx), lines
    assert not any("203.0.113.9" in line for line in lines)


async def _market_data(ws: trio_websocket.WebSocketConnection, count: int = 3) -> list[dict[str, object]]:
    """Subscribe to AAPL's market data and return the first ``count`` ticks."""
    await ws.send_message('smd+265598+{"fields":["31","84","86"]}')
    ticks: list[dict[str, object]] = []
    with trio.fail_after(10):
        while len(ticks) < count:
            message = json.loads(await ws.get_message())
            if message.get("topic") == "smd+265598":
                ticks.append(message)
    return ticks


async def _relays_closed(gw: TestGateway) -> None:
    with trio.fail_after(5):
        while gw.gateway.relays.open:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.02)


async def test_websocket_relay_through_nginx(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.websocket")
    async with stack.websocket(WS_PATH) as ws:
        ticks = await _market_data(ws)
        assert {tick["conid"] for tick in ticks} == {265598}
        assert stack.gw.gateway.relays.open == 1
        # The status shows who holds the relay as the browser saw it: nginx's X-Forwarded-For and -Proto.
        async with stack.gw.client() as direct:
            relays = (await direct.get("/session")).json()["relays"]
        assert relays["clients"] == [{"client": CLIENT_ADDRESS, "scheme": "https"}]
    await _relays_closed(stack.gw)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.websocket"]
    assert f"/v1/api/ws: WebSocket relay open client={CLIENT_ADDRESS}" in lines, lines
    assert f"/v1/api/ws: WebSocket relay closed client={CLIENT_ADDRESS}" in lines, lines


async def test_rate_limit_turns_a_burst_away_at_nginx(stack: Stack, figure: Figure) -> None:
    before = sum(1 for r in stack.gw.simulator.records if r.path == ACCOUNTS)
    statuses: list[int] = []
    bodies: list[str] = []

    async def fire(http: httpx.AsyncClient, count: int) -> None:
        for _ in range(count):
            r = await http.get(ACCOUNTS, extensions=SNI)
            statuses.append(r.status_code)
            if r.status_code != 200:
                bodies.append(r.text)

    started = time.monotonic()
    async with stack.client(limits=httpx.Limits(max_connections=10)) as http, trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(fire, http, 15)
    elapsed = time.monotonic() - started
    passed, limited = statuses.count(200), statuses.count(429)
    figure("g7_nginx_burst_150_passed", passed, "requests", f"<= 41 + 20/s * {elapsed:.2f} s", limited > 0)
    assert passed + limited == 150, statuses
    # limit_req: burst 40 at once, then 20 per second.
    assert limited > 0 and passed <= 41 + 20 * elapsed + 2, (passed, limited, elapsed)
    assert all("nginx" in body or "429" in body for body in bodies) and not any('"gateway"' in b for b in bodies)
    # The gateway saw exactly the requests nginx let through, answered them all, and is healthy.
    after = sum(1 for r in stack.gw.simulator.records if r.path == ACCOUNTS)
    assert after - before == passed
    async with stack.gw.client() as direct:
        assert (await direct.get("/health")).status_code == 200


def _records(gw: TestGateway, path: str) -> list[str]:
    """The raw queries of the requests for ``path`` that reached ``gw``'s simulator (IBKR's side)."""
    return [r.raw_query for r in gw.simulator.records if r.path == path]


@ACCOUNTS_STACK
async def test_each_prefix_reaches_its_own_gateway(stack: Stack) -> None:
    """Through the accounts site, ``/<account>/...`` reaches that account's gateway with the prefix stripped and the
    query unchanged — its status page and ``/session`` name the account — and the other gateway sees nothing of it;
    ``/<account>`` moves to ``/<account>/``; a path under no account is nginx's 404, seen by no gateway."""
    gateways = stack.gateways
    async with stack.client() as http:
        for name, gw in gateways.items():
            others = [other for other in gateways.values() if other is not gw]
            before = {id(g): len(_records(g, ACCOUNTS)) for g in gateways.values()}
            r = await http.get(f"/{name}{ACCOUNTS}", params={"x": "1", "y": "a,b"}, extensions=SNI)
            assert r.status_code == 200, r.text
            assert _records(gw, ACCOUNTS)[before[id(gw)] :] == ["x=1&y=a%2Cb"]
            assert all(len(_records(other, ACCOUNTS)) == before[id(other)] for other in others)
            session = (await http.get(f"/{name}/session", extensions=SNI)).json()
            assert session["account"] == {"label": name, "paper": True}
            page = await http.get(f"/{name}/", extensions=SNI)
            assert page.status_code == 200 and f"<title>{name} · ibkr-oauth-gateway status</title>" in page.text
            assert 'fetch("session"' in page.text  # relative: the page polls /<account>/session, not /session
            health = await http.get(f"/{name}/health", extensions=SNI)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            bare = await http.get(f"/{name}", extensions=SNI)
            moved = f"https://{SERVER_NAME}:{stack.https_port}/{name}/"  # in production: port 443, left out
            assert bare.status_code == 301 and bare.headers["location"] == moved
        before = {id(g): len(g.simulator.records) for g in gateways.values()}
        for path in (ACCOUNTS, "/session", "/", "/other/session", f"/other{ACCOUNTS}", "/paperx/session"):
            r = await http.get(path, extensions=SNI)
            assert r.status_code == 404, (path, r.status_code)
            assert r.json() == {"error": "no account at this path", "statusCode": 404, "source": "nginx"}, path
        assert {id(g): len(g.simulator.records) for g in gateways.values()} == before


@ACCOUNTS_STACK
async def test_websocket_through_each_prefix(stack: Stack) -> None:
    """A WebSocket at ``/<account>/v1/api/ws`` is relayed by that account's gateway only, and receives market data;
    one under no account is refused by nginx."""
    gateways = stack.gateways
    for name, gw in gateways.items():
        async with stack.websocket(f"/{name}{WS_PATH}") as ws:
            ticks = await _market_data(ws)
            assert {tick["conid"] for tick in ticks} == {265598}
            assert {other: g.gateway.relays.open for other, g in gateways.items()} == {
                other: int(other == name) for other in gateways
            }
            async with gw.client() as direct:
                relays = (await direct.get("/session")).json()["relays"]
            assert relays["clients"] == [{"client": CLIENT_ADDRESS, "scheme": "https"}]
        await _relays_closed(gw)
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with stack.websocket(f"/other{WS_PATH}"):
            pass
    assert refused.value.status_code == 404 and refused.value.body is not None
    assert json.loads(refused.value.body)["source"] == "nginx"
