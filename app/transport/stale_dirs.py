"""Socket directories that servers killed with ``kill -9`` left behind.

A server makes its same-host socket in a private directory of its own,
``optserve-local-<pid>-<random>``, and removes it when it stops. A server that is killed
cannot, and every restart makes a new one (a machine of many restarts held over a thousand).
At start the transport removes those of its own user whose server is gone: the pid in the name
is no live process, nothing answers on the socket (a server in another pid namespace that
shares the directory does), and the directory is older than :data:`MIN_AGE_S` (a server that is
starting has made its directory but not yet its socket).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

PREFIX = "optserve-local-"
SOCKET_NAME = "optserve.sock"
MIN_AGE_S = 60.0
_NAME = re.compile(r"optserve-local-([0-9]{1,10})-[A-Za-z0-9_]+")


#: the longest path a Unix socket can be bound at (``sun_path``: 108 bytes on Linux, the last
#: a NUL)
MAX_SOCKET_PATH = 107
#: the longest parent directory a server's socket fits under: what the path adds to it is
#: ``/optserve-local-<pid>-<8 random characters>/optserve.sock`` (a pid of at most 10 digits)
MAX_PARENT_BYTES = MAX_SOCKET_PATH - len(f"/{PREFIX}") - 10 - 1 - 8 - len(f"/{SOCKET_NAME}")


def fits(parent: Path) -> bool:
    """Whether a server's socket directory can be made in ``parent``: its socket's path
    stays within :data:`MAX_SOCKET_PATH` bytes."""
    return len(os.fsencode(str(parent))) <= MAX_PARENT_BYTES


def default_parent() -> Path:
    """Where a server's socket directory goes unless ``OPTSERVE_LOCAL_DIR`` says: the system's
    temporary directory (``TMPDIR``, ...), or ``/tmp`` where the former's path is too long for
    a socket under it (a CI runner's deep TMPDIR: binding failed with "AF_UNIX path too long",
    and the server did not start)."""
    tmp = Path(tempfile.gettempdir())
    if fits(tmp) or not os.path.isdir("/tmp"):
        return tmp
    return Path("/tmp")


def prefix() -> str:
    """The name a new directory of this process starts with."""
    return f"{PREFIX}{os.getpid()}-"


def sweep(parent: Path, now: float | None = None) -> list[Path]:
    """Remove the directories in ``parent`` that servers gone for good left behind; the ones
    removed."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                or now - info.st_mtime < MIN_AGE_S):
            continue
        path = Path(entry.path)
        if _alive(int(match[1])) or _answers(path / SOCKET_NAME):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:  # (``kill(0, ...)`` would mean this process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
