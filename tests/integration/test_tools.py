"""The system-tool mechanism of tests/tools.py keeps its contract: a missing tool skips with one line naming it and
its install command, the same run under ``CI=1`` fails instead, a present tool (or an override variable) gives its
path, and the end of the run lists the missing tools once.

The skip and fail paths run pytest in a subprocess on a tiny test module, with a ``PATH`` that holds only a fake
executable, so the outcome does not depend on what this machine has installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests import tools
from tests.tools import Tool, in_ci, require_tool

REPO = Path(__file__).resolve().parents[2]
PRESENT = "ibkr-test-present-tool"
MISSING_REASON = "needs ibkr-test-missing-tool: apt-get install ibkr-test-pkg"

CONFTEST = 'pytest_plugins = ["tests.tools"]\n'
MODULE = f"""
import pytest

from tests.tools import Tool, require_tool

MISSING = Tool("ibkr-test-missing-tool", "apt-get install ibkr-test-pkg")
PRESENT = Tool("{PRESENT}", "apt-get install ibkr-test-pkg")


@pytest.fixture
def missing_path() -> str:
    return require_tool(MISSING)


def test_one_needs_it(missing_path: str) -> None:
    raise AssertionError("the body of a test whose tool is missing ran")


def test_two_need_it(missing_path: str) -> None:
    raise AssertionError("the body of a test whose tool is missing ran")


def test_without_the_tool_still_runs() -> None:
    assert require_tool(PRESENT).endswith("/{PRESENT}")
"""


def _line_of(test: str) -> int:
    """The line of ``def <test>`` in MODULE, as pytest numbers it."""
    return next(n for n, line in enumerate(MODULE.splitlines(), 1) if line.startswith(f"def {test}("))


def _fake_executable(directory: Path, name: str) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _run_inner(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest on MODULE with ``PATH`` = a directory holding only the fake present tool, and ``CI`` as given."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(MODULE)
    bin_dir = tmp_path / "bin"
    _fake_executable(bin_dir, PRESENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "CI"}
    env |= {"PATH": str(bin_dir), "PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-ra", "-p", "no:cacheprovider", "test_inner.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_missing_tool_skips_with_its_install_command(tmp_path: Path) -> None:
    result = _run_inner(tmp_path, ci=None)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "1 passed, 2 skipped" in out, out
    # One -ra line per skipped test, at the test's own location, with the one-line reason.
    for test in ("test_one_needs_it", "test_two_need_it"):
        assert f"SKIPPED [1] test_inner.py:{_line_of(test)}: {MISSING_REASON}" in out, out
    # The end of the run names the tool once, with what it stopped and how to install it.
    section = out.split("missing tools", 1)[1].split("short test summary", 1)[0]
    assert f"{MISSING_REASON}  [2 skipped]" in section, out
    assert "to run them: apt-get install ibkr-test-pkg" in section, out
    assert section.count("ibkr-test-missing-tool") == 1, out


@pytest.mark.parametrize("ci", ["1", "true", "yes"])
def test_under_ci_a_missing_tool_fails(tmp_path: Path, ci: str) -> None:
    result = _run_inner(tmp_path, ci=ci)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert re.search(r"=+ 1 passed, 2 errors in ", out), out
    for test in ("test_one_needs_it", "test_two_need_it"):
        assert f"ERROR test_inner.py::{test} - Failed: {MISSING_REASON}" in out, out
    assert "CI is set, so a missing tool fails the test" in out, out
    assert "the body of a test whose tool is missing ran" not in out, out
    section = out.split("missing tools", 1)[1].split("short test summary", 1)[0]
    assert f"{MISSING_REASON}  [2 failed]" in section, out


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("", False), ("0", False), ("false", False), (" False ", False), ("1", True), ("true", True)],
)
def test_what_counts_as_ci(value: str | None, expected: bool) -> None:
    assert in_ci({} if value is None else {"CI": value}) is expected


def test_a_present_tool_gives_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _fake_executable(tmp_path / "a", "ibkr-test-browser")
    monkeypatch.setenv("PATH", f"{tmp_path / 'a'}{os.pathsep}/nonexistent")
    assert require_tool(Tool("ibkr-test-browser", "apt-get install x")) == str(first)
    # Another name of the same tool is found too.
    other = _fake_executable(tmp_path / "b", "ibkr-test-browser-2")
    monkeypatch.setenv("PATH", str(tmp_path / "b"))
    assert require_tool(Tool("ibkr-test-browser", "x", other_names=("ibkr-test-browser-2",))) == str(other)


def test_an_override_variable_wins_and_must_name_an_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = _fake_executable(tmp_path / "path", "ibkr-test-browser")
    chosen = _fake_executable(tmp_path / "elsewhere", "my-browser")
    monkeypatch.setenv("PATH", str(on_path.parent))
    tool = Tool("ibkr-test-browser", "apt-get install x", env="IBKR_TEST_BROWSER")
    monkeypatch.setenv("IBKR_TEST_BROWSER", str(chosen))
    assert require_tool(tool) == str(chosen)
    monkeypatch.delenv("IBKR_TEST_BROWSER")
    assert require_tool(tool) == str(on_path)
    # Set but wrong: a failure even outside CI (someone asked for that binary), naming the variable.
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("IBKR_TEST_BROWSER", str(tmp_path / "nothing-here"))
    with pytest.raises(pytest.fail.Exception, match=r"IBKR_TEST_BROWSER=.*nothing-here is not an executable"):
        require_tool(tool)
    assert tool.name not in tools._missing


def test_chromium_keeps_its_override_variable() -> None:
    assert tools.CHROMIUM.env == "CHROMIUM"
    assert tools.CHROMIUM.reason == "needs chromium: apt-get install chromium (or set CHROMIUM=/path/to/chromium)"


def test_refuses_to_run_inside_trio() -> None:
    """Inside trio a skip would lose its reason (pytest-trio re-raises a bare skip), so it is refused everywhere —
    even for a tool that is present."""

    async def main() -> None:
        require_tool(Tool(Path(sys.executable).name, "x"))

    with pytest.raises(RuntimeError, match="inside trio: call it from a sync fixture"):
        trio.run(main)


def test_ci_run_sets_ci_before_it_runs_pytest() -> None:
    """CI does not rely on its machine setting ``CI``: ``.ci/run`` exports it before the README's test command."""
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    exported = lines.index("export CI=1")
    assert exported < next(n for n, line in enumerate(lines) if "-m pytest" in line)
    assert in_ci({"CI": "1"})
