"""Configuration: parsing, environment overrides, key loading, and every bad-config case named by the issue."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config, parse_config
from gateway.config.render import render_config
from gateway.errors import ConfigError
from tests.keyfiles import KeySet, encrypt_secret, new_keyset, secret_for_wrong_key

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def keys() -> KeySet:
    return new_keyset()


@pytest.fixture
def config_dir(tmp_path: Path, keys: KeySet) -> Path:
    keys.write(tmp_path / "keys")
    return tmp_path


def write_config(
    folder: Path, keys: KeySet, *, extra: str = "", ibkr_extra: str = "", secret: str | None = None
) -> Path:
    secret = keys.access_token_secret if secret is None else secret
    text = f"""
[server]
port = 5001

[ibkr]
consumer_key = "{keys.consumer_key}"
access_token = "{keys.access_token}"
access_token_secret = "{secret}"
signature_key = "keys/private_signature.pem"
encryption_key = "keys/private_encryption.pem"
dh_param = "keys/dhparam.pem"
{ibkr_extra}

[[routes]]
path = "/v1/api/iserver/*"
methods = ["get", "POST"]

{extra}
"""
    path = folder / "gateway.toml"
    path.write_text(text)
    path.chmod(0o600)  # it holds the secret
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in excinfo.value.problems if p.severity == "error"]


# --- the happy path ---------------------------------------------------------------------------------------


def test_valid_config_loads_credentials(config_dir: Path, keys: KeySet) -> None:
    loaded = load_config(write_config(config_dir, keys), env={})
    config = loaded.config
    assert config.server.port == 5001
    assert config.server.host == "127.0.0.1"
    assert config.ibkr.signature_key == config_dir.resolve() / "keys" / "private_signature.pem"
    assert config.routes[0].methods == ("GET", "POST")
    assert config.routes[0].is_prefix
    assert config.session.tickle_interval_s == 60.0
    assert loaded.credentials is not None
    assert loaded.credentials.prepend.reveal() == keys.plaintext.hex()
    assert loaded.credentials.dh.g == 2
    assert loaded.credentials.identity.realm == "limited_poa"
    assert loaded.warnings == ()


def test_committed_default_config_is_valid_and_offline() -> None:
    loaded = load_config(REPO / "gateway.toml", env={})
    assert loaded.config.simulator.enabled
    assert loaded.credentials is None
    assert loaded.warnings == ()
    assert any(r.path == "/v1/api/ws" for r in loaded.config.routes)


def test_secret_never_in_repr(config_dir: Path, keys: KeySet) -> None:
    loaded = load_config(write_config(config_dir, keys), env={})
    text = repr(loaded)
    assert keys.access_token_secret not in text
    assert keys.plaintext.hex() not in text


# --- environment overrides --------------------------------------------------------------------------------


def test_env_overrides_every_kind_of_value(config_dir: Path, keys: KeySet) -> None:
    env = {
        "GATEWAY__SERVER__PORT": "6001",
        "GATEWAY__SERVER__ALLOWED_ORIGINS": '["https://Dash.example.com"]',
        "GATEWAY__IBKR__ACCESS_TOKEN": "ffffffffffffffffffff",
        "GATEWAY__IBKR__COMPETE": "false",
        "GATEWAY__SESSION__TICKLE_INTERVAL_S": "30.5",
        "GATEWAY__LOGGING__LEVEL": "DEBUG",
        "UNRELATED": "x",
    }
    loaded = load_config(write_config(config_dir, keys), env=env)
    assert loaded.config.server.port == 6001
    assert loaded.config.server.allowed_origins == ("https://dash.example.com",)
    assert loaded.config.ibkr.access_token == "ffffffffffffffffffff"
    assert loaded.config.ibkr.compete is False
    assert loaded.config.session.tickle_interval_s == 30.5
    assert loaded.config.logging.level == "debug"


def test_secret_from_env_only(config_dir: Path, keys: KeySet) -> None:
    path = write_config(config_dir, keys)
    text = "\n".join(line for line in path.read_text().splitlines() if "access_token_secret" not in line)
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert any("GATEWAY__IBKR__ACCESS_TOKEN_SECRET" in p for p in problems_of(excinfo))
    loaded = load_config(path, env={"GATEWAY__IBKR__ACCESS_TOKEN_SECRET": keys.access_token_secret})
    assert loaded.credentials is not None


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("GATEWAY__SERVER__PROT", "1", "GATEWAY__SERVER__PROT: server.prot: unknown key (did you mean 'port'?)"),
        ("GATEWAY__SERVR__PORT", "1", "GATEWAY__SERVR__PORT: servr: unknown section (did you mean 'server'?)"),
        ("GATEWAY__SERVER__PORT", "abc", "GATEWAY__SERVER__PORT: server.port: is not a TOML value"),
        ("GATEWAY__SERVER__PORT", '"5000"', "GATEWAY__SERVER__PORT: server.port: must be an integer, not a string"),
        ("GATEWAY__ROUTES__PATH", "/x", "GATEWAY__ROUTES__PATH: routes: routes can only be set in the config file"),
        ("GATEWAY__PORT", "1", "GATEWAY__PORT: must be named GATEWAY__<SECTION>__<KEY>"),
    ],
)
def test_bad_env_overrides_named(config_dir: Path, keys: KeySet, name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys), env={name: value})
    assert any(p.startswith(expected) for p in problems_of(excinfo)), problems_of(excinfo)


# --- every bad-config case: clear message naming file, key and what is wrong -----------------------------


def test_broken_toml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = 5000\nhost = "unterminated\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = excinfo.value.problems
    assert problem.line == 3
    assert str(problem).startswith(f"{path}:3: is not valid TOML")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(tmp_path / "nope.toml", env={})
    assert str(excinfo.value) == f"{tmp_path / 'nope.toml'}: config file does not exist"


def test_unknown_key_and_section_with_lines(config_dir: Path, keys: KeySet) -> None:
    path = write_config(config_dir, keys, ibkr_extra='consumer_kye = "x"', extra="[tickle]\nx = 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    found = problems_of(excinfo)
    assert any(p.startswith(f"{path}:12: ibkr.consumer_kye: unknown key (did you mean 'consumer_key'?)") for p in found)
    assert any(p.startswith(f"{path}:") and "tickle: unknown section" in p for p in found)


def test_wrong_types_all_reported_at_once(config_dir: Path, keys: KeySet) -> None:
    path = write_config(config_dir, keys, ibkr_extra="compete = 1")
    text = path.read_text().replace("port = 5001", 'port = "high"\nallowed_origins = ["https://x.test/path"]')
    text += "\n[session]\ntickle_interval_s = 0.1\nreconnect_delay_s = 10\nreconnect_max_delay_s = 5\n"
    text += '\n[logging]\nlevel = "loud"\n\n[[routes]]\npath = "v1/api/x"\nmethods = ["FETCH"]\nwhat = 1\n'
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    found = "\n".join(problems_of(excinfo))
    for expected in (
        "server.port: must be an integer, not a string",
        "server.allowed_origins: item 0 ('https://x.test/path'): must be an origin only",
        "ibkr.compete: must be true or false, not an integer",
        "session.tickle_interval_s: must be between 1 and 3600 seconds, got 0.1",
        "session.reconnect_max_delay_s: must not be smaller than reconnect_delay_s",
        "logging.level: must be one of 'debug', 'info', 'warning', 'error', got 'loud'",
        "routes[1].what: unknown key",
        "routes[1].path: must start with /",
        "routes[1].methods: item 0 ('FETCH'): must be one of GET",
    ):
        assert expected in found, (expected, found)


def test_missing_required_fields(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[ibkr]\nconsumer_key = "ABC"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    found = problems_of(excinfo)
    for key in ("access_token", "access_token_secret", "signature_key", "encryption_key", "dh_param"):
        assert f"{path}: ibkr.{key}: is required (or set GATEWAY__IBKR__{key.upper()})" in found


def test_missing_key_file(config_dir: Path, keys: KeySet) -> None:
    (config_dir / "keys" / "dhparam.pem").unlink()
    path = write_config(config_dir, keys)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{path}:11: ibkr.dh_param: file ")
    assert problem.endswith("keys/dhparam.pem does not exist")


def test_unreadable_pem(config_dir: Path, keys: KeySet) -> None:
    (config_dir / "keys" / "private_signature.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64!\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys), env={})
    (problem,) = problems_of(excinfo)
    assert "ibkr.signature_key:" in problem
    assert "signature key" in problem


def test_wrong_key_type(config_dir: Path, keys: KeySet) -> None:
    # A DH parameters file where an RSA key belongs.
    keys_dir = config_dir / "keys"
    (keys_dir / "private_signature.pem").write_bytes((keys_dir / "dhparam.pem").read_bytes())
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys), env={})
    (problem,) = problems_of(excinfo)
    assert "ibkr.signature_key:" in problem


def test_dh_file_holding_rsa_key(config_dir: Path, keys: KeySet) -> None:
    keys_dir = config_dir / "keys"
    (keys_dir / "dhparam.pem").write_bytes((keys_dir / "private_signature.pem").read_bytes())
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys), env={})
    (problem,) = problems_of(excinfo)
    assert "ibkr.dh_param:" in problem


def test_secret_encrypted_to_another_key(config_dir: Path, keys: KeySet) -> None:
    secret = secret_for_wrong_key(keys.encryption_key, keys.plaintext)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys, secret=secret), env={})
    (problem,) = problems_of(excinfo)
    assert "ibkr.access_token_secret: does not decrypt with ibkr.encryption_key" in problem
    assert secret not in str(excinfo.value)


def test_secret_of_wrong_length(config_dir: Path, keys: KeySet) -> None:
    secret = encrypt_secret(keys.encryption_key, b"x" * 16)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys, secret=secret), env={})
    assert "ibkr.access_token_secret: does not decrypt" in str(excinfo.value)


def test_secret_not_base64(config_dir: Path, keys: KeySet) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write_config(config_dir, keys, secret="not*base64"), env={})
    (problem,) = problems_of(excinfo)
    assert problem.endswith("ibkr.access_token_secret: is not valid base64 (paste it exactly as IBKR issued it)")
    assert "not*base64" not in problem


def test_group_readable_key_is_a_warning(config_dir: Path, keys: KeySet) -> None:
    os.chmod(config_dir / "keys" / "private_encryption.pem", 0o644)
    loaded = load_config(write_config(config_dir, keys), env={})
    (warning,) = loaded.warnings
    assert warning.severity == "warning"
    assert "ibkr.encryption_key" in str(warning)
    assert "mode 0644" in str(warning)
    assert loaded.credentials is not None


def test_dh_parameters_readable_by_others_are_not_warned_about(config_dir: Path, keys: KeySet) -> None:
    """The DH prime and generator are public (IBKR's own set-up makes them with openssl dhparam)."""
    os.chmod(config_dir / "keys" / "dhparam.pem", 0o644)
    assert load_config(write_config(config_dir, keys), env={}).warnings == ()


def test_config_holding_the_secret_readable_by_others_is_a_warning(config_dir: Path, keys: KeySet) -> None:
    path = write_config(config_dir, keys)
    os.chmod(path, 0o644)
    loaded = load_config(path, env={})
    (warning,) = loaded.warnings
    assert str(warning) == (
        f"{path}:8: ibkr.access_token_secret: warning: {path} is readable by group or others (mode 0644) but holds "
        f"a secret; run: chmod 600 {path}"
    )
    assert keys.access_token_secret not in str(warning)
    # The same check, in the same words, as for a private key file.
    os.chmod(path, 0o600)
    os.chmod(config_dir / "keys" / "private_signature.pem", 0o644)
    (key_warning,) = load_config(path, env={}).warnings
    assert str(key_warning).split(": warning: ")[1].startswith(f"{config_dir / 'keys' / 'private_signature.pem'} is")
    assert str(key_warning).endswith("(mode 0644) but holds a secret; run: chmod 600 " + str(key_warning).split()[-1])


def test_config_holding_api_keys_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        '[server]\napi_keys = "key-one-0123456789abcdef"\n[simulator]\nenabled = true\n'
        '[[routes]]\npath = "/v1/api/ws"\n'
    )
    os.chmod(path, 0o640)
    (warning,) = load_config(path, env={}).warnings
    assert (warning.key, warning.line, warning.severity) == ("server.api_keys", 2, "warning")
    assert "(mode 0640) but holds a secret; run: chmod 600" in warning.message
    assert "key-one-0123456789abcdef" not in str(warning)


def test_config_without_a_secret_may_be_readable_by_others(config_dir: Path, keys: KeySet) -> None:
    """A config whose secret comes from the environment holds nothing private: no warning at any mode."""
    path = write_config(config_dir, keys)
    path.write_text(path.read_text().replace("access_token_secret", "# access_token_secret"))
    os.chmod(path, 0o644)
    loaded = load_config(path, env={"GATEWAY__IBKR__ACCESS_TOKEN_SECRET": keys.access_token_secret})
    assert loaded.credentials is not None
    assert loaded.warnings == ()


def test_unreadable_key_file(config_dir: Path, keys: KeySet) -> None:
    # /proc/self/mem is a regular, 0600 file that fails to read at offset 0 even for root (CI runs as root,
    # so chmod 000 would not make a file unreadable).
    path = write_config(config_dir, keys)
    path.write_text(path.read_text().replace("keys/private_signature.pem", "/proc/self/mem"))
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = problems_of(excinfo)
    assert "ibkr.signature_key: file /proc/self/mem cannot be read: Input/output error" in problem


def test_key_path_is_a_directory(config_dir: Path, keys: KeySet) -> None:
    path = write_config(config_dir, keys)
    path.write_text(path.read_text().replace("keys/dhparam.pem", "keys"))
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert "ibkr.dh_param:" in str(excinfo.value)
    assert "is not a regular file" in str(excinfo.value)


def test_simulator_mode_needs_no_credentials_and_warns_if_given(config_dir: Path, keys: KeySet) -> None:
    path = config_dir / "sim.toml"
    path.write_text('[simulator]\nenabled = true\n[[routes]]\npath = "/v1/api/ws"\n')
    loaded = load_config(path, env={})
    assert loaded.credentials is None
    assert loaded.warnings == ()
    loaded = load_config(path, env={"GATEWAY__IBKR__ACCESS_TOKEN": "abc"})
    (warning,) = loaded.warnings
    assert "ibkr credentials (access_token)" in str(warning)


def test_no_routes_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[simulator]\nenabled = true\n")
    (warning,) = load_config(path, env={}).warnings
    assert "nothing will be proxied" in str(warning)


def test_duplicate_route(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[simulator]\nenabled = true\n[[routes]]\npath = "/a"\n[[routes]]\npath = "/a"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert "routes[1].path: '/a' is listed twice" in str(excinfo.value)


def test_trusted_proxies_accept_networks(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[server]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n[simulator]\nenabled = true\n')
    config = load_config(path, env={}).config
    assert config.server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1"))


def test_label_names_the_account_and_defaults_to_empty(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[ibkr]\nlabel = "Family paper · ünïcode"\n[simulator]\nenabled = true\n')
    assert load_config(path, env={}).config.ibkr.label == "Family paper · ünïcode"
    assert load_config(path, env={"GATEWAY__IBKR__LABEL": "live 2"}).config.ibkr.label == "live 2"
    path.write_text("[simulator]\nenabled = true\n")
    assert load_config(path, env={}).config.ibkr.label == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"' + "x" * 65 + '"', "ibkr.label: must be at most 64 characters, got 65"),
        ('"two\\nlines"', "ibkr.label: must hold printable characters only"),
        ('"tab\\there"', "ibkr.label: must hold printable characters only"),
        ('"bell\\u0007"', "ibkr.label: must hold printable characters only"),
        ("7", "ibkr.label: must be a string, not an integer"),
    ],
)
def test_label_refused(tmp_path: Path, value: str, expected: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f"[ibkr]\nlabel = {value}\n[simulator]\nenabled = true\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert any(expected in problem for problem in problems_of(excinfo)), problems_of(excinfo)


def test_label_of_64_characters_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(f'[ibkr]\nlabel = "{"x" * 64}"\n[simulator]\nenabled = true\n')
    assert load_config(path, env={}).config.ibkr.label == "x" * 64


# --- the renderer and the parser agree --------------------------------------------------------------------


def test_rendered_defaults_parse_back_to_defaults(tmp_path: Path) -> None:
    text = render_config({"simulator": {"enabled": True}})
    config, warnings = parse_config(tomllib.loads(text), source="x", base_dir=tmp_path, env={})
    assert config.simulator.enabled
    assert config.server.port == 5000
    assert warnings == []
    assert len(config.routes) == 6


@settings(max_examples=120, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
        max_leaves=20,
    ).filter(lambda v: isinstance(v, dict))
)
def test_parser_never_raises_anything_but_config_error(data: dict[str, object]) -> None:
    sections = ["server", "ibkr", "session", "simulator", "logging", "routes"]
    shaped = {sections[i % len(sections)]: value for i, value in enumerate(data.values())} | data
    problems: tuple[object, ...] | None = None
    try:
        parse_config(shaped, source="fuzz.toml", base_dir=Path("/nonexistent"), env={})
    except ConfigError as exc:
        problems = exc.problems
    assert problems is None or len(problems) > 0
