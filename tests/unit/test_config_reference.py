"""docs/configuration.md is the schema table rendered: every key, default and meaning agree with the code."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import schema
from gateway.config.reference import COMMAND, format_default, key_table, render_reference
from gateway.pacing.model import API, IBKR_DEFAULT_LIMITS

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "configuration.md"


def _first_difference(committed: str, generated: str) -> str:
    diff = difflib.unified_diff(
        committed.splitlines(), generated.splitlines(), "committed", "generated", n=0, lineterm=""
    )
    return "\n".join(list(diff)[:12])


def test_committed_reference_is_the_rendered_schema() -> None:
    committed = REFERENCE.read_text(encoding="utf-8")
    generated = render_reference()
    assert committed == generated, (
        f"docs/configuration.md is out of date with src/gateway/config/schema.py; regenerate it with `{COMMAND}`\n"
        + _first_difference(committed, generated)
    )


@pytest.mark.parametrize(
    ("section", "key"),
    [(section, key) for section, keys in schema.SECTIONS.items() for key in keys]
    + [("routes", key) for key in schema.ROUTE_KEYS],
)
def test_every_key_has_its_row_with_default_and_meaning(section: str, key: str) -> None:
    spec = schema.ROUTE_KEYS[key] if section == "routes" else schema.SECTIONS[section][key]
    text = REFERENCE.read_text(encoding="utf-8")
    heading = "## `[[routes]]`" if section == "routes" else f"## `[{section}]`"
    assert heading in text, f"{heading} missing; regenerate with `{COMMAND}`"
    body = text.split(heading, 1)[1].split("\n## ", 1)[0]
    row = next((line for line in body.splitlines() if line.startswith(f"| `{key}` |")), None)
    assert row is not None, f"{section}.{key} has no row; regenerate with `{COMMAND}`"
    cells = row.removeprefix("| ").removesuffix(" |").split(" | ", 2)
    if spec.default is not None:
        assert cells[1] == f"`{format_default(spec.default)}`"
    else:
        assert cells[1] in ("required", "none")
    assert spec.doc in cells[2]
    assert spec.details.replace("|", "\\|") in cells[2]


def test_builtin_pacing_limits_are_listed() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    for limit in IBKR_DEFAULT_LIMITS:
        assert f"`{limit.path.removeprefix(API)}`" in text


def test_credential_keys_read_required_and_others_none() -> None:
    table = key_table(schema.SECTIONS["ibkr"])
    assert "| `consumer_key` | required |" in table
    assert "| `api_keys_file` | none |" in key_table(schema.SECTIONS["server"])
    assert "| `path` | required |" in key_table(schema.ROUTE_KEYS, required=frozenset({"path"}))


def test_format_default_writes_toml_values() -> None:
    assert format_default(True) == "true"
    assert format_default("127.0.0.1") == '"127.0.0.1"'
    assert format_default(["127.0.0.1", "::1"]) == '["127.0.0.1", "::1"]'
    assert format_default([]) == "[]"
    assert format_default(65536) == "65536"


def test_config_docs_command_writes_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "configuration.md"
    assert main(["config-docs", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_reference()
    capsys.readouterr()
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == render_reference()
