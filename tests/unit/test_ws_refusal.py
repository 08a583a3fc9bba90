"""The WebSocket refusals loopback cannot reach (the HTTP parser never hands over such an upgrade, or the server has
no ``websocket.http.response`` extension), driven straight through the dispatcher."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.asgi import Message, Receive, Scope, Send
from gateway.config.model import RouteConfig
from gateway.web.dispatch import Dispatcher, DispatchSettings


async def _never(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("a refused upgrade reached an app")


def _scope(http_version: str, extensions: dict[str, object]) -> Scope:
    return {
        "type": "websocket",
        "scheme": "ws",
        "http_version": http_version,
        "path": "/v1/api/ws",
        "raw_path": b"/v1/api/ws",
        "query_string": b"",
        "client": ("127.0.0.1", 50000),
        "headers": [(b"host", b"127.0.0.1:5000"), (b"origin", b"https://dash.example.com")],
        "subprotocols": [],
        "extensions": extensions,
    }


async def _refuse(scope: Scope) -> list[Message]:
    settings = DispatchSettings(routes=(RouteConfig("/v1/api/ws"),), allowed_origins=frozenset())
    dispatcher = Dispatcher(settings=settings, pages=_never, http_proxy=_never, relay=_never, tickle=_never)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await dispatcher(scope, receive, send)
    return sent


async def test_http2_upgrade_is_505_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.edge")
    start, body = await _refuse(_scope("2", {"websocket.http.response": {}}))
    assert (start["type"], start["status"]) == ("websocket.http.response.start", 505)
    assert dict(start["headers"])[b"x-request-id"]
    assert json.loads(body["body"])["code"] == "http_version_not_supported"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway.edge"]
    assert line.startswith("WebSocket upgrade refused (http_version_not_supported): route=/v1/api/ws client=127.0.0.1")


async def test_without_the_denial_extension_the_upgrade_is_closed_but_still_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.edge")
    assert await _refuse(_scope("2", {})) == [{"type": "websocket.close", "code": 1008}]
    assert any("(http_version_not_supported)" in r.getMessage() for r in caplog.records)
