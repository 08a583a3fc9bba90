"""Suite-wide helpers: the FIGURE recorder that fault and load tests report their measured numbers through."""

from __future__ import annotations

from collections.abc import Callable

import pytest

_FIGURES: list[str] = []

Figure = Callable[..., None]


@pytest.fixture
def figure() -> Figure:
    """Record ``FIGURE name=<id> value=<n> unit=<u> threshold=<t> pass=<bool>``; printed at the end of the run."""

    def record(name: str, value: float, unit: str, threshold: str, passed: bool) -> None:
        _FIGURES.append(
            f"FIGURE name={name} value={value:g} unit={unit} threshold={threshold} pass={str(passed).lower()}"
        )

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
