"""The OAuth core stays pure: no module in gateway/oauth imports I/O, clocks, randomness or concurrency."""

from __future__ import annotations

import ast
import pathlib

import pytest

import gateway.oauth

OAUTH_DIR = pathlib.Path(gateway.oauth.__file__).parent
FORBIDDEN = {
    "trio", "httpx", "hypercorn", "quart", "quart_trio", "trio_websocket", "socket", "time", "secrets", "os",
    "random", "pathlib", "io", "asyncio", "datetime", "logging", "ssl", "subprocess", "shutil", "tempfile",
}  # fmt: skip
# cryptography is allowed for RSA, but not its deprecated finite-field DH API.
FORBIDDEN_PREFIXES = ("cryptography.hazmat.primitives.asymmetric.dh",)
MODULES = sorted(OAUTH_DIR.glob("*.py"))


def _imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_every_module_is_checked() -> None:
    assert {p.name for p in MODULES} >= {
        "__init__.py", "encoding.py", "basestring.py", "signatures.py", "header.py", "dh.py", "keys.py", "signer.py",
    }  # fmt: skip


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_imports_nothing_impure(path: pathlib.Path) -> None:
    for name in _imports(path):
        assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
        assert not name.startswith(FORBIDDEN_PREFIXES), f"{path.name} imports {name}"
        assert "__import__" not in name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_has_a_docstring(path: pathlib.Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring
    assert docstring.splitlines()[0].endswith(".")


def test_public_api_is_exported() -> None:
    for name in gateway.oauth.__all__:
        assert hasattr(gateway.oauth, name), name
