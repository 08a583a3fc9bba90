"""IBKR-shaped JSON bodies and WebSocket messages (pure builders; values are arguments).

Shapes follow docs/protocol.md §6.2, §7.2-§7.5 and §9 (and the spellings IBKR really uses, e.g. ``collission``).
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.state import ACCOUNT_ID, USER_ID, USERNAME

SERVER_INFO = {"serverName": "SimServer1", "serverVersion": "Build 10.30.1a, simulated"}
MAC = "00:00:5E:00:53:01"


def error_body(reason: str, status: int) -> dict[str, Any]:
    """IBKR's error shape: ``{"error": "<reason>", "statusCode": <status>}``."""
    return {"error": reason, "statusCode": status}


def terse_error(reason: str, incident: int) -> str:
    """IBKR's terse 401 text for one of the simulator's precise rejection reasons.

    IBKR tells a client only which of three things it did not like, behind an ``incident`` id:
    ``id: 39687, error: invalid consumer`` (consumer key unknown or not active), ``… invalid token`` (access
    token unknown) and ``… invalid signature`` (everything else: signature, secret, realm, timestamp, nonce).
    """
    if "consumer" in reason:
        kind = "invalid consumer"
    elif reason in ("missing token", "invalid token"):
        kind = "invalid token"
    else:
        kind = "invalid signature"
    return f"id: {incident}, error: {kind}"


def auth_status(*, authenticated: bool, competing: bool, connected: bool = True) -> dict[str, Any]:
    """BrokerageSessionStatus (§6.2)."""
    return {
        "authenticated": authenticated,
        "competing": competing,
        "connected": connected,
        "established": authenticated,
        "message": "",
        "MAC": MAC,
        "serverInfo": dict(SERVER_INFO),
        "hardware_info": "0f1e2d3c|" + MAC,
    }


def tickle(*, session: str, sso_expires_ms: int, status: dict[str, Any], bridge: bool) -> dict[str, Any]:
    """Successful tickle answer (§6.3); ``hmds`` says ``no bridge`` until the brokerage session exists."""
    return {
        "session": session,
        "ssoExpires": sso_expires_ms,
        "collission": False,
        "userId": USER_ID,
        "hmds": {} if bridge else {"error": "no bridge"},
        "iserver": {"authStatus": status},
    }


def lst_response(*, response_hex: str, signature_hex: str, expires_ms: int) -> dict[str, Any]:
    """The ``/oauth/live_session_token`` answer (§4.2)."""
    return {
        "diffie_hellman_response": response_hex,
        "live_session_token_signature": signature_hex,
        "live_session_token_expiration": expires_ms,
    }


def _is_paper(paper: bool | None) -> dict[str, Any]:
    """IBKR's ``isPaper`` field: a paper (``true``) or live (``false``) account; left out when ``paper`` is None."""
    return {} if paper is None else {"isPaper": paper}


def iserver_accounts(session: str | None, *, paper: bool | None = True) -> dict[str, Any]:
    """``GET /iserver/accounts``."""
    return {
        "accounts": [ACCOUNT_ID],
        "acctProps": {ACCOUNT_ID: {"hasChildAccounts": False, "supportsCashQty": True, "supportsFractions": True}},
        "aliases": {ACCOUNT_ID: ACCOUNT_ID},
        "allowFeatures": {"showGFIS": True, "allowFXConv": True, "allowTypeAhead": True, "snapshotRefreshTimeout": 30},
        "chartPeriods": {"STK": ["*"], "CASH": ["*"]},
        "groups": [],
        "profiles": [],
        "selectedAccount": ACCOUNT_ID,
        "serverInfo": dict(SERVER_INFO),
        "sessionId": session or "",
        "isFT": False,
        **_is_paper(paper),
    }


def portfolio_accounts() -> list[dict[str, Any]]:
    """``GET /portfolio/accounts``."""
    return [
        {
            "id": ACCOUNT_ID,
            "accountId": ACCOUNT_ID,
            "accountVan": ACCOUNT_ID,
            "accountTitle": "Simulated Paper Account",
            "displayName": ACCOUNT_ID,
            "accountAlias": None,
            "accountStatus": 1700000000000,
            "currency": "USD",
            "type": "DEMO",
            "tradingType": "PMRGN",
            "businessType": "IB_PROSERVE",
            "ibEntity": "IBLLC-US",
            "faclient": False,
            "clearingStatus": "O",
            "covestor": False,
            "noClientTrading": False,
            "trackVirtualFXPortfolio": True,
            "parent": {"mmc": [], "accountId": "", "isMParent": False, "isMChild": False, "isMultiplex": False},
            "desc": ACCOUNT_ID,
        }
    ]


def ws_system_hello(*, paper: bool | None = True) -> dict[str, Any]:
    """First WebSocket message after a session is attached (§7)."""
    return {"topic": "system", "success": USERNAME, "isFT": False, **_is_paper(paper)}


def ws_act(session: str, *, paper: bool | None = True) -> dict[str, Any]:
    """The ``act`` (accounts) WebSocket message."""
    body = iserver_accounts(session, paper=paper)
    return {"topic": "act", "args": {k: v for k, v in body.items() if k not in ("groups", "profiles")}}


def ws_sts(status: dict[str, Any]) -> dict[str, Any]:
    """The ``sts`` (session status) WebSocket message."""
    return {"topic": "sts", "args": {**status, "fail": ""}}


def ws_heartbeat(now_ms: int) -> dict[str, Any]:
    """The server heartbeat: ``{"topic":"system","hb":<ms>}``."""
    return {"topic": "system", "hb": now_ms}


def ws_tic(session: str, now_ms: int) -> dict[str, Any]:
    """Answer to ``tic``."""
    return {"topic": "tic", "alive": True, "id": session, "lastAccessed": now_ms}


def ws_unknown_topic(topic: str) -> dict[str, Any]:
    """Answer to an unknown topic (the topic is echoed, truncated)."""
    return {"error": f"Topic unknown: {topic[:64]}", "code": 1}
