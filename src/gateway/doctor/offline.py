"""What can be proven about IBKR credentials without talking to IBKR (pure: the PEM bytes are arguments).

Contract: :func:`check_key_material` takes the credential set as loaded (the config loader has already proven that
every file parses and that the access-token secret decrypts under the encryption key) and returns one
:class:`~gateway.doctor.report.Step` plus public facts: key sizes, the SHA-256 fingerprints of the *public*
signature and encryption keys and of the DH parameters - the same numbers ``openssl … -outform DER | sha256sum``
prints for the files uploaded to IBKR's portal, so a user can tell whether the uploaded keys match. It fails for a
realm IBKR does not accept for the consumer key and warns about shapes IBKR never issues. No secret is read into
the result.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.doctor.report import Status, Step
from gateway.hints import Hint
from gateway.oauth.dh import DHParams
from gateway.oauth.signer import expected_realm

__all__ = ["KeyMaterial", "check_key_material", "public_key_fingerprint"]

RECOMMENDED_BITS = 2048
_CONSUMER_KEY = re.compile(r"[A-Z]{9}")
_ACCESS_TOKEN = re.compile(r"[0-9a-f]{20}")
_PEM_BODY = re.compile(rb"-----BEGIN DH PARAMETERS-----([A-Za-z0-9+/=\s]+)-----END DH PARAMETERS-----")

#: How to print the same fingerprints from the files (for the guide and the doctor's facts).
FINGERPRINT_COMMANDS = {
    "signature_key": "openssl rsa -in private_signature.pem -pubout -outform DER | sha256sum",
    "encryption_key": "openssl rsa -in private_encryption.pem -pubout -outform DER | sha256sum",
    "dh_param": "openssl dhparam -in dhparam.pem -outform DER | sha256sum",
}


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """The loaded credential set: both private keys, the DH parameters (and their PEM, for the fingerprint) and
    the identity strings. ``prepend_bytes`` is only the *length* of the decrypted secret."""

    consumer_key: str
    access_token: str
    realm: str
    signature_key: RSAPrivateKey
    encryption_key: RSAPrivateKey
    dh: DHParams
    dh_pem: bytes
    prepend_bytes: int


def public_key_fingerprint(key: RSAPrivateKey) -> str:
    """Lower-case hex SHA-256 of the public half's DER SubjectPublicKeyInfo (``openssl rsa -pubout -outform DER``)."""
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _dh_fingerprint(pem: bytes) -> str:
    match = _PEM_BODY.search(pem)
    der = base64.b64decode(b"".join(match.group(1).split())) if match else b""
    return hashlib.sha256(der).hexdigest()


_REALM_HINT = Hint(
    cause="IBKR accepts only limited_poa for a real consumer key (test_realm is for its public TESTCONS key)",
    fix='set ibkr.realm = "limited_poa" (or leave it out: that is the default)',
    keys=("ibkr.realm",),
)


def check_key_material(keys: KeyMaterial) -> tuple[Step, dict[str, object]]:
    """The ``keys`` step and its public facts (see the module contract)."""
    facts: dict[str, object] = {
        "signature_key_bits": keys.signature_key.key_size,
        "signature_key_sha256": public_key_fingerprint(keys.signature_key),
        "encryption_key_bits": keys.encryption_key.key_size,
        "encryption_key_sha256": public_key_fingerprint(keys.encryption_key),
        "dh_param_bits": keys.dh.p.bit_length(),
        "dh_param_generator": keys.dh.g,
        "dh_param_sha256": _dh_fingerprint(keys.dh_pem),
        "fingerprint_commands": dict(FINGERPRINT_COMMANDS),
    }
    summary = (
        f"signature key {keys.signature_key.key_size}-bit (public sha256 {facts['signature_key_sha256']}), "
        f"encryption key {keys.encryption_key.key_size}-bit (public sha256 {facts['encryption_key_sha256']}), "
        f"DH {keys.dh.p.bit_length()}-bit g={keys.dh.g} (sha256 {facts['dh_param_sha256']}); "
        f"access-token secret decrypts to {keys.prepend_bytes} bytes"
    )
    realm = expected_realm(keys.consumer_key)
    if keys.realm != realm:
        return Step("keys", Status.FAIL, f"ibkr.realm is {keys.realm!r}; IBKR expects {realm!r}", _REALM_HINT), facts
    remarks: list[tuple[str, Hint]] = []
    if keys.consumer_key != "TESTCONS" and not _CONSUMER_KEY.fullmatch(keys.consumer_key):
        remarks.append(
            (
                "the consumer key is not 9 capital letters, the shape IBKR's self-service portal issues",
                Hint("a mistyped consumer key", "copy ibkr.consumer_key again from the portal", ("ibkr.consumer_key",)),
            )
        )
    if not _ACCESS_TOKEN.fullmatch(keys.access_token):
        remarks.append(
            (
                "the access token is not 20 lower-case hex digits, the shape IBKR issues",
                Hint("a mistyped access token", "copy ibkr.access_token again from the portal", ("ibkr.access_token",)),
            )
        )
    if keys.prepend_bytes != 32:
        remarks.append(
            (
                f"the access-token secret decrypts to {keys.prepend_bytes} bytes (IBKR's are 32)",
                Hint(
                    "the secret belongs to another encryption key or was damaged when copied",
                    "copy ibkr.access_token_secret again, and check ibkr.encryption_key is the uploaded key's pair",
                    ("ibkr.access_token_secret", "ibkr.encryption_key"),
                ),
            )
        )
    if min(keys.signature_key.key_size, keys.encryption_key.key_size, keys.dh.p.bit_length()) < RECOMMENDED_BITS:
        remarks.append(
            (
                "a key or the DH prime is shorter than the 2048 bits IBKR's set-up instructions create",
                Hint(
                    "key files made with other settings than IBKR's instructions",
                    "make 2048-bit keys and DH parameters (see the setup guide) and upload their public halves",
                    ("ibkr.signature_key", "ibkr.encryption_key", "ibkr.dh_param"),
                ),
            )
        )
    if keys.dh.g != 2:
        remarks.append(
            (
                f"the DH generator is {keys.dh.g}; IBKR's parameters use 2",
                Hint(
                    "DH parameters not made by openssl dhparam with its default generator",
                    "point ibkr.dh_param at the dhparam.pem uploaded to the portal",
                    ("ibkr.dh_param",),
                ),
            )
        )
    if public_key_fingerprint(keys.signature_key) == public_key_fingerprint(keys.encryption_key):
        remarks.append(
            (
                "the signature and encryption keys are the same key pair",
                Hint(
                    "one key file configured twice",
                    "point ibkr.signature_key and ibkr.encryption_key at the two different private keys",
                    ("ibkr.signature_key", "ibkr.encryption_key"),
                ),
            )
        )
    if remarks:
        text = "; ".join(remark for remark, _ in remarks)
        return Step("keys", Status.WARN, f"{text}. {summary}", remarks[0][1]), facts
    return Step("keys", Status.OK, summary), facts
