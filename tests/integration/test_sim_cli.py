"""``python -m gateway.simulator`` as a subprocess: files written with mode 0600, a TOML the gateway can load,
the process serves and answers, SIGINT ends it with exit 0 and no traceback; bad input exits 2 in one line."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import trio

from gateway.simulator import SimulatorCredentials
from gateway.simulator.cli import main
from tests.integration.sim_client import Client

CONTRACT_KEYS = {
    "server": {"host", "port"},
    "ibkr": {"base_url", "consumer_key", "access_token", "access_token_secret", "signature_key", "encryption_key",
             "dh_param", "realm"},
    "simulator": {"enabled"},
}  # fmt: skip


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.simulator", *args]


async def _listening_url(process: trio.Process) -> str:
    """The URL the CLI prints once it listens (read from its stdout)."""
    assert process.stdout is not None
    buffer = b""
    while b"listening on" not in buffer:
        chunk = await process.stdout.receive_some(4096)
        assert chunk, "simulator exited before listening"
        buffer += chunk
    return buffer.decode().split("listening on ", 1)[1].split()[0]


async def test_cli_writes_credentials_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    target = tmp_path / "creds"
    process = await trio.lowlevel.open_process(
        _cmd("--host", "127.0.0.1", "--port", "0", "--write-credentials", str(target), "--gateway-port", "5055"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        with trio.fail_after(20):
            url = await _listening_url(process)

            for name in ("private_signature.pem", "private_encryption.pem", "dhparam.pem", "gateway.toml"):
                assert stat.S_IMODE((target / name).stat().st_mode) == 0o600, name
            doc = tomllib.loads((target / "gateway.toml").read_text())
            assert all(set(doc[section]) >= keys for section, keys in CONTRACT_KEYS.items())
            assert doc["ibkr"]["base_url"] == url
            assert (doc["server"]["host"], doc["server"]["port"]) == ("127.0.0.1", 5055)
            assert doc["simulator"]["enabled"] is False
            ibkr = doc["ibkr"]
            creds = SimulatorCredentials(
                consumer_key=ibkr["consumer_key"],
                access_token=ibkr["access_token"],
                access_token_secret=ibkr["access_token_secret"],
                signature_key_pem=(target / ibkr["signature_key"]).read_bytes(),
                encryption_key_pem=(target / ibkr["encryption_key"]).read_bytes(),
                dh_param_pem=(target / ibkr["dh_param"]).read_bytes(),
                realm=ibkr["realm"],
            )
            async with httpx.AsyncClient() as http:
                client = Client(creds, url)
                assert (await client.get_lst(http)).valid  # the written files are the server's counterpart
                r = await client.request(http, "POST", "/v1/api/tickle")
                assert r.status_code == 200

            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
            err = b""
            while chunk := await process.stderr.receive_some(65536):
                err += chunk
            assert b"Traceback" not in err
            assert ibkr["access_token_secret"].encode() not in err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()


async def test_cli_ibkr_rule_switches_reach_the_simulator() -> None:
    rules = ("--accounts-first", "--snapshot-preflight", "--pacing", "--penalty-box-s", "0.5")
    process = await trio.lowlevel.open_process(
        _cmd("--host", "127.0.0.1", "--port", "0", *rules), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(20):
            url = await _listening_url(process)
            async with httpx.AsyncClient() as http:
                state = (await http.get(f"{url}/_sim/state")).json()["rules"]
            assert (state["accounts_first"], state["snapshot_preflight"], state["pacing"]) == (True, True, True)
            assert state["penalty_box_s"] == 0.5
    finally:
        process.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await process.wait()
        await process.stdout.aclose()


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "99999"],
        ["--port", "abc"],
        ["--lst-ttl-s", "0"],
        ["--lst-ttl-s", "nan"],
        ["--heartbeat-s", "-1"],
        ["--penalty-box-s", "-1"],
        ["--penalty-box-s", "inf"],
        ["--consumer-key", "lower"],
        ["--bogus"],
        ["--host", ""],
    ],
)
def test_cli_bad_input_one_line_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("gateway.simulator: error: ")


def test_cli_bad_input_as_subprocess() -> None:
    result = subprocess.run(_cmd("--port", "x"), capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_cli_write_credentials_into_a_file_is_exit_2(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("x")
    result = subprocess.run(
        _cmd("--write-credentials", str(file)), capture_output=True, text=True, timeout=20, check=False
    )
    assert (result.returncode, result.stderr.count("\n")) == (2, 1)


def test_cli_port_in_use_is_one_line_exit_1() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            _cmd("--port", str(port), "--log-level", "error"), capture_output=True, text=True, timeout=20, check=False
        )
    assert result.returncode == 1
    assert result.stderr.strip().endswith("Address already in use")
    assert result.stderr.count("\n") == 1


def test_cli_main_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--write-credentials" in capsys.readouterr().out
