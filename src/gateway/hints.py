"""What a failure most likely means and what fixes it: one table from error texts to causes, fixes and config keys.

IBKR's error answers are terse (``invalid consumer``, ``invalid signature``, ``invalid token``) and each has a
handful of real causes a user can act on. Every error the session records, every ``session_not_ready`` answer,
``/health`` and ``python -m gateway doctor`` look up their hint here, so the same failure is explained the same
way everywhere.

Contract: pure (no I/O). :func:`hint_for` takes an error message as the gateway builds it - the operation
(``POST /oauth/live_session_token``), IBKR's status and IBKR's own error text, or a transport failure - and returns
the first matching :class:`Hint` of :data:`HINTS`, or ``None``. Hints name config keys (``ibkr.consumer_key``) and
portal actions, never a value from the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["HINTS", "Hint", "hint_for"]


@dataclass(frozen=True, slots=True)
class Hint:
    """The likely cause of a failure, the fix, and the config keys the fix touches (may be empty)."""

    cause: str
    fix: str
    keys: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """JSON shape: ``{"cause": …, "fix": …, "keys": […]}``."""
        return {"cause": self.cause, "fix": self.fix, "keys": list(self.keys)}


_LST = r"/oauth/live_session_token"
_ANY = r"[\s\S]*"

_NOT_ACTIVE = Hint(
    cause=(
        "IBKR does not accept this consumer key: it is mistyped, registered for another user, or new - a newly "
        "registered consumer key becomes active only after one of IBKR's server restarts (users see it work the "
        "next business day, or after the weekend)"
    ),
    fix=(
        "compare ibkr.consumer_key with the key shown in IBKR's self-service OAuth portal; if you registered it "
        "recently, wait for the next business day (or the weekend restart) and try again"
    ),
    keys=("ibkr.consumer_key",),
)
_REALM = Hint(
    cause="IBKR refused the OAuth realm: real consumer keys use limited_poa; test_realm is only for TESTCONS",
    fix='set ibkr.realm = "limited_poa" (or remove it: that is the default)',
    keys=("ibkr.realm",),
)
_TOKEN = Hint(
    cause=(
        "IBKR does not know this access token for the consumer key: it is mistyped, from another consumer key, "
        "or was replaced by a newer 'Generate Token' in the portal"
    ),
    fix=(
        "copy ibkr.access_token and ibkr.access_token_secret again from the portal's latest generated token "
        "(generating a new token invalidates the old pair)"
    ),
    keys=("ibkr.access_token", "ibkr.access_token_secret"),
)
_RSA_SIGNATURE = Hint(
    cause=(
        "IBKR could not verify the RSA signature of the live session token request: ibkr.signature_key is not the "
        "private key whose public half was uploaded to the portal, or ibkr.access_token_secret belongs to another "
        "token (it is part of what is signed), or the clock is far off"
    ),
    fix=(
        "compare the signature key's fingerprint (python -m gateway doctor prints it) with the public key uploaded "
        "in the portal and upload the right one, or generate a new access token; keep the clock synchronised (NTP)"
    ),
    keys=("ibkr.signature_key", "ibkr.access_token_secret"),
)
_DH = Hint(
    cause=(
        "the Diffie-Hellman exchange failed: ibkr.dh_param is not the DH parameter file registered in the portal "
        "for this consumer key (or the access-token secret does not match the encryption key)"
    ),
    fix=(
        "point ibkr.dh_param at the dhparam.pem uploaded to the portal (compare its fingerprint, python -m gateway "
        "doctor prints it), or upload this one"
    ),
    keys=("ibkr.dh_param", "ibkr.encryption_key", "ibkr.access_token_secret"),
)
_QUERY_RULE = Hint(
    cause=(
        "IBKR refused the signature of a request with a query string: IBKR's servers and clients disagree on "
        "whether (and how) the query is part of the signed text"
    ),
    fix="run python -m gateway doctor: it tries each rule and names the ibkr.query_rule value IBKR accepts",
    keys=("ibkr.query_rule",),
)
_USER_AGENT = Hint(
    cause="IBKR's edge refuses requests without a User-Agent",
    fix="set ibkr.user_agent to a non-empty value",
    keys=("ibkr.user_agent",),
)
_PENALTY = Hint(
    cause="IBKR's pacing limit was exceeded; IBKR then refuses everything from this address for about 10 minutes",
    fix="wait for the penalty to end; lower pacing.global_requests_per_s or the per-endpoint pacing.limits",
    keys=("pacing.global_requests_per_s", "pacing.limits"),
)
_COMPETING = Hint(
    cause=(
        "another brokerage session of the same IBKR user (TWS, Client Portal, the mobile app, or a second gateway) "
        "holds the brokerage session; IBKR allows one per user"
    ),
    fix="log out there, or set ibkr.compete = true to take the session over",
    keys=("ibkr.compete",),
)
_UNREACHABLE = Hint(
    cause="the gateway could not open a connection to IBKR (DNS, firewall, proxy or IBKR down)",
    fix="check that this machine reaches the host and port of ibkr.base_url (outbound HTTPS must be allowed)",
    keys=("ibkr.base_url",),
)
_TLS = Hint(
    cause="the TLS handshake with IBKR failed: the certificate could not be verified (an intercepting proxy?)",
    fix="check the system's CA certificates and any TLS-inspecting proxy between this machine and ibkr.base_url",
    keys=("ibkr.base_url",),
)
_TIMEOUT = Hint(
    cause="IBKR did not answer in time",
    fix="usually transient (IBKR busy or in maintenance); if it persists raise upstream.read_timeout_s",
    keys=("upstream.read_timeout_s", "upstream.connect_timeout_s"),
)
_MAINTENANCE = Hint(
    cause="IBKR answered with a server error: its systems are restarting or in maintenance (nightly and weekends)",
    fix="nothing to change: the gateway retries with back-off",
)
_SECRET_EXPIRED = Hint(
    cause="IBKR has no access-token secret on record for this user (server-side state IBKR sometimes loses)",
    fix="generate a new access token in the portal and set ibkr.access_token and ibkr.access_token_secret",
    keys=("ibkr.access_token", "ibkr.access_token_secret"),
)

#: ``(pattern, hint)`` in order; the first pattern that matches the error text (case-insensitive) wins.
HINTS: tuple[tuple[re.Pattern[str], Hint], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), hint)
    for pattern, hint in (
        (r"no access secret key found", _SECRET_EXPIRED),
        (r"invalid consumer|missing consumer key|unknown consumer", _NOT_ACTIVE),
        (r"invalid realm|missing realm", _REALM),
        (r"invalid token|missing token", _TOKEN),
        (r"diffie_hellman|does not match IBKR's signature", _DH),
        (_LST + _ANY + r"answered 401", _RSA_SIGNATURE),
        (r"answered 401" + _ANY + r"invalid signature", _QUERY_RULE),
        (r"missing user-agent|answered 403" + _ANY + r"user.agent", _USER_AGENT),
        (r"answered 429|penalty box|too many requests", _PENALTY),
        (r"competing|held elsewhere|another session|TWS holds", _COMPETING),
        (r"certificate|\bTLS\b|\bSSL\b", _TLS),
        (r"cannot connect|name resolution|connection refused|unreachable|resolve", _UNREACHABLE),
        (r"did not answer in time|timed out|timeout", _TIMEOUT),
        (r"answered 5\d\d", _MAINTENANCE),
    )
)


def hint_for(message: str) -> Hint | None:
    """The hint for an error ``message`` (see the module docstring), or ``None`` when no rule matches."""
    for pattern, hint in HINTS:
        if pattern.search(message):
            return hint
    return None
