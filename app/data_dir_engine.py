"""Which engine a data directory belongs to.

The embedded engine keeps its sessions in ``<data dir>/sessions/<key>/`` (a sharded session's
layout in ``directory/<key>``, its shards ``local``); the Ray engine keeps them under
``<data dir>/hosts/<name>/`` with an entry naming their hosts in ``directory/<key>``. Neither
engine serves the other's sessions, and each reads every entry of ``directory/`` as its own:
the embedded engine pointed at a Ray engine's directory failed to start on its first plain
entry (a ``KeyError``), and took a sharded Ray session's entry for one of its own whose shards
are gone and deleted it; the Ray engine pointed at an embedded one served none of its sessions
(404) without a word.

So the first start on a data directory notes its engine in ``<data dir>/engine``, and a start
of the other engine there is refused before anything is read or written, naming both (exit 2:
a configuration to fix). A directory from before this file is told by what it holds:
``sessions/`` with a session in it (or a ``tombstones.jsonl``) is the embedded engine's,
``hosts/`` with anything in it the Ray engine's; one with both is refused to either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

#: the file that names the engine a data directory belongs to
ENGINE_FILE = "engine"
#: what it may name (``OPTSERVE_ENGINE``'s values)
ENGINES = ("embedded", "ray")

log = logging.getLogger("optserve")


def _has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds anything but hidden names (a delete's leftovers)."""
    try:
        with os.scandir(folder) as entries:
            return any(not e.name.startswith(".") for e in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


def owners(data_dir: Path) -> set[str]:
    """The engines whose sessions ``data_dir`` holds: the one its file names, or for a
    directory without it, what its layout shows (empty: a new or an empty directory)."""
    try:
        named = (data_dir / ENGINE_FILE).read_text(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        named = ""
    if named:
        return {named}
    found = set()
    if _has_entries(data_dir / "sessions") or (data_dir / "tombstones.jsonl").exists():
        found.add("embedded")
    if _has_entries(data_dir / "hosts"):
        found.add("ray")
    return found


def engine_problem(data_dir: Path, engine: str) -> str | None:
    """Why ``engine`` must not start on ``data_dir`` (another engine's sessions are there),
    or None. Reads only."""
    others = sorted(owners(data_dir) - {engine})
    if not others:
        return None
    unknown = [o for o in others if o not in ENGINES]
    if unknown:
        return (f"{str(data_dir / ENGINE_FILE)!r:.200} names the engine {unknown[0]!r:.40}, "
                f"not one of {', '.join(ENGINES)}: write the engine its sessions are for")
    what = " and ".join(f"the {o} engine's" for o in others)
    return (f"OPTSERVE_DATA_DIR={str(data_dir)!r:.200} holds {what} sessions, and this server "
            f"runs the {engine} engine (OPTSERVE_ENGINE={engine}), which would not serve them "
            "and would take the other engine's entries in its directory/ for its own. Start "
            "the engine that wrote them, give this one another OPTSERVE_DATA_DIR, or move the "
            "sessions over (docs/cluster.md, Files) and write the engine's name to "
            f"{str(data_dir / ENGINE_FILE)!r:.200}")


def claim(data_dir: Path, engine: str) -> None:
    """Refuse ``engine`` on another engine's data directory (RuntimeError naming both);
    else note it in the directory's file, where it is not yet (a full or read-only disk: only
    warned, and noted at a later start)."""
    problem = engine_problem(data_dir, engine)
    if problem is not None:
        raise DataDirOfAnotherEngine(problem)
    path = data_dir / ENGINE_FILE
    if path.exists():
        return
    from app.engine.store import write_atomic  # (the engine's: only once the server starts)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, [f"{engine}\n".encode()])
    except OSError as exc:
        log.warning("could not note the engine in %s: %s", path, exc.strerror or exc)


class DataDirOfAnotherEngine(RuntimeError):
    """The data directory holds the other engine's sessions."""
