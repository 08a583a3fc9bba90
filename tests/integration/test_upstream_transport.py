"""The upstream transport's one error map: every trio, OS, TLS and httpx failure becomes the right UpstreamError, and
every deadline a timeout — the table itself, then real loopback sockets (a refused port, a peer that resets or
never answers or never reads, TLS against a plain socket or an untrusted certificate) and the session's httpx
client against the same peers."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from gateway.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStale,
    UpstreamTimeout,
)
from gateway.upstream.client import build_client
from gateway.upstream.transport import Timeouts, UpstreamStream, reason, tls_context, upstream_error
from tests.certs import self_signed

CEILING = 5.0
SHORT = 0.2  # the deadline under test
WHERE = "GET /v1/api/x"

Peer = Callable[[trio.SocketStream], Awaitable[None]]


def tls_failure() -> trio.BrokenResourceError:
    """What trio raises when a TLS handshake fails: a bare BrokenResourceError from the ssl.SSLError."""
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError from exc
    except trio.BrokenResourceError as wrapped:
        return wrapped


# --- the table ---------------------------------------------------------------------------------------------

TRIO_CASES: list[tuple[str, BaseException, str, type[UpstreamError], str]] = [
    ("refused", ConnectionRefusedError(111, "Connect call failed"), "connect", UpstreamConnectError, "cannot connect"),
    ("dns", socket.gaierror(-2, "Name or service not known"), "connect", UpstreamConnectError, "Name or service"),
    ("tls-at-connect", ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version"), "connect", UpstreamConnectError,
     "WRONG_VERSION_NUMBER"),
    ("tls-wrapped-by-trio", tls_failure(), "connect", UpstreamConnectError, "CERTIFICATE_VERIFY_FAILED"),
    ("broken-at-connect", trio.BrokenResourceError(), "connect", UpstreamConnectError, "(BrokenResourceError)"),
    ("reset-on-read", ConnectionResetError(104, "Connection reset by peer"), "read", UpstreamClosed,
     "upstream connection failed"),
    ("broken-on-write", trio.BrokenResourceError("socket connection broken: [Errno 32] Broken pipe"), "write",
     UpstreamClosed, "Broken pipe"),
    ("closed-on-read", trio.ClosedResourceError("this socket was already closed"), "read", UpstreamClosed,
     "already closed"),
    ("tls-on-read", ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]"), "read", UpstreamClosed,
     "BAD_RECORD_MAC"),
    ("connect-deadline", trio.TooSlowError(), "connect", UpstreamTimeout, "(connect timeout)"),
    ("read-deadline", trio.TooSlowError(), "read", UpstreamTimeout, "(read timeout)"),
    ("write-deadline", trio.TooSlowError(), "write", UpstreamTimeout, "(write timeout)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("failure", "step", "expected", "text"), [case[1:] for case in TRIO_CASES], ids=[case[0] for case in TRIO_CASES]
)
def test_trio_os_and_tls_failures_map_by_step(
    failure: BaseException, step: str, expected: type[UpstreamError], text: str
) -> None:
    error = upstream_error(failure, WHERE, step)  # type: ignore[arg-type]
    assert type(error) is expected
    assert str(error).startswith(f"{WHERE}: {expected.phrase} (")
    assert text in str(error)
    assert error.status == (504 if expected is UpstreamTimeout else 502)


HTTPX_REQUEST = httpx.Request("POST", "https://api.ibkr.com/v1/api/tickle")
HTTPX_CASES: list[tuple[httpx.HTTPError, type[UpstreamError], str]] = [
    (httpx.ConnectError("[Errno 111] Connection refused"), UpstreamConnectError, "cannot connect to upstream ([Errno"),
    (httpx.ConnectTimeout("timed out"), UpstreamTimeout, "upstream did not answer in time (connect timeout)"),
    (httpx.ReadTimeout("timed out"), UpstreamTimeout, "upstream did not answer in time (read timeout)"),
    (httpx.WriteTimeout("timed out"), UpstreamTimeout, "upstream did not answer in time (write timeout)"),
    (httpx.PoolTimeout("timed out"), UpstreamTimeout, "upstream did not answer in time (pool timeout)"),
    (httpx.ReadError("[Errno 104] Connection reset by peer"), UpstreamClosed,
     "upstream connection failed ([Errno 104]"),
    (httpx.WriteError("[Errno 32] Broken pipe"), UpstreamClosed, "upstream connection failed ([Errno 32]"),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."), UpstreamClosed,
     "upstream connection failed (Server disconnected"),
    (httpx.UnsupportedProtocol("Request URL has an unsupported protocol"), UpstreamError,
     "upstream request failed (UnsupportedProtocol)"),
]  # fmt: skip


@pytest.mark.parametrize(("failure", "expected", "text"), HTTPX_CASES, ids=[type(c[0]).__name__ for c in HTTPX_CASES])
def test_httpx_failures_map_onto_the_same_errors(
    failure: httpx.HTTPError, expected: type[UpstreamError], text: str
) -> None:
    error = upstream_error(failure, "POST /v1/api/tickle")
    assert type(error) is expected
    assert str(error).startswith(f"POST /v1/api/tickle: {text}")


def test_one_family() -> None:
    for kind in (UpstreamConnectError, UpstreamClosed, UpstreamStale, UpstreamProtocolError, UpstreamTimeout):
        assert issubclass(kind, UpstreamError)
    assert issubclass(UpstreamStale, UpstreamClosed)  # a stale keep-alive connection is one that closed
    assert {UpstreamConnectError.code, UpstreamClosed.code, UpstreamProtocolError.code, UpstreamTimeout.code} == {
        "upstream_connect",
        "upstream_closed",
        "upstream_protocol",
        "upstream_timeout",
    }


def test_reason_is_one_short_line() -> None:
    assert reason(OSError("first line\nsecond line")) == "first line"
    assert len(reason(OSError("x" * 1000))) == 200
    assert reason(trio.BrokenResourceError()) == "BrokenResourceError"
    assert reason(tls_failure()).startswith("[SSL: CERTIFICATE_VERIFY_FAILED]")


# --- real sockets ------------------------------------------------------------------------------------------


@asynccontextmanager
async def peer(behave: Peer) -> AsyncIterator[int]:
    """A loopback listener whose every connection is handled by ``behave``; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, behave, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def drain(stream: trio.SocketStream) -> None:
    while await stream.receive_some(65536):
        pass


async def reset_after_a_read(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    stream.socket.close()


async def answer_in_clear(stream: trio.SocketStream) -> None:
    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    await drain(stream)


async def close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def open_stream(port: int, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> UpstreamStream:
    return await UpstreamStream.open(host, port, tls=tls, connect_s=SHORT, read_s=SHORT, write_s=SHORT, where=WHERE)


async def test_a_refused_port_is_a_connect_error() -> None:
    with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError, match="cannot connect to upstream") as caught:
        await open_stream(free_port())
    assert str(caught.value).startswith(f"{WHERE}: ")


async def test_a_peer_that_never_answers_is_a_read_timeout() -> None:
    async with peer(silent) as port:
        stream = await open_stream(port)
        started = trio.current_time()
        with trio.fail_after(CEILING), pytest.raises(UpstreamTimeout, match=r"\(read timeout\)") as caught:
            await stream.receive_some(100, WHERE)
        assert SHORT * 0.9 <= trio.current_time() - started < SHORT + 1.0
        assert caught.value.status == 504
        stream.close()


async def test_a_peer_that_never_reads_is_a_write_timeout() -> None:
    async with peer(silent) as port:
        stream = await open_stream(port)
        with trio.fail_after(CEILING), pytest.raises(UpstreamTimeout, match=r"\(write timeout\)"):
            while True:  # fills both sockets' buffers, then the write waits
                await stream.send_all(b"x" * 1_000_000, WHERE)
        stream.close()


async def test_a_peer_that_resets_mid_read_is_a_closed_connection() -> None:
    async with peer(reset_after_a_read) as port:
        stream = await open_stream(port)
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n", WHERE)
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed, match="upstream connection failed"):
            while await stream.receive_some(100, WHERE):
                pass
        stream.close()


async def test_a_peer_that_closes_is_end_of_stream_not_an_error() -> None:
    async with peer(close_at_once) as port:
        stream = await open_stream(port)
        with trio.fail_after(CEILING):
            assert await stream.receive_some(100, WHERE) == b""  # the protocol on top decides if that was too early
        stream.close()


async def test_writing_to_a_peer_that_reset_is_a_closed_connection() -> None:
    async with peer(reset_after_a_read) as port:
        stream = await open_stream(port)
        await stream.send_all(b"hello", WHERE)
        with trio.fail_after(CEILING), pytest.raises(UpstreamClosed):
            for _ in range(100):
                await stream.send_all(b"x" * 65536, WHERE)
                await trio.sleep(0.01)
        stream.close()


async def test_cancellation_from_outside_is_not_mapped() -> None:
    async with peer(silent) as port:
        stream = await UpstreamStream.open("127.0.0.1", port, tls=None, connect_s=SHORT, where=WHERE)  # no deadlines
        with trio.move_on_after(SHORT) as outside:
            await stream.receive_some(100, WHERE)
        assert outside.cancelled_caught
        stream.close()


@pytest.mark.parametrize(
    ("behave", "expected", "text"),
    [
        (answer_in_clear, UpstreamConnectError, "cannot connect to upstream ([SSL"),
        (close_at_once, UpstreamConnectError, "cannot connect to upstream ("),
        (silent, UpstreamTimeout, "upstream did not answer in time (connect timeout)"),
    ],
    ids=["plain-answer", "closed", "silent"],
)
async def test_tls_handshake_against_a_plain_socket(behave: Peer, expected: type[UpstreamError], text: str) -> None:
    async with peer(behave) as port:
        started = trio.current_time()
        with trio.fail_after(CEILING), pytest.raises(expected) as caught:
            await open_stream(port, tls=tls_context())
        assert trio.current_time() - started < SHORT + 1.0
    assert str(caught.value).startswith(f"{WHERE}: {text}")


async def test_an_untrusted_certificate_is_a_connect_error_that_says_why(tmp_path: Path) -> None:
    """trio reports a failed handshake as a bare BrokenResourceError: the message gives the TLS reason behind it."""
    server_context, _ = self_signed(tmp_path)

    async def tls_server(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        with suppress(trio.BrokenResourceError):
            await tls.do_handshake()

    async with peer(tls_server) as port:
        with trio.fail_after(CEILING), pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await open_stream(port, tls=tls_context())


async def test_a_trusted_tls_connection_reads_and_writes(tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)

    async def echo_once(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.send_all(await tls.receive_some(100))
        await tls.aclose()

    async with peer(echo_once) as port:
        with trio.fail_after(CEILING):
            stream = await open_stream(port, tls=client_context)
            await stream.send_all(b"ping", WHERE)
            assert await stream.receive_some(100, WHERE) == b"ping"
            await stream.aclose(SHORT)


# --- the session's httpx client, mapped the same way -------------------------------------------------------


async def httpx_error(url: str) -> UpstreamError:
    timeouts = Timeouts(connect_s=SHORT, read_s=SHORT, write_s=SHORT, pool_s=SHORT)
    async with build_client(timeouts, tls=tls_context()) as client:
        try:
            await client.post(url)
        except httpx.HTTPError as exc:
            return upstream_error(exc, "POST /v1/api/tickle")
    raise AssertionError("the request succeeded")


async def test_httpx_against_a_refused_port() -> None:
    with trio.fail_after(CEILING):
        error = await httpx_error(f"http://127.0.0.1:{free_port()}/v1/api/tickle")
    assert type(error) is UpstreamConnectError
    assert str(error).startswith("POST /v1/api/tickle: cannot connect to upstream (")


async def test_httpx_against_a_peer_that_never_answers() -> None:
    async with peer(drain) as port:
        with trio.fail_after(CEILING):
            error = await httpx_error(f"http://127.0.0.1:{port}/v1/api/tickle")
    assert type(error) is UpstreamTimeout
    assert str(error) == "POST /v1/api/tickle: upstream did not answer in time (read timeout)"


async def test_httpx_against_a_peer_that_closes_without_answering() -> None:
    async def read_then_close(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.aclose()

    async with peer(read_then_close) as port:
        with trio.fail_after(CEILING):
            error = await httpx_error(f"http://127.0.0.1:{port}/v1/api/tickle")
    assert type(error) is UpstreamClosed
    assert str(error).startswith("POST /v1/api/tickle: upstream connection failed (")
