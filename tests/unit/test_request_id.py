"""Request ids: which client ids are reused and how new ones look (log lines: tests/unit/test_logs.py)."""

from __future__ import annotations

import re

import pytest

from gateway.web.request_id import is_valid, new_request_id, request_id


@pytest.mark.parametrize("value", [b"a", b"A-z_0.9", b"x" * 64, b"550e8400-e29b-41d4-a716-446655440000"])
def test_well_formed_ids_are_reused(value: bytes) -> None:
    assert is_valid(value)
    assert request_id([(b"accept", b"*/*"), (b"x-request-id", value)]) == value.decode()


@pytest.mark.parametrize("value", [b"", b"x" * 65, b"a b", b"a;b", b"a/b", b"\xc3\xbc", b"a\r\nb"])
def test_malformed_ids_are_replaced(value: bytes) -> None:
    assert not is_valid(value)
    assert request_id([(b"x-request-id", value)]) != value.decode("latin-1")


def test_two_ids_are_believed_neither() -> None:
    rid = request_id([(b"x-request-id", b"one"), (b"x-request-id", b"two")])
    assert rid not in ("one", "two")


def test_generated_ids_are_short_unique_and_well_formed() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z0-9]{6}-[0-9a-f]+", rid) and is_valid(rid.encode()) for rid in ids)
    assert len({rid.split("-")[0] for rid in ids}) == 1  # one process prefix
