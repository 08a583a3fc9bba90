"""docs/deployment.md is what the tests use: its file blocks are the files in deploy/, byte for byte, and the nginx
site's limits and timeouts agree with the gateway's own defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import schema
from gateway.config.load import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = REPO / "docs" / "deployment.md"
SITE = REPO / "deploy" / "nginx" / "ibkr-gateway.conf"
ACCOUNTS_SITE = REPO / "deploy" / "nginx" / "ibkr-gateways.conf"
FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```\n", re.S)


def file_blocks() -> dict[str, str]:
    return {path: body for path, body in FILE_BLOCK.findall(DEPLOYMENT.read_text())}


def test_every_deploy_file_is_on_the_page_verbatim() -> None:
    blocks = file_blocks()
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "deploy").rglob("*") if p.is_file())
    assert sorted(blocks) == files
    for path, body in blocks.items():
        assert body.encode() == (REPO / path).read_bytes(), (
            f"docs/deployment.md's block for {path} differs from the file"
        )


def test_readme_and_operations_point_to_deployment() -> None:
    readme = (REPO / "README.md").read_text()
    operations = (REPO / "docs" / "operations.md").read_text()
    assert "](docs/deployment.md)" in readme
    assert "## Deploying" in operations and "](deployment.md)" in operations


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].isalpha() else int(value)


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


@pytest.mark.parametrize("site_file", [SITE, ACCOUNTS_SITE], ids=["single", "accounts"])
def test_nginx_limits_agree_with_the_gateway(site_file: Path) -> None:
    site = site_file.read_text()
    server = schema.SECTIONS["server"]
    body = re.search(r"^\s*client_max_body_size (\S+);", site, re.M)
    headers = re.search(r"^\s*large_client_header_buffers \d+ (\S+);", site, re.M)
    assert body and _size(body.group(1)) == server["max_body_bytes"].default
    assert headers and _size(headers.group(1)) == server["max_header_bytes"].default
    ws_locations = re.findall(r"location = (?:/[\w-]+)?/v1/api/ws \{(.*?)\}", site, re.S)
    assert ws_locations, "the site has no WebSocket location"
    ping = server["websocket_ping_interval_s"].default
    assert isinstance(ping, int | float)
    for ws_location in ws_locations:  # one per account on the accounts site
        ws_read = re.search(r"proxy_read_timeout (\S+);", ws_location)
        assert ws_read and _seconds(ws_read.group(1)) > 10 * ping
    http_read = re.search(r"^    proxy_read_timeout (\S+);", site, re.M)
    worst_case = sum(
        float(str(schema.SECTIONS[section][key].default))
        for section, key in (("session", "ready_timeout_s"), ("pacing", "max_wait_s"), ("upstream", "read_timeout_s"))
    )
    assert http_read and _seconds(http_read.group(1)) > worst_case


def test_documented_gateway_config_matches_the_site(tmp_path: Path) -> None:
    """deploy/gateway.toml keeps the gateway on the loopback address nginx proxies to and trusts exactly it."""
    text = (REPO / "deploy" / "gateway.toml").read_text()
    upstream = re.search(r"^\s*server (\S+):(\d+);", SITE.read_text(), re.M)
    assert upstream
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(text + "\n[simulator]\nenabled = true\n")  # no key files needed to read the rest
    config = load_config(config_path, env={}).config
    assert (config.server.host, str(config.server.port)) == upstream.groups()
    assert [str(net) for net in config.server.trusted_proxies] == [f"{upstream.group(1)}/32"]
