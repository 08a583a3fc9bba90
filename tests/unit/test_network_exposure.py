"""Listening beyond loopback with no API key (security issue, task 9): refused at check and at start unless
``server.allow_network_without_api_keys`` opts in, which then warns on every start; also on reload."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.runtime import reload_config_file
from gateway.simulator import SimulatorCredentials
from gateway.testing import open_test_gateway

API_KEY = "k" * 24
ANY = "0.0.0.0"  # noqa: S104 - only ever a value under test; nothing here listens beyond loopback
ROUTES = '[[routes]]\npath = "/v1/api/ws"\n'

LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "localhost", "LocalHost"]
NETWORK = [ANY, "::", "192.168.1.20", "10.0.0.5", "fe80::1", "2001:db8::5", "gateway.example.com", "localhost."]


def write(folder: Path, server: str, name: str = "g.toml") -> Path:
    path = folder / name
    path.write_text(f"[server]\n{server}\n[simulator]\nenabled = true\n{ROUTES}")
    path.chmod(0o600)  # some hold server.api_keys
    return path


def refusal(host: str) -> str:
    return (
        f"server.host: {host!r} is reachable from the network but no API key is configured, so anyone who can reach "
        "the port could use the brokerage session; configure API keys (server.api_keys_file or "
        "GATEWAY__SERVER__API_KEYS), listen on 127.0.0.1, or opt in with server.allow_network_without_api_keys = true"
    )


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_without_keys_is_fine(tmp_path: Path, host: str) -> None:
    loaded = load_config(write(tmp_path, f'host = "{host}"'), env={})
    assert loaded.config.server.host == host
    assert loaded.warnings == ()


@pytest.mark.parametrize("host", NETWORK)
def test_network_host_without_keys_is_refused(tmp_path: Path, host: str) -> None:
    path = write(tmp_path, f'port = 5000\nhost = "{host}"')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert str(excinfo.value) == f"{path}:3: {refusal(host)}"


def test_check_refuses_with_exit_2_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, 'host = "0.0.0.0"')
    assert main(["check", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}:2: {refusal(ANY)}\n"
    assert captured.out == ""


def test_environment_host_is_checked_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'host = "127.0.0.1"')
    monkeypatch.setenv("GATEWAY__SERVER__HOST", "::")
    assert main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: GATEWAY__SERVER__HOST: {refusal('::')}\n"


@pytest.mark.parametrize(
    ("server", "env"),
    [
        pytest.param(f'api_keys = "{API_KEY}"', {}, id="server.api_keys"),
        pytest.param("", {"GATEWAY__SERVER__API_KEYS": API_KEY}, id="GATEWAY__SERVER__API_KEYS"),
        pytest.param('api_keys_file = "keys.txt"', {}, id="server.api_keys_file"),
    ],
)
def test_network_host_with_api_keys_is_fine(tmp_path: Path, server: str, env: dict[str, str]) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# one key\n{API_KEY}\n")
    keys_file.chmod(0o600)
    loaded = load_config(write(tmp_path, f'host = "0.0.0.0"\n{server}'), env={"GATEWAY__SERVER__HOST": "::", **env})
    assert loaded.config.server.host == "::"
    assert loaded.api_keys.reveal() == (API_KEY,)
    assert loaded.warnings == ()


def test_an_api_keys_file_without_keys_is_reported_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys.txt").write_text("# no key yet\n")
    (tmp_path / "keys.txt").chmod(0o600)
    path = write(tmp_path, 'host = "0.0.0.0"\napi_keys_file = "keys.txt"')
    assert main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}:3: server.api_keys_file: {tmp_path / 'keys.txt'} holds no key\n"


@pytest.mark.parametrize(
    ("server", "env"),
    [
        pytest.param("allow_network_without_api_keys = true", {}, id="file"),
        pytest.param("", {"GATEWAY__SERVER__ALLOW_NETWORK_WITHOUT_API_KEYS": "true"}, id="environment"),
    ],
)
def test_opt_in_starts_with_a_warning(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    env: dict[str, str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, f'host = "0.0.0.0"\n{server}')
    assert main(["check", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"{path}:2: server.host: warning: '0.0.0.0' is reachable from the network and no API key is configured "
        "(server.allow_network_without_api_keys = true): anyone who can reach the port can use the brokerage "
        "session\n"
    )
    assert "listens on 0.0.0.0:5000" in captured.out
    (warning,) = load_config(path).warnings
    assert warning.severity == "warning"


def test_opt_in_is_silent_when_keys_or_loopback_make_it_moot(tmp_path: Path) -> None:
    opt_in = "allow_network_without_api_keys = true"
    assert load_config(write(tmp_path, f'host = "0.0.0.0"\n{opt_in}\napi_keys = "{API_KEY}"'), env={}).warnings == ()
    assert load_config(write(tmp_path, f"{opt_in}"), env={}).warnings == ()


# --- reload: the listen address needs a restart, so the check runs against the one in force --------------------


async def test_reload_cannot_drop_the_keys_of_a_gateway_on_the_network(
    tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    # The test gateway really binds 127.0.0.1; its config says it listens on every address, with a key.
    overrides = {"server": {"host": ANY, "api_keys": API_KEY}}
    async with open_test_gateway(overrides, credentials=ibkr_sim_credentials) as gw:
        running = gw.gateway.config
        # 1. The file moves to loopback and drops the key: loads on its own, but the socket stays on 0.0.0.0.
        to_loopback = write(tmp_path, 'host = "127.0.0.1"', "loopback.toml")
        assert await reload_config_file(gw.gateway, str(to_loopback)) is None
        (line,) = [r.getMessage() for r in caplog.records if "config reload" in r.getMessage()]
        assert line == (
            f"config reload rejected, the running config stays in force: {to_loopback}: server.host: the gateway "
            "listens on '0.0.0.0' until it restarts, and this config has no API key for it; keep the keys until it "
            "has restarted on a loopback host, or set server.allow_network_without_api_keys = true"
        )
        # 2. The same host without a key: refused by the load itself.
        caplog.clear()
        same_host = write(tmp_path, 'host = "0.0.0.0"', "same.toml")
        assert await reload_config_file(gw.gateway, str(same_host)) is None
        (line,) = [r.getMessage() for r in caplog.records if "config reload" in r.getMessage()]
        assert line.endswith(f"{same_host}:2: {refusal(ANY)}")
        assert gw.gateway.config is running
        assert gw.gateway.dispatcher.settings.api_keys.enabled
        # 3. With the opt-in, dropping the key is what was asked for.
        opted = write(tmp_path, 'host = "127.0.0.1"\nallow_network_without_api_keys = true', "opted.toml")
        plan = await reload_config_file(gw.gateway, str(opted))
        assert plan is not None
        assert set(plan.applied) >= {"server.api_keys", "server.allow_network_without_api_keys"}
        assert "server.host" in plan.restart_needed
        assert not gw.gateway.dispatcher.settings.api_keys.enabled
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"{opted}: server.host: warning: '0.0.0.0' is reachable from the network and no API key is configured "
            "(server.allow_network_without_api_keys = true): anyone who can reach the port can use the brokerage "
            "session"
        ]
