"""WebSocket echo/ticker server for the benchmark (trio-websocket; loopback only; stops on SIGTERM/SIGINT).

Protocol, per connection, text frames (binary frames are echoed unchanged):

- ``c...``   count it, no answer (one-way throughput);
- ``?``      answer ``n=<count of c messages so far>`` (sent after everything before it was read, so it marks the end);
- ``p<N>``   push N messages ``t<seq> <monotonic_ns>`` as fast as the connection takes them (N ≤ 10,000,000);
- anything else is echoed back verbatim, so a timestamp field inside it comes back intact.

Usage: ``python bench/wsecho.py --port P``.
"""

from __future__ import annotations

import argparse
import signal
import time
from functools import partial

import trio
import trio_websocket

MAX_PUSH = 10_000_000
MAX_MESSAGE = 1 << 20


async def _handle(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    count = 0
    while True:
        try:
            message = await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return
        try:
            if isinstance(message, bytes):
                await ws.send_message(message)
            elif message.startswith("c"):
                count += 1
            elif message == "?":
                await ws.send_message(f"n={count}")
            elif message.startswith("p") and message[1:].isdigit():
                for seq in range(min(int(message[1:]), MAX_PUSH)):
                    await ws.send_message(f"t{seq} {time.monotonic_ns()}")
            else:
                await ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            return


async def _serve(port: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                _handle,
                "127.0.0.1",
                port,
                None,
                message_queue_size=64,
                max_message_size=MAX_MESSAGE,
                receive_buffer_size=65536,
                connect_timeout=10,
                disconnect_timeout=5,
            )
        )


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
