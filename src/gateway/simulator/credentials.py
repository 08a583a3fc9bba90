"""Throwaway IBKR-shaped credentials: generate them, hand the client half out, keep only the server's view.

IBKR hands a first-party consumer: a 9-letter consumer key, a 20-hex access token, an access-token secret (base64
of an RSAES-PKCS1-v1_5 ciphertext of 32 random bytes under the consumer's public encryption key), and the consumer
keeps its private signature key, private encryption key and a ``dhparam.pem`` (docs/protocol.md §2). The simulator's
protocol code sees only :class:`ServerView` - what IBKR's server knows: the public signature key, the 32-byte
prepend, the consumer key, the access token, the realm and the DH prime.
"""

from __future__ import annotations

import base64
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.config.render import DEFAULT_ROUTES, render_config
from gateway.simulator.dh import GENERATOR, RFC3526_GROUP14_PRIME, java_bytes

SIGNATURE_KEY_FILE = "private_signature.pem"
ENCRYPTION_KEY_FILE = "private_encryption.pem"
DH_PARAM_FILE = "dhparam.pem"
TOML_FILE = "gateway.toml"

_PEM_BEGIN = b"-----BEGIN DH PARAMETERS-----"
_PEM_END = b"-----END DH PARAMETERS-----"


def realm_for(consumer_key: str) -> str:
    """IBKR's realm rule: ``test_realm`` for the public test consumer ``TESTCONS``, else ``limited_poa``."""
    return "test_realm" if consumer_key == "TESTCONS" else "limited_poa"


@dataclass(frozen=True, slots=True, repr=False)
class SimulatorCredentials:
    """The client half of a throwaway credential set, exactly in the shapes IBKR hands out.

    PEMs are the *private* keys (PKCS#8) and the PKCS#3 DH parameters, for the client side. ``repr`` shows only
    the consumer key and realm; never the token secret or key material.
    """

    consumer_key: str
    access_token: str
    access_token_secret: str
    signature_key_pem: bytes
    encryption_key_pem: bytes
    dh_param_pem: bytes
    realm: str

    def __repr__(self) -> str:
        return f"SimulatorCredentials(consumer_key={self.consumer_key!r}, realm={self.realm!r}, <secrets redacted>)"


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_integer(value: int) -> bytes:
    body = java_bytes(value)  # DER INTEGER content = minimal two's complement, same rule as Java's toByteArray
    return b"\x02" + _der_length(len(body)) + body


def dh_params_pem(prime: int, generator: int) -> bytes:
    """Encode PKCS#3 ``DHParameter ::= SEQUENCE { prime INTEGER, base INTEGER }`` as a ``DH PARAMETERS`` PEM."""
    content = _der_integer(prime) + _der_integer(generator)
    der = b"\x30" + _der_length(len(content)) + content
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return _PEM_BEGIN + b"\n" + b"\n".join(lines) + b"\n" + _PEM_END + b"\n"


def _read_der(data: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError("unexpected DER tag")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return data[pos : pos + length], pos + length


def parse_dh_params_pem(pem: bytes) -> tuple[int, int]:
    """Parse a PKCS#3 ``DH PARAMETERS`` PEM into ``(prime, generator)``. Raises ValueError if malformed."""
    text = pem.strip()
    if not text.startswith(_PEM_BEGIN) or not text.endswith(_PEM_END):
        raise ValueError("not a DH PARAMETERS PEM")
    body = b"".join(text[len(_PEM_BEGIN) : -len(_PEM_END)].split())
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise ValueError("DH PARAMETERS PEM is not valid base64") from exc
    seq, end = _read_der(der, 0, 0x30)
    if end != len(der):
        raise ValueError("trailing bytes after DH parameters")
    prime_bytes, pos = _read_der(seq, 0, 0x02)
    gen_bytes, pos = _read_der(seq, pos, 0x02)
    if pos != len(seq):  # an optional privateValueLength INTEGER may follow in PKCS#3; tolerate exactly that
        _read_der(seq, pos, 0x02)
    if not prime_bytes or not gen_bytes or prime_bytes[0] & 0x80 or gen_bytes[0] & 0x80:
        raise ValueError("DH parameters must be positive integers")
    return int.from_bytes(prime_bytes, "big"), int.from_bytes(gen_bytes, "big")


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_credentials(*, consumer_key: str | None = None) -> SimulatorCredentials:
    """Generate a fresh throwaway credential set (two RSA-2048 key pairs: ~0.1-0.5 s).

    DH parameters are RFC 3526 group 14 with g=2 (never generated). ``consumer_key`` defaults to 9 random
    upper-case letters; pass ``"TESTCONS"`` to get IBKR's test realm.
    """
    if consumer_key is None:
        consumer_key = "".join(secrets.choice(string.ascii_uppercase) for _ in range(9))
    signature_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encryption_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    plaintext = secrets.token_bytes(32)
    ciphertext = encryption_key.public_key().encrypt(plaintext, padding.PKCS1v15())
    return SimulatorCredentials(
        consumer_key=consumer_key,
        access_token=secrets.token_hex(10),
        access_token_secret=base64.b64encode(ciphertext).decode("ascii"),
        signature_key_pem=_private_pem(signature_key),
        encryption_key_pem=_private_pem(encryption_key),
        dh_param_pem=dh_params_pem(RFC3526_GROUP14_PRIME, GENERATOR),
        realm=realm_for(consumer_key),
    )


@dataclass(frozen=True, slots=True, repr=False)
class ServerView:
    """What IBKR's server knows about one consumer; the only credential object the protocol code sees."""

    consumer_key: str
    access_token: str
    realm: str
    signature_public_key: rsa.RSAPublicKey
    prepend: bytes
    dh_prime: int
    dh_generator: int

    def __repr__(self) -> str:
        return f"ServerView(consumer_key={self.consumer_key!r}, realm={self.realm!r}, <secrets redacted>)"

    @classmethod
    def from_credentials(cls, creds: SimulatorCredentials) -> ServerView:
        """Derive the server's view. The prepend is recovered by decrypting the secret (the server generated it;
        the simulator just does not keep the plaintext around separately). Raises ValueError if unusable."""
        sig_key = serialization.load_pem_private_key(creds.signature_key_pem, password=None)
        enc_key = serialization.load_pem_private_key(creds.encryption_key_pem, password=None)
        if not isinstance(sig_key, rsa.RSAPrivateKey) or not isinstance(enc_key, rsa.RSAPrivateKey):
            raise ValueError("signature and encryption keys must be RSA private keys")
        try:
            prepend = enc_key.decrypt(base64.b64decode(creds.access_token_secret, validate=True), padding.PKCS1v15())
        except ValueError as exc:
            raise ValueError("access token secret does not decrypt under the encryption key") from exc
        prime, generator = parse_dh_params_pem(creds.dh_param_pem)
        return cls(
            consumer_key=creds.consumer_key,
            access_token=creds.access_token,
            realm=creds.realm,
            signature_public_key=sig_key.public_key(),
            prepend=prepend,
            dh_prime=prime,
            dh_generator=generator,
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already existed
        os.write(fd, data)
    finally:
        os.close(fd)


def write_credentials(
    creds: SimulatorCredentials,
    directory: str | os.PathLike[str],
    *,
    base_url: str,
    gateway_port: int = 5000,
    gateway_host: str = "127.0.0.1",
) -> Path:
    """Write the client half into ``directory`` (created if needed) and return the path of ``gateway.toml``.

    Files (all mode 0600): ``private_signature.pem``, ``private_encryption.pem`` (PKCS#8), ``dhparam.pem`` and
    ``gateway.toml`` with key paths relative to the TOML's folder and ``base_url`` pointing at the simulator.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(folder / SIGNATURE_KEY_FILE, creds.signature_key_pem)
    _write_private(folder / ENCRYPTION_KEY_FILE, creds.encryption_key_pem)
    _write_private(folder / DH_PARAM_FILE, creds.dh_param_pem)
    document: dict[str, dict[str, object]] = {
        "server": {"host": gateway_host, "port": gateway_port},
        "ibkr": {
            "base_url": base_url,
            "consumer_key": creds.consumer_key,
            "access_token": creds.access_token,
            "access_token_secret": creds.access_token_secret,
            "signature_key": SIGNATURE_KEY_FILE,
            "encryption_key": ENCRYPTION_KEY_FILE,
            "dh_param": DH_PARAM_FILE,
            "realm": creds.realm,
        },
        "simulator": {"enabled": False},
    }
    text = render_config(
        document,
        routes=(*DEFAULT_ROUTES, {"path": "/v1/api/sim/*"}),
        header=(
            "Gateway configuration for the IBKR simulator at " + base_url + ", written by\n"
            "`python -m gateway.simulator --write-credentials`. The credentials are throwaway keys that only this\n"
            "simulator run accepts. Run: python -m gateway --config " + TOML_FILE
        ),
    )
    toml_path = folder / TOML_FILE
    _write_private(toml_path, text.encode("utf-8"))
    return toml_path
