"""The documented systemd unit: systemd's own checker accepts it, its hardening score, its values agree with the
gateway's code, its credential wiring loads real keys, and the gateway runs under MemoryDenyWriteExecute.

The unit is ``deploy/systemd/ibkr-gateway.service`` (what Deployment.md includes verbatim). systemd cannot run as
PID 1 here, so the unit is checked with ``systemd-analyze`` and its parts are exercised directly: the
``LoadCredential=`` lines and ExecStart's ``--config`` with a credentials directory the test fills as systemd would, and
the kernel's own MDWE (``prctl(PR_SET_MDWE)``, the mechanism behind ``MemoryDenyWriteExecute=`` on current
systemd) applied to a real gateway process.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from gateway.cli import EXIT_CONFIG
from gateway.config import load_config
from gateway.runtime import GRACEFUL_TIMEOUT_S
from gateway.session.supervisor import _LOGOUT_TIMEOUT_S
from gateway.simulator import generate_credentials
from tests.conftest import Figure
from tests.processes import gateway_popen, wait_healthy
from tests.twclient import open_websocket

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "ibkr-gateway.service"
GATEWAY_TOML = REPO / "deploy" / "gateway.toml"
UNIT_NAME = "ibkr-gateway.service"
EXEC_START = "ExecStart=/opt/ibkr-gateway/venv/bin/ibkr-gateway "
MAX_EXPOSURE = 2.0


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (all sections), values in order; comments and blank lines skipped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def runnable_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with only ExecStart's program replaced by this venv's real ``ibkr-gateway`` (verify checks that
    the program exists and is executable)."""
    text = UNIT.read_text() if text is None else text
    program = Path(sys.executable).parent / "ibkr-gateway"
    assert program.is_file(), program
    assert text.count(EXEC_START) == 1
    copy = tmp_path / UNIT_NAME
    copy.write_text(text.replace(EXEC_START, f"ExecStart={program} "))
    return copy


def verify(systemd_analyze: str, unit: Path) -> list[str]:
    """``systemd-analyze verify`` lines about this unit. Lines naming other units (the container's own, e.g. a
    missing dependency's file) are not the unit's directives and are left out; none appear on CI's image today."""
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if UNIT_NAME in line or str(unit) in line]


def test_systemd_analyze_verify_reports_nothing(systemd_analyze_path: str, tmp_path: Path) -> None:
    assert verify(systemd_analyze_path, runnable_copy(tmp_path)) == []


def test_verify_does_report_a_broken_unit(systemd_analyze_path: str, tmp_path: Path) -> None:
    """The check above can fail: the same tool, on a copy with a misspelt and a mistyped directive, complains."""
    broken = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictest\nWatchdogSecs=30")
    complaints = verify(systemd_analyze_path, runnable_copy(tmp_path, broken))
    assert any("WatchdogSecs" in line for line in complaints), complaints
    assert any("strictest" in line or "protect system" in line.lower() for line in complaints), complaints


def test_hardening_exposure_score(systemd_analyze_path: str, tmp_path: Path, figure: Figure) -> None:
    result = subprocess.run(
        [systemd_analyze_path, "security", "--offline=yes", str(runnable_copy(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    figure("g7_systemd_exposure", exposure, "score(0-10)", f"<= {MAX_EXPOSURE}", exposure <= MAX_EXPOSURE)
    assert exposure <= MAX_EXPOSURE


def test_unit_agrees_with_the_gateway() -> None:
    unit = unit_settings(UNIT.read_text())
    one = {key: values[-1] for key, values in unit.items()}
    assert (one["Type"], one["NotifyAccess"], one["KillSignal"], one["Restart"]) == (
        "notify", "main", "SIGTERM", "on-failure",
    )  # fmt: skip
    # systemd must wait out the whole graceful drain (requests, then logout) before it sends SIGKILL.
    assert int(one["TimeoutStopSec"]) > GRACEFUL_TIMEOUT_S + _LOGOUT_TIMEOUT_S + 5
    assert int(one["WatchdogSec"]) >= 10  # pinged every WatchdogSec/2 by the event loop
    assert one["RestartPreventExitStatus"] == str(EXIT_CONFIG)  # a bad config is not retried
    assert int(one["RestartSec"]) * int(one["StartLimitBurst"]) < int(one["StartLimitIntervalSec"])
    assert one["DynamicUser"] == "yes" and one["CapabilityBoundingSet"] == ""
    assert one["MemoryDenyWriteExecute"] == "yes" and one["ProtectSystem"] == "strict"
    assert one["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"  # AF_UNIX: the notify socket, journald
    assert unit["SystemCallFilter"][0] == "@system-service"


def test_credential_wiring_loads_the_documented_config(tmp_path: Path) -> None:
    """What the unit hands the service loads as a complete config with real keys: the files LoadCredential=
    names, copied into a credentials directory as systemd does, read through ExecStart's ``--config
    ${CREDENTIALS_DIRECTORY}/gateway.toml``, with the secret from the optional EnvironmentFile= line."""
    creds = generate_credentials()
    unit = unit_settings(UNIT.read_text())
    on_disk = {
        "/etc/ibkr-gateway/gateway.toml": GATEWAY_TOML.read_bytes(),
        "/etc/ibkr-gateway/private_signature.pem": creds.signature_key_pem,
        "/etc/ibkr-gateway/private_encryption.pem": creds.encryption_key_pem,
        "/etc/ibkr-gateway/dhparam.pem": creds.dh_param_pem,
    }
    credentials_dir = tmp_path / "credentials" / UNIT_NAME
    credentials_dir.mkdir(parents=True)
    for entry in unit["LoadCredential"]:
        name, _, source = entry.partition(":")
        target = credentials_dir / name
        target.write_bytes(on_disk.pop(source))
        target.chmod(0o400)  # as systemd hands them over
    assert not on_disk, f"files the unit does not load: {sorted(on_disk)}"
    credentials_dir.chmod(0o500)
    config_arg = unit["ExecStart"][0].split("--config ", 1)[1].replace("${CREDENTIALS_DIRECTORY}", str(credentials_dir))
    assert unit["EnvironmentFile"] == ["-/etc/ibkr-gateway/gateway.env"]
    env = {"GATEWAY__IBKR__ACCESS_TOKEN_SECRET": creds.access_token_secret}  # the gateway.env line
    loaded = load_config(config_arg, env=env)
    assert loaded.credentials is not None
    assert loaded.credentials.prepend.reveal()  # the secret decrypted with the credential-provided key
    assert not loaded.warnings, loaded.warnings  # 0400 credential files raise no permission warning
    assert [str(n) for n in loaded.config.server.trusted_proxies] == ["127.0.0.1/32"]
    assert not loaded.config.simulator.enabled


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def _deny_write_execute() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed (Linux >= 6.3 needed)")


def test_mdwe_survives_exec() -> None:
    """The restriction used below is really in force in the exec'd program (the kernel keeps it across execve)."""
    probe = "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"
    result = subprocess.run(
        [sys.executable, "-c", probe], preexec_fn=_deny_write_execute, capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == str(PR_MDWE_REFUSE_EXEC_GAIN), result.stderr


async def _exercise(port: int) -> None:
    """What a gateway process must get through: a ready session, a proxied request, a relayed subscription."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        await wait_healthy(http)
        assert (await http.get("/v1/api/iserver/accounts")).status_code == 200
    async with open_websocket(f"ws://127.0.0.1:{port}/v1/api/ws") as ws:
        await ws.send_message('smd+265598+{"fields":["31"]}')
        with trio.fail_after(10):
            while json.loads(await ws.get_message()).get("topic") != "smd+265598":
                pass


async def test_gateway_runs_under_memory_deny_write_execute(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is kept in the unit because CPython, cryptography, trio and the relay work
    without writable+executable memory: a real gateway process under the kernel's MDWE handshakes, proxies and
    relays a WebSocket."""
    with gateway_popen(tmp_path, preexec_fn=_deny_write_execute) as (proc, port):
        await _exercise(port)
        assert proc.poll() is None


def _syscall_group(systemd_analyze: str, name: str) -> set[str]:
    """The system calls of a ``SystemCallFilter=`` group, nested groups expanded, as systemd itself lists them."""
    out = subprocess.run([systemd_analyze, "syscall-filter", name], capture_output=True, text=True, timeout=60)
    calls: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= _syscall_group(systemd_analyze, entry) if entry.startswith("@") else {entry}
    assert calls, f"systemd-analyze knows no group {name}"
    return calls


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def test_gateway_stays_inside_the_system_call_filter(
    systemd_analyze_path: str, strace_path: str, tmp_path: Path, figure: Figure
) -> None:
    """Every system call a real gateway process makes — start, handshake, proxied request, WebSocket relay,
    SIGTERM drain and logout — is one the unit's SystemCallFilter= allows (counted with strace)."""
    unit = unit_settings(UNIT.read_text())
    allowed: set[str] = set()
    for entry in unit["SystemCallFilter"]:
        groups = entry.removeprefix("~").split()
        calls = set().union(*(_syscall_group(systemd_analyze_path, group) for group in groups))
        allowed = allowed - calls if entry.startswith("~") else allowed | calls
    summary = tmp_path / "strace.txt"
    with gateway_popen(tmp_path, wrapper=[strace_path, "-f", "-c", "-o", str(summary)]) as (tracer, port):
        await _exercise(port)
        children = _children(tracer.pid)
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)  # the gateway itself, so its drain is traced too
        with trio.fail_after(30):
            while tracer.poll() is None:  # noqa: ASYNC110 - a child process has no trio wait
                await trio.sleep(0.05)
    used = {
        fields[-1]
        for fields in (line.split() for line in summary.read_text().splitlines())
        if len(fields) >= 5 and fields[-1].isidentifier() and fields[-1] not in ("syscall", "total")
    }
    outside = sorted(used - allowed)
    figure("g7_syscalls_outside_filter", len(outside), "count", "0", not outside)
    assert len(used) > 30, used  # the summary was read
    assert not outside, f"system calls the unit's filter would refuse: {outside}"
