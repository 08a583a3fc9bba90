"""Pacing rules: which rule governs a request, IBKR's documented table, and settings validation."""

from __future__ import annotations

import math

import pytest

from gateway.pacing.model import (
    API,
    IBKR_DEFAULT_LIMITS,
    Limit,
    PacingSettings,
    limit_problems,
    match_limit,
    normalise_path,
    settings_problems,
)

EXACT_GET = Limit("GET", "/v1/api/a/b", 1, 1)
EXACT_ANY = Limit(None, "/v1/api/a/b", 2, 1)
PREFIX_SHORT = Limit(None, "/v1/api/*", 3, 1)
PREFIX_LONG = Limit(None, "/v1/api/a/*", 4, 1)
PREFIX_LONG_POST = Limit("POST", "/v1/api/a/*", 5, 1)
RULES = (PREFIX_SHORT, EXACT_ANY, PREFIX_LONG_POST, EXACT_GET, PREFIX_LONG)


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v1/api/a/b", EXACT_GET),  # exact + method beats exact + any
        ("get", "/v1/api/a/b", EXACT_GET),  # methods compare upper-cased
        ("POST", "/v1/api/a/b", EXACT_ANY),  # exact (any method) beats a method-specific prefix
        ("DELETE", "/v1/api/a/b", EXACT_ANY),
        ("GET", "/v1/api/a/b/c", PREFIX_LONG),  # longer prefix beats shorter
        ("POST", "/v1/api/a/b/c", PREFIX_LONG_POST),  # same prefix: method-specific wins
        ("POST", "/v1/api/a", PREFIX_LONG_POST),  # a prefix covers its own base path
        ("GET", "/v1/api/ab", PREFIX_SHORT),  # ... but only at a segment boundary
        ("GET", "/v1/api/x", PREFIX_SHORT),
        ("GET", "/v1/api", PREFIX_SHORT),
        ("GET", "/v1/apix", None),
        ("GET", "/other", None),
        ("GET", "/v1/api/a/b/", EXACT_GET),  # a trailing slash does not dodge the exact rule
        ("GET", "/v1/api/a/b?x=1", EXACT_GET),  # nor does a query
        ("GET", "/v1/api/a/b#frag", EXACT_GET),
    ],
)
def test_match_limit_most_specific_wins(method: str, path: str, expected: Limit | None) -> None:
    assert match_limit(RULES, method, path) is expected
    assert match_limit(tuple(reversed(RULES)), method, path) is expected  # order does not matter


def test_equally_specific_rules_first_listed_wins() -> None:
    first, second = Limit("GET", "/x", 1, 1), Limit("GET", "/x", 2, 1)
    assert match_limit((first, second), "GET", "/x") is first


def test_no_rules_no_match() -> None:
    assert match_limit((), "GET", "/v1/api/anything") is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/a/b/", "/a/b"), ("/a//", "/a"), ("/", "/"), ("/a?b=/c/", "/a"), ("/a/#x", "/a"), ("", "")],
)
def test_normalise_path(path: str, expected: str) -> None:
    assert normalise_path(path) == expected


# docs/protocol.md §10.5, written out independently: (method, path under /v1/api, requests, per_s, max_concurrent).
IBKR_TABLE = [
    ("GET", "/iserver/marketdata/snapshot", 10, 1, None),
    ("GET", "/iserver/scanner/params", 1, 900, None),
    ("POST", "/iserver/scanner/run", 1, 1, None),
    ("GET", "/iserver/trades", 1, 5, None),
    ("GET", "/iserver/account/orders", 1, 5, None),
    ("GET", "/iserver/orders", 1, 5, None),
    ("GET", "/iserver/account/pnl/partitioned", 1, 5, None),
    ("GET", "/portfolio/accounts", 1, 5, None),
    ("GET", "/portfolio/subaccounts", 1, 5, None),
    ("POST", "/pa/performance", 1, 900, None),
    ("POST", "/pa/summary", 1, 900, None),
    ("POST", "/pa/transactions", 1, 900, None),
    ("GET", "/fyi/unreadnumber", 1, 1, None),
    ("PUT", "/fyi/settings/M8", 1, 1, None),
    ("GET", "/tickle", 1, 1, None),
    ("POST", "/tickle", 1, 1, None),
    ("GET", "/sso/validate", 1, 60, None),
    ("GET", "/iserver/marketdata/history", 0, None, 5),
]


@pytest.mark.parametrize(("method", "path", "requests", "per_s", "concurrent"), IBKR_TABLE)
def test_ibkr_defaults_cover_every_documented_row(
    method: str, path: str, requests: float, per_s: float | None, concurrent: int | None
) -> None:
    limit = match_limit(IBKR_DEFAULT_LIMITS, method, API + path)
    assert limit is not None
    assert limit.requests == requests
    if per_s is not None:
        assert limit.per_s == per_s
    assert limit.max_concurrent == concurrent
    assert limit.has_rate == (requests > 0)


def test_ibkr_defaults_leave_other_paths_and_methods_to_the_global_limit() -> None:
    assert match_limit(IBKR_DEFAULT_LIMITS, "GET", API + "/iserver/accounts") is None
    assert match_limit(IBKR_DEFAULT_LIMITS, "POST", API + "/iserver/marketdata/snapshot") is None
    assert match_limit(IBKR_DEFAULT_LIMITS, "GET", API + "/iserver/marketdata/snapshots") is None


def test_tickle_methods_share_one_budget_and_fyi_is_one_budget() -> None:
    get = match_limit(IBKR_DEFAULT_LIMITS, "GET", API + "/tickle")
    post = match_limit(IBKR_DEFAULT_LIMITS, "POST", API + "/tickle")
    assert get is post
    assert match_limit(IBKR_DEFAULT_LIMITS, "GET", API + "/fyi/a") is match_limit(
        IBKR_DEFAULT_LIMITS, "POST", API + "/fyi/b/c"
    )


def test_defaults_are_valid_and_the_documented_ones() -> None:
    default = PacingSettings()
    assert settings_problems(default) == []
    assert default.limits == IBKR_DEFAULT_LIMITS
    assert (default.global_requests_per_s, default.global_burst, default.max_wait_s) == (10.0, 10, 5.0)
    assert (default.breaker_cooldown_s, default.breaker_max_cooldown_s) == (60.0, 900.0)
    assert default.global_windows() == ((10, 1.0),)


@pytest.mark.parametrize(
    ("limit", "window"),
    [
        (Limit(None, "/x", 10, 1), (10, 1.0)),
        (Limit(None, "/x", 1, 900), (1, 900.0)),
        (Limit(None, "/x", 0.5, 1), (1, 2.0)),  # below one per window: one per longer window
        (Limit(None, "/x", 2.5, 1), (2, 1.0)),  # fractional: never more than 2.5 in a window
        (Limit(None, "/x", 0, 0, 5), None),
    ],
)
def test_limit_window(limit: Limit, window: tuple[int, float] | None) -> None:
    got = limit.window()
    if window is None:
        assert got is None
    else:
        assert got is not None
        assert got[0] == window[0] and math.isclose(got[1], window[1])
        assert got[0] / got[1] <= limit.requests / limit.per_s * (1 + 1e-12)


@pytest.mark.parametrize(
    ("rate", "burst", "windows"),
    [
        (10.0, 10, ((10, 1.0),)),
        (50.0, 50, ((50, 1.0),)),
        (10.0, 50, ((10, 1.0),)),  # a burst above the rate cannot lift the per-second cap
        (10.0, 1, ((10, 1.0), (1, 0.1))),  # burst 1: evenly spaced
        (10.0, 3, ((10, 1.0), (3, 0.3))),
        (10.5, 10, ((10, 1.0),)),
        (0.5, 1, ((1, 2.0),)),
        (0.5, 2, ((1, 2.0),)),
    ],
)
def test_global_windows(rate: float, burst: int, windows: tuple[tuple[int, float], ...]) -> None:
    got = PacingSettings(global_requests_per_s=rate, global_burst=burst).global_windows()
    assert [n for n, _ in got] == [n for n, _ in windows]
    assert all(math.isclose(a, b) for (_, a), (_, b) in zip(got, windows, strict=True))


def test_limit_labels() -> None:
    assert Limit("GET", "/v1/api/iserver/trades", 1, 5).rule == "GET /v1/api/iserver/trades"
    assert Limit(None, "/v1/api/fyi/*", 1, 1).rule == "* /v1/api/fyi/*"
    assert Limit("GET", "/x", 1, 5).describe() == "1 request per 5 s"
    assert Limit("GET", "/x", 10, 1, 3).describe() == "10 requests per 1 s, 3 concurrent"
    assert Limit("GET", "/x", 0, 0, 5).describe() == "5 concurrent"
    assert Limit("GET", "/x", 0, 0).describe() == "no limit"


@pytest.mark.parametrize(
    ("limit", "fields"),
    [
        (Limit("get", "/x", 1, 1), ["method"]),
        (Limit("GET", "x", 1, 1), ["path"]),
        (Limit("GET", "/x/*/y", 1, 1), ["path"]),
        (Limit("GET", "/x?y", 1, 1), ["path"]),
        (Limit("GET", "/x/", 1, 1), ["path"]),
        (Limit("GET", "/x", -1, 1), ["requests"]),
        (Limit("GET", "/x", math.nan, 1), ["requests"]),
        (Limit("GET", "/x", math.inf, 1), ["requests"]),
        (Limit("GET", "/x", 1, 0), ["per_s"]),
        (Limit("GET", "/x", 1, math.inf), ["per_s"]),
        (Limit("GET", "/x", 1, 1, 0), ["max_concurrent"]),
        (Limit("get", "x", -1, 1, 0), ["method", "path", "requests", "max_concurrent"]),
        (Limit(None, "/*", 1, 1), []),
        (Limit(None, "/x", 0, 0, 1), []),
    ],
)
def test_limit_problems(limit: Limit, fields: list[str]) -> None:
    assert [key for key, _ in limit_problems(limit)] == fields


def test_settings_problems_reports_everything_at_once() -> None:
    bad = PacingSettings(
        global_requests_per_s=0,
        global_burst=0,
        max_wait_s=-1,
        breaker_cooldown_s=100,
        breaker_max_cooldown_s=10,
        limits=(Limit("GET", "/ok", 1, 1), Limit("GET", "/bad", 1, -5)),
    )
    assert [key for key, _ in settings_problems(bad)] == [
        "global_requests_per_s",
        "global_burst",
        "max_wait_s",
        "breaker_max_cooldown_s",
        "limits[1].per_s",
    ]
    assert [key for key, _ in settings_problems(PacingSettings(breaker_cooldown_s=math.nan))] == ["breaker_cooldown_s"]
