"""One process at a time on a data directory.

Two servers started on one data directory (a second ``scripts/serve`` on another port, a
container started before the old one stopped) would each restore the same sessions and each
append its own operations to the same logs: both acknowledge a version 2 of a session, and a
restart keeps only one of them. So the store holds an exclusive ``flock`` on
``<data dir>/.lock`` from its open to its close. A second process, or a second store in this
process, waits for it up to ``wait_s`` (``OPTSERVE_DATA_DIR_WAIT_S``: a supervisor may start
the new process while the old one still drains), then refuses to start with
:class:`DataDirInUse`, naming the holder. The kernel drops the lock when its process dies
(``kill -9`` included), so a crash never leaves the directory locked.

The file holds the holder's pid, host and start time, for the message only. Where it cannot be
made (a first start on a full disk), the directory itself is locked instead (``flock`` on its
descriptor: local file systems; NFS takes the file's lock).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

#: the lock's file in the data directory
LOCK_NAME = ".lock"
#: how often a start waiting for the lock tries again
_POLL_S = 0.1
#: a lock file that cannot be made for want of space: the directory is locked instead
_FULL = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger("optserve.store")


class DataDirInUse(RuntimeError):
    """Another process (or another store of this one) holds the data directory."""


class DataDirLock:
    """The exclusive lock of one data directory (:meth:`acquire`, then :meth:`release`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / LOCK_NAME
        self._fd: int | None = None
        self._is_file = True
        #: why the lock no longer keeps other processes out (:meth:`renew`), or None
        self.lost: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float) -> None:
        """Take the lock, waiting for its holder up to ``wait_s`` seconds; raise
        :class:`DataDirInUse` naming the holder when it is still held then."""
        if self._fd is not None:
            return
        fd, is_file = self._open()
        try:
            deadline = time.monotonic() + wait_s
            waiting = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = self._holder(is_file)
                    if time.monotonic() >= deadline:
                        raise DataDirInUse(
                            f"the data directory {self.root.resolve()} is in use by another "
                            f"optserve process ({holder}), still after {wait_s:g} s: two "
                            "servers on one data directory would both write its sessions' "
                            "logs, and a restart would keep only one server's steps. Stop "
                            "that process, or give this one its own OPTSERVE_DATA_DIR"
                        ) from None
                    if not waiting:
                        waiting = True
                        log.warning("the data directory %s is in use by another optserve "
                                    "process (%s): waiting up to %g s for it to stop",
                                    self.root.resolve(), holder, wait_s)
                    time.sleep(_POLL_S)
            if is_file:
                self._note_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._is_file = fd, is_file

    def _note_holder(self, fd: int) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        holder_line = f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder_line.encode(), 0)
        except OSError as exc:  # only the message loses it (a full disk)
            log.warning("could not note this process in %s: %s", self.path, exc)

    def renew(self) -> bool:
        """Take the lock again when its file was removed or replaced while it was held (the
        data directory removed under a running server): a lock on a file no folder holds
        keeps no other process out. Where another process took the new file first,
        :attr:`lost` says so (readiness reports it); the lock held stays as it was. True when
        it was taken again (the directory is this process's again, made anew)."""
        fd = self._fd
        if fd is None or not self._is_file:
            return False
        try:
            mine, there = os.fstat(fd), os.stat(self.path)
            if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                self.lost = None
                return False
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("checking the lock %s: %s", self.path, exc)
            return False
        gone = f"the data directory's lock {self.path} was removed while the server ran"
        try:
            new, is_file = self._open()
        except OSError as exc:
            self.lost = f"{gone} and cannot be made again: {exc.strerror or exc}"
            log.error("%s", self.lost)
            return False
        try:
            fcntl.flock(new, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(new)
            self.lost = (f"{gone}, and another process holds it now ({self._holder(is_file)}): "
                         "two servers write one data directory; stop one of them")
            log.error("%s", self.lost)
            return False
        if is_file:
            self._note_holder(new)
        self._fd, self._is_file = new, is_file
        os.close(fd)
        self.lost = None
        log.warning("%s: taken again", gone)
        return True

    def release(self) -> None:
        """Drop the lock (closing its descriptor drops the ``flock``)."""
        self.lost = None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _open(self) -> tuple[int, bool]:
        """A descriptor to lock (the directory made first where it is missing): the lock's
        file, or the directory where the file cannot be made for want of space; and whether it
        is the file."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), True
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            log.warning("could not make %s (%s): locking the directory itself", self.path,
                        exc.strerror or exc)
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), False

    def _holder(self, is_file: bool) -> str:
        """Who holds the lock, as its file says."""
        if is_file:
            try:
                text = self.path.read_text(errors="replace").strip()
            except OSError:
                text = ""
            if text:
                return text[:200]
        return "its pid is not noted"
