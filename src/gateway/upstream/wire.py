"""PURE: the HTTP/1.1 response side of the upstream hop — head parsing and chunked decoding, no I/O.

Why not h11 here: the proxy pays for every microsecond per request, and h11 (state machine, event objects, a fresh
connection object per raw-read response) cost about 100 µs per exchange on the development machine; this parser
does the part the client needs in a fraction of that. It is strict where smuggling hides: one status line
``HTTP/1.0|1.1 NNN reason``; header names are tokens with no space before the colon; no obs-fold; no CR, LF or NUL in
values; ``Transfer-Encoding`` must be exactly ``chunked`` and never comes with ``Content-Length``; several
``Content-Length`` values must agree. Errors are :class:`WireError` with a fixed reason that never quotes the bytes
received (a header line can carry a cookie).

Contract:
- :func:`parse_head` returns ``None`` while the head is incomplete (and raises once the buffered part exceeds
  ``max_head_bytes``), else the :class:`Head` and how many bytes it took. 1xx heads are returned like any other;
  the caller skips them.
- :class:`ChunkedDecoder` takes bytes as they arrive and returns the body's data pieces; once :attr:`done` it has
  consumed the last chunk and the trailer section, and :attr:`leftover` holds any bytes after them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ChunkedDecoder", "Framing", "Head", "WireError", "parse_head"]

Framing = Literal["none", "length", "chunked", "close"]

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_FORBIDDEN_IN_VALUE = (b"\x00", b"\r", b"\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_CHUNK_LINE = 1024


class WireError(Exception):
    """The upstream's bytes are not an HTTP/1.1 response this client accepts; the message is a fixed reason."""


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed response head: status, headers (names lower-case, values stripped), framing of the body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool  # HTTP/1.1 without ``Connection: close``
    framing: Framing
    length: int = 0  # with framing "length"


def parse_head(buffer: bytes | bytearray, *, request_method: bytes, max_head_bytes: int) -> tuple[Head, int] | None:
    """Parse the response head at the start of ``buffer``; see the module contract."""
    end = buffer.find(b"\r\n\r\n")
    size = end + 4
    bare = buffer.find(b"\n\n")  # bare LF line ends are tolerated (RFC 9112 §2.2): whichever head end comes first
    if bare >= 0 and (end < 0 or bare < end):
        end, size = bare, bare + 2
    if end < 0:
        if len(buffer) > max_head_bytes:
            raise WireError("header block too large")
        return None
    if size > max_head_bytes:
        raise WireError("header block too large")
    lines = bytes(buffer[:end]).split(b"\n")
    status_line = lines[0].rstrip(b"\r")
    version, _, rest = status_line.partition(b" ")
    code, _, _ = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise WireError("not an HTTP/1.x status line")
    if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 599:
        raise WireError("invalid status code")
    status = int(code)
    headers: list[tuple[bytes, bytes]] = []
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise WireError("obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name):
            raise WireError("illegal header line")
        value = value.strip(b" \t")
        if any(bad in value for bad in _FORBIDDEN_IN_VALUE):
            raise WireError("illegal header value")
        headers.append((name.lower(), value))
    return _framed(status, headers, version == b"HTTP/1.1", request_method), size


def _framed(status: int, headers: list[tuple[bytes, bytes]], http11: bool, request_method: bytes) -> Head:
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    keep_alive = http11
    for name, value in headers:
        if name == b"content-length":
            lengths.update(part.strip() for part in value.split(b","))
        elif name == b"transfer-encoding":
            codings += [part.strip().lower() for part in value.split(b",")]
        elif name == b"connection" and b"close" in (part.strip().lower() for part in value.split(b",")):
            keep_alive = False
    if codings and lengths:
        raise WireError("both Transfer-Encoding and Content-Length")
    if len(lengths) > 1:
        raise WireError("conflicting Content-Length values")
    length_text = next(iter(lengths), None)
    if length_text is not None and not (length_text.isdigit() and len(length_text) <= 18):
        raise WireError("invalid Content-Length")
    if codings and codings != [b"chunked"]:
        raise WireError("unsupported Transfer-Encoding")
    if status < 200 or status in (204, 304) or request_method == b"HEAD":
        return Head(status, headers, keep_alive, "none")
    if codings:
        return Head(status, headers, keep_alive, "chunked")
    if length_text is not None:
        return Head(status, headers, keep_alive, "length", int(length_text))
    return Head(status, headers, False, "close")  # the body ends when the upstream closes


@dataclass(slots=True)
class ChunkedDecoder:
    """Decodes a chunked body incrementally; see the module contract."""

    max_trailer_bytes: int
    done: bool = False
    leftover: bytes = b""
    _buffer: bytearray = field(default_factory=bytearray)
    _remaining: int = 0  # data bytes left in the current chunk
    _trailer_bytes: int = 0
    _state: Literal["size", "data", "data_end", "trailer"] = "size"

    def feed(self, data: bytes) -> list[bytes]:
        """Data pieces decoded from ``data`` (plus what was buffered); raises :class:`WireError` on bad framing."""
        pieces: list[bytes] = []
        buffer = self._buffer
        if data:
            if self._state == "data" and not buffer and len(data) <= self._remaining:
                self._remaining -= len(data)  # the common case for large chunks: no copy at all
                if not self._remaining:
                    self._state = "data_end"
                return [data]
            buffer += data
        position = 0
        while not self.done:
            if self._state == "data":
                take = min(self._remaining, len(buffer) - position)
                if not take:
                    break
                pieces.append(bytes(buffer[position : position + take]))
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = "data_end"
                continue
            end = buffer.find(b"\n", position)
            if end < 0:
                limit = _MAX_CHUNK_LINE if self._state != "trailer" else self.max_trailer_bytes
                if len(buffer) - position > limit:
                    raise WireError("chunk framing line too long")
                break
            line = bytes(buffer[position:end]).rstrip(b"\r")
            position = end + 1
            if self._state == "data_end":
                if line:
                    raise WireError("chunk data not followed by CRLF")
                self._state = "size"
            elif self._state == "size":
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not size_text or not _HEX.issuperset(size_text) or len(size_text) > 16:
                    raise WireError("invalid chunk size")
                self._remaining = int(size_text, 16)
                self._state = "data" if self._remaining else "trailer"
            elif not line:  # the empty line that ends the trailer section
                self.done = True
                self.leftover = bytes(buffer[position:])
            else:  # a trailer field: not forwarded (the head was sent long ago), only bounded
                self._trailer_bytes += len(line)
                if self._trailer_bytes > self.max_trailer_bytes:
                    raise WireError("trailer section too large")
        del buffer[:position]
        return pieces
