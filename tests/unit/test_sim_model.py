"""The simulator's pure-ish parts: market data, session state, nonces, records and the fault switchboard."""

from __future__ import annotations

import pytest
import trio

from gateway.simulator.faults import Faults
from gateway.simulator.market import INSTRUMENTS, MAX_BARS, Market, parse_duration_s
from gateway.simulator.records import Recorder, redact_headers
from gateway.simulator.state import NonceCache, SessionState
from gateway.simulator.verify import Rejection

# ------------------------------------------------------------------------------------------- market


def test_well_known_instruments_present() -> None:
    expected = {265598: "AAPL", 8314: "IBM", 272093: "MSFT", 756733: "SPY", 76792991: "TSLA", 12087792: "EUR.USD"}
    for conid, symbol in expected.items():
        assert INSTRUMENTS[conid].symbol == symbol


def test_random_walk_is_plausible_and_seedable() -> None:
    a, b = Market(seed=7), Market(seed=7)
    fields = ("31", "84", "86", "85", "88", "55", "70", "71", "82", "83")
    for _ in range(200):
        a.step(265598)
        b.step(265598)
        va = a.fields(265598, fields)
        assert va == b.fields(265598, fields)
        bid, last, ask = float(va["84"]), float(va["31"]), float(va["86"])
        assert bid < last < ask
        assert float(va["71"]) <= last <= float(va["70"])
        assert va["55"] == "AAPL"
        assert int(va["85"]) > 0
        assert int(va["88"]) > 0
    fx = Market(seed=1).fields(12087792, ("31",))["31"]
    assert len(fx.split(".")[1]) == 5


def test_snapshot_shape_and_unknown_conid() -> None:
    market = Market(seed=3)
    entry = market.snapshot(8314, ("31", "84", "86", "999"), 1_700_000_000_000)
    assert entry["conid"] == 8314
    assert entry["_updated"] == 1_700_000_000_000
    assert {"31", "84", "86"} <= entry.keys()
    assert "999" not in entry
    assert market.snapshot(1, ("31",), 0) == {
        "conid": 1,
        "conidEx": "1",
        "_updated": 0,
        "server_id": "q0",
        "6119": "q0",
    }


def test_search() -> None:
    assert [r["conid"] for r in Market.search("aapl")] == ["265598"]
    assert Market.search("NOPE") == []
    assert Market.search("   ") == []
    assert {r["symbol"] for r in Market.search("INC", by_name=True)} >= {"AAPL", "TSLA"}


@pytest.mark.parametrize(
    ("text", "seconds"), [("5min", 300), ("1h", 3600), ("2d", 172800), ("1w", 604800), ("6m", 15552000),
                          ("1y", 31536000), ("0d", None), ("1x", None), ("", None), ("99999d", None)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert parse_duration_s(text) == seconds


def test_history_bars() -> None:
    market = Market(seed=5)
    now = 1_700_000_123_456
    body = market.history(265598, "1d", "1h", now)
    bars = body["data"]
    assert len(bars) == 24
    assert body["points"] == 23
    assert body["timePeriod"] == "1d"
    assert bars[-1]["t"] == (now // 3_600_000) * 3_600_000
    for bar in bars:
        assert bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"]
    assert market.history(265598, "1d", "1h", now) == body
    assert len(market.history(265598, "1y", "1min", now)["data"]) == MAX_BARS
    for period, bar, message in [("1d", "2d", "invalid bar"), ("x", "1h", "invalid period"), ("1d", "", "invalid bar")]:
        with pytest.raises(ValueError, match=message):
            market.history(265598, period, bar, now)
    with pytest.raises(ValueError, match="unavailable"):
        market.history(42, "1d", "1h", now)


# ------------------------------------------------------------------------------------------- state


def test_session_state_lst_lifecycle() -> None:
    state = SessionState()
    assert state.lst_rejection(0) == Rejection("no live session token")
    state.issue_lst(b"a" * 20, expires_ms=1000)
    assert state.lst_rejection(999) is None
    assert state.lst_rejection(1000) == Rejection("live session token expired")
    state.issue_lst(b"b" * 20, expires_ms=5000)
    assert state.previous_lst == b"a" * 20
    state.expire_lst(now_ms=2000)
    assert state.lst_rejection(2000) == Rejection("live session token expired")


def test_session_state_bridge_and_logout() -> None:
    state = SessionState()
    assert state.ensure_session("s1") == "s1"
    assert state.open_bridge("s2") == "s1"
    assert state.bridge
    state.logout()
    assert (state.bridge, state.session_id) == (False, None)
    assert state.open_bridge("s3") == "s3"


def test_nonce_cache_window_and_bound() -> None:
    cache = NonceCache(keep_s=10, max_entries=3)
    cache.remember("a", 0)
    assert "a" in cache
    cache.prune(10)
    assert "a" in cache
    cache.prune(10.5)
    assert "a" not in cache
    for i, nonce in enumerate("bcde"):
        cache.remember(nonce, 20 + i)
    assert len(cache) == 3
    assert "b" not in cache


# ------------------------------------------------------------------------------------------- records


def test_records_counts_and_redaction() -> None:
    recorder = Recorder(max_records=2)
    headers = (("Authorization", 'OAuth oauth_signature="s"'), ("Cookie", "api=x"), ("User-Agent", "u"))
    for i in range(3):
        recorder.add(time=i, method="GET", path="/p", raw_query="", headers=headers, endpoint="/p", accepted=True,
                     status=200, reason="ok")  # fmt: skip
    assert [r.seq for r in recorder.records] == [2, 3]
    assert recorder.counts == {"/p": 3}
    record = recorder.records[0]
    assert record.header("authorization") == 'OAuth oauth_signature="s"'
    red = record.redacted()
    assert red["headers"] == [["Authorization", "<redacted>"], ["Cookie", "<redacted>"], ["User-Agent", "u"]]
    assert redact_headers((("proxy-authorization", "x"),)) == [["proxy-authorization", "<redacted>"]]
    recorder.clear()
    assert recorder.records == []
    assert recorder.counts == {}


# ------------------------------------------------------------------------------------------- faults


class _Hooks:
    def __init__(self) -> None:
        self.expired = 0
        self.events: list[str] = []

    def expire_lst(self) -> None:
        self.expired += 1

    def set_other_session(self, active: bool) -> None:
        self.events.append(f"other {active}")

    def end_brokerage_session(self) -> None:
        self.events.append("nightly")

    async def close_websockets(self, code: int, reason: str) -> int:
        self.events.append(f"close {code}")
        return 0

    async def go_down(self) -> None:
        self.events.append("down")

    async def go_up(self) -> None:
        self.events.append("up")


async def test_fail_next_queue_and_prefix() -> None:
    faults = Faults(_Hooks())
    faults.fail_next(2, status=503, path_prefix="/v1/api/iserver")
    faults.fail_next(1, status=500, error="boom")
    first = faults.take_request_fault("/v1/api/tickle")
    assert first is not None
    assert (first.status, first.reason) == (500, "boom")
    assert faults.take_request_fault("/v1/api/tickle") is None
    for _ in range(2):
        fault = faults.take_request_fault("/v1/api/iserver/accounts")
        assert fault is not None
        assert (fault.status, fault.reason) == (503, "service unavailable")
    assert faults.take_request_fault("/v1/api/iserver/accounts") is None


async def test_rate_limit_n_and_seconds(autojump_clock: trio.abc.Clock) -> None:
    faults = Faults(_Hooks())
    faults.rate_limit(n=2)
    assert [f.status if f else None for f in (faults.take_request_fault("/x") for _ in range(3))] == [429, 429, None]
    faults.rate_limit(seconds=2.5)
    fault = faults.take_request_fault("/x")
    assert fault is not None
    assert dict(fault.headers)["Retry-After"] == "3"
    await trio.sleep(2.6)
    assert faults.take_request_fault("/x") is None
    faults.rate_limit(n=1, path_prefix="/v1/api/iserver")
    assert faults.take_request_fault("/v1/api/tickle") is None
    assert faults.take_request_fault("/v1/api/iserver/x") is not None
    with pytest.raises(ValueError, match="exactly one"):
        faults.rate_limit()
    with pytest.raises(ValueError, match="exactly one"):
        faults.rate_limit(n=1, seconds=1)


async def test_switches_reset_and_hooks() -> None:
    hooks = _Hooks()
    faults = Faults(hooks)
    faults.set_delay(0.25)
    faults.drop_mid_response(2, after_bytes=10)
    faults.set_tickle_unauthenticated(True, competing=True, clear_on_init=True)
    assert faults.describe()["tickle"] == {"unauthenticated": True, "competing": True, "clear_on_init": True}
    assert faults.take_drop() == (True, 10)
    faults.on_init()
    assert not faults.tickle_unauthenticated
    faults.expire_lst()
    assert hooks.expired == 1
    await faults.close_websockets(1011)
    await faults.down()
    assert faults.is_down
    await faults.up()
    faults.set_other_session()
    faults.nightly_reset()
    assert hooks.events == ["close 1011", "down", "up", "other True", "nightly"]
    faults.fail_next(1)
    faults.reset()
    assert hooks.events[-1] == "other False"  # reset sends the other session away
    assert faults.delay_s == 0
    assert faults.take_drop() == (False, None)
    assert faults.take_request_fault("/x") is None
    with pytest.raises(ValueError, match="delay"):
        faults.set_delay(-1)
    with pytest.raises(ValueError, match="fail_next"):
        faults.fail_next(1, status=99)
    with pytest.raises(ValueError, match="drop_mid_response"):
        faults.drop_mid_response(-1)
