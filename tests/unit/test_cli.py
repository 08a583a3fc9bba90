"""The command line: ``check`` and ``init`` through ``main(argv)``, and the real entry points as subprocesses."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load_config
from tests.keyfiles import KeySet, new_keyset, secret_for_wrong_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return new_keyset()


SECRET_VARIABLE = "GATEWAY__IBKR__ACCESS_TOKEN_SECRET"


def init_args(
    keys: KeySet, keys_dir: Path, output: Path, *extra: str, secret: str | None = None, with_secret: bool = True
) -> list[str]:
    """``init`` arguments; ``with_secret=False`` leaves ``--access-token-secret`` out (the environment has it)."""
    given = ["--access-token-secret", keys.access_token_secret if secret is None else secret] if with_secret else []
    return [
        "init",
        "--keys-dir",
        str(keys_dir),
        "--consumer-key",
        keys.consumer_key,
        "--access-token",
        keys.access_token,
        *given,
        "--output",
        str(output),
        *extra,
    ]


def test_check_default_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(REPO / "gateway.toml")]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert "the built-in simulator" in out.out
    assert out.err == ""


def test_check_bad_config_exit_2_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = "x"\nbogus = 1\n[simulator]\nenabled = true\n')
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {path}:2: server.port: must be an integer, not a string",
        f"error: {path}:3: server.bogus: unknown key",
    ]


def test_init_writes_a_config_that_checks(tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]) -> None:
    keys.write(tmp_path / "keys")
    output = tmp_path / "conf" / "gateway.prod.toml"
    output.parent.mkdir()
    secret = keys.access_token_secret  # a fresh encryption each time it is read
    assert main(init_args(keys, tmp_path / "keys", output, secret=secret)) == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    text = output.read_text()
    assert 'signature_key = "../keys/private_signature.pem"' in text
    assert "# consumer key from IBKR's self-service portal" in text
    loaded = load_config(output, env={})
    assert loaded.credentials is not None
    assert loaded.credentials.prepend.reveal() == keys.plaintext.hex()
    assert loaded.config.ibkr.realm == "limited_poa"
    assert not loaded.config.simulator.enabled
    out = capsys.readouterr().out
    assert "the access-token secret from --access-token-secret is written in it" in out
    assert f'access_token_secret = "{secret}"' in text
    assert main(["check", "--config", str(output)]) == 0
    assert secret not in capsys.readouterr().out + out


def test_init_never_overwrites_without_force(tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]) -> None:
    keys.write(tmp_path / "keys")
    output = tmp_path / "g.toml"
    output.write_text("precious")
    assert main(init_args(keys, tmp_path / "keys", output)) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert output.read_text() == "precious"
    assert main(init_args(keys, tmp_path / "keys", output, "--force")) == 0
    assert "consumer_key" in output.read_text()


def test_init_rejects_secret_for_another_key(tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]) -> None:
    keys.write(tmp_path / "keys")
    output = tmp_path / "g.toml"
    secret = secret_for_wrong_key(keys.encryption_key, keys.plaintext)
    assert main(init_args(keys, tmp_path / "keys", output, secret=secret)) == 2
    err = capsys.readouterr().err
    assert "ibkr.access_token_secret: does not decrypt with ibkr.encryption_key" in err
    assert secret not in err
    assert not output.exists()


def test_init_reports_missing_pem_files(tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").mkdir()
    assert main(init_args(keys, tmp_path / "keys", tmp_path / "g.toml")) == 2
    err = capsys.readouterr().err
    for name in ("private_signature.pem", "private_encryption.pem", "dhparam.pem"):
        assert f"{name} does not exist" in err


def test_init_realm_for_testcons(tmp_path: Path, keys: KeySet) -> None:
    keys.write(tmp_path / "keys")
    args = init_args(keys, tmp_path / "keys", tmp_path / "g.toml")
    args[args.index(keys.consumer_key)] = "TESTCONS"
    assert main(args) == 0
    assert load_config(tmp_path / "g.toml", env={}).config.ibkr.realm == "test_realm"


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "x.toml", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _run(*args: str, env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")} | (env_extra or {})
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)
    return proc, time.monotonic() - started


def test_python_m_gateway_bad_config_fast_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[server\n")
    proc, elapsed = _run(sys.executable, "-m", "gateway", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}:1: is not valid TOML")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert elapsed < 5  # the bar is 1 s of our own time; interpreter start-up on a loaded CI box is extra


def test_init_leaves_a_secret_from_the_environment_out_of_the_file(tmp_path: Path, keys: KeySet) -> None:
    """``init`` without ``--access-token-secret`` checks the variable's secret but never writes it; the file then
    checks with the variable set, and without it fails with one line naming the key and the variable."""
    keys.write(tmp_path / "keys")
    output = tmp_path / "g.toml"
    secret = keys.access_token_secret
    variable = {SECRET_VARIABLE: secret}
    args = init_args(keys, tmp_path / "keys", output, with_secret=False)
    written, _ = _run(sys.executable, "-m", "gateway", *args, env_extra=variable)
    assert written.returncode == 0, written.stderr
    text = output.read_text()
    assert secret not in text and secret not in written.stdout + written.stderr
    assert f"the access-token secret is not in it: `check` and `run` read it from {SECRET_VARIABLE}" in written.stdout
    assert "# access_token_secret = ..." in text
    assert f"# not written here by `init`: it is read from the environment variable {SECRET_VARIABLE}" in text
    assert stat.S_IMODE(output.stat().st_mode) == 0o600

    checked, _ = _run(sys.executable, "-m", "gateway", "check", "--config", str(output), env_extra=variable)
    assert checked.returncode == 0, checked.stderr
    assert ": ok" in checked.stdout

    unset, _ = _run(sys.executable, "-m", "gateway", "check", "--config", str(output))
    assert unset.returncode == 2
    assert unset.stdout == ""
    assert unset.stderr.splitlines() == [
        f"error: {output}: ibkr.access_token_secret: is required (or set {SECRET_VARIABLE})"
    ]


def test_init_checks_a_secret_from_the_environment_before_writing(
    tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys.write(tmp_path / "keys")
    output = tmp_path / "g.toml"
    wrong = secret_for_wrong_key(keys.encryption_key, keys.plaintext)
    monkeypatch.setenv(SECRET_VARIABLE, wrong)
    assert main(init_args(keys, tmp_path / "keys", output, with_secret=False)) == 2
    err = capsys.readouterr().err
    assert "ibkr.access_token_secret: does not decrypt with ibkr.encryption_key" in err
    assert wrong not in err
    assert not output.exists()


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "ibkr-gateway"
    proc, _ = _run(str(script), "--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("ibkr-oauth-gateway ")


def _case_files(tmp_path: Path, keys: KeySet, case: str) -> Path:
    """Write a config for one bad-config case of the issue; returns the config path."""
    keys.write(tmp_path / "keys")
    secret = keys.access_token_secret
    body = {
        "consumer_key": f'"{keys.consumer_key}"',
        "access_token": f'"{keys.access_token}"',
        "access_token_secret": f'"{secret}"',
        "signature_key": '"keys/private_signature.pem"',
        "encryption_key": '"keys/private_encryption.pem"',
        "dh_param": '"keys/dhparam.pem"',
    }
    extra = ""
    if case == "unknown key":
        extra = "colour = 1\n"
    elif case == "wrong type":
        body["compete"] = '"yes"'
    elif case == "missing file":
        body["dh_param"] = '"keys/nope.pem"'
    elif case == "unreadable PEM":
        (tmp_path / "keys" / "private_encryption.pem").write_text("-----BEGIN PRIVATE KEY-----\n!!\n")
    elif case == "secret for another key":
        body["access_token_secret"] = f'"{secret_for_wrong_key(keys.encryption_key, keys.plaintext)}"'
    elif case == "missing required field":
        del body["access_token"]
    text = "[ibkr]\n" + "".join(f"{k} = {v}\n" for k, v in body.items()) + extra
    if case == "broken TOML":
        text += "[server\n"
    text += '\n[[routes]]\npath = "/v1/api/iserver/*"\n'
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    path.chmod(0o600)  # it holds the secret
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("broken TOML", ":8: is not valid TOML"),
        ("unknown key", ":8: ibkr.colour: unknown key"),
        ("wrong type", ":8: ibkr.compete: must be true or false, not a string"),
        ("missing file", ":7: ibkr.dh_param: file "),
        ("unreadable PEM", ":6: ibkr.encryption_key: "),
        ("secret for another key", ":4: ibkr.access_token_secret: does not decrypt with ibkr.encryption_key"),
        ("missing required field", ": ibkr.access_token: is required (or set GATEWAY__IBKR__ACCESS_TOKEN)"),
    ],
)
def test_every_bad_config_case_exits_2_with_one_clear_line(
    tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str], case: str, expected: str
) -> None:
    path = _case_files(tmp_path, keys, case)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert keys.access_token_secret not in err


def test_group_readable_key_warns_but_checks(tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]) -> None:
    path = _case_files(tmp_path, keys, "valid")
    os.chmod(tmp_path / "keys" / "private_signature.pem", 0o640)
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "ibkr.signature_key: warning: " in err
    assert "readable by group or others (mode 0640)" in err


def test_check_warns_about_a_config_holding_the_secret_readable_by_others(
    tmp_path: Path, keys: KeySet, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _case_files(tmp_path, keys, "valid")
    os.chmod(path, 0o644)
    os.chmod(tmp_path / "keys" / "dhparam.pem", 0o644)  # public: no warning
    assert main(["check", "--config", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{path}:4: ibkr.access_token_secret: warning: {path} is readable by group or others (mode 0644) but holds "
        f"a secret; run: chmod 600 {path}"
    ]
