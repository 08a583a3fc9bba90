"""RSA key loading and access-token-secret decryption: accepted formats, every rejection, fuzzing."""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import KeyMaterialError, SecretDecryptError
from gateway.oauth.keys import MIN_RSA_KEY_BITS, decrypt_access_token_secret, load_rsa_private_key
from tests.keyfiles import is_probable_prime

VECTORS: dict[str, Any] = json.loads(
    (pathlib.Path(__file__).parent.parent / "vectors" / "ibkr-oauth-vectors.json").read_text(encoding="utf-8")
)
PUBLISHED_KEY_PEM: bytes = VECTORS["published"]["rsa_authorization_header"]["private_key_pem"].encode("ascii")
PREPEND = bytes.fromhex(VECTORS["synthetic_lst"]["cases"][0]["prepend_hex"])  # 32 bytes
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- deterministic RSA keys from deterministic primes (for tests that must not depend on random keys) ----------


def _prime_at_least(start: int, e: int = 65537) -> int:
    n = start | 1
    while not (is_probable_prime(n) and (n - 1) % e != 0):
        n += 2
    return n


def deterministic_rsa_key(bits: int, seed: int) -> rsa.RSAPrivateKey:
    """An RSA key built from the first primes above fixed, seed-dependent starting points."""
    half = bits // 2
    p = _prime_at_least((1 << (half - 1)) | (1 << (half - 2)) | (seed * 7919 << 8))
    q = _prime_at_least((1 << (half - 1)) | (1 << (half - 3)) | (seed * 104729 << 8))
    e = 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), public
    )
    return numbers.private_key()


def deterministic_pkcs1_encrypt(key: rsa.RSAPublicKey, message: bytes) -> bytes:
    """RSAES-PKCS1-v1_5 encryption with fixed (non-random) padding bytes, so the ciphertext is reproducible."""
    k = (key.key_size + 7) // 8
    em = b"\x00\x02" + b"\x5a" * (k - 3 - len(message)) + b"\x00" + message
    numbers = key.public_numbers()
    return pow(int.from_bytes(em, "big"), numbers.e, numbers.n).to_bytes(k, "big")


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_a() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def key_b() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pkcs1(key: rsa.RSAPrivateKey, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        encryption or serialization.NoEncryption(),
    )


def pkcs8(key: Any, encryption: serialization.KeySerializationEncryption | None = None) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption or serialization.NoEncryption()
    )
    return data


# --- loading ----------------------------------------------------------------------------------------------


def test_loads_pkcs1_and_pkcs8(key_a: rsa.RSAPrivateKey) -> None:
    for pem in (pkcs1(key_a), pkcs8(key_a)):
        loaded = load_rsa_private_key(pem, what="signature key")
        assert loaded.private_numbers() == key_a.private_numbers()


def test_loads_published_1024_bit_key() -> None:
    assert load_rsa_private_key(PUBLISHED_KEY_PEM, what="signature key").key_size == 1024


def test_loads_key_with_crlf_and_surrounding_whitespace(key_a: rsa.RSAPrivateKey) -> None:
    pem = b"\r\n" + pkcs1(key_a).replace(b"\n", b"\r\n") + b"\r\n\r\n"
    assert load_rsa_private_key(pem, what="encryption key").key_size == 2048


def _bad_pems(key: rsa.RSAPrivateKey) -> Iterator[tuple[str, bytes, str]]:
    """(id, pem, expected message fragment) for every kind of unusable key file."""
    password = serialization.BestAvailableEncryption(b"pw")
    public = key.public_key()
    yield "empty", b"", "not a PEM"
    yield "not pem", b"just some text", "not a PEM"
    yield "binary", bytes(range(256)), "not a PEM"
    yield "encrypted pkcs8", pkcs8(key, password), "encrypted"
    yield "encrypted pkcs1", pkcs1(key, password), "encrypted"
    yield (
        "public spki",
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "public key",
    )
    yield (
        "public pkcs1",
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        "public key",
    )
    ec_key = ec.generate_private_key(ec.SECP256R1())
    yield (
        "ec traditional",
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        ),
        "EC key",
    )
    yield "ec pkcs8", pkcs8(ec_key), "non-RSA key (EC)"
    yield "ed25519 pkcs8", pkcs8(ed25519.Ed25519PrivateKey.generate()), "non-RSA key (Ed25519)"
    yield (
        "dh params",
        b"-----BEGIN DH PARAMETERS-----\nMAYCAQcCAQI=\n-----END DH PARAMETERS-----\n",
        "DH parameters",
    )
    yield "two keys", pkcs1(key) + pkcs8(key), "2 PEM blocks"
    yield "corrupt body", pkcs1(key).replace(b"\n", b"\nAAAA", 3), "corrupt"
    yield "truncated", pkcs8(key)[:200] + b"\n-----END PRIVATE KEY-----\n", "corrupt"
    yield "unknown label", b"-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n", "'FOO'"
    small = deterministic_rsa_key(768, seed=1)
    yield "too small", pkcs8(small), f"at least {MIN_RSA_KEY_BITS}"


_BAD_IDS = [
    "empty", "not pem", "binary", "encrypted pkcs8", "encrypted pkcs1", "public spki", "public pkcs1",
    "ec traditional", "ec pkcs8", "ed25519 pkcs8", "dh params", "two keys", "corrupt body", "truncated",
    "unknown label", "too small",
]  # fmt: skip


@pytest.mark.parametrize("case_id", _BAD_IDS)
def test_unusable_key_files_are_rejected(key_a: rsa.RSAPrivateKey, case_id: str) -> None:
    cases = {name: (pem, fragment) for name, pem, fragment in _bad_pems(key_a)}
    assert set(cases) == set(_BAD_IDS)
    pem, fragment = cases[case_id]
    with pytest.raises(KeyMaterialError) as info:
        load_rsa_private_key(pem, what="signature key")
    message = str(info.value)
    assert message.startswith("signature key: ")
    assert fragment in message
    # no key material in the message
    for line in pem.splitlines()[1:-1]:
        if len(line) > 16:
            assert line.decode("latin-1") not in message


# --- decrypting the access-token secret --------------------------------------------------------------------


def test_decrypts_32_byte_secret(key_a: rsa.RSAPrivateKey) -> None:
    secret = base64.b64encode(key_a.public_key().encrypt(PREPEND, padding.PKCS1v15())).decode()
    assert decrypt_access_token_secret(key_a, secret) == PREPEND.hex()


def test_whitespace_in_secret_is_ignored(key_a: rsa.RSAPrivateKey) -> None:
    secret = base64.b64encode(key_a.public_key().encrypt(PREPEND, padding.PKCS1v15())).decode()
    wrapped = "  " + "\n".join(secret[i : i + 64] for i in range(0, len(secret), 64)) + "\r\n"
    assert decrypt_access_token_secret(key_a, wrapped) == PREPEND.hex()


def test_secret_encrypted_to_another_key_is_rejected() -> None:
    # Deterministic keys and padding: with OpenSSL's implicit rejection a wrong key yields pseudo-random
    # plaintext whose length depends on key and ciphertext; random keys would make this test flaky (~1/245).
    key_a = deterministic_rsa_key(1024, seed=2)
    key_b = deterministic_rsa_key(1024, seed=3)
    ciphertext = deterministic_pkcs1_encrypt(key_a.public_key(), PREPEND)
    assert key_a.decrypt(ciphertext, padding.PKCS1v15()) == PREPEND  # the ciphertext itself is sound
    secret = base64.b64encode(ciphertext).decode()
    with pytest.raises(SecretDecryptError, match="wrong"):
        decrypt_access_token_secret(key_b, secret)


def test_secret_encrypted_to_another_random_key_never_yields_that_prepend(
    key_a: rsa.RSAPrivateKey, key_b: rsa.RSAPrivateKey
) -> None:
    secret = base64.b64encode(key_a.public_key().encrypt(PREPEND, padding.PKCS1v15())).decode()
    try:
        prepend = decrypt_access_token_secret(key_b, secret)
    except SecretDecryptError:
        return
    assert prepend != PREPEND.hex()  # implicit rejection produced 32 random bytes (rare); LST check catches it


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_secret_of_wrong_plaintext_length_is_rejected(key_a: rsa.RSAPrivateKey, length: int) -> None:
    secret = base64.b64encode(key_a.public_key().encrypt(b"\x42" * length, padding.PKCS1v15())).decode()
    with pytest.raises(SecretDecryptError, match=f"{length} bytes instead of 32"):
        decrypt_access_token_secret(key_a, secret)


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("", "empty"),
        ("  \n ", "empty"),
        ("not base64!", "not valid base64"),
        ("QUJD=", "not valid base64"),
        ("QUJ", "not valid base64"),
        ("é", "not valid base64"),
        ("QUJD", "3 bytes of ciphertext"),
    ],
)
def test_malformed_secrets_are_rejected(key_a: rsa.RSAPrivateKey, secret: str, fragment: str) -> None:
    with pytest.raises(SecretDecryptError, match=fragment):
        decrypt_access_token_secret(key_a, secret)


def test_ciphertext_not_below_modulus_is_rejected(key_a: rsa.RSAPrivateKey) -> None:
    secret = base64.b64encode(b"\xff" * 256).decode()
    with pytest.raises(SecretDecryptError):
        decrypt_access_token_secret(key_a, secret)


def test_messages_carry_no_secret(key_a: rsa.RSAPrivateKey) -> None:
    secret = base64.b64encode(key_a.public_key().encrypt(b"\x42" * 20, padding.PKCS1v15())).decode()
    with pytest.raises(SecretDecryptError) as info:
        decrypt_access_token_secret(key_a, secret)
    assert secret[:16] not in str(info.value)
    assert "42" * 4 not in str(info.value)


# --- fuzzing: only our own errors -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2000))
def test_load_arbitrary_bytes_raises_only_key_material_error(data: bytes) -> None:
    with contextlib.suppress(KeyMaterialError):
        load_rsa_private_key(data, what="signature key")


@FUZZ
@given(st.sampled_from(["RSA PRIVATE KEY", "PRIVATE KEY"]), st.binary(max_size=1300))
def test_load_arbitrary_pem_bodies_raises_only_key_material_error(label: str, body: bytes) -> None:
    b64 = base64.b64encode(body).decode()
    pem = f"-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n".encode()
    with contextlib.suppress(KeyMaterialError):
        load_rsa_private_key(pem, what="signature key")


_PUBLISHED_DER = base64.b64decode(b"".join(PUBLISHED_KEY_PEM.splitlines()[1:-1]))


@FUZZ
@given(st.data())
def test_load_mutated_key_parses_or_raises_key_material_error(data: st.DataObject) -> None:
    der = bytearray(_PUBLISHED_DER)
    for _ in range(data.draw(st.integers(1, 3))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    b64 = base64.encodebytes(bytes(der)).decode()
    pem = f"-----BEGIN PRIVATE KEY-----\n{b64}-----END PRIVATE KEY-----\n".encode()
    with contextlib.suppress(KeyMaterialError):
        load_rsa_private_key(pem, what="signature key")


@FUZZ
@given(st.text(max_size=400))
def test_decrypt_arbitrary_text_raises_only_secret_decrypt_error(key_a: rsa.RSAPrivateKey, text: str) -> None:
    with contextlib.suppress(SecretDecryptError):
        decrypt_access_token_secret(key_a, text)


@FUZZ
@given(st.binary(min_size=256, max_size=256))
def test_decrypt_arbitrary_ciphertext_returns_hex_or_raises_secret_decrypt_error(
    key_a: rsa.RSAPrivateKey, ciphertext: bytes
) -> None:
    try:
        prepend = decrypt_access_token_secret(key_a, base64.b64encode(ciphertext).decode())
    except SecretDecryptError:
        return
    assert len(prepend) == 64
    assert prepend == prepend.lower()
    int(prepend, 16)
