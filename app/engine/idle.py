"""When an idle host gives its heap back.

While sessions step, the heap keeps the blocks a step frees for the next step to reuse
(``app.runtime.tune_allocator``); giving them back costs the next step their page faults (for a
1e7-parameter Adam step, some 120 MB of fresh pages). So "idle" is measured against the host's
own rhythm: after it steps without pauses, two seconds without an operation; after it paused
between bursts (a worker's seconds-long forward and backward pass), twice the longest of its
last eight pauses, at most a minute. When memory is short (less than half of the machine's,
or of the container's, is available) it gives the heap back after two idle seconds whatever its
rhythm: then the memory is worth more to others than the page faults are to the next step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

#: seconds between looks at the device worker's job count
POLL_S = 2.0
#: the longest wait, in polls (a minute)
MAX_POLLS = 30
#: below this share of memory available, the heap goes back after one idle poll
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

    def poll(self, active: bool, short_of_memory: Callable[[], bool] = lambda: False) -> bool:
        """One look; ``short_of_memory`` is asked only when its answer decides (work is left
        to give back and the rhythm's wait has not run out), not on every idle poll."""
        if active:
            if self.idle:
                self.pauses.append(self.idle)
            self.idle = 0
            self.busy = True
            return False
        self.idle += 1
        if self.busy and (self.idle >= self.wait() or short_of_memory()):
            self.busy = False
            return True
        return False


def available_share(root: Path = Path("/")) -> float | None:
    """The share of memory available to this process: its cgroup's when the cgroup has a limit
    below the machine's memory (v2: ``memory.max`` less ``memory.current``; v1:
    ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``), else the machine's
    (``MemAvailable`` of ``MemTotal``); None when none of them can be read."""
    machine: float | None = None
    total = 0
    try:
        fields = dict(line.split(":", 1) for line in
                      (root / "proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        machine = int(fields["MemAvailable"].split()[0]) * 1024 / total if total else None
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
            return max(0.0, 1.0 - used / limit)
    return machine


def short_of_memory() -> bool:
    share = available_share()
    return share is not None and share < LOW_MEMORY
