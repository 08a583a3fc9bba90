"""Which IBKR endpoints need an accounts read first (pure path predicates; paths are below ``/v1/api``).

IBKR keeps, per brokerage session, whether ``/iserver/accounts`` was read, and refuses market-data snapshots and
order calls until it was. Likewise the per-account ``/portfolio/{acct}/...`` calls want ``/portfolio/accounts``
(or ``/portfolio/subaccounts``) read first.
"""

from __future__ import annotations

import re

ACCOUNTS_FIRST_ERROR = "Please query /accounts first"
PORTFOLIO_FIRST_ERROR = "Please query /portfolio/accounts first"

_ISERVER_NEEDS_ACCOUNTS = re.compile(
    r"/iserver/marketdata/snapshot"
    r"|/iserver/account/orders"  # live orders
    r"|/iserver/account/[^/]+/orders?(/.*)?"  # place, what-if, modify, cancel
    r"|/iserver/reply/.+"  # confirm an order's question
)
# /portfolio/{acct}/... except the listing endpoints themselves and the account-less ones.
_PORTFOLIO_FREE = frozenset({"accounts", "subaccounts", "allocation", "positions"})
_PORTFOLIO_ACCOUNT = re.compile(r"/portfolio/([^/]+)/.+")


def needs_iserver_accounts(path: str) -> bool:
    """True for the endpoints IBKR refuses until ``/iserver/accounts`` was read in this brokerage session."""
    return _ISERVER_NEEDS_ACCOUNTS.fullmatch(path) is not None


def needs_portfolio_accounts(path: str) -> bool:
    """True for ``/portfolio/{acct}/...``: refused until ``/portfolio/accounts`` was read with the current LST."""
    match = _PORTFOLIO_ACCOUNT.fullmatch(path)
    return match is not None and match.group(1) not in _PORTFOLIO_FREE
