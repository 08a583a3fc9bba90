"""The test tiers CONTRIBUTING.md promises, checked by collecting the suite as a contributor would run it: one
``pytest --collect-only -m "not slow"`` in a subprocess, with a probe plugin that reports what was selected (and
with which markers) and what was deselected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLOW = {
    "tests/integration/test_faults.py::test_f6_thousand_client_aborts_leave_nothing_behind",
    "tests/integration/test_pacing.py::test_f8_burst_is_paced_answered_and_health_stays_fast",
    "tests/integration/test_soak.py::test_fault_soak",
}
PROBE = """
import json, os

_deselected = []

def pytest_deselected(items):
    _deselected.extend(item.nodeid for item in items)

def pytest_collection_finish(session):
    selected = {item.nodeid: sorted(mark.name for mark in item.iter_markers()) for item in session.items}
    with open(os.environ["TIER_PROBE_OUT"], "w") as out:
        json.dump({"selected": selected, "deselected": _deselected}, out)
"""


@pytest.fixture(scope="module")
def not_slow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]] | list[str]]:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "tier_probe.py").write_text(PROBE)
    out = folder / "out.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")])),
        "TIER_PROBE_OUT": str(out),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(
        [*command, "-p", "tier_probe", "-m", "not slow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result: dict[str, dict[str, list[str]] | list[str]] = json.loads(out.read_text())
    return result


def test_not_slow_leaves_out_exactly_the_slow_tests(not_slow: dict[str, dict[str, list[str]] | list[str]]) -> None:
    assert set(not_slow["deselected"]) == SLOW


def test_fast_marks_every_unit_test_and_nothing_else(not_slow: dict[str, dict[str, list[str]] | list[str]]) -> None:
    selected = not_slow["selected"]
    assert isinstance(selected, dict)
    fast = {node for node, marks in selected.items() if "fast" in marks}
    unit = {node for node in selected if node.startswith("tests/unit/")}
    assert fast == unit
    assert len(fast) > 1000


def test_tool_marks_the_tests_that_run_a_system_tool(not_slow: dict[str, dict[str, list[str]] | list[str]]) -> None:
    selected = not_slow["selected"]
    assert isinstance(selected, dict)
    tool = {node for node, marks in selected.items() if "tool" in marks}
    for module in ("test_deploy_nginx.py", "test_browser.py", "test_deploy_systemd.py"):
        assert any(node.startswith(f"tests/integration/{module}::") for node in tool), module
