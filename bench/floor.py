"""The floor: hypercorn, configured exactly as the gateway configures it, serving a no-op ASGI app.

Every figure the gateway reaches is bounded by what its server stack costs on its own. This app answers
``GET /v1/api/bench/small`` with the same ``{"ok":true}`` as nginx A, streams ``GET /v1/api/bench/big?bytes=N``
(N zero bytes with a Content-Length, in 256 KiB pieces), reads ``POST /v1/api/bench/upload`` to its end and
answers ``{"received": <bytes>}`` like bench/sink.py, and speaks bench/wsecho.py's protocol on ``/v1/api/ws``
(``c...`` counted, ``?`` → ``n=<count>``, ``p<N>`` → N pushes, anything else echoed), so the benchmark measures it
with the same loads as the three paths. Usage: ``python bench/floor.py --port P``.
"""

from __future__ import annotations

import argparse
import signal
import time
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import hypercorn.trio
import trio

from gateway.config.model import ServerConfig
from gateway.runtime import _hypercorn_config

SMALL = b'{"ok":true}'
PIECE = bytes(256 * 1024)
Message = dict[str, Any]


async def app(scope: Message, receive: Any, send: Any) -> None:
    """The no-op ASGI app."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await _http(scope, receive, send)
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    count = 0
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif text.startswith("c"):
            count += 1
        elif text == "?":
            await send({"type": "websocket.send", "text": f"n={count}"})
        elif text.startswith("p") and text[1:].isdigit():
            for seq in range(int(text[1:])):
                await send({"type": "websocket.send", "text": f"t{seq} {time.monotonic_ns()}"})
        else:
            await send({"type": "websocket.send", "text": text})


async def _http(scope: Message, receive: Any, send: Any) -> None:
    received = 0
    while True:  # the request body, read to its end (an upload is counted, never kept)
        message = await receive()
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    if scope["path"] == "/v1/api/bench/upload":
        body = b'{"received": %d}' % received
    elif scope["path"] == "/v1/api/bench/big":
        size = int(parse_qs(scope["query_string"].decode()).get("bytes", ["0"])[0])
        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while size > 0:
            piece = PIECE if size >= len(PIECE) else PIECE[:size]
            size -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": size > 0})
        return
    else:
        body = SMALL
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _serve(port: int) -> None:
    config = _hypercorn_config(ServerConfig(), "127.0.0.1", port)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        await nursery.start(partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        await stop.wait()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            stop.set()
            return


def main() -> int:
    """Serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="hypercorn with the gateway's settings and a no-op app (127.0.0.1).")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    trio.run(_serve, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
