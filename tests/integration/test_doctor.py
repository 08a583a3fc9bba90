"""``python -m gateway doctor`` against the simulator's misconfiguration modes, over loopback.

Each test breaks the set-up the way a user's first contact with IBKR breaks it - on IBKR's side (the simulator's
modes: a consumer key not active yet, another registered signature key, other DH parameters, a skewed clock,
query-signing rules, a competing login, IBKR's terse 401 bodies) or in the config - and checks that the doctor stops
at the right step and names the config key that fixes it. The command-line tests check the exit statuses, the JSON
document and that no secret is ever printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from email.utils import formatdate
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import load_config
from gateway.doctor import diagnose
from gateway.doctor.live import CLOCK_FAIL_S
from gateway.doctor.report import Report, Status, exit_status
from gateway.simulator import Simulator, SimulatorCredentials, generate_credentials
from tests.certs import self_signed
from tests.keyfiles import is_probable_prime
from tests.rawserver import RawConnection, open_raw_server

REPO = Path(__file__).resolve().parents[2]


def _step(report: Report, name: str) -> Any:
    return next(step for step in report.steps if step.name == name)


def _prime_above(n: int) -> int:
    candidate = n | 1
    while not is_probable_prime(candidate):
        candidate += 2
    return candidate


async def _doctor(
    tmp_path: Path,
    edit: Callable[[str], str] = lambda text: text,
    *,
    conid: int = 265598,
    creds: SimulatorCredentials | None = None,
    **modes: Any,
) -> tuple[Report, Simulator]:
    """Serve a simulator for ``creds`` with IBKR's terse 401 bodies and ``modes``, write the config a user would
    have for it (changed by ``edit``), and run the doctor on that config."""
    async with trio.open_nursery() as nursery:
        sim = Simulator(creds or generate_credentials(), terse_errors=True, **modes)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        toml = sim.write_credentials(tmp_path / "conf")
        toml.write_text(edit(toml.read_text()))
        loaded = load_config(toml, env={})
        report = await diagnose(loaded, config_name=str(toml), conid=conid)
        nursery.cancel_scope.cancel()
    return report, sim


def _stopped_at(report: Report, name: str) -> Any:
    failed = report.failed
    assert failed is not None, [(s.name, s.status, s.detail) for s in report.steps]
    assert failed.name == name, (failed.name, failed.detail)
    after = report.steps[[s.name for s in report.steps].index(name) + 1 :]
    assert all(step.status is Status.NOT_RUN for step in after)
    assert exit_status(report) == 1
    return failed


async def test_a_good_setup_passes_every_step_and_logs_out(tmp_path: Path) -> None:
    report, sim = await _doctor(tmp_path)
    assert report.failed is None, [(s.name, s.detail) for s in report.steps if s.status is not Status.OK]
    assert {s.status for s in report.steps} <= {Status.OK, Status.SKIPPED}
    assert _step(report, "tls").status is Status.SKIPPED  # plain http to the simulator
    assert "DU" in _step(report, "accounts").detail
    assert "topic 'system' (user " in _step(report, "websocket").detail
    assert _step(report, "websocket").detail.endswith(", paper)")
    assert "last" in _step(report, "snapshot").detail
    assert exit_status(report) == 0
    assert any(r.endpoint.endswith("logout") and r.accepted for r in sim.records)


async def test_consumer_key_not_active_yet(tmp_path: Path) -> None:
    report, _ = await _doctor(tmp_path, consumer_active=False)
    failed = _stopped_at(report, "live_session_token")
    assert "error: invalid consumer" in failed.detail  # IBKR's terse answer, shown as it came
    assert failed.hint.keys == ("ibkr.consumer_key",)
    assert "active" in failed.hint.cause and "business day" in failed.hint.cause


async def test_mistyped_consumer_key(tmp_path: Path) -> None:
    creds = generate_credentials()
    report, _ = await _doctor(tmp_path, lambda t: t.replace(creds.consumer_key, "ABCDEFGHI"), creds=creds)
    assert _stopped_at(report, "live_session_token").hint.keys == ("ibkr.consumer_key",)


async def test_wrong_access_token(tmp_path: Path) -> None:
    creds = generate_credentials()
    report, _ = await _doctor(tmp_path, lambda t: t.replace(creds.access_token, "0123456789abcdef0123"), creds=creds)
    failed = _stopped_at(report, "live_session_token")
    assert "invalid token" in failed.detail
    assert failed.hint.keys == ("ibkr.access_token", "ibkr.access_token_secret")


async def test_portal_holds_another_signature_key(tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    report, _ = await _doctor(tmp_path, registered_signature_key=other)
    failed = _stopped_at(report, "live_session_token")
    assert "invalid signature" in failed.detail
    assert failed.hint.keys[0] == "ibkr.signature_key"
    assert "fingerprint" in failed.hint.fix
    assert len(report.facts["signature_key_sha256"]) == 64  # type: ignore[arg-type]


async def test_other_dh_parameters_registered(tmp_path: Path) -> None:
    # A registered prime far above the file's: IBKR's DH response lies outside the file's group, as with a 1024-bit
    # file where IBKR holds a 2048-bit one.
    report, _ = await _doctor(tmp_path, registered_dh_prime=_prime_above(2**2100))
    assert _step(report, "live_session_token").status is Status.OK  # IBKR did answer
    failed = _stopped_at(report, "lst_validation")
    assert "diffie_hellman_response" in failed.detail or "does not match" in failed.detail
    assert failed.hint.keys[0] == "ibkr.dh_param"


async def test_skewed_clock_stops_before_any_signed_request(tmp_path: Path) -> None:
    report, sim = await _doctor(tmp_path, clock_skew_s=CLOCK_FAIL_S + 540)
    failed = _stopped_at(report, "clock")
    assert re.search(r"(599|600|601) s behind IBKR's", failed.detail)
    assert "NTP" in failed.hint.fix or "ntp" in failed.hint.fix
    assert not any(r.endpoint.endswith("live_session_token") for r in sim.records)


async def test_small_skew_is_a_warning_and_the_walk_goes_on(tmp_path: Path) -> None:
    report, _ = await _doctor(tmp_path, clock_skew_s=-20)
    assert _step(report, "clock").status is Status.WARN
    assert re.search(r"(19|20|21) s ahead of IBKR's", _step(report, "clock").detail)
    assert report.failed is None


async def test_query_rule_names_the_rule_ibkr_accepts(tmp_path: Path) -> None:
    report, _ = await _doctor(tmp_path, accepted_query_rules=("omit",))
    failed = _stopped_at(report, "query_rule")
    assert 'set ibkr.query_rule = "omit"' in failed.detail
    assert failed.hint.keys == ("ibkr.query_rule",)
    assert "include: 401" in failed.detail and "omit: 200" in failed.detail
    fixed, _ = await _doctor(
        tmp_path, lambda t: t.replace('query_rule = "include"', 'query_rule = "omit"'), accepted_query_rules=("omit",)
    )
    assert fixed.failed is None, fixed.failed


async def test_realm_typo_fails_offline(tmp_path: Path) -> None:
    report, sim = await _doctor(tmp_path, lambda t: t.replace('realm = "limited_poa"', 'realm = "limited-poa"'))
    failed = _stopped_at(report, "keys")
    assert failed.hint.keys == ("ibkr.realm",)
    assert _step(report, "config").status is Status.WARN and "ibkr.realm" in _step(report, "config").detail
    assert sim.records == []  # nothing was sent


async def test_competing_login_names_compete(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sim = Simulator(generate_credentials(), terse_errors=True)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        sim.faults.set_other_session(True)
        toml = sim.write_credentials(tmp_path)
        toml.write_text(toml.read_text().replace("compete = true", "compete = false"))
        report = await diagnose(load_config(toml, env={}), config_name="g.toml")
        nursery.cancel_scope.cancel()
    failed = _stopped_at(report, "tickle")
    assert "competing" in failed.detail
    assert failed.hint.keys == ("ibkr.compete",)


async def test_lost_access_secret_is_told_apart(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sim = Simulator(generate_credentials(), terse_errors=True)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        sim.faults.fail_next(
            1,
            401,
            path_prefix="/v1/api/oauth/live_session_token",
            error="id: 118871, error: LST failed, error: No access secret key found for user1",
        )
        toml = sim.write_credentials(tmp_path)
        report = await diagnose(load_config(toml, env={}), config_name="g.toml")
        nursery.cancel_scope.cancel()
    failed = _stopped_at(report, "live_session_token")
    assert "generate a new access token" in failed.hint.fix


async def test_no_prices_is_a_warning(tmp_path: Path) -> None:
    report, _ = await _doctor(tmp_path, conid=1)
    assert _step(report, "snapshot").status is Status.WARN
    assert report.failed is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_host_names_host_and_port(tmp_path: Path) -> None:
    port = _free_port()
    report, _ = await _doctor(tmp_path, lambda t: _rebase(t, f"http://127.0.0.1:{port}"))
    failed = _stopped_at(report, "tcp")
    assert f"127.0.0.1:{port}" in failed.detail
    assert failed.hint.keys == ("ibkr.base_url",)


def _rebase(text: str, url: str) -> str:
    start = text.index('base_url = "') + len('base_url = "')
    return text[:start] + url + text[text.index('"', start) :]


class _FailingResolver(trio.abc.HostnameResolver):
    async def getaddrinfo(self, host: bytes | str | None, port: bytes | str | int | None, *args: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_unresolvable_host(tmp_path: Path) -> None:
    previous = trio.socket.set_custom_hostname_resolver(_FailingResolver())  # no DNS query leaves the machine
    try:
        report, _ = await _doctor(tmp_path, lambda t: _rebase(t, "https://api.ibkr.invalid"))
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    failed = _stopped_at(report, "dns")
    assert "api.ibkr.invalid" in failed.detail
    assert failed.hint.keys == ("ibkr.base_url",)


async def test_untrusted_certificate(tmp_path: Path) -> None:
    server_context, _ = self_signed(tmp_path)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.do_handshake()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_ssl_over_tcp, handler, 0, server_context)
        port = listeners[0].transport_listener.socket.getsockname()[1]
        report, _ = await _doctor(tmp_path, lambda t: _rebase(t, f"https://127.0.0.1:{port}"))
        nursery.cancel_scope.cancel()
    failed = _stopped_at(report, "tls")
    assert "certificate" in failed.detail
    assert "certificate" in failed.hint.cause


# ------------------------------------------------------------------------------------------------ the command line


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def default_config() -> Path:
    return REPO / "gateway.toml"


def test_cli_default_config_passes_and_prints_no_secret(default_config: Path) -> None:
    result = _run("--config", str(default_config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "opens its own IBKR session" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_json_is_one_document(default_config: Path) -> None:
    result = _run("--config", str(default_config), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["failed"] is None
    assert [step["name"] for step in document["steps"]][:2] == ["config", "keys"]
    assert "opens its own IBKR session" in document["notice"]


def test_cli_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[ibkr]\nconsumer_key = "X"\nbogus = 1\n')
    text = _run("--config", str(bad))
    assert text.returncode == 2 and "ibkr.bogus" in text.stderr and "Traceback" not in text.stderr
    as_json = _run("--config", str(bad), "--json")
    assert as_json.returncode == 2
    document = json.loads(as_json.stdout)
    assert document["ok"] is False and document["failed"] == "config"
    assert any("ibkr.bogus" in problem for problem in document["problems"])


async def test_cli_failure_exits_1_and_never_prints_a_secret(tmp_path: Path) -> None:
    creds = generate_credentials()
    async with trio.open_nursery() as nursery:
        sim = Simulator(creds, terse_errors=True, accepted_query_rules=("in_url",))
        await nursery.start(sim.serve, "127.0.0.1", 0)
        toml = sim.write_credentials(tmp_path)
        text = toml.read_text().replace(f'access_token_secret = "{creds.access_token_secret}"\n', "")
        toml.write_text(text)
        env = {"GATEWAY__IBKR__ACCESS_TOKEN_SECRET": creds.access_token_secret}
        results = [
            await trio.to_thread.run_sync(partial(_run, "--config", str(toml), *extra, env=env))
            for extra in ((), ("--json",))
        ]
        session_cookie = sim.current_session
        nursery.cancel_scope.cancel()
    from gateway.simulator.credentials import ServerView

    prepend = ServerView.from_credentials(creds).prepend.hex()
    secrets = [creds.access_token_secret, prepend, prepend.upper(), "PRIVATE KEY"]
    if session_cookie:
        secrets.append(session_cookie)
    for result in results:
        assert result.returncode == 1, result.stdout + result.stderr
        for secret in secrets:
            assert secret not in result.stdout + result.stderr
    assert 'ibkr.query_rule = "in_url"' in results[0].stdout
    document = json.loads(results[1].stdout)
    assert document["failed"] == "query_rule"
    assert document["steps"][-2]["hint"]["fix"] == 'set ibkr.query_rule = "in_url"'


# ------------------------------------------------------------------------------------------------ hostile upstreams


def _answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    date = formatdate(usegmt=True).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n".encode()
    return head + b"date: " + date + b"\r\nconnection: close\r\n\r\n" + body


@pytest.mark.parametrize(
    ("lst_answer", "expected"),
    [
        (_answer("200 OK", b"<html>maintenance</html>", "text/html"), "body that is not JSON"),
        (_answer("200 OK", b'{"diffie_hellman_response": 7}'), "diffie_hellman_response missing or empty"),
        (
            _answer(
                "200 OK",
                b'{"diffie_hellman_response": "zz", "live_session_token_signature": "a", '
                b'"live_session_token_expiration": 1}',
            ),
            "not a hex number",
        ),
        (_answer("503 Service Unavailable", b'{"error": "maintenance"}'), "IBKR answered 503"),
        (None, "did not answer in time"),
    ],
)
async def test_a_misbehaving_ibkr_is_a_failed_step_not_a_traceback(
    tmp_path: Path, lst_answer: bytes | None, expected: str
) -> None:
    async def handler(connection: RawConnection) -> None:
        request = await connection.read_request()
        if request is None:
            return
        if request.startswith(b"GET / "):
            await connection.send(_answer("404 Not Found", b'{"error": "not found"}'))
        elif lst_answer is None:
            await trio.sleep_forever()  # IBKR never answers the token request
        else:
            await connection.send(lst_answer)

    async with open_raw_server(handler) as server:
        config = tmp_path / "conf"
        report, _ = await _doctor(
            config,
            lambda t: _rebase(t, f"http://127.0.0.1:{server.port}").replace(
                "read_timeout_s = 15", "read_timeout_s = 0.5"
            ),
        )
    failed = _stopped_at(report, "lst_validation" if "hex number" in expected else "live_session_token")
    assert expected in failed.detail
    assert failed.hint is None or failed.hint.fix


async def test_websocket_refused_by_ibkr(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        sim = Simulator(generate_credentials(), terse_errors=True)
        await nursery.start(sim.serve, "127.0.0.1", 0)
        sim.faults.fail_next(1, 403, path_prefix="/v1/api/ws")
        toml = sim.write_credentials(tmp_path)
        report = await diagnose(load_config(toml, env={}), config_name="g.toml")
        nursery.cancel_scope.cancel()
    failed = _stopped_at(report, "websocket")
    assert "HTTP 403" in failed.detail
    assert failed.hint.keys == ("ibkr.access_token",)
