"""Readiness ahead of a full disk (``OPTSERVE_READY_MIN_FREE_BYTES``): whether a data
directory's file system has less free space than a bound, measured at most once every
:data:`FREE_SPACE_TTL_S` (a probe polling ``/readyz`` costs no ``statvfs`` per call). The
embedded engine's store asks it of its data directory (:meth:`app.engine.store.Store.health`),
the Ray engine's front of the data directory its hosts' stores share
(:meth:`app.engine.ray_host.RayRouter.status`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

#: how long a measure of the data directory's free space stands
FREE_SPACE_TTL_S = 1.0


class FreeSpace:
    """The free space of ``root`` (``measure(root)``: ``f_bavail * f_frsize``, what this
    process may write) against ``min_free_bytes`` (0: never measured)."""

    def __init__(self, root: Path, min_free_bytes: int,
                 measure: Callable[[Path], int]) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._measure = measure
        #: the last free space measured and when (``time.monotonic``; None: not yet)
        self._free: tuple[float, int] | None = None

    def short(self) -> str | None:
        """Why the free space is under :attr:`min_free_bytes`, or None (also for a directory
        that cannot be measured: left to the other checks)."""
        if self.min_free_bytes <= 0:
            return None
        now = time.monotonic()
        cached = self._free
        if cached is not None and now - cached[0] < FREE_SPACE_TTL_S:
            free = cached[1]
        else:
            try:
                free = self._measure(self.root)
            except OSError:
                return None
            self._free = (now, free)
        if free >= self.min_free_bytes:
            return None
        return (f"the data directory is (nearly) full: {free} bytes free, under "
                f"OPTSERVE_READY_MIN_FREE_BYTES ({self.min_free_bytes}); a write could fail")

    def unreachable(self, total_bytes: Callable[[Path], int]) -> str | None:
        """A warning (the start logs it) when :attr:`min_free_bytes` is more than the whole
        file system of :attr:`root` (``total_bytes(root)``: ``f_blocks * f_frsize``) holds:
        so much can never be free, and :meth:`short` is never None. None otherwise, also
        where the size cannot be measured."""
        if self.min_free_bytes <= 0:
            return None
        try:
            total = total_bytes(self.root)
        except OSError:
            return None
        if self.min_free_bytes <= total:
            return None
        return (f"OPTSERVE_READY_MIN_FREE_BYTES ({self.min_free_bytes}) is more than the data "
                f"directory's file system holds in all ({total} bytes, {self.root}): /readyz "
                "will answer 503 not_ready for as long as this server runs; lower it (0 turns "
                "the check off)")
