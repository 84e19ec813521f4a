#!/usr/bin/env python3
"""Print the runtime part of requirements-lock.txt (used by the Dockerfile's build stage).

Every pinned line of the lock is kept except the packages that only the ``dev`` extra of
pyproject.toml names (pytest, ruff, mypy, ...) and those that only extras not asked for name
(``ray``, unless ``--extras ray``), so the image gets exactly the lock's versions of the server's
dependencies (and of the transitive pins the lock holds, e.g. starlette) and no test tools. Fails
when a runtime dependency of pyproject.toml (or of an extra asked for) is not pinned with ``==``
in the lock, so the image can never resolve an unpinned version silently.

Usage: lock-runtime.py [--extras ray,...] [pyproject.toml] [requirements-lock.txt]
       > runtime-lock.txt
"""

from __future__ import annotations

import re
import sys
import tomllib

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise SystemExit(f"lock-runtime: cannot read a package name in {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def main(pyproject_path: str, lock_path: str, extras: tuple[str, ...] = ()) -> int:
    with open(pyproject_path, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional) - {"dev"})
    if unknown:
        raise SystemExit(f"lock-runtime: no extra {unknown[0]!r} in {pyproject_path}")
    runtime = {_norm(r) for r in project.get("dependencies", [])}
    for extra in extras:
        runtime |= {_norm(r) for r in optional[extra]}
    dev_only = {_norm(r) for name, reqs in optional.items() if name not in extras
                for r in reqs}
    dev_only -= runtime

    kept: list[str] = []
    pinned: set[str] = set()
    with open(lock_path, encoding="utf-8") as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name = _norm(line)
            if name in dev_only:
                continue
            if "==" not in line:
                raise SystemExit(f"lock-runtime: {lock_path}: {line!r} is not pinned with ==")
            kept.append(line)
            pinned.add(name)

    missing = sorted(runtime - pinned)
    if missing:
        raise SystemExit(
            f"lock-runtime: runtime dependencies of {pyproject_path} missing from {lock_path}: "
            + ", ".join(missing)
        )
    print("\n".join(kept))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    chosen: tuple[str, ...] = ()
    if args[:1] == ["--extras"]:
        if len(args) < 2:
            raise SystemExit(__doc__)
        chosen = tuple(e.strip() for e in args[1].split(",") if e.strip())
        args = args[2:]
    args = args or ["pyproject.toml", "requirements-lock.txt"]
    if len(args) != 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(args[0], args[1], chosen))
