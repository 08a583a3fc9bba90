"""The documented nginx site, run for real: a non-root-style nginx on loopback ports with a self-signed certificate,
in front of a real gateway and its simulator.

The site is ``deploy/nginx/ibkr-gateway.conf`` (what Deployment.md includes verbatim), changed only by
:func:`render_site`: listen ports (production's 80/443 become free loopback ports), the two certificate paths and
the upstream port. Everything else — TLS, the redirect, the catch-all servers, headers, buffering, timeouts and the
rate limit — is the documented text. The client connects from 127.0.0.3, so the address the gateway logs can only
have come through ``X-Forwarded-For``.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from tests.conftest import Figure
from tests.processes import free_port

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "deploy" / "nginx" / "ibkr-gateway.conf"
SERVER_NAME = "gateway.example.com"
CLIENT_ADDRESS = "127.0.0.3"  # the test client's source address: not a trusted proxy
ACCOUNTS = "/v1/api/iserver/accounts"

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


def render_site(site: str, *, http_port: int, https_port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """The documented site with only what a loopback test must change; each substitution must match exactly as
    often as the site is written to need it, so an edit of the site that the test no longer covers fails here.

    - ``listen 80``/``listen 443`` → ``127.0.0.1:<free port>``; ``listen [::]:80``/``[::]:443`` → ``[::1]:<port>``
    - ``ssl_certificate`` / ``ssl_certificate_key`` → the self-signed pair made by the test
    - ``server 127.0.0.1:5000`` in the upstream → the test gateway's port
    """
    ports = {"80": http_port, "443": https_port}

    def listen(match: re.Match[str]) -> str:
        host = "[::1]" if match.group(2) else "127.0.0.1"
        return f"{match.group(1)}{host}:{ports[match.group(3)]}"

    rendered, listens = re.subn(r"(?m)^(\s*listen\s+)(\[::\]:)?(80|443)\b", listen, site)
    assert listens == 8, f"expected 8 listen lines in the site, found {listens}"
    rendered, certs = re.subn(r"(?m)^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", rendered)
    rendered, keys = re.subn(r"(?m)^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", rendered)
    rendered, upstreams = re.subn(
        r"(?m)^(\s*server\s+)127\.0\.0\.1:5000;", rf"\g<1>127.0.0.1:{upstream_port};", rendered
    )
    assert (certs, keys, upstreams) == (1, 1, 1), (certs, keys, upstreams)
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
    gw: TestGateway
    http_port: int
    https_port: int
    tls: ssl.SSLContext
    prefix: Path

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


SNI = {"sni_hostname": SERVER_NAME}


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def stack(
    nginx_path: str, openssl_path: str, tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials
) -> AsyncIterator[Stack]:
    cert, key = self_signed(tmp_path, openssl_path)
    tls = ssl.create_default_context(cafile=str(cert))
    async with open_test_gateway(
        {"server": {"trusted_proxies": ["127.0.0.1"]}},
        credentials=ibkr_sim_credentials,
        simulator_options={"tick_interval_s": 0.05, "heartbeat_s": 0.5},
    ) as gw:
        upstream_port = int(gw.url.rsplit(":", 1)[1])
        http_port, https_port = free_port(), free_port()
        site = tmp_path / "ibkr-gateway.conf"
        site.write_text(
            render_site(
                SITE.read_text(), http_port=http_port, https_port=https_port, upstream_port=upstream_port,
                cert=cert, key=key,
            )
        )  # fmt: skip
        conf = tmp_path / "nginx.conf"
        conf.write_text(wrapper_conf(tmp_path, site))
        base = [nginx_path, "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")]
        check = await trio.run_process([*base, "-t", "-q"], capture_stderr=True, check=False)
        assert check.returncode == 0, check.stderr.decode()
        stderr_path = tmp_path / "nginx.stderr"
        with stderr_path.open("wb") as stderr_file:
            nginx = await trio.lowlevel.open_process([*base, "-g", "daemon off;"], stderr=stderr_file)
        try:
            with trio.fail_after(10):
                while not (_listening(https_port) and _listening(http_port)):
                    assert nginx.poll() is None, stderr_path.read_text()
                    await trio.sleep(0.05)
            yield Stack(gw=gw, http_port=http_port, https_port=https_port, tls=tls, prefix=tmp_path)
        finally:
            nginx.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                await nginx.wait()
        stderr = stderr_path.read_text()
        errors = [line for line in (tmp_path / "error.log").read_text().splitlines() if "[emerg]" in line]
        assert not errors and "emerg" not in stderr, (errors, stderr)


def test_documented_site_renders_for_loopback(tmp_path: Path) -> None:
    """The substitutions the tests below rely on still fit the documented site (no nginx needed): every listen line
    moves to loopback, both certificate lines and the upstream change, and nothing else does."""
    site = SITE.read_text()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    rendered = render_site(site, http_port=8080, https_port=8443, upstream_port=5555, cert=cert, key=key)
    assert not re.search(r"(?m)^\s*listen\s+(\[::\]:)?(80|443)\b", rendered)
    assert rendered.count("listen 127.0.0.1:8080") == rendered.count("listen [::1]:8080") == 2
    assert rendered.count("listen 127.0.0.1:8443") == rendered.count("listen [::1]:8443") == 2
    assert re.search(rf"(?m)^\s*ssl_certificate\s+{re.escape(str(cert))};$", rendered)
    assert re.search(rf"(?m)^\s*ssl_certificate_key\s+{re.escape(str(key))};$", rendered)
    assert re.search(r"(?m)^\s*server\s+127\.0\.0\.1:5555;$", rendered)
    changed = [pair for pair in zip(site.splitlines(), rendered.splitlines(), strict=True) if pair[0] != pair[1]]
    assert len(changed) == 8 + 2 + 1, changed


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


async def test_websocket_relay_through_nginx(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.websocket")
    async with trio.open_nursery() as nursery:
        tcp = await trio.open_tcp_stream("127.0.0.1", stack.https_port, local_address=CLIENT_ADDRESS)
        tls = trio.SSLStream(tcp, stack.tls, server_hostname=SERVER_NAME, https_compatible=True)
        ws = await trio_websocket.wrap_client_stream(
            nursery, tls, SERVER_NAME, "/v1/api/ws", extra_headers=[(b"origin", f"https://{SERVER_NAME}".encode())]
        )
        try:
            await ws.send_message('smd+265598+{"fields":["31","84","86"]}')
            ticks: list[dict[str, object]] = []
            with trio.fail_after(10):
                while len(ticks) < 3:
                    message = json.loads(await ws.get_message())
                    if message.get("topic") == "smd+265598":
                        ticks.append(message)
            assert {tick["conid"] for tick in ticks} == {265598}
            assert stack.gw.gateway.relays.open == 1
            # The status shows who holds the relay as the browser saw it: nginx's X-Forwarded-For and -Proto.
            async with stack.gw.client() as direct:
                relays = (await direct.get("/session")).json()["relays"]
            assert relays["clients"] == [{"client": CLIENT_ADDRESS, "scheme": "https"}]
        finally:
            await ws.aclose()
    with trio.fail_after(5):
        while stack.gw.gateway.relays.open:  # noqa: ASYNC110 - polls a counter owned by the gateway
            await trio.sleep(0.02)
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
