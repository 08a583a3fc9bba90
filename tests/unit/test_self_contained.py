"""Nothing in the repository points to documents outside it: the IBKR facts live in docs/protocol.md.

Forbidden anywhere in a tracked file: a path into a ``shared`` folder beside the repository, the names of the
design and reliability notes that were never part of it, and a protocol page other than the repository's own
``docs/protocol.md`` (written as that path, or as a relative Markdown link and its text, which test_doc_links checks).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Spelled in pieces so that this file does not match itself.
_OUTSIDE = re.compile(
    "|".join(
        [
            re.escape("../" + "shared"),
            re.escape("shared/" + "vectors"),
            re.escape("design" + ".md"),
            re.escape("reliability" + ".md"),
            r"(?<!docs/)(?<!\]\()(?<!\[)" + re.escape("protocol" + ".md"),
        ]
    )
)


def tracked_files() -> list[Path]:
    """The files git tracks (the working tree's versions), or every file outside hidden and build folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        ).stdout.decode()
        return [REPO / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "build", "dist", "test-output", "__pycache__"}
        return [p for p in REPO.rglob("*") if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)]


def outside_references() -> list[str]:
    hits = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for match in _OUTSIDE.finditer(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)}: {line.strip()[:100]}")
    return hits


def test_no_reference_points_outside_the_repository() -> None:
    hits = outside_references()
    assert not hits, (
        "these lines point to documents outside the repository; cite docs/protocol.md (or ARCHITECTURE.md) or "
        "state the fact itself:\n" + "\n".join(hits)
    )


def test_the_pattern_allows_the_repositorys_own_protocol_page() -> None:
    assert _OUTSIDE.search("see docs/" + "protocol" + ".md §4") is None
    assert _OUTSIDE.search("[rule](" + "protocol" + ".md#8-x)") is None
    assert _OUTSIDE.search("[" + "protocol" + ".md](" + "protocol" + ".md)") is None
    assert _OUTSIDE.search("(" + "protocol" + ".md §7)") is not None
    assert _OUTSIDE.search("../" + "shared/x") is not None
