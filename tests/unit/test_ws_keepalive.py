"""The relay keep-alive's pure parts: which frames are IBKR's answer to ``tic``, and the config key's bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.parse import parse_config
from gateway.errors import ConfigError
from gateway.proxy.websocket import is_tic_reply

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
