"""The SDK's install hints say what works: the package is installed from the optserve
repository, as its README says (``pip install './clients/python[torch]'``), not from a package
index (``pip install 'optserve[torch]'`` finds nothing); an extra's own requirement installs
by itself into an environment that has the SDK. The READMEs name only extras the SDK has."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import optserve
from optserve import _constants, _watch

SDK = Path(optserve.__file__).resolve().parent
ROOT = SDK.parent.parent.parent
# `pip install` and what it installs: quoted or bare words, up to a word that is no target
_INSTALL = re.compile(r"pip install((?:\s+(?:'[^'\s]+'|\"[^\"\s]+\"|[A-Za-z0-9_./\[\]<>=-]+))+)")


def pyproject() -> dict[str, object]:
    return tomllib.loads((SDK.parent / "pyproject.toml").read_text())


def installed(text: str) -> list[str]:
    """What every ``pip install`` in ``text`` installs (quotes removed): its first word, and
    the next ones that are quoted or look like a path or a requirement (not the prose after
    it, as in "pip install . from the repository")."""
    out = []
    for match in _INSTALL.finditer(text):
        for k, word in enumerate(match.group(1).split()):
            if k and word[0] not in "'\"" and not set(word) & set("./[<>="):
                break
            out.append(word.strip("'\""))
    return out


def readme_installs() -> set[str]:
    """What the SDK README's install block installs."""
    readme = (SDK.parent / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    return set(installed(block))


def extra_requirements() -> set[str]:
    """The plain names of what the SDK's extras add (``torch``, ``plotext``)."""
    extras = pyproject()["project"]["optional-dependencies"]  # type: ignore[index]
    return {re.split(r"[<>=\[ ]", req, maxsplit=1)[0] for reqs in extras.values()
            for req in reqs}


def test_every_hint_installs_what_the_readme_installs_or_an_extras_requirement() -> None:
    """Every ``pip install`` the SDK's sources (its errors, its CLI's help) tell a user to run
    installs what the README's install block installs, or an extra's own requirement; none
    names ``optserve[...]``, which no index has. The hints said ``pip install
    'optserve[torch]'`` and ``'optserve[watch]'``."""
    # (and "." for the server, which `optserve serve` without it says to install from the
    # repository's root)
    allowed = readme_installs() | extra_requirements() | {"."}
    assert {"./clients/python", "./clients/python[torch]", "./clients/python[watch]"} \
        <= readme_installs()
    found: dict[str, list[str]] = {}
    for path in sorted(SDK.glob("*.py")):
        text = path.read_text()
        assert "pip install 'optserve[" not in text, path.name
        targets = installed(text)
        if targets:
            found[path.name] = targets
    assert found, "the SDK gives no install hint at all"
    for name, targets in found.items():
        assert set(targets) <= allowed, (name, set(targets) - allowed)


@pytest.mark.parametrize(("name", "extra", "requirement"), [
    ("TORCH_HINT", "torch", "torch"), ("WATCH_HINT", "watch", "plotext")])
def test_the_hints_name_the_readmes_command_and_the_requirement(
        name: str, extra: str, requirement: str) -> None:
    hint = getattr(_constants, name)
    assert f"pip install './clients/python[{extra}]'" in hint
    assert f"pip install {requirement}," in hint
    assert f"./clients/python[{extra}]" in readme_installs()
    assert requirement in extra_requirements()


def test_watch_without_plotext_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "plotext", None)  # `import plotext` raises ImportError
    with pytest.raises(_watch.WatchUnavailable) as caught:
        _watch._plotext()
    assert "pip install './clients/python[watch]'" in str(caught.value)
    assert "pip install plotext" in str(caught.value)


def test_the_readmes_name_only_extras_the_sdk_has() -> None:
    """Every ``./clients/python[...]`` the repository's READMEs and docs install names an extra
    of the SDK's pyproject."""
    extras = set(pyproject()["project"]["optional-dependencies"])  # type: ignore[index]
    texts = [ROOT / "README.md", SDK.parent / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = set()
    for path in texts:
        for target in installed(path.read_text()):
            m = re.fullmatch(r"\./clients/python(?:\[([a-z,]+)\])?", target)
            if m and m.group(1):
                named.update(m.group(1).split(","))
    assert named and named <= extras, named - extras
