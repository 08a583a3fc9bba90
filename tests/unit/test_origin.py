"""Browser Origin check: listed origins, the gateway's own origin, and the look-alikes that must fail."""

from __future__ import annotations

import pytest

from gateway.web.dispatch import origin_allowed

# As the config loader stores them: lower-case scheme://host[:port].
ALLOWED = frozenset({"https://dash.example.com", "http://localhost:3000"})
GW = b"gw.example.com"


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "expected"),
    [
        # no Origin: not a browser cross-origin request
        (None, GW, "https", True),
        (None, None, "http", True),
        # listed exactly (case-insensitive, surrounding whitespace ignored)
        (b"https://dash.example.com", GW, "https", True),
        (b"HTTPS://DASH.EXAMPLE.COM", GW, "https", True),
        (b"https://Dash.Example.Com", None, "http", True),
        (b" https://dash.example.com ", GW, "https", True),
        (b"http://localhost:3000", GW, "http", True),
        # look-alikes
        (b"https://dash.example.com.evil.com", GW, "https", False),
        (b"https://evildash.example.com", GW, "https", False),
        (b"https://evil.com/https://dash.example.com", GW, "https", False),
        (b"https://dash.example.com/", GW, "https", False),
        (b"https://dash.example.com@evil.com", GW, "https", False),
        (b"https://sub.dash.example.com", GW, "https", False),
        (b"null", GW, "https", False),
        (b"null", b"null", "http", False),
        (b"", GW, "https", False),
        (b"http://dash.example.com", GW, "https", False),  # scheme swap
        (b"https://dash.example.com:8443", GW, "https", False),  # port mismatch
        (b"https://dash.example.com:443", GW, "https", False),  # compared exactly; browsers omit default ports
        (b"http://localhost:3001", GW, "http", False),
        (b"http://localhost", GW, "http", False),
        (b"https://localhost:3000", GW, "https", False),
        (b"https://evil.com", None, "https", False),
        # the gateway's own origin (scheme://Host)
        (b"https://gw.example.com", GW, "https", True),
        (b"https://gw.example.com", GW, "wss", True),
        (b"http://gw.example.com", GW, "http", True),
        (b"http://gw.example.com", GW, "ws", True),
        (b"HTTPS://GW.EXAMPLE.COM", b"Gw.Example.Com", "https", True),
        (b"http://127.0.0.1:5000", b"127.0.0.1:5000", "http", True),
        (b"http://[::1]:5000", b"[::1]:5000", "ws", True),
        (b"https://gw.example.com", GW, "http", False),  # served over http, Origin says https
        (b"http://gw.example.com", GW, "https", False),
        (b"http://gw.example.com", GW, "wss", False),
        (b"http://127.0.0.1:5001", b"127.0.0.1:5000", "http", False),
        (b"http://127.0.0.1", b"127.0.0.1:5000", "http", False),
        (b"https://gw.example.com.evil.com", GW, "https", False),
        (b"https://gw.example.com", b"gw.example.com.evil.com", "https", False),
    ],
)
def test_origin_allowed(origin: bytes | None, host: bytes | None, scheme: str, expected: bool) -> None:
    assert origin_allowed(origin, host, scheme, ALLOWED) is expected


def test_nothing_is_listed_by_default() -> None:
    assert origin_allowed(b"https://dash.example.com", GW, "https", frozenset()) is False
    assert origin_allowed(b"https://gw.example.com", GW, "https", frozenset()) is True
