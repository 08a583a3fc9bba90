"""The relay keep-alive's parts that need no sockets: which frames are IBKR's answer to ``tic``, the config key's
bounds, and the write deadline on a keep-alive (a tiny write cannot be made to stall over loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from gateway.asgi import Message
from gateway.config.parse import parse_config
from gateway.edge.request import Admitted, Request
from gateway.errors import ConfigError
from gateway.proxy.websocket import RelaySettings, WebSocketRelay, _Relay, is_tic_reply
from gateway.session.supervisor import SessionManager

TIC_ANSWER = '{"topic":"tic","alive":true,"id":"0123456789abcdef0123456789abcdef","lastAccessed":1712596911593}'


@pytest.mark.parametrize(
    "payload",
    [TIC_ANSWER, TIC_ANSWER.encode(), '{ "topic" : "tic" }', b'{"alive":true,"topic":"tic"}'],
)
def test_tic_answers_in_text_or_binary_frames_are_recognised(payload: str | bytes) -> None:
    assert is_tic_reply(payload)


@pytest.mark.parametrize(
    "payload",
    [
        "tic",  # a bare text, not IBKR's answer
        "ech+hb",
        '{"topic":"system","hb":1712596911593}',
        '{"topic":"smd+8314","31":"tic"}',  # names "tic" as a value, not as its topic
        '["tic"]',
        '{"topic":"tic"',  # cut short
        b'\xff{"topic":"tic"}',  # not UTF-8
        '{"topic":"tic","pad":"' + "x" * 2000 + '"}',  # far longer than IBKR's answer
        "",
    ],
)
def test_other_frames_are_not_tic_answers(payload: str | bytes) -> None:
    assert not is_tic_reply(payload)


def parse_keepalive(value: object) -> float:
    data = {"simulator": {"enabled": True}, "websocket": {"upstream_keepalive_s": value}, "routes": [{"path": "/a"}]}
    config, _ = parse_config(data, source="t.toml", base_dir=Path("."), env={})
    return config.websocket.upstream_keepalive_s


def test_keepalive_default_and_bounds() -> None:
    config, _ = parse_config(
        {"simulator": {"enabled": True}, "routes": [{"path": "/a"}]}, source="t.toml", base_dir=Path("."), env={}
    )
    assert config.websocket.upstream_keepalive_s == 45.0
    assert parse_keepalive(1) == 1.0
    assert parse_keepalive(59) == 59.0
    for bad in (0.5, 60, "45", True):
        with pytest.raises(ConfigError, match="upstream_keepalive_s"):
            parse_keepalive(bad)


async def _no_receive() -> Message:
    raise AssertionError("not called")


async def _no_send(message: Message) -> None:
    raise AssertionError("not called")


async def test_a_stalled_keepalive_write_ends_the_relay_like_a_stalled_client_write() -> None:
    """A keep-alive write pending for ``upstream_write_timeout_s`` ends the relay with 1011 at the watchdog's next
    look; one pending for less does not."""
    settings = RelaySettings(
        ws_base_url="ws://127.0.0.1:9", access_token="t", user_agent="u", ready_timeout_s=1, upstream_write_timeout_s=2
    )
    relays = WebSocketRelay(manager=cast(SessionManager, None), settings=settings)
    scope = {"type": "websocket", "path": "/v1/api/ws", "headers": [], "client": ("127.0.0.1", 50000)}
    admitted = Admitted(Request.from_scope(scope), "rid", b"", "/v1/api/ws")
    relay = _Relay(scope=scope, admitted=admitted, receive=_no_receive, send=_no_send, path="/v1/api/ws")
    relay.keepalive_since = 10.0
    relays._check_writes(relay, now=11.9)
    assert relay.close_code is None and not relay.cancel_scope.cancel_called
    relays._check_writes(relay, now=12.0)
    assert relay.close_code == 1011 and relay.cancel_scope.cancel_called
