"""WebSocket echo/ticker server for the benchmark (hand-written RFC 6455 on trio; 127.0.0.1; stops on SIGTERM/INT).

Protocol, per connection, text frames (binary frames are echoed unchanged):

- ``c...``   count it, no answer (one-way throughput);
- ``?``      answer ``n=<count of c messages so far>`` (sent after everything before it was read, so it marks the end);
- ``p<N>``   push N messages ``t<seq> <monotonic_ns>`` as fast as the connection takes them (N ≤ 10,000,000);
- ``tic``    answer ``{"topic":"tic","alive":true}`` as IBKR does (the gateway's relay sends ``tic`` up as its
  keep-alive and drops that one answer, so echoing it would put an unasked ``tic`` in front of the client's echoes);
- anything else is echoed back verbatim, so a timestamp field inside it comes back intact.

Answers keep the order of the messages that caused them: what arrives during a push is answered after it. Pings
are answered at once (even mid-push), a close is echoed with its code and ends the connection, fragmented
messages are reassembled, and a message over 1 MiB is refused with close 1009.

It must outrun the proxies it measures, so it does as little Python work per message as it can: it reads 256 KiB
at a time, parses frames in place in one bytearray, recognises ``c`` frames from two bytes without unmasking or
decoding them, and writes many frames per ``send_all``.

Usage: ``python bench/wsecho.py --port P``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hashlib
import signal
import time
from functools import partial

import trio

MAX_PUSH = 10_000_000
MAX_MESSAGE = 1 << 20
RECEIVE_SIZE = 1 << 18  # big reads: a bulk sender's frames are parsed thousands per wake-up
PUSH_BATCH = 512  # pushed frames per send_all: big kernel writes, yet frequent schedule points
MAX_HEAD = 16 << 10
HANDSHAKE_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # bound on flushing a close and waiting for the client's side of the TCP close
QUEUE_LIMIT = 4 << 20  # answers held back behind a push before the reader stops reading (TCP backpressure)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_C = ord("c")
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_FIN_TEXT = 0x80 | _TEXT
_PUSH_HEADS = [bytes((_FIN_TEXT, n)) for n in range(126)]  # a pushed message is always under 126 bytes


class _ProtocolError(Exception):
    """The client broke RFC 6455; ``code`` is the close code to send."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    length = len(payload)
    if length < 126:
        return bytes((0x80 | opcode, length)) + payload
    if length < 1 << 16:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big") + payload


_TIC_ANSWER = _frame(_TEXT, b'{"topic":"tic","alive":true}')


def _close_frame(code: int) -> bytes:
    return _frame(_CLOSE, code.to_bytes(2, "big"))


def _unmask(buf: bytearray, start: int, end: int) -> bytes:
    """The payload ``buf[start:end]``, unmasked with the 4-byte key just before it: one big-integer XOR over the
    whole payload instead of a Python loop per byte."""
    length = end - start
    if not length:
        return b""
    key = bytes(buf[start - 4 : start]) * (length // 4 + 1)
    data = int.from_bytes(buf[start:end], "little") ^ int.from_bytes(key[:length], "little")
    return data.to_bytes(length, "little")


def _accept_key(head: bytes) -> tuple[int, bytes]:
    """Check an HTTP/1.1 WebSocket upgrade request; (101, Sec-WebSocket-Accept) or (an error status, b"")."""
    lines = head.split(b"\r\n")
    request = lines[0].split(b" ")
    if len(request) != 3 or request[0] != b"GET" or request[2] != b"HTTP/1.1":
        return 400, b""
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return 400, b""
        name = name.strip().lower()
        headers[name] = headers[name] + b"," + value.strip() if name in headers else value.strip()

    def tokens(name: bytes) -> set[bytes]:
        return {token.strip().lower() for token in headers.get(name, b"").split(b",")}

    if b"websocket" not in tokens(b"upgrade") or b"upgrade" not in tokens(b"connection"):
        return 400, b""
    if headers.get(b"sec-websocket-version") != b"13":
        return 426, b""
    key = headers.get(b"sec-websocket-key", b"")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return 400, b""
    except binascii.Error:
        return 400, b""
    return 101, base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())


async def _handshake(stream: trio.SocketStream) -> bytearray | None:
    """Answer the upgrade request; the bytes already read past it, or None if the request was refused."""
    buf = bytearray()
    with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                break
            chunk = await stream.receive_some(MAX_HEAD)
            if not chunk:
                return None
            buf += chunk
    head, found, rest = bytes(buf).partition(b"\r\n\r\n")
    if not found:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return None
    status, accept = _accept_key(head)
    if status == 101:
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return bytearray(rest)
    reason = b"Upgrade Required\r\nSec-WebSocket-Version: 13" if status == 426 else b"Bad Request"
    await stream.send_all(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (status, reason))
    return None


class _Connection:
    """One upgraded connection: the reader task parses and answers; a writer task exists only while a push runs.

    Only one task writes at a time (trio forbids concurrent ``send_all``): the reader writes its answers itself
    while no writer runs, otherwise it queues them behind the push so answers keep message order."""

    def __init__(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        self.stream = stream
        self.nursery = nursery
        self.jobs: collections.deque[bytes | int] = collections.deque()  # frames to write, or a push count
        self.queued = 0  # bytes of frames in ``jobs``
        self.urgent = bytearray()  # pongs: written before the next pushed batch, not after the whole push
        self.writing = False  # a writer task runs and owns the stream's send side
        self.drained = trio.Event()  # set when the writer lets a blocked reader go on
        self.close_frame = b""  # set by the reader: the writer sends it instead of what remains, then stops
        self.out: list[bytes] = []  # the reader's answers to the current chunk, written (or queued) once per chunk

    async def read(self, buf: bytearray) -> None:
        """Parse and answer frames until a close, EOF or protocol error (the close is sent, or handed over)."""
        try:
            await self._read(buf)
        except _ProtocolError as error:
            await self._flush(self.out)  # answers to the frames before the bad one still go out first
            await self._close(_close_frame(error.code))

    async def _read(self, buf: bytearray) -> None:
        receive = self.stream.receive_some
        count = 0
        pos = 0
        fragments: list[bytes] = []  # payloads of an unfinished fragmented message
        fragments_size = 0
        fragments_opcode = 0  # 0 when no fragmented message is open
        out = self.out
        while True:
            size = len(buf)
            while size - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                length = b1 & 0x7F
                if length < 126:
                    start = pos + 6
                elif length == 126:
                    if size - pos < 8:
                        break
                    length = (buf[pos + 2] << 8) | buf[pos + 3]
                    start = pos + 8
                else:
                    if size - pos < 14:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    start = pos + 14
                if not b1 & 0x80:
                    raise _ProtocolError(1002)  # client frames must be masked
                if length > MAX_MESSAGE:
                    raise _ProtocolError(1009)  # refused before reading it
                end = start + length
                if end > size:
                    break
                pos = end
                # Hot path: a whole text frame whose first payload byte (unmasked with the key's first byte,
                # just before it) is "c" only bumps the counter: no copy, no unmasking, no decoding.
                if b0 == _FIN_TEXT and length and buf[start] ^ buf[start - 4] == _C and not fragments_opcode:
                    count += 1
                    continue

                if b0 & 0x70:
                    raise _ProtocolError(1002)  # no extension was negotiated, so RSV bits must be clear
                opcode = b0 & 0x0F
                payload = _unmask(buf, start, end)
                if opcode >= _CLOSE:
                    if not b0 & 0x80 or length > 125:
                        raise _ProtocolError(1002)
                    if opcode == _PING:
                        pong = _frame(_PONG, payload)
                        if self.writing:
                            self.urgent += pong
                        else:
                            out.append(pong)
                    elif opcode == _CLOSE:
                        if length == 1:
                            raise _ProtocolError(1002)
                        await self._flush(out)
                        await self._close(_frame(_CLOSE, payload[:2]))  # echo the code (none if it sent none)
                        return
                    elif opcode != _PONG:
                        raise _ProtocolError(1002)
                    continue
                if opcode == _CONT:
                    if not fragments_opcode:
                        raise _ProtocolError(1002)
                    opcode = fragments_opcode
                elif opcode not in (_TEXT, _BINARY) or fragments_opcode:
                    raise _ProtocolError(1002)
                if not b0 & 0x80 or fragments_opcode:
                    fragments_size += length
                    if fragments_size > MAX_MESSAGE:
                        raise _ProtocolError(1009)
                    fragments.append(payload)
                    if not b0 & 0x80:
                        fragments_opcode = opcode
                        continue
                    payload = b"".join(fragments)
                    fragments.clear()
                    fragments_size = fragments_opcode = 0

                if opcode == _BINARY:
                    out.append(_frame(_BINARY, payload))
                elif payload[:1] == b"c":
                    count += 1
                elif payload == b"?":
                    out.append(_frame(_TEXT, b"n=%d" % count))
                elif payload == b"tic":
                    out.append(_TIC_ANSWER)
                elif payload[:1] == b"p" and payload[1:].isdigit():  # bytes.isdigit: ASCII digits only
                    digits = payload[1:].lstrip(b"0")
                    await self._flush(out)
                    self._enqueue(MAX_PUSH if len(digits) > 8 else min(int(digits or b"0"), MAX_PUSH))
                else:
                    try:
                        payload.decode()
                    except UnicodeDecodeError:
                        raise _ProtocolError(1007) from None
                    out.append(_frame(_TEXT, payload))

            await self._flush(out)
            if self.queued > QUEUE_LIMIT:
                # Like a bounded message queue: stop reading until the push behind which these answers wait
                # has gone out, so a client that never reads cannot grow this process without limit.
                self.drained = trio.Event()
                await self.drained.wait()
            # The parsed prefix is dropped once per chunk, not per frame (CPython trims a bytearray's front cheaply).
            del buf[:pos]
            pos = 0
            chunk = await receive(RECEIVE_SIZE)
            if not chunk:
                return
            buf += chunk

    async def _flush(self, out: list[bytes]) -> None:
        if not out:
            return
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        if self.writing:
            self.jobs.append(data)
            self.queued += len(data)
        else:
            await self.stream.send_all(data)

    def _enqueue(self, push: int) -> None:
        self.jobs.append(push)
        self.queued += 64  # a push's own size in the queue, so a flood of them also hits QUEUE_LIMIT
        if not self.writing:
            self.writing = True
            self.nursery.start_soon(self._write)

    async def _close(self, frame: bytes) -> None:
        if self.writing:
            self.close_frame = frame
            # Bound the wait for the writer: it may be blocked on a client that has stopped reading.
            self.nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT_S
        else:
            await self.stream.send_all(frame)

    async def _write(self) -> None:
        """Write queued answers and pushes in order, until none is left or the reader hands over a close."""
        send_all = self.stream.send_all
        try:
            while not self.close_frame:
                # Pending pongs are taken before each await: the reader may add more while a write blocks.
                if self.jobs:
                    job = self.jobs.popleft()
                    if isinstance(job, int):
                        self.queued -= 64
                        await self._push(job)
                    else:
                        self.queued -= len(job)
                        urgent = bytes(self.urgent)
                        self.urgent.clear()
                        await send_all(urgent + job)
                    if self.queued <= QUEUE_LIMIT // 2:
                        self.drained.set()
                elif self.urgent:
                    urgent = bytes(self.urgent)
                    self.urgent.clear()
                    await send_all(urgent)
                else:
                    # Nothing left: ``writing`` turns False (in ``finally``) with no schedule point after this
                    # check, so the reader cannot queue anything that no one would write.
                    return
            urgent = bytes(self.urgent)
            self.urgent.clear()
            await send_all(urgent + self.close_frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.nursery.cancel_scope.cancel()  # the peer is gone: stop the reader too
        finally:
            self.writing = False
            self.drained.set()

    async def _push(self, total: int) -> None:
        send_all = self.stream.send_all
        heads = _PUSH_HEADS
        now = time.monotonic_ns
        seq = 0
        while seq < total and not self.close_frame:
            stop = min(seq + PUSH_BATCH, total)
            parts: list[bytes] = []
            append = parts.append
            # Timestamps are taken as each batch is built, just before it is written.
            for index in range(seq, stop):
                body = b"t%d %d" % (index, now())
                append(heads[len(body)])
                append(body)
            if self.urgent:
                parts.insert(0, bytes(self.urgent))
                self.urgent.clear()
            # send_all is a schedule point, so the reader and other connections run between batches.
            await send_all(b"".join(parts))
            seq = stop


async def _handle(stream: trio.SocketStream) -> None:
    try:
        buf = await _handshake(stream)
        if buf is None:
            return
        async with trio.open_nursery() as nursery:
            await _Connection(stream, nursery).read(buf)
        # Half-close and wait for the client to close its side: closing with unread input would reset the
        # connection, and the client could lose the close frame just sent.
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _serve(port: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        await nursery.start(partial(trio.serve_tcp, _handle, port, host="127.0.0.1", backlog=1024))


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="WebSocket echo/ticker server for bench/run.py (127.0.0.1 only).")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    trio.run(_serve, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
