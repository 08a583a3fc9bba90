"""The doctor's offline key checks and its report renderings (pure parts)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.doctor.offline import KeyMaterial, check_key_material, public_key_fingerprint
from gateway.doctor.report import STEPS, Report, Status, Step, complete, exit_status, render_json, render_text
from gateway.hints import Hint
from gateway.oauth.dh import parse_dh_params_pem
from gateway.simulator import generate_credentials
from gateway.simulator.credentials import dh_params_pem
from tests.tools import OPENSSL, require_tool


@cache
def _material() -> KeyMaterial:
    creds = generate_credentials()
    from gateway.oauth.keys import load_rsa_private_key

    return KeyMaterial(
        consumer_key=creds.consumer_key,
        access_token=creds.access_token,
        realm=creds.realm,
        signature_key=load_rsa_private_key(creds.signature_key_pem, what="s"),
        encryption_key=load_rsa_private_key(creds.encryption_key_pem, what="e"),
        dh=parse_dh_params_pem(creds.dh_param_pem),
        dh_pem=creds.dh_param_pem,
        prepend_bytes=32,
    )


def test_a_good_set_passes_with_fingerprints() -> None:
    step, facts = check_key_material(_material())
    assert step.status is Status.OK, step.detail
    assert facts["signature_key_bits"] == 2048 and facts["dh_param_bits"] == 2048
    assert facts["signature_key_sha256"] != facts["encryption_key_sha256"]
    assert str(facts["signature_key_sha256"]) in step.detail


def test_fingerprints_match_what_openssl_prints(tmp_path: Path) -> None:
    """The numbers the doctor shows are the ones the documented openssl commands print for the same files."""
    openssl = require_tool(OPENSSL)
    creds = generate_credentials()
    (tmp_path / "private_signature.pem").write_bytes(creds.signature_key_pem)
    (tmp_path / "dhparam.pem").write_bytes(creds.dh_param_pem)
    _, facts = check_key_material(
        replace(
            _material(),
            signature_key=_load(creds.signature_key_pem),
            dh=parse_dh_params_pem(creds.dh_param_pem),
            dh_pem=creds.dh_param_pem,
        )
    )
    for key, args in (
        ("signature_key_sha256", ["rsa", "-in", "private_signature.pem", "-pubout", "-outform", "DER"]),
        ("dh_param_sha256", ["dhparam", "-in", "dhparam.pem", "-outform", "DER"]),
    ):
        der = subprocess.run([openssl, *args], cwd=tmp_path, capture_output=True, check=True).stdout
        assert hashlib.sha256(der).hexdigest() == facts[key]


def _load(pem: bytes) -> rsa.RSAPrivateKey:
    from gateway.oauth.keys import load_rsa_private_key

    return load_rsa_private_key(pem, what="k")


def test_wrong_realm_fails_naming_realm() -> None:
    step, _ = check_key_material(replace(_material(), realm="test_realm"))
    assert step.status is Status.FAIL and step.hint is not None and step.hint.keys == ("ibkr.realm",)
    testcons, _ = check_key_material(replace(_material(), consumer_key="TESTCONS", realm="test_realm"))
    assert testcons.status is Status.OK


@pytest.mark.parametrize(
    ("change", "remark", "key"),
    [
        ({"consumer_key": "abc"}, "9 capital letters", "ibkr.consumer_key"),
        ({"access_token": "not-hex"}, "20 lower-case hex", "ibkr.access_token"),
        ({"prepend_bytes": 16}, "decrypts to 16 bytes", "ibkr.access_token_secret"),
    ],
)
def test_shapes_ibkr_never_issues_are_warnings(change: dict[str, object], remark: str, key: str) -> None:
    step, _ = check_key_material(replace(_material(), **change))  # type: ignore[arg-type]
    assert step.status is Status.WARN and remark in step.detail
    assert step.hint is not None and key in step.hint.keys


def test_short_dh_prime_other_generator_and_one_key_twice_warn() -> None:
    material = _material()
    small = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers().p  # a 1024-bit prime
    short = parse_dh_params_pem(dh_params_pem(small, 2))
    step, _ = check_key_material(replace(material, dh=short, dh_pem=dh_params_pem(small, 2)))
    assert step.status is Status.WARN and "2048 bits" in step.detail
    other_g = parse_dh_params_pem(dh_params_pem(material.dh.p, 5))
    step, _ = check_key_material(replace(material, dh=other_g))
    assert step.status is Status.WARN and "generator is 5" in step.detail
    step, _ = check_key_material(replace(material, encryption_key=material.signature_key))
    assert step.status is Status.WARN and "same key pair" in step.detail
    assert public_key_fingerprint(material.signature_key) in step.detail


def test_report_marks_the_rest_not_run_and_renders_both_ways() -> None:
    hint = Hint("the cause", "the fix", ("ibkr.consumer_key",))
    steps = complete([Step("config", Status.OK, "loads"), Step("keys", Status.FAIL, "bad", hint)])
    assert [s.name for s in steps] == [name for name, _ in STEPS]
    assert all(s.status is Status.NOT_RUN for s in steps[2:])
    report = Report(config="g.toml", upstream="https://api.ibkr.com", steps=steps, notice="opens a session")
    assert exit_status(report) == 1
    text = render_text(report)
    assert "FAIL  key files" in text and "fix:   the fix" in text and "keys:  ibkr.consumer_key" in text
    assert "stopped at: key files" in text and "(not run)" in text
    document = json.loads(render_json(report))
    assert document["ok"] is False and document["failed"] == "keys"
    assert document["steps"][1]["hint"] == {"cause": "the cause", "fix": "the fix", "keys": ["ibkr.consumer_key"]}
    passed = Report(config="g", upstream="u", steps=complete([Step(n, Status.OK) for n, _ in STEPS]))
    assert exit_status(passed) == 0 and "all checks passed" in render_text(passed)
