"""The exact text encodings the OAuth core needs: RFC 3986 percent-encoding (and its inverse), strict base64.

The unreserved set ``A-Z a-z 0-9 - . _ ~`` is kept as is; every other character is UTF-8 encoded and each
byte is written as ``%XX`` with upper-case hex. This is the alphabet of docs/protocol.md §4.2
(``quote(s, safe='')``); it is written out here so that the exact rule does not depend on a library default.

Base64 input (the access-token secret, a live session token, a PEM body) is decoded strictly: only the
canonical encoding of some byte string is accepted, so a damaged value is reported instead of half-decoded.
"""

from __future__ import annotations

import base64
import binascii

from gateway.errors import OAuthError

__all__ = ["UNRESERVED", "percent_decode", "percent_encode", "strict_b64decode"]

#: RFC 3986 §2.3 unreserved characters: never percent-encoded.
UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_UNRESERVED_BYTES = frozenset(ord(c) for c in UNRESERVED)
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# The text for every byte value; the signer encodes a few hundred bytes per request, so a table lookup per byte
# (through ``map`` in C) instead of a Python-level expression per byte.
_ENCODED_BYTE = tuple(chr(b) if b in _UNRESERVED_BYTES else f"%{b:02X}" for b in range(256))


def percent_encode(value: str) -> str:
    """Percent-encode ``value`` per RFC 3986.

    Unreserved characters are kept; everything else becomes ``%XX`` (upper-case hex) per UTF-8 byte, so a
    space is ``%20`` (never ``+``) and ``~`` stays ``~``.

    Raises:
        OAuthError: ``value`` contains a lone surrogate and therefore has no UTF-8 form.
    """
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise OAuthError("cannot percent-encode a string that is not valid Unicode (lone surrogate)") from None
    return "".join(map(_ENCODED_BYTE.__getitem__, raw))


def percent_decode(value: str) -> str:
    """Decode ``%XX`` sequences in ``value`` and return the UTF-8 text they spell.

    This is the strict inverse of :func:`percent_encode`: ``percent_decode(percent_encode(s)) == s`` for every
    string ``s``. Characters other than ``%`` are copied unchanged (``+`` stays ``+``; the form-encoding
    rule "``+`` means space" is applied by the query parser in :mod:`gateway.oauth.basestring`, not here).
    Hex digits may be upper or lower case.

    Raises:
        OAuthError: a ``%`` not followed by two hex digits, or decoded bytes that are not valid UTF-8.
            Malformed input is rejected rather than passed through, because a lenient decoder would sign a
            different string than the server reconstructs.
    """
    if "%" not in value:
        return value
    out = bytearray()
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch == "%":
            pair = value[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEX_DIGITS for c in pair):
                raise OAuthError(f"malformed percent-escape at offset {i}: '%' must be followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
        else:
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise OAuthError("percent-escapes do not decode to valid UTF-8") from None


def strict_b64decode(text: str) -> bytes | None:
    """Decode canonical standard base64 (``+/`` alphabet, ``=`` padding); return ``None`` if ``text`` is not that.

    Canonical means ``base64.b64encode(result) == text``: correct padding, no excess ``=``, no whitespace, no
    non-zero unused bits. Returning ``None`` lets each caller raise the error of its own domain.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw
