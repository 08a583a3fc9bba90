"""The upstream response parser: heads table-tested, chunked decoding against any split of any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.upstream.wire import ChunkedDecoder, Head, WireError, parse_head

LIMIT = 64 * 1024


def head(text: bytes, method: bytes = b"GET") -> tuple[Head, int] | None:
    return parse_head(text, request_method=method, max_head_bytes=LIMIT)


def test_a_complete_head_and_where_the_body_starts() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    parsed = parse_head(data, request_method=b"GET", max_head_bytes=LIMIT)
    assert parsed is not None
    result, size = parsed
    assert data[size:] == b"{}"
    assert result.status == 200
    assert result.headers == [(b"content-type", b"application/json"), (b"content-length", b"2")]
    assert (result.framing, result.length, result.keep_alive) == ("length", 2, True)


def test_the_first_head_end_counts_even_when_the_body_holds_the_other_kind() -> None:
    data = b"HTTP/1.1 200 OK\nContent-Length: 8\n\nab\r\n\r\ncd"
    parsed = head(data)
    assert parsed is not None
    assert data[parsed[1] :] == b"ab\r\n\r\ncd"
    crlf = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab\n\ncd"
    parsed = head(crlf)
    assert parsed is not None
    assert crlf[parsed[1] :] == b"ab\n\ncd"


def test_incomplete_head_waits_and_bare_lf_is_tolerated() -> None:
    assert head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n") is None
    parsed = head(b"HTTP/1.1 204 No Content\nX: y\n\n")
    assert parsed is not None
    assert parsed[0].framing == "none"


@pytest.mark.parametrize(
    ("text", "method", "framing", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", "chunked", True),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", "close", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", b"GET", "length", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n", b"GET", "length", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", "none", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b"GET", "none", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"POST", "none", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n", b"GET", "length", True),
    ],
)
def test_framing(text: bytes, method: bytes, framing: str, keep_alive: bool) -> None:
    parsed = head(text, method)
    assert parsed is not None
    assert (parsed[0].framing, parsed[0].keep_alive) == (framing, keep_alive)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"garbage\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "invalid status code"),
        (b"HTTP/1.1 600 Nope\r\n\r\n", "invalid status code"),
        (b"HTTP/1.1 200 OK\r\nSet-Cookie : s=SECRET\r\n\r\n", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n", "obsolete line folding in a header"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00SECRET\r\n\r\n", "illegal header value"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting Content-Length values"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "both Transfer-Encoding"),
    ],
)
def test_refused_heads_name_the_problem_and_never_the_bytes(text: bytes, reason: str) -> None:
    with pytest.raises(WireError) as caught:
        head(text)
    assert str(caught.value).startswith(reason)
    assert "SECRET" not in str(caught.value)


def test_head_size_limit_complete_or_not() -> None:
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * LIMIT + b"\r\n"
    with pytest.raises(WireError, match="too large"):
        head(big)  # incomplete and already over the limit
    with pytest.raises(WireError, match="too large"):
        head(big + b"\r\n")  # complete, but over the limit


def encode_chunked(body: bytes, sizes: list[int], trailer: bytes = b"") -> bytes:
    out = bytearray()
    position = 0
    for size in sizes:
        piece = body[position : position + size]
        position += len(piece)
        if piece:
            out += b"%x;ext=1\r\n%b\r\n" % (len(piece), piece)
    if position < len(body):
        out += b"%X\r\n%b\r\n" % (len(body) - position, body[position:])
    return bytes(out + b"0\r\n" + trailer + b"\r\n")


@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), max_size=12),
    cuts=st.lists(st.integers(1, 400), max_size=40),
    trailer=st.sampled_from([b"", b"X-Trailer: 1\r\n"]),
    after=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]),
)
def test_chunked_decoding_survives_any_split(
    body: bytes, sizes: list[int], cuts: list[int], trailer: bytes, after: bytes
) -> None:
    wire = encode_chunked(body, sizes, trailer) + after
    decoder = ChunkedDecoder(max_trailer_bytes=LIMIT)
    got = bytearray()
    position = 0
    for cut in [*cuts, len(wire)]:
        if decoder.done or position >= len(wire):
            break
        got += b"".join(decoder.feed(wire[position : position + cut]))
        position += cut
    assert decoder.done
    assert bytes(got) == body
    assert decoder.leftover + wire[position:] == after


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"zz\r\n", "invalid chunk size"),
        (b"\r\n", "invalid chunk size"),
        (b"3\r\nabcX\r\n", "chunk data not followed by CRLF"),
        (b"1" * 2000, "chunk framing line too long"),
    ],
)
def test_bad_chunk_framing(wire: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        ChunkedDecoder(max_trailer_bytes=LIMIT).feed(wire)


def test_trailer_section_is_bounded() -> None:
    decoder = ChunkedDecoder(max_trailer_bytes=100)
    decoder.feed(b"0\r\n")
    with pytest.raises(WireError, match="trailer section too large"):
        for _ in range(20):
            decoder.feed(b"X-T: " + b"a" * 20 + b"\r\n")
