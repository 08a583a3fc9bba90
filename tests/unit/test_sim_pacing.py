"""The simulator's pacing core (pure): sliding windows, IBKR's endpoint table, the penalty box."""

from __future__ import annotations

import pytest

from gateway.simulator.pacing import GLOBAL_PER_S, EndpointLimit, Pacer, SlidingWindow
from gateway.simulator.preconditions import needs_iserver_accounts, needs_portfolio_accounts


def test_sliding_window_forgets_arrivals_one_window_later() -> None:
    window = SlidingWindow(1.0)
    assert [window.add(t) for t in (0.0, 0.5, 0.9)] == [1, 2, 3]
    assert window.retry_after(0.9) == pytest.approx(0.1)
    assert window.add(1.0) == 3  # the arrival at 0.0 has left
    assert window.add(2.5) == 1


def test_global_limit_then_penalty_box_then_free() -> None:
    pacer = Pacer(penalty_s=10.0)
    assert all(pacer.arrive("GET", "/sim/echo", 0.001 * i) is None for i in range(GLOBAL_PER_S))
    refused = pacer.arrive("GET", "/sim/echo", 0.06)
    assert refused is not None
    assert refused.status == 429
    assert pacer.penalty_left(0.06) == pytest.approx(10.0)
    # Every request, on any endpoint, is refused while the box lasts, however slowly it comes.
    assert pacer.arrive("POST", "/tickle", 5.0) is not None
    assert pacer.arrive("GET", "/portfolio/accounts", 10.0) is not None
    assert pacer.arrive("POST", "/tickle", 10.07) is None
    assert pacer.penalty_left(10.07) == 0.0
    assert pacer.refused == 3


def test_per_endpoint_windows_are_separate_and_counted_at_arrival() -> None:
    pacer = Pacer(penalty_s=0.0)
    assert pacer.arrive("POST", "/tickle", 0.0) is None
    assert pacer.arrive("GET", "/iserver/accounts", 0.1) is None  # another endpoint: no limit of its own
    assert pacer.arrive("GET", "/tickle", 0.5) is not None  # 1/s, whatever the method
    # The refused tickle counted too: the window is measured from it.
    assert pacer.arrive("POST", "/tickle", 1.2) is not None
    assert pacer.arrive("POST", "/tickle", 2.3) is None
    for i in range(10):
        assert pacer.arrive("GET", "/iserver/marketdata/snapshot", 3 + i * 0.01) is None
    assert pacer.arrive("GET", "/iserver/marketdata/snapshot", 3.5) is not None


def test_documented_table_rows() -> None:
    pacer = Pacer(penalty_s=0.0)
    assert pacer.arrive("GET", "/portfolio/accounts", 0.0) is None
    assert pacer.arrive("GET", "/portfolio/accounts", 4.9) is not None
    assert pacer.arrive("GET", "/portfolio/accounts", 10.0) is None
    assert pacer.arrive("GET", "/iserver/account/orders", 20.0) is None
    assert pacer.arrive("POST", "/iserver/account/orders", 20.1) is None  # the limit is on GET only
    assert pacer.arrive("GET", "/iserver/account/orders", 24.0) is not None
    assert pacer.arrive("GET", "/fyi/unreadnumber", 30.0) is None
    assert pacer.arrive("GET", "/fyi/unreadnumber", 30.5) is not None


def test_custom_limits_clear_and_bad_settings() -> None:
    pacer = Pacer(penalty_s=60.0, global_per_s=2, limits=(EndpointLimit(r"/x", 1, 1.0, "POST"),))
    assert pacer.arrive("POST", "/x", 0.0) is None
    assert pacer.arrive("POST", "/x", 0.1) is not None
    pacer.clear()
    assert pacer.penalty_left(0.2) == 0.0
    assert pacer.arrive("GET", "/y", 0.2) is None
    assert pacer.arrive("GET", "/y", 0.3) is None
    assert pacer.arrive("GET", "/y", 0.4) is not None
    with pytest.raises(ValueError, match="penalty_s"):
        Pacer(penalty_s=-1)
    with pytest.raises(ValueError, match="global_per_s"):
        Pacer(penalty_s=1, global_per_s=0)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/iserver/marketdata/snapshot", True),
        ("/iserver/account/orders", True),
        ("/iserver/account/DU1234567/orders", True),
        ("/iserver/account/DU1234567/order/123", True),
        ("/iserver/account/DU1234567/orders/whatif", True),
        ("/iserver/reply/abc-123", True),
        ("/iserver/accounts", False),
        ("/iserver/marketdata/history", False),
        ("/iserver/secdef/search", False),
        ("/iserver/reply/", False),
    ],
)
def test_accounts_first_paths(path: str, expected: bool) -> None:
    assert needs_iserver_accounts(path) is expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/portfolio/DU1234567/positions/0", True),
        ("/portfolio/DU1234567/summary", True),
        ("/portfolio/DU1234567/ledger", True),
        ("/portfolio/accounts", False),
        ("/portfolio/subaccounts", False),
        ("/portfolio/positions/265598", False),
        ("/portfolio/allocation", False),
        ("/portfolio/DU1234567", False),
    ],
)
def test_portfolio_first_paths(path: str, expected: bool) -> None:
    assert needs_portfolio_accounts(path) is expected
