"""Test helper: throwaway IBKR-shaped key material (RSA PEMs, a PKCS#3 DH PEM, an encrypted secret)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

VECTORS_PATH = Path(__file__).parent / "vectors" / "ibkr-oauth-vectors.json"


def vectors() -> dict[str, object]:
    """The known-answer vectors file, parsed."""
    data: dict[str, object] = json.loads(VECTORS_PATH.read_text())
    return data


def group14_prime() -> int:
    """RFC 3526 group 14, taken from the vectors file (not pasted)."""
    cases = vectors()["synthetic_lst"]
    assert isinstance(cases, dict)
    return int(cases["cases"][0]["prime_hex"], 16)


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_length(len(body)) + body


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def dh_params_pem(p: int, g: int = 2) -> bytes:
    """PKCS#3 ``DH PARAMETERS`` PEM for ``(p, g)``, DER-encoded by hand."""
    body = _der_integer(p) + _der_integer(g)
    der = b"\x30" + _der_length(len(body)) + body
    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN DH PARAMETERS-----\n" + "\n".join(lines) + "\n-----END DH PARAMETERS-----\n").encode()


def pkcs8_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pkcs1_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def encrypt_secret(key: rsa.RSAPrivateKey, plaintext: bytes) -> str:
    """base64(RSAES-PKCS1-v1_5(public half of ``key``, plaintext)) — IBKR's access-token-secret shape."""
    return base64.b64encode(key.public_key().encrypt(plaintext, padding.PKCS1v15())).decode()


def secret_for_wrong_key(right_key: rsa.RSAPrivateKey, plaintext: bytes) -> str:
    """A secret encrypted to a different key, chosen so that ``right_key`` visibly fails to decrypt it.

    OpenSSL's implicit rejection makes a wrong-key PKCS#1 v1.5 decryption return random bytes, which have the
    right length (32) about once in 245 tries; such a ciphertext is re-drawn so tests never flake.
    """
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    while True:
        secret = encrypt_secret(other, plaintext)
        try:
            wrong = right_key.decrypt(base64.b64decode(secret), padding.PKCS1v15())
        except ValueError:
            return secret
        if len(wrong) != len(plaintext):
            return secret


@dataclass(frozen=True)
class KeySet:
    """One set of IBKR-shaped credentials (the prepend is the hex of ``plaintext``)."""

    signature_key: rsa.RSAPrivateKey
    encryption_key: rsa.RSAPrivateKey
    plaintext: bytes
    consumer_key: str = "TESTKEY01"
    access_token: str = "0123456789abcdef0123"

    @cached_property
    def access_token_secret(self) -> str:
        """The encrypted secret: one ciphertext per key set (encryption is randomised), so a test that looks for
        it in output looks for the very text the config holds."""
        return encrypt_secret(self.encryption_key, self.plaintext)

    def write(self, folder: Path) -> None:
        """Write the three PEM files under IBKR's usual names, mode 0600."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "private_signature.pem": pkcs8_pem(self.signature_key),
            "private_encryption.pem": pkcs1_pem(self.encryption_key),
            "dhparam.pem": dh_params_pem(group14_prime()),
        }
        for name, data in files.items():
            path = folder / name
            path.write_bytes(data)
            os.chmod(path, 0o600)


def new_keyset(bits: int = 2048) -> KeySet:
    """Fresh RSA key pairs and a random 32-byte prepend."""
    return KeySet(
        signature_key=rsa.generate_private_key(public_exponent=65537, key_size=bits),
        encryption_key=rsa.generate_private_key(public_exponent=65537, key_size=bits),
        plaintext=os.urandom(32),
    )


_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p**0.5) + 1))]


def is_probable_prime(n: int) -> bool:
    """Miller-Rabin with the first 16 small primes as bases (enough for test fixtures, not for keys)."""
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for base in _SMALL_PRIMES[:16]:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True
