"""Load the consumer's RSA private keys from PEM and decrypt the access-token secret into IBKR's prepend."""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.errors import KeyMaterialError, SecretDecryptError
from gateway.oauth.encoding import strict_b64decode

__all__ = ["MIN_RSA_KEY_BITS", "PREPEND_BYTES", "decrypt_access_token_secret", "load_rsa_private_key"]

#: Smallest RSA modulus accepted. IBKR issues 2048-bit keys; the published test key is 1024 bits.
MIN_RSA_KEY_BITS = 1024
#: The decrypted access-token secret is always 32 bytes (64 hex characters of prepend).
PREPEND_BYTES = 32

_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 .]+)-----")
_PROC_TYPE_ENCRYPTED = re.compile(rb"Proc-Type:[ \t]*4,[ \t]*ENCRYPTED")
_ACCEPTED_LABELS = frozenset({"RSA PRIVATE KEY", "PRIVATE KEY"})
_LABEL_PROBLEMS = {
    "ENCRYPTED PRIVATE KEY": "is encrypted; an unencrypted key is required",
    "PUBLIC KEY": "is a public key; the private key is required",
    "RSA PUBLIC KEY": "is a public key; the private key is required",
    "CERTIFICATE": "is a certificate; the private key is required",
    "EC PRIVATE KEY": "is an EC key; an RSA key is required",
    "DSA PRIVATE KEY": "is a DSA key; an RSA key is required",
    "OPENSSH PRIVATE KEY": "is in OpenSSH format; a PKCS#1 or PKCS#8 PEM key is required",
    "DH PARAMETERS": "is a DH parameters file, not an RSA private key",
    "X9.42 DH PARAMETERS": "is a DH parameters file, not an RSA private key",
}
_WHITESPACE = re.compile(r"\s+")


def load_rsa_private_key(pem: bytes, *, what: str) -> RSAPrivateKey:
    """Load an unencrypted RSA private key from a PKCS#1 or PKCS#8 PEM file.

    Args:
        pem: the file contents; exactly one ``RSA PRIVATE KEY`` or ``PRIVATE KEY`` PEM block.
        what: names the key in error messages, e.g. ``"signature key"`` or ``"encryption key"``.

    Returns:
        The key, of at least :data:`MIN_RSA_KEY_BITS` bits.

    Raises:
        KeyMaterialError: not PEM, several PEM blocks, an encrypted key, a public key or certificate, a
            non-RSA key (EC, DSA, Ed25519, DH parameters ...), corrupt key data, or a key under
            :data:`MIN_RSA_KEY_BITS` bits. The message names ``what`` and the problem, never key bytes.
    """
    labels = [m.decode("ascii") for m in _PEM_LABEL.findall(pem)]
    if not labels:
        raise KeyMaterialError(f"{what}: not a PEM file (no '-----BEGIN ...-----' line)")
    if len(labels) > 1:
        raise KeyMaterialError(f"{what}: the file holds {len(labels)} PEM blocks; exactly one private key expected")
    label = labels[0]
    if label not in _ACCEPTED_LABELS:
        problem = _LABEL_PROBLEMS.get(label, f"is a '{label}' PEM block, not an RSA private key")
        raise KeyMaterialError(f"{what}: {problem}")
    if _PROC_TYPE_ENCRYPTED.search(pem):
        # A traditional PKCS#1 PEM encrypted by OpenSSL carries "Proc-Type: 4,ENCRYPTED".
        raise KeyMaterialError(f"{what}: is encrypted; an unencrypted key is required")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyMaterialError(f"{what}: is encrypted; an unencrypted key is required") from None
    except UnsupportedAlgorithm:
        raise KeyMaterialError(f"{what}: uses an unsupported key algorithm; an RSA key is required") from None
    except ValueError:
        raise KeyMaterialError(f"{what}: PEM '{label}' block is corrupt or not a valid private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise KeyMaterialError(
            f"{what}: holds a non-RSA key ({type(key).__name__.removesuffix('PrivateKey')}); an RSA key is required"
        )
    if key.key_size < MIN_RSA_KEY_BITS:
        raise KeyMaterialError(f"{what}: RSA key has {key.key_size} bits; at least {MIN_RSA_KEY_BITS} are required")
    return key


def decrypt_access_token_secret(key: RSAPrivateKey, secret_b64: str) -> str:
    """Decrypt the base64 access-token secret into the prepend: lower-case hex of its 32 plaintext bytes.

    Whitespace anywhere in ``secret_b64`` is removed first (the portal wraps long values); the rest must be
    canonical base64 with padding. Decryption is RSAES-PKCS1-v1_5 (not OAEP). Under a wrong key current OpenSSL
    does not fail but returns random bytes of some other length (implicit rejection), so the 32-byte length
    check is the real test.

    Raises:
        SecretDecryptError: empty or invalid base64; a ciphertext whose length does not match the key size;
            a decryption failure; or a plaintext that is not 32 bytes. No secret bytes appear in the message.
    """
    compact = _WHITESPACE.sub("", secret_b64)
    if not compact:
        raise SecretDecryptError("access token secret is empty")
    ciphertext = strict_b64decode(compact)
    if ciphertext is None:
        raise SecretDecryptError("access token secret is not valid base64")
    expected = (key.key_size + 7) // 8
    if len(ciphertext) != expected:
        raise SecretDecryptError(
            f"access token secret is {len(ciphertext)} bytes of ciphertext; the {key.key_size}-bit "
            f"encryption key expects {expected} (wrong encryption key or damaged secret)"
        )
    try:
        plaintext = key.decrypt(ciphertext, padding.PKCS1v15())
    except ValueError:
        raise SecretDecryptError(
            "access token secret does not decrypt with the encryption key (wrong key or damaged secret)"
        ) from None
    if len(plaintext) != PREPEND_BYTES:
        raise SecretDecryptError(
            f"access token secret decrypts to {len(plaintext)} bytes instead of {PREPEND_BYTES} "
            "(wrong encryption key or damaged secret)"
        )
    return plaintext.hex()
