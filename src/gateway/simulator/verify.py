"""Server-side verification of IBKR OAuth requests as received (pure: no I/O, no clock; time is an argument).

Written from the server's point of view and independent of the gateway's client code: parse the
``Authorization: OAuth ...`` header, rebuild the signature base string from the request *as received* (method,
scheme, Host header, raw path, raw query, form body), then check the RSA-SHA256 (live session token request) or
HMAC-SHA256 (every other request) signature (docs/protocol.md §4-§6, §8.1, §8.4).

Every function here either returns a value or a :class:`Rejection`; none raises on bad input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

QueryRule = Literal["guide", "omit", "in_url"]
#: Strict mode accepts only IBKR's documented rule; lenient mode also the two others seen in the wild (§9.1).
STRICT_RULES: tuple[QueryRule, ...] = ("guide",)
LENIENT_RULES: tuple[QueryRule, ...] = ("guide", "omit", "in_url")

MAX_HEADER_CHARS = 8192
MAX_NONCE_CHARS = 256

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_WS = " \t"
_TIMESTAMP = re.compile(r"[0-9]{10}")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: a short reason (never containing secret values) and the HTTP status."""

    reason: str
    status: int = 401


# --------------------------------------------------------------------------------------------- encoding


def pct_encode(text: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes of ``text``: unreserved ``A-Za-z0-9-._~`` stay, the rest
    becomes ``%XX`` (upper-case hex). Lone surrogates are encoded as their (invalid) surrogatepass bytes."""
    out: list[str] = []
    for byte in text.encode("utf-8", "surrogatepass"):
        out.append(chr(byte) if byte in _UNRESERVED else f"%{byte:02X}")
    return "".join(out)


def pct_decode(text: str, *, plus_is_space: bool = False) -> str | None:
    """Strictly decode ``%XX`` escapes (and ``+`` as space when ``plus_is_space``).

    Returns None when an escape is malformed or the bytes are not valid UTF-8.
    """
    buf = bytearray()
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(c in _HEXDIGITS for c in pair):
                return None
            buf.append(int(pair, 16))
            i += 3
            continue
        if char == "+" and plus_is_space:
            buf.append(0x20)
        else:
            try:
                buf.extend(char.encode("utf-8"))
            except UnicodeEncodeError:
                return None
        i += 1
    try:
        return buf.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_query(raw_query: str) -> list[tuple[str, str]] | None:
    """Split a raw query (or urlencoded form body) into decoded ``(key, value)`` pairs, in received order.

    Form rules: ``&`` separates, ``+`` is a space, ``%XX`` decoded; ``key`` without ``=`` has the value ``""``;
    empty segments are skipped. Returns None if any escape is malformed.
    """
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        dkey = pct_decode(key, plus_is_space=True)
        dvalue = pct_decode(value, plus_is_space=True)
        if dkey is None or dvalue is None:
            return None
        pairs.append((dkey, dvalue))
    return pairs


# --------------------------------------------------------------------------------------------- header


@dataclass(frozen=True, slots=True)
class OAuthHeader:
    """A parsed ``Authorization: OAuth`` header. Values are percent-decoded once.

    ``params`` holds every pair except ``realm`` and ``oauth_signature`` in received order - exactly the pairs
    that belong in the base string.
    """

    params: tuple[tuple[str, str], ...]
    realm: str | None
    signature: str | None

    def get(self, name: str) -> str | None:
        """The decoded value of parameter ``name``, or None."""
        for key, value in self.params:
            if key == name:
                return value
        return None


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def parse_authorization(value: str | None) -> OAuthHeader | Rejection:
    """Parse ``OAuth k="v", k="v", ...`` as IBKR clients send it (any order, ``", "`` or ``","``, realm first or
    last, values quoted or bare tokens, quoted-pair escapes allowed, every value percent-decoded once).

    Any input yields an :class:`OAuthHeader` or a :class:`Rejection`; nothing raises.
    """
    if value is None:
        return Rejection("missing authorization header")
    if len(value) > MAX_HEADER_CHARS:
        return Rejection("authorization header too long")
    text = value.strip(_WS)
    scheme_end = 0
    while scheme_end < len(text) and text[scheme_end] not in _WS:
        scheme_end += 1
    if text[:scheme_end].lower() != "oauth":
        return Rejection("authorization scheme is not OAuth")
    bad = Rejection("malformed authorization header")
    i = scheme_end
    n = len(text)
    seen: dict[str, str] = {}
    order: list[str] = []
    while True:
        i = _skip(text, i, _WS + ",")
        if i >= n:
            break
        start = i
        while i < n and text[i] in _TCHAR:
            i += 1
        key = text[start:i]
        if not key:
            return bad
        i = _skip(text, i, _WS)
        if i >= n or text[i] != "=":
            return bad
        i = _skip(text, i + 1, _WS)
        if i < n and text[i] == '"':
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    return bad
                char = text[i]
                if char == "\\":
                    if i + 1 >= n:
                        return bad
                    chars.append(text[i + 1])
                    i += 2
                elif char == '"':
                    i += 1
                    break
                else:
                    chars.append(char)
                    i += 1
            raw = "".join(chars)
        else:
            start = i
            while i < n and text[i] in _TCHAR:
                i += 1
            raw = text[start:i]
        i = _skip(text, i, _WS)
        if i < n and text[i] != ",":
            return bad
        decoded = pct_decode(raw)
        if decoded is None:
            return bad
        if key in seen:
            return Rejection(f"duplicate parameter {key}")
        seen[key] = decoded
        order.append(key)
    params = tuple((k, seen[k]) for k in order if k not in ("realm", "oauth_signature"))
    return OAuthHeader(params=params, realm=seen.get("realm"), signature=seen.get("oauth_signature"))


# --------------------------------------------------------------------------------------------- base string


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """The parts of a received request that the signature covers, exactly as they arrived.

    ``host`` is the Host header; ``raw_path``/``raw_query`` are the undecoded target parts; ``form_params`` the
    decoded body pairs when the body is ``application/x-www-form-urlencoded`` (else empty).
    """

    method: str
    scheme: str
    host: str
    raw_path: str
    raw_query: str = ""
    form_params: tuple[tuple[str, str], ...] = ()


_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def request_base_url(scheme: str, host: str, raw_path: str) -> str:
    """``scheme://host/path`` as the client must have signed it: lower-case scheme and host, the scheme's
    default port dropped, the path byte-for-byte as received."""
    scheme = scheme.lower()
    host = host.strip().lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None and host.endswith(":" + default) and not host.endswith("]"):
        host = host[: -len(default) - 1]
    return f"{scheme}://{host}{raw_path}"


def base_string(method: str, base_url: str, params: Iterable[tuple[str, str]], prepend_hex: str = "") -> str:
    """``[prepend]METHOD&pct(base_url)&pct(sorted k=v joined by &)`` - IBKR's rule (docs/protocol.md §4.2).

    Pairs are sorted by key then value (code-point order), joined raw, and the whole list is encoded once.
    """
    joined = "&".join(f"{k}={v}" for k, v in sorted(params))
    return f"{prepend_hex}{method.upper()}&{pct_encode(base_url)}&{pct_encode(joined)}"


def candidate_base_strings(
    request: ReceivedRequest, header: OAuthHeader, rules: Sequence[QueryRule], prepend_hex: str = ""
) -> list[tuple[QueryRule, str]] | Rejection:
    """The base strings the request may legitimately have been signed over, one per query rule in ``rules``.

    ``guide``: decoded query merged into the params; ``omit``: query ignored; ``in_url``: raw query kept in
    the URL part. Identical candidates (e.g. no query) are listed once under the first rule.
    """
    url = request_base_url(request.scheme, request.host, request.raw_path)
    base_params = [*header.params, *request.form_params]
    out: list[tuple[QueryRule, str]] = []
    seen: set[str] = set()
    for rule in rules:
        if rule == "guide":
            query = parse_query(request.raw_query)
            if query is None:
                return Rejection("malformed query string", 400)
            candidate = base_string(request.method, url, [*base_params, *query], prepend_hex)
        elif rule == "omit":
            candidate = base_string(request.method, url, base_params, prepend_hex)
        else:
            full = f"{url}?{request.raw_query}" if request.raw_query else url
            candidate = base_string(request.method, full, base_params, prepend_hex)
        if candidate not in seen:
            seen.add(candidate)
            out.append((rule, candidate))
    return out


# --------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class Expected:
    """The identity a request must carry: IBKR's consumer key, access token and realm for this consumer."""

    consumer_key: str
    access_token: str
    realm: str


def check_oauth_params(
    header: OAuthHeader,
    expected: Expected,
    *,
    signature_method: str,
    now_s: float,
    window_s: float,
    seen_nonces: Container[str],
) -> Rejection | None:
    """Check everything but the signature, in IBKR-like order; None when all pass.

    Order: consumer key, access token, realm, signature method, timestamp (10 digits, within ``window_s`` of
    ``now_s``), nonce (present, not in ``seen_nonces``), signature present.
    """
    consumer_key = header.get("oauth_consumer_key")
    if consumer_key is None:
        return Rejection("missing consumer key")
    if not hmac.compare_digest(consumer_key.encode(), expected.consumer_key.encode()):
        return Rejection("invalid consumer")
    token = header.get("oauth_token")
    if token is None:
        return Rejection("missing token")
    if not hmac.compare_digest(token.encode(), expected.access_token.encode()):
        return Rejection("invalid token")
    if header.realm is None:
        return Rejection("missing realm")
    if header.realm != expected.realm:
        return Rejection("invalid realm")
    method = header.get("oauth_signature_method")
    if method != signature_method:
        return Rejection("invalid signature method")
    timestamp = header.get("oauth_timestamp")
    if timestamp is None:
        return Rejection("missing timestamp")
    if _TIMESTAMP.fullmatch(timestamp) is None:
        return Rejection("invalid timestamp")
    if abs(int(timestamp) - now_s) > window_s:
        return Rejection("timestamp out of range")
    nonce = header.get("oauth_nonce")
    if not nonce:
        return Rejection("missing nonce")
    if len(nonce) > MAX_NONCE_CHARS:
        return Rejection("invalid nonce")
    if nonce in seen_nonces:
        return Rejection("nonce reused")
    if not header.signature:
        return Rejection("missing signature")
    return None


def _signature_bytes(header: OAuthHeader) -> bytes | None:
    text = header.signature or ""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def verify_rsa_signature(
    request: ReceivedRequest,
    header: OAuthHeader,
    public_key: rsa.RSAPublicKey,
    prepend_hex: str,
    rules: Sequence[QueryRule] = STRICT_RULES,
) -> QueryRule | Rejection:
    """Verify the RSA-SHA256 (PKCS#1 v1.5) signature of a live session token request over
    ``prepend + base string``; returns the matching query rule."""
    signature = _signature_bytes(header)
    if signature is None:
        return Rejection("invalid signature")
    candidates = candidate_base_strings(request, header, rules, prepend_hex)
    if isinstance(candidates, Rejection):
        return candidates
    for rule, candidate in candidates:
        try:
            public_key.verify(signature, candidate.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            continue
        return rule
    return Rejection("invalid signature")


def hmac_signature(key: bytes, base: str) -> bytes:
    """Raw HMAC-SHA256 of a base string under a raw LST key."""
    return hmac.new(key, base.encode("utf-8"), hashlib.sha256).digest()


def verify_hmac_signature(
    request: ReceivedRequest,
    header: OAuthHeader,
    lst: bytes,
    rules: Sequence[QueryRule] = STRICT_RULES,
) -> QueryRule | Rejection:
    """Verify the HMAC-SHA256 signature of an ordinary request under the raw LST; returns the matching rule."""
    signature = _signature_bytes(header)
    if signature is None:
        return Rejection("invalid signature")
    candidates = candidate_base_strings(request, header, rules)
    if isinstance(candidates, Rejection):
        return candidates
    for rule, candidate in candidates:
        if hmac.compare_digest(hmac_signature(lst, candidate), signature):
            return rule
    return Rejection("invalid signature")
