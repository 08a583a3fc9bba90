"""sd_notify message formatting, NOTIFY_SOCKET addresses, the watchdog interval rule and the never-raise contract."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from gateway.logs import register_secret
from gateway.notify import STATUS_MAX_CHARS, Notifier, encode, socket_address, status_line, watchdog_interval_s


def test_encode_joins_assignments_in_order() -> None:
    assert encode({"READY": 1, "MAINPID": 4242, "STATUS": "IBKR session ready"}) == (
        b"READY=1\nMAINPID=4242\nSTATUS=IBKR session ready"
    )
    assert encode({"WATCHDOG": 1}) == b"WATCHDOG=1"
    assert encode({"STATUS": "caf\u00e9"}) == "STATUS=caf\u00e9".encode()


@pytest.mark.parametrize("fields", [{"STATUS": "two\nlines"}, {"STATUS": "nul\0"}, {"ready": 1}, {"": 1}, {"A=B": 1}])
def test_encode_refuses_what_would_be_misread(fields: dict[str, str | int]) -> None:
    with pytest.raises(ValueError, match="sd_notify"):
        encode(fields)


def test_socket_address_forms() -> None:
    assert socket_address(None) is None
    assert socket_address("") is None
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@sd-notify-1") == b"\0sd-notify-1"
    with pytest.raises(ValueError, match="neither"):
        socket_address("relative/notify")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "77"}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "78"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_our_pid_only(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env, 77) == expected


def test_status_line_is_one_short_line() -> None:
    assert status_line("ready", generation=3, listening="http://127.0.0.1:5000") == (
        "IBKR session ready (session #3); listening on http://127.0.0.1:5000"
    )
    assert status_line("backoff", last_error="tickle failed:\n  HTTP 500") == (
        "IBKR session backoff; last error: tickle failed: HTTP 500"
    )
    assert status_line("ready", last_error="old error") == "IBKR session ready"
    long = status_line("backoff", last_error="x" * 1000)
    assert len(long) == STATUS_MAX_CHARS and "\n" not in long


def test_disabled_notifier_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.send(READY=1) is False


def test_notifier_delivers_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    abstract = f"@ibkr-gateway-unit-{id(tmp_path)}"
    for name, bind_to in ((path, path), (abstract, "\0" + abstract[1:])):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(bind_to)
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "1000000"})
            assert notifier.watchdog_s == 0.5
            assert notifier.ready("IBKR session handshaking")
            assert notifier.watchdog()
            assert notifier.stopping("shutting down")
            notifier.close()
            first = server.recv(4096).decode()
            assert first.startswith("READY=1\nMAINPID=") and first.endswith("\nSTATUS=IBKR session handshaking")
            assert server.recv(4096) == b"WATCHDOG=1"
            assert server.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"


def test_status_never_carries_a_registered_secret(tmp_path: Path) -> None:
    secret = "notify-test-secret-0123456789"
    register_secret(secret)
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier(path)
        assert notifier.status(status_line("backoff", last_error=f"upstream said {secret}"))
        notifier.close()
        text = server.recv(4096).decode()
    assert secret not in text and "***" in text


def test_broken_socket_warns_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    with caplog.at_level(logging.WARNING, logger="gateway.notify"):
        results = [notifier.watchdog() for _ in range(5)]
    notifier.close()
    assert results == [False] * 5
    warnings = [r for r in caplog.records if r.name == "gateway.notify"]
    assert len(warnings) == 1 and "missing.sock" in warnings[0].getMessage()


def test_malformed_notify_socket_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.notify"):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "not-a-path", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert "NOTIFY_SOCKET" in caplog.text
