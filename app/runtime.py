"""Process-level tuning applied once at start."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

from app.gc_settle import settler
from optserve._gc import paused

log = logging.getLogger("optserve")
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: the largest trim threshold ``mallopt`` (an ``int``) can set: glibc does not trim by itself
_NEVER_TRIM = 2**31 - 1


_libc: ctypes.CDLL | None = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _c() -> ctypes.CDLL | None:
    """The C library (loaded once), or None where it cannot be found."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return None
        try:
            _libc = ctypes.CDLL(name)
        except OSError:
            return None
        mallinfo2 = getattr(_libc, "mallinfo2", None)  # glibc 2.33+
        if mallinfo2 is not None:
            mallinfo2.restype = _MallInfo2
    return _libc


def tune_allocator() -> None:
    """Keep glibc from returning large blocks to the OS while sessions step: Adam at 1e7
    parameters allocates a 40 MB temporary per step and a request body is as large, and glibc
    serves blocks above its mmap threshold (at most 32 MB, whatever ``mallopt`` asks) with fresh
    ``mmap`` calls and unmaps them on free: every step would pay the page faults of 80 MB. So:
    no mmap for large blocks (``M_MMAP_MAX`` 0), and one arena for all threads (a body freed by
    the event loop's thread is the block the device worker's next temporary reuses; per-thread
    arenas kept one copy each).

    And glibc never trims the heap's top by itself (``M_TRIM_THRESHOLD`` at the most ``mallopt``
    takes, 2 GiB): with the 64 MB it had before, a 1e7 Adam step that happened to leave more
    than that free at the top gave it back, and the next step faulted it in again
    (``benchmarks.ab`` at 1e7 Adam: p90 204 -> 107 ms). The heap is given back instead when the
    host has been idle (``app.engine.idle``: two seconds, longer after pauses between steps
    unless memory is short) and after operations much larger than a step (a create, an import,
    an export, a snapshot: ``release_memory``). Measured with ``benchmarks/memory.py``: resident
    memory at rest about 1.0x params + state + one gradient (while a step runs, its body,
    temporaries and answer add to that)."""
    libc = _c()
    if libc is None:
        log.debug("C library not found; allocator left as is")
        return
    try:
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    except (OSError, AttributeError):
        log.debug("mallopt not available; allocator left as is")


def settle_gc(*, sessions: bool = True) -> None:
    """For the server process, once its modules are loaded (before any session exists):
    everything alive now (the interpreter, torch, the app) leaves the cyclic collector's sight
    (``gc.freeze``), and the youngest generation grows to 10,000 objects before a collection.
    Each full collection used to walk torch's million-odd objects: a safetensors header of
    100,000 tensors took 0.52 s to parse, 0.15 s after this. ``sessions``
    (``OPTSERVE_GC_FREEZE_SESSIONS``): sessions' parameters and state leave it too, as they
    are made (:mod:`app.gc_settle`). Not done in-process (tests, an embedding application):
    frozen objects that later become cyclic garbage are freed only by a sweep."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    settler.enable(sessions)


#: no cyclic collection while building a large tree of fresh objects that holds no cycles (a
#: parsed header of 100,000 tensors: 0.52 s with collections, 0.08 s without): the SDK's
#: counted pause (the server and the SDK are one distribution; one count in a process that
#: runs both)
gc_paused = paused


def heap_free_bytes() -> int | None:
    """The resident bytes of glibc's heap that hold no allocation, about what
    :func:`release_memory` would give back: the heap mapping's resident size (``[heap]`` in
    ``/proc/self/smaps``; one arena and no mmapped blocks, as :func:`tune_allocator` sets it)
    less the bytes in use (``mallinfo2().uordblks``; its count of free bytes also counts pages
    already given back). None where either cannot be read (another libc, glibc < 2.33, no
    ``/proc``)."""
    libc = _c()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    used = int(mallinfo2().uordblks)
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            in_heap = False
            for line in f:
                if in_heap and line.startswith("Rss:"):
                    return max(0, int(line.split()[1]) * 1024 - used)
                if line.rstrip().endswith("[heap]"):
                    in_heap = True
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_memory() -> None:
    """Give the OS back the free pages of the heap, holes included (``malloc_trim``): after
    operations that allocate and free much more than a step (a create, an import, an export,
    a snapshot), so the heap that reuses per-step blocks does not keep their peak."""
    libc = _c()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
    except AttributeError:
        pass
