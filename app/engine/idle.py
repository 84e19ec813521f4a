"""When an idle host gives its heap back.

While sessions step, the heap keeps the blocks a step frees for the next step to reuse
(``app.runtime.tune_allocator``); giving them back costs the next step their page faults
(tens of milliseconds for a 1e7-parameter step on a VM). So "idle" is measured against the
host's own rhythm: after it steps without pauses, two seconds without an operation; after it
paused between bursts (a worker's seconds-long forward and backward pass, other systems'
turns in a benchmark), twice the longest of its last eight pauses, at most a minute. A
session at rest therefore gives its memory back within a minute of its last operation.
"""

from __future__ import annotations

from collections import deque

#: seconds between looks at the device worker's job count
POLL_S = 2.0
#: the longest wait, in polls (a minute)
MAX_POLLS = 30


class IdleClock:
    """Fed one poll at a time (whether any operation ran since the last one); says when the
    heap should be given back: once per idle stretch, after work."""

    def __init__(self, remembered: int = 8) -> None:
        self.idle = 0  # polls in a row without an operation
        self.pauses: deque[int] = deque(maxlen=remembered)  # idle stretches that work ended
        self.busy = False  # operations ran since the last trim

    def wait(self) -> int:
        """Polls without an operation before a trim."""
        return min(MAX_POLLS, max(1, 2 * max(self.pauses, default=0)))

    def poll(self, active: bool) -> bool:
        if active:
            if self.idle:
                self.pauses.append(self.idle)
            self.idle = 0
            self.busy = True
            return False
        self.idle += 1
        if self.busy and self.idle >= self.wait():
            self.busy = False
            return True
        return False
