"""Every table row of the Markdown docs is inside a table: a ``| ... |`` line that follows no
other row and has no ``|---|`` separator under it (a table's header row) renders as plain
text, part of the paragraph before it (clients/js/README.md's method table once ended in five
such rows, after a paragraph)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md"),
               *ROOT.glob("clients/*/README.md")])
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


def stray_rows(text: str) -> list[int]:
    """The line numbers of table rows that no table holds (outside fenced code blocks)."""
    lines, stray, fenced = text.splitlines(), [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("|"):
            continue
        before = lines[i - 1] if i else ""
        if before.startswith("|"):
            continue
        after = lines[i + 1] if i + 1 < len(lines) else ""
        if not SEPARATOR.match(after):
            stray.append(i + 1)
    return stray


def test_a_row_after_a_paragraph_is_stray() -> None:
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert stray_rows("text\n\n" + table) == []
    assert stray_rows("text\n\n" + table + "more text\n| 3 | 4 |\n") == [7]
    assert stray_rows("text\n| a | b |\n|---|---|\n") == []  # GFM: a table may follow
    assert stray_rows("text\n\n| a | b |\n| 1 | 2 |\n") == [3]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_is_in_a_table(path: Path) -> None:
    assert stray_rows(path.read_text()) == [], path
