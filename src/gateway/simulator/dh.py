"""Server-side Diffie-Hellman and live-session-token maths of IBKR's OAuth flow (pure: no I/O, no randomness).

The server receives the client's challenge ``A``, picks a secret ``b`` (passed in by the caller), answers with
``B = g^b mod p`` and derives ``K = A^b mod p``. The live session token (LST) is ``HMAC-SHA1(key=java_bytes(K),
msg=prepend)`` and IBKR proves it to the client with ``hex(HMAC-SHA1(key=LST, msg=consumer_key))``
(docs/protocol.md §6.2-§6.3).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

#: RFC 3526 group 14 (2048-bit MODP) prime; used with generator 2 for the simulator's throwaway DH parameters.
RFC3526_GROUP14_PRIME = int(
    "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74"
    "020bbea63b139b22514a08798e3404ddef9519b3cd3a431b302b0a6df25f1437"
    "4fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7ed"
    "ee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf05"
    "98da48361c55d39a69163fa8fd24cf5f83655d23dca3ad961c62f356208552bb"
    "9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3b"
    "e39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf695581718"
    "3995497cea956ae515d2261898fa051015728e5a8aacaa68ffffffffffffffff",
    16,
)
GENERATOR = 2

_HEX = re.compile(r"[0-9a-fA-F]+")


def java_bytes(value: int) -> bytes:
    """Return Java ``BigInteger.toByteArray()`` of a non-negative ``value``.

    Minimal big-endian two's complement: the minimal unsigned bytes, plus a leading ``0x00`` when the top bit of
    the first byte is set (``0xff -> 00 ff``, ``0x7f -> 7f``, ``0 -> 00``). Raises ValueError for negatives.
    """
    if value < 0:
        raise ValueError("java_bytes is defined here for non-negative integers only")
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def parse_hex_int(text: str, *, max_digits: int = 1024) -> int | None:
    """Parse IBKR-style hex (no ``0x``, any case, odd length allowed, leading zeros allowed).

    Returns None for anything else, including empty text and more than ``max_digits`` digits.
    """
    if not 0 < len(text) <= max_digits or _HEX.fullmatch(text) is None:
        return None
    return int(text, 16)


def challenge_in_range(challenge: int, prime: int) -> bool:
    """True iff ``1 < challenge < prime - 1`` (rejects the degenerate public values 0, 1 and p-1 and beyond)."""
    return 1 < challenge < prime - 1


def live_session_token(shared_secret: int, prepend: bytes) -> bytes:
    """Return the raw 20-byte LST: ``HMAC-SHA1(key=java_bytes(K), msg=prepend)``."""
    return hmac.new(java_bytes(shared_secret), prepend, hashlib.sha1).digest()


def lst_signature(lst: bytes, consumer_key: str) -> str:
    """Return ``live_session_token_signature``: lower-case hex of ``HMAC-SHA1(key=LST, msg=consumer_key)``."""
    return hmac.new(lst, consumer_key.encode("utf-8"), hashlib.sha1).hexdigest()


@dataclass(frozen=True, slots=True, repr=False)
class LstGrant:
    """The server's answer to one LST request: ``B`` as hex, the raw LST and its proof for the client."""

    response_hex: str
    lst: bytes
    signature_hex: str

    def __repr__(self) -> str:
        return "LstGrant(<redacted>)"


def answer_challenge(
    challenge: int, server_secret: int, *, prime: int, generator: int, prepend: bytes, consumer_key: str
) -> LstGrant:
    """Compute the server side of one LST exchange for an already range-checked ``challenge`` (= A).

    ``B = g^b mod p``, ``K = A^b mod p``, LST and its signature as above. ``server_secret`` (= b) must be fresh
    per request; the caller supplies it so this stays deterministic and testable.
    """
    response = pow(generator, server_secret, prime)
    shared = pow(challenge, server_secret, prime)
    lst = live_session_token(shared, prepend)
    return LstGrant(response_hex=format(response, "x"), lst=lst, signature_hex=lst_signature(lst, consumer_key))
