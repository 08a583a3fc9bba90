"""The gateway's one error tree; every error knows the HTTP status it becomes at the edge.

Hierarchy::

    GatewayError                    500  base of everything the gateway raises on purpose
    ├── ConfigError                      bad configuration (carries every problem found, not just the first)
    ├── OAuthError                  502  the OAuth protocol could not be carried out
    │   ├── KeyMaterialError             a PEM, key or DH parameter set is unusable
    │   ├── SecretDecryptError           the access-token secret does not decrypt to an IBKR prepend
    │   └── LiveSessionTokenError        IBKR's live_session_token_signature does not match the derived LST
    ├── UpstreamError               502  IBKR (or the simulator) could not be reached or answered wrongly
    │   ├── UpstreamConnectError    502  no connection: refused, unreachable, DNS, or the TLS handshake failed
    │   ├── UpstreamClosed          502  the connection broke or closed in the middle of an exchange
    │   │   └── UpstreamStale       502  ... a reused idle connection, before any byte of the answer
    │   ├── UpstreamProtocolError   502  the answer is not valid HTTP/1.1 (or not a WebSocket handshake)
    │   ├── UpstreamTimeout         504  no (complete) answer within the configured deadline
    │   └── UpstreamStatusError     502  an unexpected HTTP status or body from a session call
    │       └── WebSocketRejected   502  the upstream refused the WebSocket upgrade with an HTTP status
    ├── PacingRejected              429  outbound pacing would not let the request go in time (carries Retry-After)
    ├── RequestRejected             400  a client's request refused at the edge, never forwarded
    │   ├── UnsupportedHttpVersion  505  not HTTP/1.0 or HTTP/1.1
    │   ├── HeadersTooLarge         431  more header lines or bytes than server.max_header_count / max_header_bytes
    │   ├── BadPath                 400  a path that is not plain and canonical
    │   └── BadQuery                400  a query string the gateway cannot forward exactly as checked
    └── SessionError                503  no usable brokerage session
        └── SessionNotReady         503  no session became ready within ready_timeout_s

Contract: no message of any error here contains secret material (key bytes, the access-token secret, the
prepend, a live session token, a signature or a session cookie). Messages name *what* is wrong and *where*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Self


class GatewayError(Exception):
    """Base of every error the gateway raises deliberately.

    ``status`` is the HTTP status the error becomes when it reaches a client; ``code`` is a short, stable,
    machine-readable identifier used in JSON error bodies and logs.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "gateway_error"


class OAuthError(GatewayError):
    """The OAuth handshake or request signing could not be carried out."""

    status = 502
    code = "oauth_error"


class KeyMaterialError(OAuthError):
    """A PEM file, RSA key or DH parameter set is missing, malformed or of the wrong kind."""

    code = "key_material"


class SecretDecryptError(OAuthError):
    """The access-token secret is not valid base64 or does not decrypt to IBKR's 32-byte prepend.

    With current OpenSSL a PKCS#1 v1.5 decryption under the wrong key returns random bytes instead of failing
    (implicit rejection), so a wrong length is reported as "wrong key or damaged secret".
    """

    code = "secret_decrypt"


class LiveSessionTokenError(OAuthError):
    """The live session token derived locally does not match IBKR's ``live_session_token_signature``."""

    code = "lst_validation"


Severity = Literal["error", "warning"]


MAX_PROBLEM_PART = 200
MAX_PROBLEM_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem found in a configuration: where it is and what is wrong.

    ``source`` is a file path or an environment variable name; ``key`` the dotted key (``ibkr.consumer_key``),
    or ``""`` for a problem with the file as a whole; ``line`` the 1-based line when known.
    """

    source: str
    key: str
    message: str
    severity: Severity = "error"
    line: int | None = None

    def __post_init__(self) -> None:
        # A hostile file can hold a megabyte-long value or key name, and messages quote what they reject: each part
        # of the one line a problem prints is cut to a readable length.
        for name, limit in (("source", MAX_PROBLEM_PART), ("key", MAX_PROBLEM_PART), ("message", MAX_PROBLEM_MESSAGE)):
            text = getattr(self, name)
            if len(text) > limit:
                object.__setattr__(self, name, f"{text[:limit]}… ({len(text) - limit} more characters)")

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            where += f": {self.key}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


class ConfigError(GatewayError):
    """The configuration is unusable. Carries every problem found, each on its own line."""

    code = "config"

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UpstreamError(GatewayError):
    """IBKR (or the simulator) could not be reached or answered in a way the gateway cannot use.

    Messages read ``"<where>: <phrase> (<detail>)"``: ``where`` names the exchange (``"GET /v1/api/tickle"``, a path
    without its query), ``phrase`` is the class's own words and ``detail`` a short reason that quotes nothing of the
    request (:meth:`at` builds them). The one map from trio, OS, TLS and httpx failures to these classes is
    :func:`gateway.upstream.transport.upstream_error`.
    """

    status = 502
    code = "upstream_error"
    phrase: ClassVar[str] = "upstream request failed"

    @classmethod
    def at(cls, where: str, detail: str) -> Self:
        """The error for ``where`` in the class's words, with ``detail`` in parentheses."""
        return cls(f"{where}: {cls.phrase} ({detail})")


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream: refused, unreachable, a name that does not resolve, a failed TLS handshake."""

    code = "upstream_connect"
    phrase = "cannot connect to upstream"


class UpstreamClosed(UpstreamError):
    """The upstream connection broke (reset, closed, a TLS failure) in the middle of an exchange: the answer is
    missing or incomplete."""

    code = "upstream_closed"
    phrase = "upstream connection failed"


class UpstreamStale(UpstreamClosed):
    """A reused keep-alive connection failed before any byte of the answer: the request may be written again on a
    new connection, if it is idempotent and its sender takes a new pacing turn (IBKR may have counted it)."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's bytes are not an answer the gateway accepts: malformed HTTP/1.1 framing, an unasked protocol
    switch, or an answer to a WebSocket upgrade that is neither an acceptance nor a refusal."""

    code = "upstream_protocol"
    phrase = "malformed response from upstream"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer (completely) within the configured deadline; the detail names which one
    (``"connect timeout"``, ``"read timeout"``, ``"write timeout"``, ``"pool timeout"``...)."""

    status = 504
    code = "upstream_timeout"
    phrase = "upstream did not answer in time"


class UpstreamStatusError(UpstreamError):
    """A session call (LST, ssodh/init, tickle, logout) got an unexpected status or body.

    ``upstream_status`` is the HTTP status IBKR answered with (``0`` when the body, not the status, was wrong).
    """

    code = "upstream_status"

    def __init__(self, message: str, *, upstream_status: int = 0) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class WebSocketRejected(UpstreamStatusError):
    """The upstream answered a WebSocket upgrade with an HTTP status instead of accepting it (``upstream_status``).

    The message names the status only: a refusal's headers and body may echo the session cookie.
    """

    @classmethod
    def status_of(cls, where: str, upstream_status: int) -> WebSocketRejected:
        """The refusal of the upgrade at ``where`` with ``upstream_status``."""
        return cls(
            f"{where}: IBKR refused the WebSocket upgrade: HTTP {upstream_status}", upstream_status=upstream_status
        )


class PacingRejected(GatewayError):
    """The outbound pacer would not let a request go upstream within ``pacing.max_wait_s``.

    ``retry_after_s`` (>= 1) is an honest estimate of when the same request could go; ``reason`` names what held
    it: ``"global"`` (the gateway-wide rate), ``"endpoint"`` (an IBKR per-endpoint rate or concurrency cap) or
    ``"breaker"`` (IBKR answered 429 and traffic is held for the cool-down).
    """

    status = 429
    code = "pacing"

    def __init__(self, message: str, *, retry_after_s: float, reason: str = "global") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class RequestRejected(GatewayError):
    """A client's request that the gateway refuses at its edge; nothing of it is forwarded."""

    status = 400
    code = "bad_request"


class UnsupportedHttpVersion(RequestRejected):
    """A request in an HTTP version other than 1.0 and 1.1 (HTTP/2 belongs to a proxy in front). ``version`` is
    the version as the server reported it."""

    status = 505
    code = "http_version_not_supported"

    def __init__(self, version: str) -> None:
        super().__init__(f"HTTP/{version} is not spoken here")
        self.version = version


class HeadersTooLarge(RequestRejected):
    """A header block with more lines or bytes than the configured limits; the message gives both figures."""

    status = 431
    code = "headers_too_large"


class BadPath(RequestRejected):
    """A path that is not plain and canonical (see :func:`gateway.edge.request.path_problem`); the message says
    which rule it breaks."""

    code = "bad_path"


class BadQuery(RequestRejected):
    """A query string that is malformed (percent-escapes, UTF-8, a fragment, bytes a URL cannot hold) or ambiguous
    (more than one ``access_key``). Messages give positions, never the query's text: it may hold an API key."""

    code = "bad_query"


class ListenError(GatewayError):
    """The gateway cannot listen where it is configured to (the port is taken, the address is not this host's).

    ``address`` is ``host:port`` as configured; the message says why, in the operating system's words.
    """

    code = "listen"

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


class SessionError(GatewayError):
    """No usable brokerage session."""

    status = 503
    code = "session_error"


class SessionNotReady(SessionError):
    """No session became ready within ``session.ready_timeout_s``."""

    code = "session_not_ready"
