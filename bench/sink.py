"""HTTP upload sink for the benchmark: reads every request body to the end and answers ``{"received": <bytes>}``.

Handles ``Content-Length`` and ``Transfer-Encoding: chunked`` bodies over keep-alive HTTP/1.1, one thread per
connection, on 127.0.0.1 only. nginx A proxies ``/v1/api/bench/upload`` here, so the byte count in the answer
proves the whole body went through every hop. Usage: ``python bench/sink.py --port P``.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

CHUNK = 1 << 20


class _Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Silence the per-request access log."""

    def _discard(self, length: int, buffer: memoryview) -> int:
        left = length
        while left:
            got = self.rfile.readinto(buffer[: min(left, len(buffer))])
            if not got:
                raise ConnectionError(f"body ended after {length - left} of {length} bytes")
            left -= got
        return length

    def _discard_chunked(self, buffer: memoryview) -> int:
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            if not size_line:
                raise ConnectionError("chunked body ended early")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return total
            total += self._discard(size, buffer)
            self.rfile.readline(1024)  # CRLF after the chunk

    def _answer(self) -> None:
        buffer = memoryview(bytearray(CHUNK))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            received = self._discard_chunked(buffer)
        else:
            received = self._discard(int(self.headers.get("Content-Length") or 0), buffer)
        body = json.dumps({"received": received}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = _answer  # noqa: N815 - BaseHTTPRequestHandler's naming
    do_PUT = _answer  # noqa: N815
    do_GET = _answer  # noqa: N815


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="HTTP upload sink for bench/run.py (127.0.0.1 only).")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Sink)
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
