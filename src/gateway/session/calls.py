"""The session's own upstream calls: live session token, ssodh/init, tickle, the accounts warm-up and logout.

Contract: each function performs one HTTP exchange with IBKR, checks the answer, and either returns a typed
result or raises a :class:`~gateway.errors.GatewayError` (``UpstreamError`` for transport and status problems,
``OAuthError`` for a token that does not validate). Messages name the endpoint and IBKR's own error text, never
a token, signature, prepend or cookie.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.config.model import Credentials
from gateway.errors import LiveSessionTokenError, OAuthError, UpstreamStatusError
from gateway.oauth.basestring import QueryRule
from gateway.oauth.dh import derive_live_session_token, dh_challenge, dh_shared_secret, validate_live_session_token
from gateway.oauth.signer import OAuthIdentity, RequestSigner, lst_request_authorization
from gateway.redact import Secret
from gateway.session.paths import (
    ISERVER_ACCOUNTS_PATH,
    LOGOUT_PATH,
    LST_PATH,
    PORTFOLIO_ACCOUNTS_PATH,
    SSODH_INIT_PATH,
    TICKLE_PATH,
)
from gateway.upstream.transport import upstream_error


def new_nonce() -> str:
    """A fresh OAuth nonce: 32 random hex digits."""
    return secrets.token_hex(16)


def unix_time() -> int:
    """The OAuth timestamp: Unix time in whole seconds."""
    return int(time.time())


def request_signer(
    identity: OAuthIdentity, live_session_token: Secret[bytes], query_rule: QueryRule = QueryRule.INCLUDE
) -> RequestSigner:
    """A signer for ordinary requests under ``live_session_token``, with a fresh nonce and the current time each."""
    return RequestSigner(identity, live_session_token, query_rule, nonce=new_nonce, clock=unix_time)


@dataclass(frozen=True, slots=True)
class LiveSessionToken:
    """A validated live session token and when IBKR says it expires (epoch milliseconds)."""

    token: Secret[bytes]
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """IBKR's brokerage-session status (from ssodh/init or tickle's ``iserver.authStatus``)."""

    authenticated: bool
    competing: bool
    connected: bool
    message: str


@dataclass(frozen=True, slots=True)
class TickleResult:
    """What a tickle says: the WebSocket session cookie value and the brokerage status.

    ``answer`` is IBKR's whole answer without ``session`` (the cookie value): what the gateway may show a client.
    """

    session: Secret[str]
    status: AuthStatus
    answer: Mapping[str, Any] = field(default_factory=dict)


def _ibkr_error_text(response: httpx.Response) -> str:
    """IBKR's error text from a failed response (``{"error": "..."}``), shortened and printable."""
    text = ""
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            text = body["error"]
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = response.text
    text = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return text[:200] or response.reason_phrase or "no detail"


async def _call(
    client: httpx.AsyncClient, method: str, url: str, path: str, headers: dict[str, str], **kwargs: Any
) -> dict[str, Any]:
    """One exchange; returns the JSON object body of a 200 or raises a gateway error naming ``path``."""
    body = await _call_json(client, method, url, path, headers, **kwargs)
    if not isinstance(body, dict):
        raise UpstreamStatusError(f"{method} {path}: IBKR answered 200 with JSON that is not an object")
    return body


async def _call_json(
    client: httpx.AsyncClient, method: str, url: str, path: str, headers: dict[str, str], **kwargs: Any
) -> object:
    """One exchange; returns the JSON body of a 200 (any JSON value) or raises a gateway error naming ``path``."""
    operation = f"{method} {path}"
    try:
        response = await client.request(method, url, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise upstream_error(exc, operation) from None
    if response.status_code != 200:
        raise UpstreamStatusError(
            f"{operation}: IBKR answered {response.status_code}: {_ibkr_error_text(response)}",
            upstream_status=response.status_code,
        )
    try:
        body: object = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UpstreamStatusError(f"{operation}: IBKR answered 200 with a body that is not JSON") from None
    return body


async def request_live_session_token(
    client: httpx.AsyncClient, *, base_url: str, credentials: Credentials, user_agent: str
) -> LiveSessionToken:
    """``POST /oauth/live_session_token`` with a fresh DH challenge; derive and validate the LST."""
    url = base_url + LST_PATH
    a = secrets.randbits(256) | (1 << 255)  # 256-bit secret exponent, top bit set so it is never tiny
    challenge = dh_challenge(credentials.dh, a)
    authorization = lst_request_authorization(
        credentials.identity,
        url=url,
        prepend_hex=credentials.prepend.reveal(),
        challenge_hex=challenge,
        signature_key=credentials.signature_key,
        nonce=new_nonce(),
        timestamp=unix_time(),
    )
    body = await _call(
        client, "POST", url, LST_PATH, {"Authorization": authorization, "User-Agent": user_agent, "Accept": "*/*"}
    )
    response_hex = body.get("diffie_hellman_response")
    signature = body.get("live_session_token_signature")
    expiration = body.get("live_session_token_expiration")
    if not isinstance(response_hex, str) or not response_hex:
        raise UpstreamStatusError(f"POST {LST_PATH}: diffie_hellman_response missing or empty (IBKR asks to retry)")
    if not isinstance(signature, str) or isinstance(expiration, bool) or not isinstance(expiration, int):
        raise UpstreamStatusError(f"POST {LST_PATH}: answer lacks live_session_token_signature or _expiration")
    shared = dh_shared_secret(credentials.dh, response_hex, a)
    token = derive_live_session_token(shared, credentials.prepend.reveal())
    try:
        validate_live_session_token(token, credentials.identity.consumer_key, signature)
    except OAuthError:
        raise LiveSessionTokenError(
            f"POST {LST_PATH}: the derived live session token does not match IBKR's signature "
            "(wrong encryption key, access-token secret or DH parameters?)"
        ) from None
    return LiveSessionToken(token=Secret(token), expires_at_ms=expiration)


def _auth_status(raw: object, operation: str) -> AuthStatus:
    if not isinstance(raw, dict) or not isinstance(raw.get("authenticated"), bool):
        raise UpstreamStatusError(f"{operation}: answer has no authentication status")
    message = raw.get("message")
    return AuthStatus(
        authenticated=raw["authenticated"],
        competing=bool(raw.get("competing", False)),
        connected=bool(raw.get("connected", False)),
        message=message if isinstance(message, str) else "",
    )


def _signed_headers(signer: RequestSigner, method: str, url: str, user_agent: str) -> dict[str, str]:
    return {"Authorization": signer.authorization(method, url), "User-Agent": user_agent, "Accept": "*/*"}


async def ssodh_init(
    client: httpx.AsyncClient, *, base_url: str, signer: RequestSigner, user_agent: str, compete: bool
) -> AuthStatus:
    """``POST /iserver/auth/ssodh/init`` with ``{"publish": true, "compete": compete}``."""
    url = base_url + SSODH_INIT_PATH
    body = await _call(
        client,
        "POST",
        url,
        SSODH_INIT_PATH,
        _signed_headers(signer, "POST", url, user_agent),
        json={"publish": True, "compete": compete},
    )
    return _auth_status(body, f"POST {SSODH_INIT_PATH}")


async def tickle(client: httpx.AsyncClient, *, base_url: str, signer: RequestSigner, user_agent: str) -> TickleResult:
    """``POST /tickle``: keeps the session alive; returns the WebSocket cookie value and the brokerage status."""
    url = base_url + TICKLE_PATH
    operation = f"POST {TICKLE_PATH}"
    body = await _call(client, "POST", url, TICKLE_PATH, _signed_headers(signer, "POST", url, user_agent))
    session = body.get("session")
    if not isinstance(session, str) or not session:
        raise UpstreamStatusError(f"{operation}: answer has no session value")
    iserver = body.get("iserver")
    status = _auth_status(iserver.get("authStatus") if isinstance(iserver, dict) else None, operation)
    answer = {name: value for name, value in body.items() if name != "session"}
    return TickleResult(session=Secret(session), status=status, answer=answer)


async def logout(client: httpx.AsyncClient, *, base_url: str, signer: RequestSigner, user_agent: str) -> None:
    """``POST /logout``: ends the brokerage session at IBKR."""
    url = base_url + LOGOUT_PATH
    await _call(client, "POST", url, LOGOUT_PATH, _signed_headers(signer, "POST", url, user_agent))


@dataclass(frozen=True, slots=True)
class Accounts:
    """The accounts IBKR lists for the session (account ids are not secrets; no balances are kept).

    ``paper`` is IBKR's ``isPaper`` from ``/iserver/accounts``: ``True`` for a paper-trading login, ``False`` for a
    live one, ``None`` when the answer did not say (absent, or not a boolean).
    """

    iserver: tuple[str, ...]
    selected: str
    portfolio: tuple[str, ...] = ()
    paper: bool | None = None


async def iserver_accounts(
    client: httpx.AsyncClient, *, base_url: str, signer: RequestSigner, user_agent: str
) -> Accounts:
    """``GET /iserver/accounts``: IBKR wants it read in every brokerage session before snapshots and orders."""
    url = base_url + ISERVER_ACCOUNTS_PATH
    body = await _call(client, "GET", url, ISERVER_ACCOUNTS_PATH, _signed_headers(signer, "GET", url, user_agent))
    raw = body.get("accounts")
    if not isinstance(raw, list) or not all(isinstance(account, str) for account in raw):
        raise UpstreamStatusError(f"GET {ISERVER_ACCOUNTS_PATH}: answer has no list of accounts")
    selected = body.get("selectedAccount")
    paper = body.get("isPaper")
    return Accounts(
        iserver=tuple(raw),
        selected=selected if isinstance(selected, str) else "",
        paper=paper if isinstance(paper, bool) else None,
    )


async def portfolio_accounts(
    client: httpx.AsyncClient, *, base_url: str, signer: RequestSigner, user_agent: str
) -> tuple[str, ...]:
    """``GET /portfolio/accounts``: IBKR wants it read before other ``/portfolio`` calls; the account ids."""
    url = base_url + PORTFOLIO_ACCOUNTS_PATH
    headers = _signed_headers(signer, "GET", url, user_agent)
    body = await _call_json(client, "GET", url, PORTFOLIO_ACCOUNTS_PATH, headers)
    if not isinstance(body, list):
        raise UpstreamStatusError(f"GET {PORTFOLIO_ACCOUNTS_PATH}: answer is not a list of accounts")
    ids = (entry.get("id") or entry.get("accountId") for entry in body if isinstance(entry, dict))
    return tuple(account for account in ids if isinstance(account, str))
