"""``/examples/dashboard/`` over HTTP: served only when enabled, fixed files with their types and headers, nothing
outside them, no key needed for the files but for every call the page makes."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
import trio

from gateway.config.render import render_config
from gateway.simulator import SimulatorCredentials
from gateway.testing import TestGateway, open_test_gateway
from gateway.web.examples import DASHBOARD_DIR

REPO = Path(__file__).resolve().parents[2]
KEY = "examples-test-key-0123456789abcdef"
FILES = {
    "/examples/dashboard/": "text/html; charset=utf-8",
    "/examples/dashboard/index.html": "text/html; charset=utf-8",
    "/examples/dashboard/app.js": "text/javascript; charset=utf-8",
    "/examples/dashboard/style.css": "text/css; charset=utf-8",
}


@pytest.fixture
async def enabled(ibkr_sim_credentials: SimulatorCredentials) -> AsyncIterator[TestGateway]:
    async with open_test_gateway(
        {"server": {"examples": True, "api_keys": KEY}}, credentials=ibkr_sim_credentials
    ) as gateway:
        yield gateway


async def raw_get(url: str, target: str) -> bytes:
    """The status line of a GET for ``target`` sent byte for byte (httpx would normalise dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        with trio.fail_after(5):
            data = b""
            while b"\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    return data.split(b"\r\n", 1)[0]


async def test_disabled_by_default_is_404_like_any_unrouted_path(ibkr_gateway: TestGateway) -> None:
    async with ibkr_gateway.client() as http:
        for path in (*FILES, "/examples/dashboard"):
            r = await http.get(path)
            assert r.status_code == 404, path
            assert r.json()["code"] == "not_routed"


async def test_files_are_served_with_type_and_headers_and_without_a_key(enabled: TestGateway) -> None:
    async with enabled.client() as http:
        for path, content_type in FILES.items():
            r = await http.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-type"] == content_type
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert "connect-src 'self'" in r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            name = path.rsplit("/", 1)[1] or "index.html"
            assert r.content == (DASHBOARD_DIR / name).read_bytes()
            head = await http.head(path)
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-length"] == str(len(r.content))
        r = await http.get("/examples/dashboard")
        assert r.status_code == 308
        assert r.headers["location"] == "/examples/dashboard/"
        # The key protects what the page calls, not the page itself.
        assert (await http.get("/v1/api/iserver/secdef/search", params={"symbol": "AAPL"})).status_code == 401
        r = await http.get(
            "/v1/api/iserver/secdef/search", params={"symbol": "AAPL"}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 200
        assert r.json()[0]["conid"] == "265598"


async def test_nothing_else_below_the_prefix(enabled: TestGateway) -> None:
    async with enabled.client() as http:
        for path in (
            "/examples/dashboard/missing.js",
            "/examples/dashboard/dashboard/index.html",
            "/examples/dashboard/__init__.py",
            "/examples/dashboardx",
            "/examples/",
        ):
            r = await http.get(path)
            assert r.status_code == 404, path
        for method in ("POST", "PUT", "DELETE"):
            r = await http.request(method, "/examples/dashboard/app.js")
            assert r.status_code == 405
            assert r.headers["allow"] == "GET, HEAD"
    for target in (
        "/examples/dashboard/../../../pyproject.toml",
        "/examples/dashboard/%2e%2e/status_page.html",
        "/examples/dashboard/..%2fexamples.py",
        "/examples/dashboard//app.js",
        "/examples/dashboard/./app.js",
    ):
        assert await raw_get(enabled.url, target) == b"HTTP/1.1 400 ", target


def test_every_served_file_ships_in_the_wheel() -> None:
    """pyproject's package-data patterns cover the status page and every file the examples app would serve, so a
    wheel install serves the same files as ``pip install -e``."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gateway"]
    package = REPO / "src" / "gateway"
    shipped = [
        path.relative_to(package).as_posix()
        for path in [package / "web" / "status_page.html", *sorted(DASHBOARD_DIR.iterdir())]
    ]
    assert {"web/examples/dashboard/index.html", "web/examples/dashboard/app.js"} <= set(shipped)
    missing = [name for name in shipped if not any(fnmatch(name, pattern) for pattern in patterns)]
    assert missing == []


def test_default_gateway_toml_enables_the_example_and_init_does_not() -> None:
    """The offline default (simulator) shows the example; a config written by ``gateway init`` leaves it off."""
    config = tomllib.loads((REPO / "gateway.toml").read_text())
    assert config["server"]["examples"] is True
    assert config["simulator"]["enabled"] is True
    assert tomllib.loads(render_config({}))["server"]["examples"] is False
