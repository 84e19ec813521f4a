"""Process-level tuning applied once at start."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("optserve")
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep glibc from returning large optimizer temporaries to the OS after every step
    (Adam at 10M params allocates ~40 MB of temporaries per step): raise the mmap and trim
    thresholds so freed blocks are reused from the heap."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024)
    except (OSError, AttributeError):
        log.debug("mallopt not available; allocator left as is")
