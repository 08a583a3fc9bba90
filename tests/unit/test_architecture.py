"""The import contract of ``ARCHITECTURE.md``, enforced: the package map's *may import* column and the list of pure
modules are read from the document and checked against every module of ``src/gateway`` (by its AST, nothing runs).

One checker for the whole tree: every module belongs to one row of the map, imports only the rows that row allows,
has a docstring, and uses absolute imports; a pure module imports nothing that does I/O, reads a clock or draws
randomness, and no gateway module that is not pure itself.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

import gateway.oauth

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "ARCHITECTURE.md"

IMPURE = frozenset(
    {
        "asyncio", "datetime", "hypercorn", "httpcore", "httpx", "io", "logging", "os", "pathlib", "quart",
        "quart_trio", "random", "secrets", "select", "selectors", "shutil", "socket", "ssl", "subprocess",
        "tempfile", "threading", "time", "trio", "trio_websocket", "urllib.request", "uuid", "wsproto",
        # cryptography is allowed for RSA and hashing, not for its finite-field DH API (the DH maths is ours)
        "cryptography.hazmat.primitives.asymmetric.dh",
    }
)  # fmt: skip
"""What a pure module may not import (a module or any of its submodules)."""

PATH_BUILDERS = {"gateway.config.parse": frozenset({"pathlib"}), "gateway.config.model": frozenset({"pathlib"})}
"""Pure modules that may hold and join paths (``pathlib``) but never touch the file system (checked below)."""


@dataclass(frozen=True)
class Contract:
    """What ``ARCHITECTURE.md`` says: rows of the package map with what each may import, and the pure modules."""

    may_import: dict[str, frozenset[str]]
    pure: frozenset[str]

    def row_of(self, module: str) -> str | None:
        """The row a dotted module name belongs to: the longest row name that is the module or a package of it
        (the ``gateway`` row is the package's own ``__init__`` only)."""
        rows = [row for row in self.may_import if module == row or (row != "gateway" and module.startswith(row + "."))]
        return max(rows, key=len) if rows else None

    def is_pure(self, module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in self.pure)


def _section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"ARCHITECTURE.md has no '## {heading}' section"
    return match.group(1)


def read_contract(text: str) -> Contract:
    """Parse the package map table and the bullet list of pure modules out of the document's text."""
    may_import: dict[str, frozenset[str]] = {}
    for line in _section(text, "Package map").splitlines():
        row = re.fullmatch(r"\| `(gateway(?:\.[\w]+)*)` \| .+ \| (.+) \|", line)
        if row:
            allowed = row.group(2).strip()
            names = [] if allowed == "—" else [name.strip() for name in allowed.split(",")]
            may_import[row.group(1)] = frozenset(name if name == "gateway" else f"gateway.{name}" for name in names)
    pure: set[str] = set()
    in_list = False
    for line in _section(text, "Pure modules").splitlines():
        if line.startswith("- "):
            in_list = True
        elif not line.startswith("  "):
            in_list = False
        if in_list:
            pure.update(re.findall(r"`(gateway(?:\.\w+)+)`", line))
    return Contract(may_import, frozenset(pure))


@cache
def contract() -> Contract:
    return read_contract(DOC.read_text(encoding="utf-8"))


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((SRC / "gateway").rglob("*.py"))}


def resolve(target: str, names: tuple[str, ...] = ()) -> set[str]:
    """The gateway modules an import statement loads: ``from gateway.x import y`` is ``gateway.x.y`` when that is a
    module, else ``gateway.x``."""
    found = {f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES}
    if not found or len(found) < len(names):
        found.add(target)
    return found


@dataclass(frozen=True)
class Imports:
    external: frozenset[str]
    internal: frozenset[str]
    relative: bool


def imports_of(source: str, filename: str = "<sample>") -> Imports:
    external: set[str] = set()
    internal: set[str] = set()
    relative = False
    for node in ast.walk(ast.parse(source, filename=filename)):
        targets: list[tuple[str, tuple[str, ...]]]
        if isinstance(node, ast.Import):
            targets = [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            relative = relative or node.level > 0
            targets = [(node.module or "", tuple(alias.name for alias in node.names))]
        else:
            continue
        for target, names in targets:
            if target == "gateway" or target.startswith("gateway."):
                internal.update(resolve(target, names))
            else:
                external.add(target)
    return Imports(frozenset(external), frozenset(internal), relative)


def impure_imports(imports: Imports) -> list[str]:
    return sorted(m for m in imports.external if any(m == bad or m.startswith(bad + ".") for bad in IMPURE))


def violations(module: str, imports: Imports, spec: Contract) -> list[str]:
    """Every way ``module`` with ``imports`` breaks ``spec`` (empty when it keeps it)."""
    problems: list[str] = []
    own = spec.row_of(module)
    if own is None:
        return [f"{module} is in no row of the package map"]
    if imports.relative:
        problems.append(f"{module} uses a relative import (write gateway.… in full)")
    for target in sorted(imports.internal):
        row = spec.row_of(target)
        if row is None:
            problems.append(f"{module} imports {target}, which is in no row of the package map")
        elif row != own and row not in spec.may_import[own]:
            problems.append(f"{module} imports {target}: {own} may not import {row}")
    if spec.is_pure(module):
        allowed = PATH_BUILDERS.get(module, frozenset())
        problems.extend(f"pure {module} imports {m}" for m in impure_imports(imports) if m not in allowed)
        problems.extend(
            f"pure {module} imports {target}, which is not pure"
            for target in sorted(imports.internal)
            if not spec.is_pure(target)
        )
    return problems


def test_the_document_has_a_map_and_a_list_of_pure_modules() -> None:
    spec = contract()
    assert len(spec.may_import) >= 20
    assert len(spec.pure) >= 30
    for row, allowed in spec.may_import.items():
        exists = row in MODULES or (SRC / row.replace(".", "/")).is_dir()
        assert exists, f"ARCHITECTURE.md's package map names {row}, which does not exist"
        for name in allowed:
            assert name in spec.may_import, f"{row} may import {name}, which is not a row of the map"
    for name in spec.pure:
        assert name in MODULES, f"ARCHITECTURE.md lists {name} as pure, but there is no such module"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_keeps_the_contract(module: str) -> None:
    path = MODULES[module]
    imports = imports_of(path.read_text(encoding="utf-8"), str(path))
    assert violations(module, imports, contract()) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_states_its_job(module: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text(encoding="utf-8")))
    assert doc, f"{module} has no docstring"
    assert doc.splitlines()[0].strip(), f"{module}'s docstring starts with an empty line"


def test_the_simulator_never_imports_the_gateways_oauth_code() -> None:
    for module, path in MODULES.items():
        if module.startswith("gateway.simulator"):
            internal = imports_of(path.read_text(encoding="utf-8")).internal
            assert not {m for m in internal if m.startswith("gateway.oauth")}, module


@pytest.mark.parametrize("module", sorted(PATH_BUILDERS))
def test_pure_modules_use_pathlib_only_to_hold_and_join_paths(module: str) -> None:
    text = MODULES[module].read_text(encoding="utf-8")
    for call in ("open(", "read_text", "read_bytes", ".stat(", "exists(", "resolve(", "glob(", "iterdir("):
        assert call not in text, (module, call)


def test_the_oauth_package_exports_what_it_lists() -> None:
    for name in gateway.oauth.__all__:
        assert hasattr(gateway.oauth, name), name


SAMPLE_DOC = """
## Package map

| package | job | may import |
|---|---|---|
| `gateway.errors` | errors | — |
| `gateway.core` | a pure core | errors |
| `gateway.shell` | its shell | errors, core |

## Pure modules

- `gateway.errors`, `gateway.core`
  `gateway.core.more`

Not in the list: `gateway.shell`.
"""


def test_the_checker_reads_the_document_format() -> None:
    spec = read_contract(SAMPLE_DOC)
    assert spec.may_import == {
        "gateway.errors": frozenset(),
        "gateway.core": frozenset({"gateway.errors"}),
        "gateway.shell": frozenset({"gateway.errors", "gateway.core"}),
    }
    assert spec.pure == {"gateway.errors", "gateway.core", "gateway.core.more"}
    assert spec.row_of("gateway.core.sub") == "gateway.core"
    assert spec.row_of("gateway.other") is None


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("gateway.core.x", "import os.path\nfrom trio import sleep\n", ["pure gateway.core.x imports os.path",
                                                                       "pure gateway.core.x imports trio"]),
        ("gateway.core.x", "from gateway.shell import thing\n", [
            "gateway.core.x imports gateway.shell: gateway.core may not import gateway.shell",
            "pure gateway.core.x imports gateway.shell, which is not pure"]),
        ("gateway.core.x", "from . import sibling\n",
         ["gateway.core.x uses a relative import (write gateway.… in full)"]),
        ("gateway.shell", "import trio\nfrom gateway.core import x\n", []),
        ("gateway.core.x", "from cryptography.hazmat.primitives.asymmetric.dh import DHParameterNumbers\n",
         ["pure gateway.core.x imports cryptography.hazmat.primitives.asymmetric.dh"]),
        ("gateway.nowhere", "", ["gateway.nowhere is in no row of the package map"]),
    ],
)  # fmt: skip
def test_the_checker_catches_what_breaks_the_contract(module: str, source: str, expected: list[str]) -> None:
    assert violations(module, imports_of(source), read_contract(SAMPLE_DOC)) == expected
