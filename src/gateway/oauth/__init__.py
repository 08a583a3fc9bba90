"""Pure core of IBKR's OAuth 1.0a variant: encoding, base strings, signatures, headers, DH/LST math, keys.

Nothing in this package performs I/O, reads a clock or draws randomness: nonces, timestamps and the DH secret
exponent are arguments, PEM files arrive as bytes. Every function reports bad input with an
:class:`~gateway.errors.OAuthError` (or one of its subclasses: ``KeyMaterialError`` for PEMs and DH
parameters, ``SecretDecryptError`` for the access-token secret, ``LiveSessionTokenError`` for a token that
fails IBKR's check) and never puts secret material in a message.

Typical handshake (the shell supplies ``a``, nonce and timestamp)::

    prepend = decrypt_access_token_secret(encryption_key, secret_b64)
    challenge = dh_challenge(params, a)
    header = lst_request_authorization(identity, url=..., prepend_hex=prepend, challenge_hex=challenge,
                                       signature_key=signature_key, nonce=..., timestamp=...)
    # POST it; IBKR answers diffie_hellman_response and live_session_token_signature
    lst = derive_live_session_token(dh_shared_secret(params, response_hex, a), prepend)
    validate_live_session_token(lst, identity.consumer_key, lst_signature)
    header = request_authorization(identity, method=..., url=..., live_session_token=lst,
                                   nonce=..., timestamp=...)
"""

from gateway.oauth.basestring import QueryRule, normalized_url, parse_query, signature_base_string
from gateway.oauth.dh import (
    MIN_DH_PRIME_BITS,
    DHParams,
    decode_live_session_token,
    derive_live_session_token,
    dh_challenge,
    dh_shared_secret,
    encode_live_session_token,
    java_bytes,
    live_session_token_signature,
    parse_dh_params_pem,
    validate_live_session_token,
)
from gateway.oauth.encoding import percent_decode, percent_encode
from gateway.oauth.header import authorization_header
from gateway.oauth.keys import (
    MIN_RSA_KEY_BITS,
    PREPEND_BYTES,
    decrypt_access_token_secret,
    load_rsa_private_key,
)
from gateway.oauth.signatures import LIVE_SESSION_TOKEN_BYTES, hmac_sha256_signature, rsa_sha256_signature
from gateway.oauth.signer import (
    HMAC_SHA256,
    RSA_SHA256,
    OAuthIdentity,
    RequestSigner,
    lst_request_authorization,
    lst_request_params,
    request_authorization,
    request_params,
)

__all__ = [
    "HMAC_SHA256",
    "LIVE_SESSION_TOKEN_BYTES",
    "MIN_DH_PRIME_BITS",
    "MIN_RSA_KEY_BITS",
    "PREPEND_BYTES",
    "RSA_SHA256",
    "DHParams",
    "OAuthIdentity",
    "QueryRule",
    "RequestSigner",
    "authorization_header",
    "decode_live_session_token",
    "decrypt_access_token_secret",
    "derive_live_session_token",
    "dh_challenge",
    "dh_shared_secret",
    "encode_live_session_token",
    "hmac_sha256_signature",
    "java_bytes",
    "live_session_token_signature",
    "load_rsa_private_key",
    "lst_request_authorization",
    "lst_request_params",
    "normalized_url",
    "parse_dh_params_pem",
    "parse_query",
    "percent_decode",
    "percent_encode",
    "request_authorization",
    "request_params",
    "rsa_sha256_signature",
    "signature_base_string",
    "validate_live_session_token",
]
