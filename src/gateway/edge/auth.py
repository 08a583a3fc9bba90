"""Client authentication with API keys: where a request may carry its key, and the constant-time check (pure).

A client proves itself with one of:

- ``Authorization: Bearer <key>`` (HTTP clients, bots);
- a ``Sec-WebSocket-Protocol`` entry ``access_key.<key>`` (browsers' WebSockets cannot set headers);
- an ``access_key=<key>`` query parameter (browsers: WebSockets and the status page).

Contract: :meth:`ApiKeys.check` compares against every configured key with :func:`hmac.compare_digest` and no early
exit; none of the helpers returns or logs a key except to the caller. The gateway removes the query parameter (in
any percent-encoded spelling of its name: the dispatcher finds and strips it by the same decoded name, and refuses
a request carrying it twice) and never forwards the client's ``Authorization`` or subprotocols, so a key never
travels upstream.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # gateway.edge.request parses with these helpers; it is imported for the type only
    from gateway.edge.request import QueryParam

SUBPROTOCOL_PREFIX = "access_key."
QUERY_PARAMETER = "access_key"


class ApiKeys:
    """The configured keys; empty means authentication is off."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(key.encode("utf-8") for key in keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} key(s)>)"

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._keys)

    def check(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is one of the keys (constant time per key; every key is compared)."""
        if candidate is None:
            return False
        given = candidate.encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def bearer_key(authorization: Iterable[bytes]) -> str | None:
    """The token of the first ``Bearer <token>`` among a request's ``Authorization`` header values, or ``None``."""
    for value in authorization:
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def subprotocol_key(subprotocols: Iterable[str]) -> tuple[str | None, str | None]:
    """``(key, entry)`` from an ``access_key.<key>`` subprotocol entry; the entry must be echoed on accept."""
    for entry in subprotocols:
        if entry.startswith(SUBPROTOCOL_PREFIX) and len(entry) > len(SUBPROTOCOL_PREFIX):
            return entry[len(SUBPROTOCOL_PREFIX) :], entry
    return None, None


def query_keys(params: Iterable[QueryParam]) -> list[str]:
    """Every ``access_key`` query parameter's value, names compared decoded (``%61ccess_key`` is ``access_key``),
    exactly as :func:`~gateway.proxy.transforms.query_without` strips them."""
    return [param.value for param in params if param.name == QUERY_PARAMETER]
