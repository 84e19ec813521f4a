"""Room kept for deletes on a full disk.

A delete of a session made with an ``Idempotency-Key`` writes a small tombstone (the create's
key, so that a retried create is answered 409 ``session_deleted`` and never makes the session
again) before its commit point, the rename of the session's directory
(:meth:`app.engine.store.Store.delete`). On a full disk that write failed, and the session whose
files would free the space could not be deleted through the API.

So the store keeps :data:`RESERVE_BYTES` of written zeros in ``.delete-reserve`` in its data
directory (made at the start, best effort). A tombstone write that finds the disk full unlinks
it and is tried once more; the reserve is made again as soon as there is room (after the delete,
which frees the session's files, or at a later health check). The reserve is a plain file: a
``kill -9`` at any point leaves the delete's own order (tombstone, then the rename) as it was,
and the next start makes the reserve again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("optserve.store")

#: the file under the data directory
RESERVE = ".delete-reserve"
#: its size: room for a tombstone's file and the tombstone log's growth, many times over (a
#: block or two each), far under any ``OPTSERVE_READY_MIN_FREE_BYTES`` worth setting
RESERVE_BYTES = 64 * 1024


class DeleteReserve:
    """``size`` bytes held in ``root / RESERVE`` for a delete on a full disk to release."""

    def __init__(self, root: Path, size: int = RESERVE_BYTES) -> None:
        self.path = root / RESERVE
        self.size = size
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether the reserve is there, whole."""
        try:
            return self.path.stat().st_size == self.size
        except OSError:
            return False

    def make(self) -> bool:
        """Write the reserve (zeros, fsynced: its blocks taken, not a sparse file) unless it is
        held; whether it is held now. A disk without the room (or any other failure) leaves
        no part of it."""
        with self._lock:
            if self.held:
                return True
            tmp = self.path.with_name(RESERVE + ".tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    view = memoryview(bytes(self.size))
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                log.warning("could not make the delete reserve %s (%d bytes): %s", self.path,
                            self.size, os.strerror(exc.errno) if exc.errno else exc)
                return False
            return True

    def release(self) -> bool:
        """Unlink the reserve, freeing its space; whether it was held."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            log.warning("the disk is full: released the delete reserve %s (%d bytes) for a "
                        "delete's tombstone", self.path, self.size)
            return True
