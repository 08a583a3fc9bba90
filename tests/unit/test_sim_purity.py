"""The simulator's pure modules import nothing that does I/O or reads the clock, and nothing of gateway.oauth."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parents[2] / "src" / "gateway" / "simulator"
PURE = ["verify.py", "dh.py", "state.py", "market.py", "payloads.py", "records.py"]
FORBIDDEN = {"trio", "httpx", "hypercorn", "socket", "time", "secrets", "os", "asyncio", "subprocess", "logging"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", PURE)
def test_pure_modules(name: str) -> None:
    bad = {m for m in _imports(SIM / name) if m.split(".")[0] in FORBIDDEN}
    assert not bad


@pytest.mark.parametrize("path", sorted(SIM.glob("*.py")), ids=lambda p: p.name)
def test_no_module_uses_gateway_oauth(path: Path) -> None:
    assert not {m for m in _imports(path) if m == "gateway.oauth" or m.startswith("gateway.oauth.")}


@pytest.mark.parametrize("path", sorted(SIM.glob("*.py")), ids=lambda p: p.name)
def test_every_module_states_its_job(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc
    assert doc.splitlines()[0].strip()
