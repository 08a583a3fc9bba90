"""Hostile config files (security issue, task 7): each one is refused with exit status 2 and one line naming the file
— no traceback, no unbounded read, no blocking on a FIFO or device, no parse that runs for minutes."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from gateway.config.document import MAX_KEY_PARTS, TomlRefused, parse_toml
from gateway.config.load import MAX_CONFIG_FILE_BYTES
from gateway.errors import ConfigError
from tests.keyfiles import KeySet, new_keyset

DEADLINE_S = 5.0


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return new_keyset()


@contextmanager
def address_space_cap(headroom: int = 512 << 20) -> Iterator[None]:
    """Lower this process's address-space limit to its current size plus ``headroom`` while the body runs, so a
    regression that reads without limit fails with ``MemoryError`` instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = vm_size + headroom if hard == resource.RLIM_INFINITY else min(vm_size + headroom, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def within_deadline(call: Callable[[], int], fifo: Path | None = None) -> int:
    """``call()`` in a thread, under :func:`address_space_cap`; fails the test unless it returns within
    :data:`DEADLINE_S`. When the call is stuck opening ``fifo`` for reading, a writer opens and closes it, so the
    thread ends."""
    outcome: list[int | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # reported below, in the test's own thread
            outcome.append(exc)

    with address_space_cap():
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(DEADLINE_S)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
            thread.join(DEADLINE_S)
        pytest.fail(f"still running after {DEADLINE_S} s (blocked or unbounded)")
    (result,) = outcome
    if isinstance(result, BaseException):
        pytest.fail(f"raised {type(result).__name__} instead of exiting 2")
    return result


def check_refused(capsys: pytest.CaptureFixture[str], path: Path | str, fifo: Path | None = None) -> str:
    """``check --config path`` exits 2 promptly with one stderr line naming ``path``; returns that line."""
    status = within_deadline(lambda: main(["check", "--config", str(path)]), fifo)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith(f"error: {path}"), lines[0]
    return lines[0]


# --- what the file is ---------------------------------------------------------------------------------------


def test_dev_zero_is_refused_unread(capsys: pytest.CaptureFixture[str]) -> None:
    line = check_refused(capsys, "/dev/zero")
    assert line == "error: /dev/zero: config file is not a regular file (it is a character device)"


def test_fifo_is_refused_without_blocking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "gateway.toml"
    os.mkfifo(fifo)
    line = check_refused(capsys, fifo, fifo=fifo)
    assert line.endswith("config file is not a regular file (it is a named pipe)")


def test_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = check_refused(capsys, tmp_path)
    assert line.endswith("config file is not a regular file (it is a directory)")


def test_file_over_the_size_limit_is_refused_unparsed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.toml"
    path.write_text("[simulator]\nenabled = true\n" + "#" * 100 + "\n" * (2 << 20))
    line = check_refused(capsys, path)
    assert f"is larger than the 1 MiB limit ({path.stat().st_size} bytes)" in line


def test_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    head = '[simulator]\nenabled = true\n[[routes]]\npath = "/v1/api/ws"\n'
    path.write_text(head + "#" * (MAX_CONFIG_FILE_BYTES - len(head) - 1) + "\n")
    assert path.stat().st_size == MAX_CONFIG_FILE_BYTES
    assert load_config(path, env={}).config.simulator.enabled


# --- what the file holds -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("a = " + "[" * 50_000 + "]" * 50_000, ": nests arrays or tables too deeply", id="deep-arrays"),
        pytest.param(
            "a = " + "{a = " * 50_000 + "1" + "}" * 50_000, ": nests arrays or tables too deeply", id="deep-tables"
        ),
        pytest.param(
            "[server]\nport = " + "9" * 5000 + "\n",
            ": is not valid TOML: Exceeds the limit (4300 digits)",
            id="5000-digit-integer",
        ),
        pytest.param(
            "[server]\n" + ".".join(["a"] * 200_000) + " = 1\n",
            f":2: has a key or table name of more than {MAX_KEY_PARTS} dotted parts",
            id="200000-part-key",
        ),
        pytest.param(
            "[" + ".".join(['"a"'] * 200_000) + "]\n",
            f":1: has a key or table name of more than {MAX_KEY_PARTS} dotted parts",
            id="200000-part-quoted-header",
        ),
        pytest.param('[server]\nhost = "127.0.0.1\x00"\n', ":2: is not valid TOML: Illegal character", id="nul"),
    ],
)
def test_hostile_toml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    assert expected in check_refused(capsys, path)


def test_invalid_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.toml"
    path.write_bytes(b'[server]\nhost = "\xff\xfe"\n')
    assert check_refused(capsys, path).endswith("is not UTF-8 text (invalid byte at offset 17)")


def test_long_dotted_keys_parse_in_linear_time() -> None:
    # tomllib's cost for one key is quadratic in its parts: 16,000 parts took 4 s, 200,000 would take ~10 minutes.
    for text in (
        ".".join(["a"] * 500_000),
        "[" + ".".join(["a"] * 500_000) + "]",
        "x = [{" + "a." * 500_000 + "a = 1}]",
    ):
        started = time.monotonic()
        with pytest.raises(TomlRefused, match="dotted parts"):
            parse_toml(text)
        assert time.monotonic() - started < 1.0
    parts = ".".join(["a"] * MAX_KEY_PARTS)
    assert parse_toml(f'{parts} = 1\nurl = "{"x." * 1000}"  # {"a." * 1000}\n')["url"].startswith("x.x.")


def test_environment_override_cannot_nest_deeply(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[simulator]\nenabled = true\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"GATEWAY__SERVER__PORT": "[" * 50_000 + "]" * 50_000})
    assert str(excinfo.value) == "GATEWAY__SERVER__PORT: server.port: nests arrays or tables too deeply"


# --- key files and the API-key file follow the same rules ---------------------------------------------------


def _sim_config(folder: Path, extra: str) -> Path:
    path = folder / "g.toml"
    path.write_text(f'[server]\n{extra}\n[simulator]\nenabled = true\n[[routes]]\npath = "/v1/api/ws"\n')
    return path


def test_api_keys_file_fifo_device_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    line = check_refused(capsys, _sim_config(tmp_path, f'api_keys_file = "{fifo}"'), fifo=fifo)
    assert line.endswith(f"server.api_keys_file: file {fifo} is not a regular file (it is a named pipe)")
    line = check_refused(capsys, _sim_config(tmp_path, 'api_keys_file = "/dev/zero"'))
    assert line.endswith("server.api_keys_file: file /dev/zero is not a regular file (it is a character device)")
    big = tmp_path / "keys.txt"
    big.write_text(("k" * 31 + "\n") * 40_000)
    big.chmod(0o600)
    line = check_refused(capsys, _sim_config(tmp_path, f'api_keys_file = "{big}"'))
    assert line.endswith(f"server.api_keys_file: file {big} is larger than the 1 MiB limit (1280000 bytes)")


def test_pem_key_file_fifo_is_refused_without_blocking(
    tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]
) -> None:
    keys.write(tmp_path / "keys")
    fifo = tmp_path / "keys" / "dhparam.pem"
    fifo.unlink()
    os.mkfifo(fifo)
    path = tmp_path / "g.toml"
    path.write_text(
        f'[ibkr]\nconsumer_key = "{keys.consumer_key}"\naccess_token = "{keys.access_token}"\n'
        f'access_token_secret = "{keys.access_token_secret}"\nsignature_key = "keys/private_signature.pem"\n'
        'encryption_key = "keys/private_encryption.pem"\ndh_param = "keys/dhparam.pem"\n'
        '[[routes]]\npath = "/v1/api/ws"\n'
    )
    path.chmod(0o600)  # it holds the secret
    line = check_refused(capsys, path, fifo=fifo)
    assert line.endswith(f"ibkr.dh_param: file {fifo} is not a regular file (it is a named pipe)")


# --- the real process ---------------------------------------------------------------------------------------


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _gateway(*args: str, stdin: int | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        preexec_fn=_limit_memory,
        check=False,
    )
    return proc, time.monotonic() - started


def test_python_m_gateway_check_dev_zero_under_a_memory_limit() -> None:
    proc, elapsed = _gateway("check", "--config", "/dev/zero")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "error: /dev/zero: config file is not a regular file (it is a character device)\n"
    assert elapsed < 5


def test_python_m_gateway_run_config_from_an_open_pipe() -> None:
    reader, writer = os.pipe()  # stdin is a pipe nobody writes to or closes: reading it would wait for ever
    try:
        proc, elapsed = _gateway("run", "--config", "/dev/stdin", stdin=reader)
    finally:
        os.close(reader)
        os.close(writer)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == "error: /dev/stdin: config file is not a regular file (it is a named pipe)\n"
    assert elapsed < 5


def test_many_problems_are_located_in_linear_time(tmp_path: Path) -> None:
    # Each problem's line used to be found by rescanning the file with a freshly compiled pattern per line:
    # 8,000 unknown keys took 79 s, a 1 MiB file of them hours.
    path = tmp_path / "g.toml"
    keys = 20_000
    path.write_text("[simulator]\nenabled = true\n[server]\n" + "".join(f"k{i} = 1\n" for i in range(keys)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    elapsed = time.monotonic() - started
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2
    assert len(lines) == keys
    assert lines[0] == f"error: {path}:4: server.k0: unknown key"
    assert lines[-1] == f"error: {path}:{keys + 3}: server.k{keys - 1}: unknown key"
    assert elapsed < 10


def test_a_huge_bad_value_or_key_prints_a_short_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "huge.toml"
    config.write_text(
        f'[simulator]\nenabled = true\n[logging]\nlevel = "{"x" * 300_000}"\n[server]\n{"k" * 300_000} = 1\n'
    )
    assert main(["check", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all(len(line) < 2000 for line in lines), [len(line) for line in lines]
    assert any("logging.level" in line and "more characters" in line for line in lines)
