"""The code version: which optserve source this process runs.

A digest of the ``app`` package as installed (every ``app/**/*.py``, sorted by relative path,
each path and its bytes), computed once per process at its first use. A Ray front compares its
own with each host actor's before its first call to it (:meth:`app.engine.ray_host.RayHost.call`):
fronts and host actors run one commit (docs/cluster.md, "Several fronts").
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_APP = Path(__file__).resolve().parent


@functools.cache
def code_version() -> str:
    """The first 16 hex digits of the sha256 of the ``app`` package's source (each file's
    relative path and length, then its bytes, in path order)."""
    digest = hashlib.sha256()
    files = sorted((p.relative_to(_APP).as_posix(), p) for p in _APP.rglob("*.py"))
    for name, path in files:
        data = path.read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]
