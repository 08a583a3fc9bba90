"""The documented systemd units: systemd's own checker accepts them, their hardening score, their values agree with
the gateway's code, their credential wiring loads real keys, two instances of the template run side by side, and the
gateway runs under MemoryDenyWriteExecute.

The units are ``deploy/systemd/ibkr-gateway.service`` and the template ``deploy/systemd/ibkr-gateway@.service`` (one
instance per IBKR account), both included verbatim in docs/deployment.md. systemd cannot run as PID 1 here, so the units
are checked with ``systemd-analyze`` (the template as an instance, ``ibkr-gateway@paper.service``: systemd resolves
``%i`` from the file name) and their parts are exercised directly: the ``LoadCredential=`` lines and ExecStart's
``--config`` with a credentials directory the test fills as systemd would, and the kernel's own MDWE
(``prctl(PR_SET_MDWE)``, the mechanism behind ``MemoryDenyWriteExecute=`` on current systemd) applied to a real
gateway process.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from gateway.cli import EXIT_CONFIG
from gateway.config import load_config
from gateway.runtime import GRACEFUL_TIMEOUT_S
from gateway.session.supervisor import _LOGOUT_TIMEOUT_S
from gateway.simulator import SimulatorCredentials, generate_credentials
from gateway.testing_websocket import open_websocket
from tests.conftest import Figure
from tests.processes import free_port, gateway_popen, wait_healthy

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
GATEWAY_TOML = REPO / "deploy" / "gateway.toml"
EXEC_START = "ExecStart=/opt/ibkr-gateway/venv/bin/ibkr-gateway "
MAX_EXPOSURE = 2.0
PER_INSTANCE = ("Description", "User", "LoadCredential", "EnvironmentFile", "SyslogIdentifier")
"""The template's settings that name its instance; every other one is the single unit's, value for value."""


@dataclass(frozen=True)
class Unit:
    """One documented unit as systemd loads it: ``name`` is the unit name (for the template, an instance of it),
    ``instance`` what ``%i`` stands for, ``etc`` the folder its config and keys are read from."""

    file: Path
    name: str
    instance: str = ""

    @property
    def text(self) -> str:
        return self.file.read_text()

    @property
    def etc(self) -> str:
        return f"/etc/ibkr-gateway/{self.instance}".rstrip("/")

    def settings(self) -> dict[str, list[str]]:
        """Every ``Key=value`` (all sections), values in order, ``%i`` resolved to the instance."""
        return unit_settings(self.text, instance=self.instance)

    def as_instance(self, instance: str) -> Unit:
        """The template's unit for another instance name."""
        return Unit(self.file, self.name.split("@", 1)[0] + f"@{instance}.service", instance)


SINGLE = Unit(SYSTEMD / "ibkr-gateway.service", "ibkr-gateway.service")
TEMPLATE = Unit(SYSTEMD / "ibkr-gateway@.service", "ibkr-gateway@paper.service", "paper")
UNITS = pytest.mark.parametrize("unit", [SINGLE, TEMPLATE], ids=["single", "template"])


def unit_settings(text: str, *, instance: str = "") -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (all sections), values in order; comments and blank lines skipped. ``%i`` in
    a value becomes ``instance``; a value using any other specifier is refused (this reader knows only ``%i``)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        others = set(re.findall(r"%.", value)) - {"%i"}
        assert not others, f"{key}= uses specifiers this test does not resolve: {others}"
        settings.setdefault(key.strip(), []).append(value.strip().replace("%i", instance))
    return settings


def runnable_copy(tmp_path: Path, unit: Unit, text: str | None = None) -> Path:
    """The unit, under its (instance) name, with only ExecStart's program replaced by this venv's real
    ``ibkr-gateway`` (verify checks that the program exists and is executable)."""
    text = unit.text if text is None else text
    assert text.count(EXEC_START) == 1
    copy = tmp_path / unit.name
    copy.write_text(text.replace(EXEC_START, f"ExecStart={gateway_program()} "))
    return copy


def gateway_program() -> Path:
    program = Path(sys.executable).parent / "ibkr-gateway"
    assert program.is_file(), program
    return program


def verify(systemd_analyze: str, unit: Unit, copy: Path) -> list[str]:
    """``systemd-analyze verify`` lines about this unit: those naming it or its service user. Lines naming other
    units (the container's own, e.g. a missing dependency's file) are not the unit's directives and are left out;
    none appear on CI's image today."""
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    lines = (result.stdout + result.stderr).splitlines()
    user = f"'{unit.settings()['User'][0]}'" if "User" in unit.settings() else None
    return [line for line in lines if unit.name in line or str(copy) in line or (user and user in line)]


@UNITS
def test_systemd_analyze_verify_reports_nothing(systemd_analyze_path: str, tmp_path: Path, unit: Unit) -> None:
    assert verify(systemd_analyze_path, unit, runnable_copy(tmp_path, unit)) == []


@UNITS
def test_verify_does_report_a_broken_unit(systemd_analyze_path: str, tmp_path: Path, unit: Unit) -> None:
    """The check above can fail: the same tool, on a copy with a misspelt and a mistyped directive, complains."""
    broken = unit.text.replace("ProtectSystem=strict", "ProtectSystem=strictest\nWatchdogSecs=30")
    complaints = verify(systemd_analyze_path, unit, runnable_copy(tmp_path, unit, broken))
    assert any("WatchdogSecs" in line for line in complaints), complaints
    assert any("strictest" in line or "protect system" in line.lower() for line in complaints), complaints


def test_verify_reports_an_instance_name_too_long_for_its_user(systemd_analyze_path: str, tmp_path: Path) -> None:
    """The template's comment allows instance names of up to 23 characters: the service user ``ibkr-gw-<instance>``
    then has the 31 characters systemd's strict user-name rules allow (a dynamic user must meet them)."""
    longest, too_long = TEMPLATE.as_instance("a" * 23), TEMPLATE.as_instance("a" * 24)
    assert "at most 23 characters" in TEMPLATE.text
    assert verify(systemd_analyze_path, longest, runnable_copy(tmp_path, longest)) == []
    complaints = verify(systemd_analyze_path, too_long, runnable_copy(tmp_path, too_long))
    assert any("does not match strict user/group name rules" in line for line in complaints), complaints


@UNITS
def test_hardening_exposure_score(systemd_analyze_path: str, tmp_path: Path, figure: Figure, unit: Unit) -> None:
    result = subprocess.run(
        [systemd_analyze_path, "security", "--offline=yes", str(runnable_copy(tmp_path, unit))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    name = "g7_systemd_exposure" if unit is SINGLE else "g7_systemd_template_exposure"
    figure(name, exposure, "score(0-10)", f"<= {MAX_EXPOSURE}", exposure <= MAX_EXPOSURE)
    assert exposure <= MAX_EXPOSURE


@UNITS
def test_unit_agrees_with_the_gateway(unit: Unit) -> None:
    settings = unit.settings()
    one = {key: values[-1] for key, values in settings.items()}
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
    assert settings["SystemCallFilter"][0] == "@system-service"


def test_template_is_the_unit_but_for_its_instance() -> None:
    """The template keeps every setting of the single unit (so all it checks above holds for each instance), and
    what it changes names the instance: its own config folder, env file, journal tag and service user — two
    instances share no file and no user."""
    single, template = unit_settings(SINGLE.text), unit_settings(TEMPLATE.text, instance="%i")
    changed = sorted(key for key in single.keys() | template.keys() if single.get(key) != template.get(key))
    assert changed == sorted(PER_INSTANCE), changed
    assert all("%i" in value for key in PER_INSTANCE for value in template[key]), template
    per_folder = [v.replace("/etc/ibkr-gateway/", "/etc/ibkr-gateway/%i/") for v in single["LoadCredential"]]
    assert template["LoadCredential"] == per_folder
    assert template["EnvironmentFile"] == ["-/etc/ibkr-gateway/%i/gateway.env"]
    paper, live = TEMPLATE.settings(), TEMPLATE.as_instance("live").settings()
    assert not {value for key in PER_INSTANCE for value in paper[key]} & {v for k in PER_INSTANCE for v in live[k]}


def load_credentials(unit: Unit, tmp_path: Path, on_disk: Mapping[str, bytes]) -> Path:
    """A credentials directory filled as systemd fills it for ``unit``: each ``LoadCredential=`` source, read from
    ``on_disk`` (absolute path -> bytes), copied under its credential name, mode 0400, the folder 0500. Every file
    in ``on_disk`` must be one the unit loads, and every one the unit loads must be there."""
    remaining = dict(on_disk)
    credentials_dir = tmp_path / "credentials" / unit.name
    credentials_dir.mkdir(parents=True)
    for entry in unit.settings()["LoadCredential"]:
        name, _, source = entry.partition(":")
        target = credentials_dir / name
        target.write_bytes(remaining.pop(source))
        target.chmod(0o400)  # as systemd hands them over
    assert not remaining, f"files the unit does not load: {sorted(remaining)}"
    credentials_dir.chmod(0o500)
    return credentials_dir


def etc_files(unit: Unit, config: bytes, creds: SimulatorCredentials) -> dict[str, bytes]:
    """What the operator installs for ``unit`` (docs/deployment.md): the config and the three PEM files in its
    folder."""
    pems = {
        "private_signature.pem": creds.signature_key_pem,
        "private_encryption.pem": creds.encryption_key_pem,
        "dhparam.pem": creds.dh_param_pem,
    }
    return {f"{unit.etc}/gateway.toml": config} | {f"{unit.etc}/{name}": pem for name, pem in pems.items()}


def exec_start(unit: Unit, credentials_dir: Path) -> list[str]:
    """ExecStart's command line as systemd runs it, ``${CREDENTIALS_DIRECTORY}`` expanded and the program this
    venv's ``ibkr-gateway``."""
    command = unit.settings()["ExecStart"][0].replace("${CREDENTIALS_DIRECTORY}", str(credentials_dir)).split()
    assert command[0] == EXEC_START.removeprefix("ExecStart=").strip()
    return [str(gateway_program()), *command[1:]]


@UNITS
def test_credential_wiring_loads_the_documented_config(tmp_path: Path, unit: Unit) -> None:
    """What the unit hands the service loads as a complete config with real keys: the files LoadCredential=
    names, copied into a credentials directory as systemd does, read through ExecStart's ``--config
    ${CREDENTIALS_DIRECTORY}/gateway.toml``, with the secret from the optional EnvironmentFile= line."""
    creds = generate_credentials()
    credentials_dir = load_credentials(unit, tmp_path, etc_files(unit, GATEWAY_TOML.read_bytes(), creds))
    command = exec_start(unit, credentials_dir)
    assert command[1:3] == ["run", "--config"]
    assert unit.settings()["EnvironmentFile"] == [f"-{unit.etc}/gateway.env"]
    env = {"GATEWAY__IBKR__ACCESS_TOKEN_SECRET": creds.access_token_secret}  # the gateway.env line
    loaded = load_config(command[3], env=env)
    assert loaded.credentials is not None
    assert loaded.credentials.prepend.reveal()  # the secret decrypted with the credential-provided key
    assert not loaded.warnings, loaded.warnings  # 0400 credential files raise no permission warning
    assert [str(n) for n in loaded.config.server.trusted_proxies] == ["127.0.0.1/32"]
    assert not loaded.config.simulator.enabled


def instance_config(text: str, *, port: int, label: str) -> str:
    """The documented config as one instance's: its own port and ``[ibkr] label``, and the built-in simulator in
    place of IBKR. Each change must match exactly once, so an edit of the reference config the test no longer
    covers fails here."""
    text, ports = re.subn(r"(?m)^port = 5000$", f"port = {port}", text)
    text, labels = re.subn(r"(?m)^\[ibkr\]$", f'[ibkr]\nlabel = "{label}"', text)
    assert (ports, labels) == (1, 1), (ports, labels)
    return text + "\n[simulator]\nenabled = true\n"


@contextmanager
def running_instance(unit: Unit, tmp_path: Path, port: int, creds: SimulatorCredentials) -> Iterator[Path]:
    """One instance of the template run as systemd would start it: its own /etc folder's files loaded as its
    credentials, ExecStart's command line, the gateway's environment clean of ``GATEWAY__`` overrides; yields the
    gateway's log file. SIGTERM at the end, and the drain must exit 0."""
    config = instance_config(GATEWAY_TOML.read_text(), port=port, label=f"{unit.instance}-account").encode()
    credentials_dir = load_credentials(unit, tmp_path, etc_files(unit, config, creds))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    log = tmp_path / f"{unit.instance}.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(exec_start(unit, credentials_dir), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0 and "Traceback" not in log.read_text(), log.read_text()


async def test_two_instances_run_side_by_side(tmp_path: Path, ibkr_sim_credentials: SimulatorCredentials) -> None:
    """Two instances of the template, ``paper`` and ``live``, each with its own folder, port and label, run at once:
    both become healthy, proxy, and each says on ``/session`` and its status page which account it serves."""
    instances = {TEMPLATE.as_instance(name): free_port() for name in ("paper", "live")}
    with ExitStack() as stack:
        for unit, port in instances.items():
            stack.enter_context(running_instance(unit, tmp_path / unit.instance, port, ibkr_sim_credentials))
        seen = {}
        for unit, port in instances.items():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                await wait_healthy(http)
                assert (await http.get("/v1/api/iserver/accounts")).status_code == 200
                status = (await http.get("/session")).json()
                page = (await http.get("/")).text
            assert status["simulator"] is True and status["state"] == "ready"
            seen[unit.instance] = (
                status["account"]["label"],
                status["account"]["paper"],
                status["accounts"]["iserver"],
            )
            assert f"<title>{unit.instance}-account · ibkr-oauth-gateway status</title>" in page
    assert seen == {
        "paper": ("paper-account", True, ["DU1234567"]),
        "live": ("live-account", True, ["DU1234567"]),  # both play the simulator's one paper account
    }


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
    unit = SINGLE.settings()
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
