"""The docs keep up with the code, mechanically: every problem code the server can answer is
in docs/protocol.md, every ``OPTSERVE_*`` setting is in the README or docs/, with the default
the code has wherever a table states one, and every route of the OpenAPI document is in the
README's endpoint table."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.api.problems import _HTTP_CODES
from app.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "protocol.md"


def _sources() -> list[Path]:
    return sorted(p for p in (ROOT / "app").rglob("*.py") if "static" not in p.parts)


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def problem_codes() -> dict[str, str]:
    """Every literal problem code in app/, with where it is raised: ``code="..."`` arguments,
    ``problem(status, "code", ...)`` answers, and the class-level code of an error class
    raised somewhere without one of its own."""
    trees = {path: ast.parse(path.read_text()) for path in _sources()}
    class_codes: dict[str, str] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (isinstance(item, ast.Assign) and len(item.targets) == 1
                            and isinstance(item.targets[0], ast.Name)
                            and item.targets[0].id == "code"
                            and isinstance(item.value, ast.Constant)):
                        class_codes[node.name] = str(item.value.value)
    codes: dict[str, str] = {}
    for path, tree in trees.items():
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            keyword = next((k for k in node.keywords if k.arg == "code"), None)
            if keyword is not None:
                if isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value,
                                                                          str):
                    codes.setdefault(keyword.value.value, f"{where}:{node.lineno}")
            elif name in class_codes:
                codes.setdefault(class_codes[name], f"{where}:{node.lineno}")
            if (name == "problem" and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant)):
                codes.setdefault(str(node.args[1].value), f"{where}:{node.lineno}")
    for code in _HTTP_CODES.values():
        codes.setdefault(code, "app/api/problems.py (HTTP errors)")
    return codes


def test_the_scan_finds_the_codes_it_must() -> None:
    """The scan itself works: a code= argument, a problem() answer, a class default raised
    without a code, and the HTTP errors' codes are all found."""
    codes = problem_codes()
    for code in ("shape_mismatch", "session_not_found", "draining", "payload_too_large",
                 "body_timeout", "method_not_allowed"):
        assert code in codes, code
    assert "conflict" not in codes  # Conflict is always raised with a code of its own


def test_every_problem_code_is_in_the_protocol_doc() -> None:
    text = PROTOCOL.read_text()
    missing = {code: where for code, where in problem_codes().items()
               if f"`{code}`" not in text}
    assert not missing, f"problem codes docs/protocol.md does not name: {missing}"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md",
                                              *sorted((ROOT / "docs").glob("*.md"))])


def test_every_setting_is_documented() -> None:
    text = _docs_text()
    missing = [env_name(f) for f in Settings.model_fields if f"`{env_name(f)}`" not in text]
    assert not missing, f"settings neither README.md nor docs/ mention: {missing}"


_ROW = re.compile(r"^\|\s*`(OPTSERVE_[A-Z0-9_]+)`\s*\|\s*([^|]*)\|")
_NO_VALUE = ("(none)", "none", "empty", "(any)", "(system temp)")


def _same(stated: str, default: Any) -> bool:
    """Whether a table's default cell (``\\`50\\``, ``\\`0\\` (unlimited)``, ``(none)``, ...)
    states ``default``."""
    quoted = re.match(r"^`([^`]*)`", stated)
    if quoted is None:
        return stated.lower() in _NO_VALUE and default in ("", None)
    value = quoted.group(1)
    if isinstance(default, bool):
        return value == ("1" if default else "0")
    if isinstance(default, int | float):
        try:
            return float(value) == float(default)
        except ValueError:
            return False
    if isinstance(default, Path):
        return Path(value) == default
    return bool(value == default)


def _table_rows() -> list[tuple[str, str, str]]:
    """The rows of the docs' settings tables (headed ``| variable | default | what |``)."""
    rows = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        header = None
        for line in path.read_text().splitlines():
            if not line.startswith("|"):
                header = None
                continue
            if header is None:
                header = [cell.strip() for cell in line.strip("|").split("|")]
            m = _ROW.match(line)
            if m and header[:2] == ["variable", "default"]:
                rows.append((path.name, m.group(1), m.group(2).strip()))
    return rows


def test_settings_tables_state_the_code_defaults() -> None:
    rows = _table_rows()
    assert len(rows) > 30  # README's Configuration table, cluster.md's, durability.md's
    wrong = []
    for doc, variable, stated in rows:
        field = variable.removeprefix("OPTSERVE_").lower()
        if field not in Settings.model_fields:
            wrong.append(f"{doc}: {variable} is not a setting")
            continue
        default = Settings.model_fields[field].default
        if not _same(stated, default):
            wrong.append(f"{doc}: {variable} default {stated!r}, the code has {default!r}")
    assert not wrong, wrong


@pytest.mark.parametrize("stated,default,same", [
    ("`50`", 50.0, True), ("`0` (unlimited)", 0, True), ("`1`", True, True),
    ("`0`", True, False), ("`./data`", Path("data"), True), ("(none)", "", True),
    ("none", None, True), ("`step`", "step", True), ("`60`", 30.0, False),
    ("(none)", "x", False),
])
def test_default_cells_are_read_as_meant(stated: str, default: Any, same: bool) -> None:
    assert _same(stated, default) is same


def test_every_route_is_in_the_readme_endpoint_table() -> None:
    """Routes as the committed OpenAPI document has them (the contract, which other tests keep
    equal to the app's)."""
    paths = json.loads(ROOT.joinpath("openapi.json").read_text())["paths"]
    readme = ROOT.joinpath("README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    documented = {(m.group(1), re.sub(r"\{[^}]*\}", "{}", m.group(2)))
                  for m in re.finditer(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`", table)}
    assert len(documented) > 20
    missing = [f"{method.upper()} {path}" for path, item in paths.items() for method in item
               if (method.upper(), re.sub(r"\{[^}]*\}", "{}", path)) not in documented]
    assert not missing, f"routes the README's endpoint table does not list: {missing}"
