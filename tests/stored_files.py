"""What a data directory stores, for tests that check a restart or a refusal left it as it
was."""

from __future__ import annotations

from pathlib import Path

from app.engine.data_dir_lock import LOCK_NAME


def stored_files(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` and its bytes, less the store's write probes and the data
    directory lock's file (which notes its holder, pid and start time, at each start)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".probe" not in p.name and p.name != LOCK_NAME}
