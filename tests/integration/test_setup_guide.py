"""The setup guide (docs/ibkr-setup.md) is true: its key-making commands, run as written by openssl, make files the
gateway accepts, and its fingerprint commands print the numbers the doctor shows for those files.

The one change to the commands: ``dhparam … 2048`` becomes 1024 bits (2048 takes minutes; the gateway and the doctor
treat both the same way, and the doctor's warning about short parameters is checked here too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from gateway.config import load_config
from gateway.doctor import key_material
from gateway.doctor.offline import check_key_material
from gateway.doctor.report import Status
from gateway.oauth.keys import load_rsa_private_key
from tests.keyfiles import encrypt_secret
from tests.tools import OPENSSL, require_tool

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "ibkr-setup.md").read_text()


def _shell_blocks(section: str) -> list[str]:
    body = GUIDE.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.DOTALL)


def test_guide_commands_make_keys_the_gateway_and_doctor_accept(tmp_path: Path) -> None:
    openssl = require_tool(OPENSSL)
    make, fingerprints = _shell_blocks("1. Make the keys")
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{Path(openssl).parent}:{os.environ.get('PATH', '')}"}
    script = make.replace("dhparam -out dhparam.pem 2048", "dhparam -out dhparam.pem 1024")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, check=True, capture_output=True, timeout=300)
    keys = tmp_path / "ibkr-keys"
    assert sorted(p.name for p in keys.iterdir()) == [
        "dhparam.pem",
        "private_encryption.pem",
        "private_signature.pem",
        "public_encryption.pem",
        "public_signature.pem",
    ]
    assert (keys / "private_signature.pem").stat().st_mode & 0o077 == 0  # umask 077, as the guide says

    # IBKR's side: the secret is encrypted to the public encryption key; init and check accept the set.
    encryption = load_rsa_private_key((keys / "private_encryption.pem").read_bytes(), what="encryption key")
    secret = encrypt_secret(encryption, os.urandom(32))
    output = tmp_path / "gateway.prod.toml"
    identity = ["--consumer-key", "ABCDEFGHI", "--access-token", "0123456789abcdef0123"]
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "init",
            "--keys-dir",
            str(keys),
            *identity,
            "--access-token-secret",
            secret,
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert init.returncode == 0, init.stderr
    loaded = load_config(output, env={})
    assert loaded.credentials is not None and loaded.config.ibkr.realm == "limited_poa"

    # The doctor's fingerprints are the ones the guide's commands print.
    material = key_material(
        loaded.credentials,
        (keys / "private_signature.pem").read_bytes(),
        (keys / "private_encryption.pem").read_bytes(),
        (keys / "dhparam.pem").read_bytes(),
    )
    step, facts = check_key_material(material)
    assert step.status is Status.WARN and "2048 bits" in step.detail  # the 1024-bit DH file of this test
    printed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"cd {keys}\n{fingerprints}"], env=env, capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    digests = [line.split()[0] for line in printed.stdout.splitlines()]
    assert digests == [facts["signature_key_sha256"], facts["encryption_key_sha256"], facts["dh_param_sha256"]]


def test_guide_names_every_diagnosis_the_doctor_makes() -> None:
    """Each terse IBKR answer the hint table knows appears in the guide's verdict table."""
    for answer in ("invalid consumer", "invalid token", "invalid signature", "No access secret key found", "competing"):
        assert f"`{answer}`" in GUIDE
    for key in ("ibkr.consumer_key", "ibkr.signature_key", "ibkr.dh_param", "ibkr.realm", "ibkr.query_rule"):
        assert key in GUIDE
