"""Diffie-Hellman and live-session-token math of IBKR's OAuth variant (docs/protocol.md §6), on plain ints.

Also parses ``dhparam.pem`` (PKCS#3 ``DH PARAMETERS``) with a minimal DER reader of its own: cryptography's
finite-field DH API is deprecated and is not used. Nothing here draws randomness; the secret exponent ``a`` is
always an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from gateway.errors import KeyMaterialError, LiveSessionTokenError, OAuthError
from gateway.oauth.encoding import strict_b64decode
from gateway.oauth.signatures import LIVE_SESSION_TOKEN_BYTES

__all__ = [
    "MIN_DH_PRIME_BITS",
    "DHParams",
    "decode_live_session_token",
    "derive_live_session_token",
    "dh_challenge",
    "dh_shared_secret",
    "encode_live_session_token",
    "java_bytes",
    "live_session_token_signature",
    "parse_dh_params_pem",
    "validate_live_session_token",
]

#: Smallest prime accepted from a PEM file. IBKR asks for 2048-bit parameters; anything under 1024 bits is
#: breakable and far more likely a wrong or truncated file than a deliberate choice. (:class:`DHParams` itself
#: accepts smaller primes so that toy test vectors can be used directly.)
MIN_DH_PRIME_BITS = 1024

_PEM_BEGIN = "-----BEGIN DH PARAMETERS-----"
_PEM_END = "-----END DH PARAMETERS-----"
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]*")
_HEX = re.compile(r"[0-9A-Fa-f]+")
_LST_SIGNATURE = re.compile(r"[0-9A-Fa-f]{40}")
_TAG_SEQUENCE = 0x30
_TAG_INTEGER = 0x02


@dataclass(frozen=True)
class DHParams:
    """A Diffie-Hellman group: odd modulus ``p`` and generator ``g`` with ``2 <= g <= p - 2``.

    Construction checks only that shape (not primality or size, so toy vectors fit).

    Raises:
        KeyMaterialError: ``p`` is not an odd integer of at least 5, or ``g`` is outside ``[2, p - 2]``.
    """

    p: int
    g: int

    def __post_init__(self) -> None:
        if self.p < 5 or self.p % 2 == 0:
            raise KeyMaterialError("DH prime p must be an odd integer of at least 5")
        if not 2 <= self.g <= self.p - 2:
            raise KeyMaterialError("DH generator g must lie in [2, p - 2]")


class _DerReader:
    """Reads definite-length DER from a byte string; every problem raises KeyMaterialError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def _byte(self) -> int:
        if self._pos >= len(self._data):
            raise KeyMaterialError("DH parameters: DER data ends early")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def element(self, tag: int, what: str) -> bytes:
        """Read one element with the given tag and return its contents."""
        got = self._byte()
        if got != tag:
            raise KeyMaterialError(f"DH parameters: expected {what} (DER tag 0x{tag:02x}), found tag 0x{got:02x}")
        first = self._byte()
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise KeyMaterialError("DH parameters: indefinite DER length is not allowed")
        else:
            count = first & 0x7F
            if count > 4:
                raise KeyMaterialError("DH parameters: DER length field is implausibly long")
            raw = bytes(self._byte() for _ in range(count))
            if raw[0] == 0:
                raise KeyMaterialError("DH parameters: DER length is not minimally encoded")
            length = int.from_bytes(raw, "big")
            if length < 0x80:
                raise KeyMaterialError("DH parameters: DER length is not minimally encoded")
        end = self._pos + length
        if end > len(self._data):
            raise KeyMaterialError("DH parameters: DER element is longer than the data")
        contents = self._data[self._pos : end]
        self._pos = end
        return contents

    def non_negative_integer(self, what: str) -> int:
        """Read one INTEGER that must be minimally encoded and not negative."""
        contents = self.element(_TAG_INTEGER, what)
        if not contents:
            raise KeyMaterialError(f"DH parameters: {what} is an empty INTEGER")
        if len(contents) > 1 and (
            (contents[0] == 0x00 and contents[1] < 0x80) or (contents[0] == 0xFF and contents[1] >= 0x80)
        ):
            raise KeyMaterialError(f"DH parameters: {what} is not minimally encoded")
        if contents[0] >= 0x80:
            raise KeyMaterialError(f"DH parameters: {what} is negative")
        return int.from_bytes(contents, "big")


def _pem_body(pem: bytes) -> bytes:
    try:
        text = pem.decode("ascii")
    except UnicodeDecodeError:
        raise KeyMaterialError("DH parameters: file is not ASCII PEM text") from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if not lines or lines[0] != _PEM_BEGIN:
        if "BEGIN X9.42 DH PARAMETERS" in text:
            raise KeyMaterialError("DH parameters: X9.42 (DHX) parameters are not supported; need PKCS#3")
        raise KeyMaterialError(f"DH parameters: file does not start with {_PEM_BEGIN}")
    if lines[-1] != _PEM_END or len(lines) < 3:
        raise KeyMaterialError(f"DH parameters: file does not end with {_PEM_END} after a body")
    body_lines = lines[1:-1]
    if not all(_BASE64_LINE.fullmatch(line) for line in body_lines):
        raise KeyMaterialError("DH parameters: PEM body is not base64 (one PEM block without headers expected)")
    der = strict_b64decode("".join(body_lines))
    if der is None:
        raise KeyMaterialError("DH parameters: PEM body is not valid base64")
    return der


def parse_dh_params_pem(pem: bytes) -> DHParams:
    """Parse a ``-----BEGIN DH PARAMETERS-----`` PEM (``openssl dhparam`` output) into :class:`DHParams`.

    The file must hold exactly one PEM block (surrounding whitespace allowed) whose DER is the PKCS#3
    ``SEQUENCE { INTEGER p, INTEGER g [, INTEGER privateValueLength] }``; the optional third field is
    checked for shape and ignored. DER must be strict: definite minimal lengths, minimal non-negative
    integers, nothing after the last field or after the sequence. ``p`` must be odd and at least
    :data:`MIN_DH_PRIME_BITS` bits; ``g`` must lie in ``[2, p - 2]``. Primality is not tested: IBKR holds its
    own copy of the parameters, and a wrong ``p`` shows up as a live-session-token validation failure.

    Raises:
        KeyMaterialError: for every malformed input, with a message saying what is wrong (never any other
            exception type).
    """
    reader = _DerReader(_pem_body(pem))
    sequence = _DerReader(reader.element(_TAG_SEQUENCE, "a SEQUENCE"))
    if not reader.at_end():
        raise KeyMaterialError("DH parameters: trailing data after the DER SEQUENCE")
    p = sequence.non_negative_integer("prime p")
    g = sequence.non_negative_integer("generator g")
    if not sequence.at_end():
        sequence.non_negative_integer("privateValueLength")
        if not sequence.at_end():
            raise KeyMaterialError("DH parameters: unexpected fields after privateValueLength")
    if p % 2 == 0:
        raise KeyMaterialError("DH parameters: prime p is even")
    if p.bit_length() < MIN_DH_PRIME_BITS:
        raise KeyMaterialError(
            f"DH parameters: prime p has {p.bit_length()} bits; at least {MIN_DH_PRIME_BITS} are required"
        )
    if not 2 <= g <= p - 2:
        raise KeyMaterialError("DH parameters: generator g must lie in [2, p - 2]")
    return DHParams(p=p, g=g)


def dh_challenge(params: DHParams, a: int) -> str:
    """Return the ``diffie_hellman_challenge``: lower-case hex of ``g**a mod p``, no prefix, no padding.

    The result may have odd length (IBKR accepts that; docs/protocol.md §6.1 step 3).

    Raises:
        OAuthError: ``a < 2`` (a trivial or negative secret exponent).
    """
    if a < 2:
        raise OAuthError("DH secret exponent a must be at least 2")
    return format(pow(params.g, a, params.p), "x")


def dh_shared_secret(params: DHParams, response_hex: str, a: int) -> int:
    """Return ``K = B**a mod p`` from IBKR's ``diffie_hellman_response`` hex ``B``.

    ``response_hex`` is hex digits only (either case, odd length allowed, no ``0x``, no whitespace).

    Raises:
        OAuthError: the response is empty (IBKR's way of saying "retry the live session token request"),
            not hex, or ``B`` lies outside ``[2, p - 2]`` (a degenerate key that would make ``K`` guessable);
            or ``a < 2``.
    """
    if a < 2:
        raise OAuthError("DH secret exponent a must be at least 2")
    if not response_hex:
        raise OAuthError("diffie_hellman_response is empty; IBKR asks for the live session token request to be retried")
    if not _HEX.fullmatch(response_hex):
        raise OAuthError("diffie_hellman_response is not a hex number")
    b_public = int(response_hex, 16)
    if not 2 <= b_public <= params.p - 2:
        raise OAuthError("diffie_hellman_response is outside [2, p - 2]; refusing a degenerate DH value")
    return pow(b_public, a, params.p)


def java_bytes(n: int) -> bytes:
    """Return Java ``BigInteger.toByteArray()`` of a non-negative ``n``: minimal big-endian two's complement.

    That is the minimal unsigned bytes plus a leading ``0x00`` when the top bit of the first byte would be set
    (when ``n``'s bit length is a multiple of 8). ``0`` gives ``b"\\x00"``; ``0xff`` gives ``b"\\x00\\xff"``.

    Raises:
        OAuthError: ``n`` is negative.
    """
    if n < 0:
        raise OAuthError("java_bytes is defined here only for non-negative integers")
    return n.to_bytes(n.bit_length() // 8 + 1, "big")


def _prepend_bytes(prepend_hex: str) -> bytes:
    if len(prepend_hex) % 2 or not _HEX.fullmatch(prepend_hex):
        raise OAuthError("prepend must be a non-empty, even-length hex string")
    return bytes.fromhex(prepend_hex)


def derive_live_session_token(shared_secret: int, prepend_hex: str) -> bytes:
    """Return the 20 raw bytes of the live session token: ``HMAC-SHA1(key=java_bytes(K), msg=prepend bytes)``.

    Args:
        shared_secret: ``K`` from :func:`dh_shared_secret`.
        prepend_hex: hex of the decrypted access-token secret (either case).

    Raises:
        OAuthError: ``prepend_hex`` is empty, of odd length or not hex; ``shared_secret`` is negative.
    """
    return hmac.new(java_bytes(shared_secret), _prepend_bytes(prepend_hex), hashlib.sha1).digest()


def encode_live_session_token(lst: bytes) -> str:
    """Return the base64 text form of a live session token (28 characters for the 20 raw bytes)."""
    return base64.b64encode(lst).decode("ascii")


def decode_live_session_token(text: str) -> bytes:
    """Return the 20 raw bytes of a base64 live session token.

    Raises:
        OAuthError: not strict base64, or not 20 bytes once decoded. The message never contains the token.
    """
    raw = strict_b64decode(text)
    if raw is None:
        raise OAuthError("live session token is not valid base64")
    if len(raw) != LIVE_SESSION_TOKEN_BYTES:
        raise OAuthError(f"live session token must decode to {LIVE_SESSION_TOKEN_BYTES} bytes, got {len(raw)}")
    return raw


def live_session_token_signature(lst: bytes, consumer_key: str) -> str:
    """Return lower-case hex ``HMAC-SHA1(key=lst, msg=consumer_key as UTF-8)``, IBKR's token check value."""
    return hmac.new(lst, consumer_key.encode("utf-8"), hashlib.sha1).hexdigest()


def validate_live_session_token(lst: bytes, consumer_key: str, expected_signature: str) -> None:
    """Check a derived live session token against IBKR's ``live_session_token_signature``.

    The comparison is constant-time and case-insensitive on the 40 hex digits.

    Raises:
        LiveSessionTokenError: the signature is not 40 hex digits, or does not match. The message never
            contains the token or either signature.
    """
    if not _LST_SIGNATURE.fullmatch(expected_signature):
        raise LiveSessionTokenError("live_session_token_signature from IBKR is not 40 hex digits")
    computed = live_session_token_signature(lst, consumer_key).encode("ascii")
    if not hmac.compare_digest(computed, expected_signature.lower().encode("ascii")):
        raise LiveSessionTokenError(
            "the live session token derived here does not match IBKR's live_session_token_signature "
            "(wrong access-token secret, encryption key or DH parameters, or the consumer key differs)"
        )
