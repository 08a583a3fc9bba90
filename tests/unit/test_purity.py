"""The pure core imports nothing that does I/O, reads the clock or draws randomness: its modules can be tested and
reasoned about without a network, a clock or a running event loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "gateway"

FORBIDDEN = {
    "asyncio", "datetime", "hypercorn", "httpcore", "httpx", "io", "logging", "os", "pathlib", "quart",
    "quart_trio", "random", "secrets", "select", "selectors", "shutil", "socket", "ssl", "subprocess",
    "tempfile", "threading", "time", "trio", "trio_websocket", "urllib.request", "uuid",
}  # fmt: skip

# pathlib is allowed in config.parse only for building (not opening) paths; it is checked separately below.
PURE_MODULES = [
    *sorted(SRC.glob("oauth/*.py")),
    SRC / "config" / "schema.py",
    SRC / "config" / "document.py",
    SRC / "config" / "exposure.py",
    SRC / "config" / "render.py",
    SRC / "config" / "pacing.py",
    SRC / "proxy" / "transforms.py",
    SRC / "upstream" / "wire.py",
    SRC / "session" / "state.py",
    SRC / "session" / "paths.py",
    SRC / "web" / "auth.py",
    SRC / "web" / "request.py",
    SRC / "pacing" / "model.py",
    SRC / "pacing" / "bucket.py",
    SRC / "pacing" / "breaker.py",
    SRC / "pacing" / "scheduler.py",
    SRC / "pacing" / "retry_after.py",
    SRC / "redact.py",
    SRC / "errors.py",
    SRC / "hints.py",
    SRC / "doctor" / "report.py",
    SRC / "doctor" / "offline.py",
    SRC / "shared" / "feed.py",
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def is_forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)


@pytest.mark.parametrize("path", PURE_MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = sorted(m for m in imported_modules(path) if is_forbidden(m))
    assert bad == [], f"{path.name} imports {bad}"


def test_oauth_package_is_covered() -> None:
    assert len([p for p in PURE_MODULES if p.parent.name == "oauth"]) >= 7


def test_parser_uses_pathlib_only_to_join_paths() -> None:
    path = SRC / "config" / "parse.py"
    assert {m for m in imported_modules(path) if is_forbidden(m)} <= {"pathlib"}
    text = path.read_text()
    for call in ("open(", "read_text", "read_bytes", ".stat(", "exists(", "resolve("):
        assert call not in text, call


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "impure.py"
    sample.write_text("import os.path\nfrom trio import sleep\nfrom . import sibling\n")
    assert sorted(m for m in imported_modules(sample) if is_forbidden(m)) == ["os.path", "trio"]
