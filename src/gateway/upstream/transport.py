"""The upstream byte stream: connect (TCP, then TLS), read and write over trio, each under its deadline, and the one
map from transport failures to the gateway's :class:`~gateway.errors.UpstreamError` family.

The proxy's HTTP/1.1 pool (:mod:`gateway.upstream.http1`) and the WebSocket client
(:mod:`gateway.upstream.wsclient`) both talk to IBKR through :class:`UpstreamStream`; the session's httpx calls
(:mod:`gateway.upstream.client`) are mapped by the same :func:`upstream_error`. Callers therefore catch one family.

Contract:
- :meth:`UpstreamStream.open` connects to ``host:port`` and, with a TLS context, completes the TLS handshake (the
  certificate is checked here, not at the first write), all within ``connect_s``. :meth:`~UpstreamStream.receive_some`
  and :meth:`~UpstreamStream.send_all` each run under the stream's read or write deadline (``math.inf``: none; the
  caller bounds the operation itself, e.g. a WebSocket relay that waits for IBKR's next message indefinitely).
- Every failure leaves as an :class:`~gateway.errors.UpstreamError` built by :func:`upstream_error`, ``from None``
  (the one map, as a table):

  - a deadline passed (the operation's own, or ``trio.TooSlowError``) → ``UpstreamTimeout``, ``"<step> timeout"``;
  - ``OSError`` (refused, reset, unreachable, DNS, ``ssl.SSLError``), trio's ``BrokenResourceError`` or
    ``ClosedResourceError`` → ``UpstreamConnectError`` while connecting, ``UpstreamClosed`` while reading or writing;
  - httpx's errors, whose type names the step: ``ConnectError`` → ``UpstreamConnectError``; ``ReadError``,
    ``WriteError`` and ``RemoteProtocolError`` (httpx's word for a peer that closed without answering, too) →
    ``UpstreamClosed``; its timeouts → ``UpstreamTimeout``; any other (a local misuse) → ``UpstreamError``.

  ``UpstreamProtocolError`` (a malformed answer) is the protocols' verdict: http1 and wsclient raise it.
  The detail is :func:`reason`: the error's first line (or its cause's, as trio wraps TLS and socket failures in a
  bare ``BrokenResourceError``), which quotes nothing that was sent. End of stream is not an error here:
  :meth:`~UpstreamStream.receive_some` returns ``b""`` and the protocol on top decides whether that was too early.
- Cancellation from outside is never mapped: it propagates as ``trio.Cancelled``.
"""

from __future__ import annotations

import contextlib
import math
import ssl
from dataclasses import dataclass
from typing import Literal

import httpx
import trio

from gateway.errors import UpstreamClosed, UpstreamConnectError, UpstreamError, UpstreamTimeout

__all__ = ["TRANSPORT_FAILURES", "Step", "Timeouts", "UpstreamStream", "reason", "tls_context", "upstream_error"]

Step = Literal["connect", "read", "write"]

TRANSPORT_FAILURES = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, httpx.HTTPError)
"""What :func:`upstream_error` maps (``ssl.SSLError`` is an ``OSError``); anything else is a bug and propagates."""

MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Upstream deadlines in seconds; the defaults are the configuration's (``upstream.*_timeout_s``): connect 5 s,
    read and write 15 s each, and 2 s to wait for a free pooled connection."""

    connect_s: float = 5.0
    read_s: float = 15.0
    write_s: float = 15.0
    pool_s: float = 2.0


def tls_context() -> ssl.SSLContext:
    """The verified TLS context every upstream connection uses (TLS >= 1.2, the system's trust store)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def reason(exc: BaseException) -> str:
    """A short reason for a transport failure: the first line of its text, or of the first cause that has one (trio
    raises a bare ``BrokenResourceError`` from the ``ssl.SSLError`` or ``OSError`` behind it), else the type's name;
    at most :data:`MAX_REASON` characters. Socket, TLS, framing and httpx errors quote nothing of the request."""
    cause: BaseException | None = exc
    while cause is not None:
        text = str(cause).strip()
        if text:
            return text.splitlines()[0][:MAX_REASON]
        cause = cause.__cause__
    return type(exc).__name__


# httpx names the step in its exception's type; these are checked in order (the timeouts are also HTTPErrors).
_HTTPX_STEPS: tuple[tuple[type[httpx.HTTPError], Step | Literal["pool"]], ...] = (
    (httpx.PoolTimeout, "pool"),
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.ConnectError, "connect"),
    (httpx.ReadError, "read"),
    (httpx.WriteError, "write"),
    (httpx.RemoteProtocolError, "read"),  # httpx's word for "closed without answering" as well as bad framing
)


def upstream_error(exc: BaseException, where: str, step: Step | None = None) -> UpstreamError:
    """The one map (see the module contract): the gateway's error for ``exc``, raised during ``step`` of the
    exchange named ``where``. ``step`` may be omitted for an httpx error, whose type names its step. Raise the
    result ``from None``."""
    if isinstance(exc, httpx.HTTPError):
        httpx_step = next((s for kind, s in _HTTPX_STEPS if isinstance(exc, kind)), None)
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeout.at(where, f"{httpx_step or 'upstream'} timeout")
        if httpx_step is None:  # a local misuse (bad URL, unsupported protocol...): no transport step failed
            return UpstreamError.at(where, type(exc).__name__)
        return (UpstreamConnectError if httpx_step == "connect" else UpstreamClosed).at(where, reason(exc))
    if isinstance(exc, trio.TooSlowError):
        return UpstreamTimeout.at(where, f"{step or 'upstream'} timeout")
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return (UpstreamConnectError if step == "connect" else UpstreamClosed).at(where, reason(exc))
    return UpstreamError.at(where, type(exc).__name__)


class UpstreamStream:
    """One open upstream connection: a trio stream (TCP, or TLS over TCP) with a read and a write deadline.

    Not safe for two concurrent writers or two concurrent readers (trio's rule); one of each is fine.
    """

    __slots__ = ("_socket", "read_s", "stream", "write_s")

    def __init__(self, stream: trio.abc.Stream, *, read_s: float, write_s: float) -> None:
        self.stream = stream
        self.read_s = read_s
        self.write_s = write_s
        transport = stream
        while isinstance(transport, trio.SSLStream):
            transport = transport.transport_stream
        assert isinstance(transport, trio.SocketStream)
        self._socket = transport.socket

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_s: float,
        read_s: float = math.inf,
        write_s: float = math.inf,
        where: str,
    ) -> UpstreamStream:
        """Connect (and with ``tls``, complete the handshake, checking ``host``'s certificate) within
        ``connect_s``; raises :class:`~gateway.errors.UpstreamConnectError` or ``UpstreamTimeout``."""
        with trio.CancelScope(deadline=trio.current_time() + connect_s):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                if tls is not None:
                    tls_stream = trio.SSLStream(stream, tls, server_hostname=host, https_compatible=True)
                    try:
                        await tls_stream.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tls_stream)
                        raise
                    stream = tls_stream
            except TRANSPORT_FAILURES as exc:
                raise upstream_error(exc, where, "connect") from None
            return cls(stream, read_s=read_s, write_s=write_s)
        raise upstream_error(trio.TooSlowError(), where, "connect")  # only the deadline gets here

    async def receive_some(self, size: int, where: str) -> bytes:
        """At most ``size`` bytes, ``b""`` at end of stream; within the read deadline."""
        try:
            if self.read_s == math.inf:
                return bytes(await self.stream.receive_some(size))
            with trio.CancelScope(deadline=trio.current_time() + self.read_s):
                return bytes(await self.stream.receive_some(size))
        except TRANSPORT_FAILURES as exc:
            raise upstream_error(exc, where, "read") from None
        raise upstream_error(trio.TooSlowError(), where, "read")  # only the deadline gets here

    async def send_all(self, data: bytes, where: str) -> None:
        """Write all of ``data`` within the write deadline. After a failure (or a cancellation) part of ``data`` may
        have been written: the stream's framing is then unknown, and the caller writes nothing more."""
        try:
            if self.write_s == math.inf:
                await self.stream.send_all(data)
                return
            # A bare CancelScope, not fail_after: this runs once per body chunk or message batch, and the
            # generator-based context manager cost more than the deadline itself.
            with trio.CancelScope(deadline=trio.current_time() + self.write_s):
                await self.stream.send_all(data)
                return
        except TRANSPORT_FAILURES as exc:
            raise upstream_error(exc, where, "write") from None
        raise upstream_error(trio.TooSlowError(), where, "write")  # only the deadline gets here

    def holds_unread_bytes(self) -> bool:
        """Whether anything arrived that no one asked for: in the socket, or already inside the TLS layer (an idle
        connection that the server closed is readable too: its EOF).

        trio's SSLStream has no public "pending" view, and an upstream that writes bytes after a complete response
        in a later TLS record leaves them in its buffers, invisible to the socket check. Reusing such a connection
        would hand those bytes to the next request as its answer, so the check looks inside (trio is pinned; a
        test covers this path).
        """
        stream = self.stream
        while isinstance(stream, trio.SSLStream):
            if stream._ssl_object.pending() or stream._incoming.pending:  # private: see the docstring
                return True
            stream = stream.transport_stream
        return self._socket.is_readable()

    def close(self) -> None:
        """Close at once, without awaiting (safe in cancelled and cleanup paths; no TLS close_notify)."""
        self._socket.close()

    async def aclose(self, timeout_s: float) -> None:
        """Close politely (TLS close_notify) within ``timeout_s``, shielded from cancellation; the socket is closed
        in any case. Never raises a transport failure."""
        with trio.move_on_after(timeout_s) as closing:
            closing.shield = True
            with contextlib.suppress(*TRANSPORT_FAILURES):
                await self.stream.aclose()
        self._socket.close()
