"""The project's docs stand alone: no reference to files outside the repository (design notes
kept elsewhere), and every relative link in a Markdown file points at a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\bshared/|\bDESIGN\.md\b|\bSTYLE\.md\b|\bNOTES\.md\b|/work/")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    """The Markdown files git has or would add. ``safe.directory``: a checkout owned by
    another user than the one running the tests (a CI user's clone of root's) is read as
    well; git refused it ("dubious ownership"), and this module's collection stopped the run."""
    out = subprocess.run(["git", "-c", "safe.directory=*", "ls-files", "-co",
                          "--exclude-standard", "*.md"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_reference_only_what_the_repository_holds(path: Path) -> None:
    text = path.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        assert not OUTSIDE.search(line), f"{path.relative_to(ROOT)}:{number}: {line}"
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same file
        file = target.split("#", 1)[0]
        assert (path.parent / file).exists(), f"{path.relative_to(ROOT)}: broken link {target}"


def test_a_checkout_of_another_user_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """As git sees a checkout that another user owns (its own test switch for that)."""
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    found = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "CHANGELOG.md"} <= found, found
