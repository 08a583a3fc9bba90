"""Every relative Markdown link in README.md and docs/ points to a file in the repository, and to a heading there."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [
        *(p for p in REPO.glob("*.md")),
        *(REPO / "docs").glob("*.md"),
        REPO / "tests" / "vectors" / "README.md",
    ]
)
_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower-case, punctuation dropped (``-`` and ``_`` kept), spaces → ``-``."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading counts by its text
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of ``path``, with GitHub's ``-1``, ``-2`` suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if match is None:
            continue
        anchor = github_anchor(match.group(2))
        count = seen.get(anchor, 0)
        out.add(anchor if count == 0 else f"{anchor}-{count}")
        seen[anchor] = count + 1
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """``(line, target)`` for each link in ``path`` that is not a URL (code blocks and code spans skipped)."""
    links = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK_TARGET.findall(_CODE_SPAN.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                links.append((number, target))
    return links


def test_the_documents_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/configuration.md", "docs/protocol.md", "docs/deployment.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(document: Path) -> None:
    broken = []
    for number, target in relative_links(document):
        file_part, _, fragment = target.partition("#")
        resolved = (document.parent / unquote(file_part)).resolve() if file_part else document
        where = f"{document.relative_to(REPO)}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif not resolved.is_relative_to(REPO):
            broken.append(f"{where} (outside the repository)")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_github_anchor_rules() -> None:
    assert github_anchor("`[server]`") == "server"
    assert github_anchor("IBKR's built-in limits") == "ibkrs-built-in-limits"
    assert github_anchor("8. Where implementations disagree") == "8-where-implementations-disagree"
    assert github_anchor("Which mode?") == "which-mode"
