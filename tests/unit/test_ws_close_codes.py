"""WebSocket relay close codes: which codes may be sent on the other leg and which become the default."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy.websocket import relay_close_code

SENDABLE = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
# None: no code at all; 1004 reserved; 1005/1006/1015 are local-only (must never be put on the wire); the rest
# are outside the registered and application ranges.
UNSENDABLE = [None, 1004, 1005, 1006, 1015, 999, 0, -1, 1016, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", SENDABLE)
def test_valid_code_passes(code: int) -> None:
    assert relay_close_code(code) == code
    assert relay_close_code(code, default=1000) == code


@pytest.mark.parametrize("code", UNSENDABLE)
def test_unsendable_code_becomes_the_default(code: int | None) -> None:
    assert relay_close_code(code) == 1011
    assert relay_close_code(code, default=1000) == 1000


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.none(), st.integers(min_value=-(2**16), max_value=2**17)), st.sampled_from([1000, 1001, 1011]))
def test_property_result_is_always_sendable(code: int | None, default: int) -> None:
    result = relay_close_code(code, default=default)
    assert result in (code, default)
    assert result not in (1004, 1005, 1006, 1015)
    assert 1000 <= result <= 1014 or 3000 <= result <= 4999
