"""Suite-wide helpers: the test tiers' markers, the FIGURE recorder that fault and load tests report their measured
numbers through, the ARTIFACT recorder that says where tests saved files worth looking at (browser screenshots), and
the system-tool fixtures with their "missing tools" section (``tests/tools.py``).

Tiers (CONTRIBUTING.md): ``pytest -m fast`` runs every unit test not marked ``slow``; ``pytest -m "not slow"`` also
runs the integration tests but leaves out the few that take minutes; ``pytest`` runs everything (what CI runs).
``fast`` and ``tool`` are added here at collection; ``slow`` is written on the test.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.tools"]  # the system-tool fixtures and the "missing tools" section

UNIT_TESTS = Path(__file__).resolve().parent / "unit"
TOOL_FIXTURES = frozenset(
    {"nginx_path", "chromium_path", "systemd_analyze_path", "strace_path", "openssl_path", "curl_path"}
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the fast tier (unit tests not marked slow) and the tests that run a system tool."""
    for item in items:
        if item.path.is_relative_to(UNIT_TESTS) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
        if TOOL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.tool)


_FIGURES: list[str] = []
_ARTIFACTS: list[str] = []

Figure = Callable[..., None]
Artifact = Callable[[str, Path], None]


@pytest.fixture
def figure() -> Figure:
    """Record ``FIGURE name=<id> value=<n> unit=<u> threshold=<t> pass=<bool>``; printed at the end of the run."""

    def record(name: str, value: float, unit: str, threshold: str, passed: bool) -> None:
        _FIGURES.append(
            f"FIGURE name={name} value={value:g} unit={unit} threshold={threshold} pass={str(passed).lower()}"
        )

    return record


@pytest.fixture
def artifact() -> Artifact:
    """Record ``ARTIFACT name=<id> path=<file>``; printed at the end of the run so CI logs say where files are."""

    def record(name: str, path: Path) -> None:
        _ARTIFACTS.append(f"ARTIFACT name={name} path={path.resolve()}")

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for title, lines in (("figures", _FIGURES), ("artifacts", _ARTIFACTS)):
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="session", autouse=True)
def whole_suite_logs_hold_no_secret() -> Iterator[None]:
    """Every in-process log line of the whole run, at DEBUG for every logger, formatted exactly as the gateway's
    own handler does it, must contain none of the secrets the run produced (access-token secrets, prepends, access
    tokens, every live session token and session cookie — whatever the gateway registered as secret)."""
    import gateway.logs as gateway_logs

    seen: set[str] = set()
    original = gateway_logs.secret_forms

    def recording(value: str | bytes) -> set[str]:
        forms = original(value)
        seen.update(forms)
        return forms

    gateway_logs.secret_forms = recording
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(gateway_logs.RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in gateway_logs.THIRD_PARTY_LOGGERS:  # capped as in production: they log URLs and headers
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        gateway_logs.secret_forms = original
    text = stream.getvalue()
    leaked = sorted(form[:6] + "…" for form in seen if form in text)
    _FIGURES.append(
        f"FIGURE name=g7_secret_occurrences_in_suite_logs value={len(leaked)} unit=count threshold=0 "
        f"pass={str(not leaked).lower()} (lines={text.count(chr(10))}, secrets_checked={len(seen)})"
    )
    assert not leaked, f"secrets leaked into the logs: {leaked}"
