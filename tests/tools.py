"""System tools some tests run — nginx, Chromium, systemd-analyze, strace, the openssl CLI, curl — and what a test
does when one is not installed. A pytest plugin (``tests/conftest.py`` loads it through ``pytest_plugins``).

A test that runs a tool takes its fixture — ``nginx_path``, ``chromium_path``, ``systemd_analyze_path``,
``strace_path``, ``openssl_path``, ``curl_path`` — or, when only some of its parametrised cases need the tool,
``request.getfixturevalue("curl_path")`` in those cases. Each fixture is :func:`require_tool` for one :class:`Tool`.

Contract:

- The fixture's value is the absolute path of the tool's executable: the first of its names found on ``PATH``, or,
  when the tool has an override variable (``CHROMIUM=/path``) and that variable is set, the executable it names.
- When the tool is not found, the test stops before its body runs, with the one-line reason
  ``needs <tool>: <install command>``. Outside CI that is a *skip*; when the environment variable ``CI`` is set
  (non-empty and not ``0`` or ``false``, any case) it is a *failure* with the same line, so a CI machine that lacks
  a tool cannot go green by skipping. ``.ci/run`` installs every tool and sets ``CI=1``.
- An override variable that is set but names no executable fails in any case: someone asked for that binary.
- Only what needs the tool may be skipped: whatever a test can check without it belongs in a test that does not
  take the fixture.
- The end of the run has a "missing tools" section: each tool a test needed and did not find, how many tests it
  skipped or failed, and one command that installs them all. The ``-ra`` summary has one line per stopped test,
  at the test's own location.
- :func:`require_tool` runs only outside trio (else ``RuntimeError``, on every machine): pytest-trio runs async
  tests and fixtures inside ``trio.run`` and turns a skip raised there into a bare ``pytest.skip()`` that has lost
  its reason. The fixtures are synchronous, so async tests and fixtures can take them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import trio

APT_GET_INSTALL = "apt-get install "


@dataclass(frozen=True)
class Tool:
    """A program on ``PATH`` that some tests run."""

    name: str
    """The executable's name, as the skip reason says it."""
    install: str
    """The command that installs it (on Debian/Ubuntu, as ``.ci/run`` does)."""
    other_names: tuple[str, ...] = ()
    """Other executable names the same tool goes by (tried after ``name``)."""
    env: str | None = None
    """A variable that, when set, names the executable to use instead of searching ``PATH``."""

    @property
    def reason(self) -> str:
        """The one line a test skips (or fails) with when the tool is missing."""
        also = f" (or set {self.env}=/path/to/{self.name})" if self.env else ""
        return f"needs {self.name}: {self.install}{also}"


NGINX = Tool("nginx", APT_GET_INSTALL + "nginx")
CHROMIUM = Tool("chromium", APT_GET_INSTALL + "chromium", other_names=("chromium-browser",), env="CHROMIUM")
SYSTEMD_ANALYZE = Tool("systemd-analyze", APT_GET_INSTALL + "systemd")
STRACE = Tool("strace", APT_GET_INSTALL + "strace")
OPENSSL = Tool("openssl", APT_GET_INSTALL + "openssl")
CURL = Tool("curl", APT_GET_INSTALL + "curl")

_missing: dict[str, Tool] = {}


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``CI`` is set: non-empty and not ``0``/``false`` (any case, surrounding blanks ignored)."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false")


def require_tool(tool: Tool) -> str:
    """The path of ``tool``'s executable; skips the calling test when it is missing, or fails it under CI (see the
    module's contract)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        pass  # not inside trio: a skip keeps its reason
    else:
        raise RuntimeError(f"require_tool({tool.name}) inside trio: call it from a sync fixture (see tests/tools.py)")
    if tool.env and (override := os.environ.get(tool.env)):
        if path := shutil.which(override):
            return path
        pytest.fail(f"{tool.env}={override} is not an executable ({tool.reason})", pytrace=False)
    for name in (tool.name, *tool.other_names):
        if path := shutil.which(name):
            return path
    _missing[tool.name] = tool
    if in_ci():
        pytest.fail(f"{tool.reason} (CI is set, so a missing tool fails the test)", pytrace=False)
    pytest.skip(tool.reason)


@pytest.fixture
def nginx_path() -> str:
    return require_tool(NGINX)


@pytest.fixture
def chromium_path() -> str:
    return require_tool(CHROMIUM)


@pytest.fixture
def systemd_analyze_path() -> str:
    return require_tool(SYSTEMD_ANALYZE)


@pytest.fixture
def strace_path() -> str:
    return require_tool(STRACE)


@pytest.fixture
def openssl_path() -> str:
    return require_tool(OPENSSL)


@pytest.fixture
def curl_path() -> str:
    return require_tool(CURL)


@pytest.hookimpl(trylast=True)  # after the suite's own sections (figures, artifacts)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A "missing tools" section: each tool a test asked for and did not find, how many tests it skipped or failed,
    and one command that installs them all."""
    if not _missing:
        return
    terminalreporter.ensure_newline()  # after the progress line, before the section's rule
    terminalreporter.section("missing tools")
    for tool in _missing.values():
        counts = []
        for label, outcomes in (("skipped", ("skipped",)), ("failed", ("failed", "error"))):
            reports = [report for outcome in outcomes for report in terminalreporter.stats.get(outcome, [])]
            count = sum(1 for report in reports if tool.reason in getattr(report, "longreprtext", ""))
            if count:
                counts.append(f"{count} {label}")
        terminalreporter.write_line(f"{tool.reason}  [{', '.join(counts) or 'no test'}]")
    installs = [tool.install for tool in _missing.values()]
    if all(command.startswith(APT_GET_INSTALL) for command in installs):
        packages = dict.fromkeys(command.removeprefix(APT_GET_INSTALL) for command in installs)
        installs = [APT_GET_INSTALL + " ".join(packages)]
    for command in installs:
        terminalreporter.write_line(f"to run them: {command}")
