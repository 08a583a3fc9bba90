"""Sign a base string: RSA-SHA256 for the live-session-token request, HMAC-SHA256 for every other request."""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gateway.errors import OAuthError

__all__ = ["LIVE_SESSION_TOKEN_BYTES", "hmac_sha256_signature", "rsa_sha256_signature"]

#: A live session token is an HMAC-SHA1 output: 20 raw bytes (28 characters of base64).
LIVE_SESSION_TOKEN_BYTES = 20


def rsa_sha256_signature(key: RSAPrivateKey, base_string: str) -> str:
    """Return base64 (one line, with padding) of RSASSA-PKCS1-v1_5 / SHA-256 over the UTF-8 base string.

    PKCS#1 v1.5 signing is deterministic: the same key and base string always give the same signature.
    The result is not yet percent-encoded; :func:`gateway.oauth.header.authorization_header` does that.
    """
    signature = key.sign(base_string.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def hmac_sha256_signature(live_session_token: bytes, base_string: str) -> str:
    """Return base64 of the raw 32-byte HMAC-SHA256 of the UTF-8 base string, keyed with the LST.

    ``live_session_token`` is the 20 raw token bytes (the base64-*decoded* LST), not its base64 text.

    Raises:
        OAuthError: ``live_session_token`` is not exactly 20 bytes (most likely the base64 text was passed).
    """
    if len(live_session_token) != LIVE_SESSION_TOKEN_BYTES:
        raise OAuthError(
            f"live session token must be the {LIVE_SESSION_TOKEN_BYTES} raw bytes (base64-decoded), "
            f"got {len(live_session_token)} bytes"
        )
    mac = hmac.new(live_session_token, base_string.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode("ascii")
