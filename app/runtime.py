"""Process-level tuning applied once at start."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("optserve")
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_allocator() -> None:
    """Keep glibc from returning large blocks to the OS after every step, without letting the
    heap grow: Adam at 1e7 parameters allocates a 40 MB temporary per step and a request body
    is as large, and glibc serves blocks above its mmap threshold (at most 32 MB, whatever
    ``mallopt`` asks) with fresh ``mmap`` calls and unmaps them on free: every step pays the
    page faults of 80 MB. So: no mmap for large blocks (``M_MMAP_MAX`` 0), one arena for all
    threads (a body freed by the event loop's thread is the block the device worker's next
    temporary reuses; per-thread arenas kept one copy each), and a trim threshold of 64 MB
    (the heap gives back what it holds beyond that). Measured on a 1e7 Adam session (see
    ``benchmarks/memory.py``): faster steps, and resident memory at rest about 1.0x params +
    state + one gradient (while a step runs its body, temporaries and answer add to that)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        log.debug("mallopt not available; allocator left as is")


_libc: ctypes.CDLL | None = None


def release_memory() -> None:
    """Give the OS back the free pages of the heap, holes included (``malloc_trim``): after
    operations that allocate and free much more than a step (a create, an import, an export,
    a snapshot), so the heap that reuses per-step blocks does not keep their peak."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return
        _libc = ctypes.CDLL(name)
    try:
        _libc.malloc_trim(0)
    except AttributeError:
        pass
