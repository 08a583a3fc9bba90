"""Throwaway credentials: IBKR's shapes, PKCS#3 DH PEM, the server view, and the files written for the gateway."""

from __future__ import annotations

import base64
import re
import stat
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.config import load_config
from gateway.simulator import SimulatorCredentials, generate_credentials
from gateway.simulator.credentials import ServerView, dh_params_pem, parse_dh_params_pem, realm_for, write_credentials
from gateway.simulator.dh import RFC3526_GROUP14_PRIME


@cache
def creds() -> SimulatorCredentials:
    return generate_credentials()


def test_shapes_match_ibkr() -> None:
    c = creds()
    assert re.fullmatch(r"[A-Z]{9}", c.consumer_key)
    assert re.fullmatch(r"[0-9a-f]{20}", c.access_token)
    assert c.realm == "limited_poa"
    assert c.signature_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert c.encryption_key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert c.dh_param_pem.startswith(b"-----BEGIN DH PARAMETERS-----")
    enc = serialization.load_pem_private_key(c.encryption_key_pem, password=None)
    sig = serialization.load_pem_private_key(c.signature_key_pem, password=None)
    assert isinstance(enc, rsa.RSAPrivateKey)
    assert isinstance(sig, rsa.RSAPrivateKey)
    assert enc.key_size == sig.key_size == 2048
    plaintext = enc.decrypt(base64.b64decode(c.access_token_secret), padding.PKCS1v15())
    assert len(plaintext) == 32


def test_repr_hides_secrets() -> None:
    c = creds()
    text = repr(c) + str(c)
    assert c.consumer_key in text
    for secret in (c.access_token_secret, c.signature_key_pem.decode(), c.access_token):
        assert secret not in text
    assert "PRIVATE" not in text
    view = ServerView.from_credentials(c)
    assert view.prepend.hex() not in repr(view)


def test_server_view_keeps_only_server_knowledge() -> None:
    c = creds()
    view = ServerView.from_credentials(c)
    assert isinstance(view.signature_public_key, rsa.RSAPublicKey)
    assert not hasattr(view, "signature_key_pem")
    assert len(view.prepend) == 32
    assert (view.dh_prime, view.dh_generator) == (RFC3526_GROUP14_PRIME, 2)
    assert (view.consumer_key, view.access_token, view.realm) == (c.consumer_key, c.access_token, c.realm)


def test_testcons_gets_test_realm() -> None:
    assert realm_for("TESTCONS") == "test_realm"
    assert realm_for("ABCDEFGHI") == "limited_poa"


def test_dh_pem_roundtrip_and_der_shape() -> None:
    pem = dh_params_pem(RFC3526_GROUP14_PRIME, 2)
    assert parse_dh_params_pem(pem) == (RFC3526_GROUP14_PRIME, 2)
    der = base64.b64decode(b"".join(pem.strip().splitlines()[1:-1]))
    # SEQUENCE (long form, 2 length bytes) { INTEGER 257 bytes (sign byte 00), INTEGER 02 }
    assert der[:4] == b"\x30\x82\x01\x08"
    assert der[4:8] == b"\x02\x82\x01\x01"
    assert der[8] == 0
    assert der[-3:] == b"\x02\x01\x02"
    assert all(len(line) <= 64 for line in pem.splitlines())


def test_openssl_reads_the_dh_pem(openssl_path: str, tmp_path: Path) -> None:
    path = tmp_path / "dh.pem"
    path.write_bytes(creds().dh_param_pem)
    result = subprocess.run(
        [openssl_path, "pkeyparam", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        result = subprocess.run(
            [openssl_path, "dhparam", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=False
        )
    assert result.returncode == 0, result.stderr
    assert "2048 bit" in result.stdout
    # OpenSSL 3 names the well-known group (RFC 3526 group 14, g=2) instead of printing p and g
    assert "modp_2048" in result.stdout or re.search(r"(generator|G):\s*2", result.stdout)


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"-----BEGIN DH PARAMETERS-----\n!!!\n-----END DH PARAMETERS-----\n",
        b"-----BEGIN DH PARAMETERS-----\nMAA=\n-----END DH PARAMETERS-----\n",
        b"-----BEGIN DH PARAMETERS-----\nMAYCAf8CAQI=\n-----END DH PARAMETERS-----\n",
        b"-----BEGIN RSA PUBLIC KEY-----\nMAA=\n-----END RSA PUBLIC KEY-----\n",
    ],
)
def test_bad_dh_pem_is_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any of the parser's messages
        parse_dh_params_pem(pem)


def test_write_credentials_files_modes_and_toml(tmp_path: Path) -> None:
    c = creds()
    target = tmp_path / "new" / "dir"
    toml_path = write_credentials(c, target, base_url="http://127.0.0.1:5100", gateway_port=5055)
    assert toml_path == target / "gateway.toml"
    names = {"private_signature.pem", "private_encryption.pem", "dhparam.pem", "gateway.toml"}
    assert {p.name for p in target.iterdir()} == names
    for name in names:
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600
    assert (target / "private_signature.pem").read_bytes() == c.signature_key_pem
    doc = tomllib.loads(toml_path.read_text())
    assert doc["server"]["host"] == "127.0.0.1"
    assert doc["server"]["port"] == 5055
    assert (
        doc["ibkr"].items()
        >= {
            "base_url": "http://127.0.0.1:5100",
            "consumer_key": c.consumer_key,
            "access_token": c.access_token,
            "access_token_secret": c.access_token_secret,
            "signature_key": "private_signature.pem",
            "encryption_key": "private_encryption.pem",
            "dh_param": "dhparam.pem",
            "realm": "limited_poa",
        }.items()
    )
    assert doc["simulator"]["enabled"] is False
    assert {"path": "/v1/api/sim/*"} in doc["routes"]
    # The written file is a complete, valid gateway config with its credentials in place.
    loaded = load_config(toml_path, env={})
    assert loaded.credentials is not None
    assert loaded.warnings == ()


def test_write_credentials_tightens_existing_file_modes(tmp_path: Path) -> None:
    existing = tmp_path / "private_signature.pem"
    existing.write_bytes(b"old")
    existing.chmod(0o644)
    write_credentials(creds(), tmp_path, base_url="http://127.0.0.1:1")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert existing.read_bytes() == creds().signature_key_pem
