"""The simulated IBKR server's session state: live session token, brokerage session, nonces (no I/O, no clock).

Times are passed in by the caller (epoch milliseconds for IBKR-visible values, seconds for nonce bookkeeping).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from gateway.simulator.verify import Rejection

USERNAME = "simuser1"
USER_ID = 10123456
ACCOUNT_ID = "DU1234567"


class NonceCache:
    """Nonces seen in accepted requests, remembered long enough to cover the timestamp window.

    Keyed by nonce alone (stricter than RFC 5849's per-timestamp uniqueness). Bounded: the oldest entries are
    evicted beyond ``max_entries``.
    """

    def __init__(self, keep_s: float, max_entries: int = 200_000) -> None:
        self._keep_s = keep_s
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def prune(self, now_s: float) -> None:
        """Forget nonces remembered more than ``keep_s`` ago."""
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if now_s - seen_at <= self._keep_s and len(self._seen) <= self._max:
                break
            del self._seen[nonce]

    def remember(self, nonce: str, now_s: float) -> None:
        """Record ``nonce`` as used at ``now_s``."""
        self._seen[nonce] = now_s
        self._seen.move_to_end(nonce)
        self.prune(now_s)

    def clear(self) -> None:
        """Forget every nonce."""
        self._seen.clear()


@dataclass
class SessionState:
    """Mutable server-side session state for the single simulated consumer/user.

    * ``lst``: the current raw live session token (a new one replaces the old; the old is kept only to give a
      better rejection reason), with its expiration in epoch ms.
    * ``bridge``: True once ``ssodh/init`` opened the brokerage session; ``/iserver/*`` needs it.
    * ``session_id``: the tickle ``session`` value (32 hex), stable until logout.
    * ``held_elsewhere``: another platform (TWS, mobile) holds this user's brokerage session; only an
      ``ssodh/init`` with ``compete`` takes it back.
    * ``accounts_read`` / ``snapshot_seen``: per brokerage session - whether ``/iserver/accounts`` was read and
      which conids had their first snapshot; both are forgotten whenever the brokerage session opens or ends.
    * ``portfolio_read_lst``: the LST number (``lst_issued``) with which ``/portfolio/accounts`` was last read.
    """

    lst: bytes | None = None
    lst_expires_ms: int = 0
    previous_lst: bytes | None = None
    bridge: bool = False
    session_id: str | None = None
    lst_issued: int = 0
    inits: int = 0
    held_elsewhere: bool = False
    accounts_read: bool = False
    snapshot_seen: set[int] = field(default_factory=set)
    portfolio_read_lst: int | None = None

    def issue_lst(self, lst: bytes, expires_ms: int) -> None:
        """Install a freshly derived LST; the previous one stops being valid at once."""
        self.previous_lst = self.lst
        self.lst = lst
        self.lst_expires_ms = expires_ms
        self.lst_issued += 1

    def expire_lst(self, now_ms: int) -> None:
        """Make the current LST expired as of ``now_ms`` (no-op without one)."""
        if self.lst is not None:
            self.lst_expires_ms = min(self.lst_expires_ms, now_ms - 1)

    def lst_rejection(self, now_ms: int) -> Rejection | None:
        """Why the current LST cannot be used at ``now_ms``, or None if it can."""
        if self.lst is None:
            return Rejection("no live session token")
        if now_ms >= self.lst_expires_ms:
            return Rejection("live session token expired")
        return None

    def ensure_session(self, new_id: str) -> str:
        """The current session id, adopting ``new_id`` when there is none yet."""
        if self.session_id is None:
            self.session_id = new_id
        return self.session_id

    def open_bridge(self, new_id: str, *, compete: bool = True) -> str | None:
        """``ssodh/init``: open (or re-open) the brokerage session and return its session id; None (nothing
        changes) when another platform holds it and ``compete`` is false."""
        if self.held_elsewhere and not compete:
            return None
        self.held_elsewhere = False
        self._forget_brokerage()
        self.bridge = True
        self.inits += 1
        return self.ensure_session(new_id)

    def end_bridge(self) -> None:
        """The brokerage session ends (nightly reset, taken elsewhere); the LST and read-only session stay."""
        self.bridge = False
        self._forget_brokerage()

    def take_elsewhere(self) -> None:
        """Another platform logs in as this user and takes the brokerage session."""
        self.held_elsewhere = True
        self.end_bridge()

    def logout(self) -> None:
        """``/logout``: end the brokerage session (bridge closed, session id dropped)."""
        self.end_bridge()
        self.session_id = None

    def read_portfolio_accounts(self) -> None:
        """``/portfolio/accounts`` (or ``subaccounts``) was read with the current LST."""
        self.portfolio_read_lst = self.lst_issued

    @property
    def portfolio_accounts_read(self) -> bool:
        """True when ``/portfolio/accounts`` was read with the current LST."""
        return self.lst is not None and self.portfolio_read_lst == self.lst_issued

    def first_snapshot(self, conid: int) -> bool:
        """True (once per brokerage session) for a conid's first snapshot, which IBKR answers without prices."""
        if conid in self.snapshot_seen:
            return False
        self.snapshot_seen.add(conid)
        return True

    def _forget_brokerage(self) -> None:
        self.accounts_read = False
        self.snapshot_seen.clear()
