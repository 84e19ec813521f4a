"""When an idle host gives its heap back.

While sessions step, the heap keeps the blocks a step frees for the next step to reuse
(``app.runtime.tune_allocator``); giving them back costs the next step their page faults (for a
1e7-parameter Adam step, some 120 MB of fresh pages). So "idle" is measured against the host's
own rhythm: after it steps without pauses, two seconds without an operation; after it paused
between bursts (a worker's seconds-long forward and backward pass), twice the longest of its
last eight pauses, at most a minute. When memory is short it gives the heap back after two idle
seconds whatever its rhythm: then the memory is worth more to others than the page faults are to
the next step. Short means that the heap's free bytes are more than a sixteenth of the memory
still available (the container's when it has a limit, else the machine's): 7 GB available and
a 1e7 Adam session's 120-200 MB of kept blocks is not short; 1 GB available and the same blocks
is. (Until this rule, short was "less than half of the memory available": on a 24 GB machine
running other work, every pause of two seconds gave the blocks back and the next step faulted
them in again.) Where the heap's free bytes cannot be read, less than half available is short.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from app.runtime import heap_free_bytes

#: seconds between looks at the device worker's job count
POLL_S = 2.0
#: the longest wait, in polls (a minute)
MAX_POLLS = 30
#: the heap goes back after one idle poll when its free bytes are more than this share of the
#: memory available
HEAP_SHARE = 1 / 16
#: where the heap's free bytes are unknown: below this share of memory available
LOW_MEMORY = 0.5


class IdleClock:
    """Fed one poll at a time (whether any operation ran since the last one, and a way to ask
    whether memory is short); says when the heap should be given back: once per idle stretch,
    after work."""

    def __init__(self, remembered: int = 8) -> None:
        self.idle = 0  # polls in a row without an operation
        self.pauses: deque[int] = deque(maxlen=remembered)  # idle stretches that work ended
        self.busy = False  # operations ran since the last trim

    def wait(self) -> int:
        """Polls without an operation before a trim."""
        return min(MAX_POLLS, max(1, 2 * max(self.pauses, default=0)))

    def asks(self, active: bool) -> bool:
        """Whether :meth:`poll` with ``active`` will ask ``short_of_memory`` (a caller can
        then find the answer off its own thread first: reading the heap's resident size takes
        milliseconds)."""
        return not active and self.busy and self.idle + 1 < self.wait()

    def poll(self, active: bool, short_of_memory: Callable[[], bool] = lambda: False) -> bool:
        """One look; ``short_of_memory`` is asked only when its answer decides (work is left
        to give back and the rhythm's wait has not run out), not on every idle poll."""
        if active:
            if self.idle:
                self.pauses.append(self.idle)
            self.idle = 0
            self.busy = True
            return False
        asking = self.asks(False)  # work to give back, and the rhythm's wait not run out
        self.idle += 1
        if self.busy and (not asking or short_of_memory()):
            self.busy = False
            return True
        return False


def available_share(root: Path = Path("/")) -> float | None:
    """The share of memory available to this process (see :func:`available`)."""
    memory = available(root)
    return None if memory is None else memory[0] / memory[1]


def available(root: Path = Path("/")) -> tuple[int, int] | None:
    """The bytes of memory available to this process and the total they are of: its cgroup's
    when the cgroup has a limit below the machine's memory (v2: ``memory.max`` less
    ``memory.current``; v1: ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``), else the
    machine's (``MemAvailable`` of ``MemTotal``); None when none of them can be read."""
    machine: tuple[int, int] | None = None
    total = 0
    try:
        fields = dict(line.split(":", 1) for line in
                      (root / "proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        if total:
            machine = (int(fields["MemAvailable"].split()[0]) * 1024, total)
    except (OSError, ValueError, KeyError):
        pass
    cgroup = root / "sys/fs/cgroup"
    for limit_file, used_file in (("memory.max", "memory.current"),
                                  ("memory/memory.limit_in_bytes",
                                   "memory/memory.usage_in_bytes")):
        try:
            limit = int((cgroup / limit_file).read_text())  # v2's "max": ValueError
            used = int((cgroup / used_file).read_text())
        except (OSError, ValueError):
            continue
        if limit > 0 and (not total or limit < total):  # v1 without a limit: a huge number
            return max(0, limit - used), limit
    return machine


def default_memory_bound(root: Path = Path("/")) -> int:
    """Half of the memory this process may use (the total :func:`available` reads), and no
    bound (``sys.maxsize``) where that cannot be read: the default bound on what same-host
    bindings hold, and on what request bodies hold."""
    memory = available(root)
    return sys.maxsize if memory is None else memory[1] // 2


def short_of_memory(heap_free: Callable[[], int | None] = heap_free_bytes,
                    root: Path = Path("/")) -> bool:
    """Whether the heap's free bytes are worth more to others now (see the module's
    docstring)."""
    memory = available(root)
    if memory is None:
        return False
    free = heap_free()
    if free is None:
        return memory[0] < LOW_MEMORY * memory[1]
    return free > HEAP_SHARE * memory[0]
