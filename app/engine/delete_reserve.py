"""Room kept for deletes on a full disk.

A delete of a session made with an ``Idempotency-Key`` writes a small tombstone (the create's
key, so that a retried create is answered 409 ``session_deleted`` and never makes the session
again) before its commit point, the rename of the session's directory
(:meth:`app.engine.store.Store.delete`). On a full disk that write failed, and the session whose
files would free the space could not be deleted through the API.

So the store keeps up to :data:`RESERVE_BYTES` of written zeros in ``.delete-reserve`` in its
data directory (made at the start, best effort). A tombstone write that finds the disk full
writes the tombstone into the reserve's own blocks (:meth:`DeleteReserve.become`: written over
its first bytes, the file cut to them, fsynced, renamed into the session's directory): it needs
no free block, so no other write (a step of another session) can take the room between the
release and the tombstone. The store then tops the reserve up again from what the delete freed
(the session's files, the reserve's cut tail) before it answers, as much as fits
(:meth:`DeleteReserve.make`, ``take_what_fits``): a user deleting several sessions on a disk full
to the last block gets each delete done. A reserve left short (or not made: a start on a full
disk) is topped up to its whole size by the store's background look, each second while it is
short (:meth:`app.engine.store.Store.top_up_reserve`, also at a delete or readiness check), once
the disk has room for what it lacks with a whole reserve's size to spare and no acknowledged
operation waits for room (a tombstone not yet logged, a log awaiting its healing snapshot);
a step pays nothing for it. The reserve is a plain file: a ``kill -9`` at any
point leaves the delete's own order (tombstone, then the rename) as it was, and the next start
tops the reserve up again (a reserve a crash left part way written is whatever its bytes are:
only its size counts).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.engine.store import Files

log = logging.getLogger("optserve.store")

#: the file under the data directory
RESERVE = ".delete-reserve"
#: its size: room for a tombstone's file and the tombstone log's growth, many times over (a
#: block or two each), far under any ``OPTSERVE_READY_MIN_FREE_BYTES`` worth setting
RESERVE_BYTES = 64 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DeleteReserve:
    """Up to ``size`` bytes held in ``root / RESERVE`` for a delete on a full disk to use."""

    def __init__(self, root: Path, size: int = RESERVE_BYTES) -> None:
        self.path = root / RESERVE
        self.size = size
        self._lock = threading.Lock()
        #: whether the last :meth:`make` found or left the reserve whole and no
        #: :meth:`become` used it since (no ``stat``: the store's background look reads it
        #: every interval, :meth:`app.engine.store.Store.top_up_reserve`)
        self.whole = False
        #: the warning :meth:`_warn` logged last while the reserve could not be made (the
        #: store's background look retries each second: a failing disk logged the same line
        #: each time); cleared once the reserve is whole
        self._warned: str | None = None

    @property
    def held(self) -> bool:
        """Whether the reserve is there, whole."""
        return self.bytes_held() == self.size

    def bytes_held(self) -> int:
        """The reserve's size now (0: none)."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def make(self, *, take_what_fits: bool = False) -> bool:
        """Top the reserve up to its whole size (zeros written at its end and fsynced: its
        blocks taken, not a sparse file); whether it is whole now. A disk without the room
        (or any other failure) leaves it as it was, or, with ``take_what_fits``, with what
        fitted (after a delete: part of a reserve is room for the next delete's tombstone)."""
        with self._lock:
            self.whole = self._make(take_what_fits)
            if self.whole:
                self._warned = None
            return self.whole

    def _make(self, take_what_fits: bool) -> bool:
        """:meth:`make`, under its lock."""
        have = self.bytes_held()
        if have >= self.size:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError as exc:
            self._warn("could not make", exc)
            return False
        try:
            have = done = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(bytes(self.size - have))
                while view:
                    n = os.write(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "write returned no progress")
                    done += n
                    view = view[n:]
                os.fsync(fd)
            except OSError as exc:
                if exc.errno not in _FULL or not take_what_fits:
                    os.ftruncate(fd, have)  # (as it was)
                    self._warn("could not make", exc)
                    return False
                os.fsync(fd)  # (what fitted)
                log.warning("the disk is full: the delete reserve %s holds %d of its %d "
                            "bytes", self.path, done, self.size)
                return False
        except OSError as exc:
            self._warn("could not make", exc)
            return False
        finally:
            os.close(fd)
        return True

    def become(self, dst: Path, data: bytes, files: Files) -> bool:
        """Turn the reserve into the file ``dst`` holding ``data``, written over the reserve's
        own blocks (no free block needed): ``data`` at its start, the file cut to it and
        fsynced, then renamed to ``dst`` (``dst``'s folder fsynced). False when no reserve of
        ``len(data)`` bytes is held (nothing done); OSError when a step fails (the reserve is
        left, with whatever it holds: a later :meth:`make` tops it up)."""
        with self._lock:
            if not data or self.bytes_held() < len(data):
                return False
            self.whole = False  # (from here on, whatever fails: a make tops it up)
            fd = os.open(self.path, os.O_WRONLY)
            try:
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.EIO, "a short write over the delete reserve's blocks")
                files.ftruncate(fd, len(data))
                files.fsync(fd)
            finally:
                os.close(fd)
            files.replace(self.path, dst)
            files.fsync_dir(dst.parent)
            log.warning("the disk is full: a delete's tombstone was written into the delete "
                        "reserve %s (%d bytes)", self.path, self.size)
            return True

    def _warn(self, what: str, exc: OSError) -> None:
        """Log a failure to make or use the reserve, once while the same failure repeats (until
        the reserve is whole again)."""
        line = (f"{what} the delete reserve {self.path} ({self.size} bytes): "
                f"{os.strerror(exc.errno) if exc.errno else exc}")
        if line != self._warned:
            self._warned = line
            log.warning("%s", line)
