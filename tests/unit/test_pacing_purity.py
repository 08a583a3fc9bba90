"""The pacing core (model, budgets, breaker, Retry-After, scheduler) imports nothing that does I/O or reads a clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_purity import SRC, imported_modules, is_forbidden

PURE_PACING = ["model.py", "bucket.py", "breaker.py", "retry_after.py", "scheduler.py"]


@pytest.mark.parametrize("name", PURE_PACING)
def test_pure_pacing_module_imports_no_io(name: str) -> None:
    path = SRC / "pacing" / name
    bad = sorted(m for m in imported_modules(path) if is_forbidden(m))
    assert bad == [], f"{name} imports {bad}"


def test_only_the_shell_imports_trio() -> None:
    shells = {p.name for p in (SRC / "pacing").glob("*.py") if "trio" in imported_modules(p)}
    assert shells == {"pacer.py"}


def test_every_module_is_classified() -> None:
    names = {p.name for p in Path(SRC / "pacing").glob("*.py")}
    assert names == {*PURE_PACING, "pacer.py", "__init__.py"}
