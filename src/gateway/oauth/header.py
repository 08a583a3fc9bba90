"""Render the ``Authorization: OAuth ...`` header value IBKR expects (docs/protocol.md §4.3).

Layout (the form ibind and deno-ibkr use, byte-exact with the published vector): ``OAuth realm="<realm>"``, then every
parameter including ``oauth_signature`` sorted by name, each as ``name="value"``, separated by ``", "``. The
signature is percent-encoded exactly once; every other value is sent raw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.errors import OAuthError
from gateway.oauth.encoding import percent_encode

__all__ = ["authorization_header"]

_NAME = re.compile(r"[A-Za-z0-9_]+")
# Printable ASCII minus the characters that would end or split a quoted value for a naive or strict parser:
# '"' ends the quoted-string, '\' starts an escape, ',' separates parameters in many hand-written parsers.
_VALUE = re.compile(r"[\x20-\x7e]*")
_FORBIDDEN_IN_VALUE = frozenset('",\\')


def _check_value(name: str, value: str) -> None:
    if not _VALUE.fullmatch(value) or _FORBIDDEN_IN_VALUE.intersection(value):
        raise OAuthError(f"Authorization header value for {name} must be printable ASCII without '\"', ',' or '\\'")


def authorization_header(oauth_params: Mapping[str, str], signature: str, realm: str) -> str:
    """Return the full ``Authorization`` header value for a signed request.

    Args:
        oauth_params: the signed ``oauth_*`` parameters (and ``diffie_hellman_challenge`` for the LST
            request), without ``oauth_signature`` and ``realm``; sent raw.
        signature: the base64 signature; percent-encoded once here (``+`` → ``%2B``, ``/`` → ``%2F``,
            ``=`` → ``%3D``).
        realm: ``limited_poa`` for real consumers, ``test_realm`` for ``TESTCONS``; always first.

    Raises:
        OAuthError: ``oauth_params`` contains ``oauth_signature`` or ``realm``; a name is not
            ``[A-Za-z0-9_]+``; a value or the realm contains ``"``, ``,``, ``\\``, control or non-ASCII
            characters (rejected rather than emitted as a malformed header); the signature is empty.
    """
    for reserved in ("oauth_signature", "realm"):
        if reserved in oauth_params:
            raise OAuthError(f"{reserved} is set by authorization_header itself, not passed in oauth_params")
    if not signature:
        raise OAuthError("cannot build an Authorization header with an empty signature")
    _check_value("realm", realm)
    for name, value in oauth_params.items():
        if not _NAME.fullmatch(name):
            raise OAuthError("Authorization header parameter names must match [A-Za-z0-9_]+")
        _check_value(name, value)

    params = dict(oauth_params)
    params["oauth_signature"] = percent_encode(signature)
    rendered = [f'realm="{realm}"'] + [f'{name}="{params[name]}"' for name in sorted(params)]
    return "OAuth " + ", ".join(rendered)
