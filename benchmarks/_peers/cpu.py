"""Where the time goes without a profiler: per-thread CPU time and run-queue wait from
``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on a CPU, nanoseconds runnable but waiting
for one), read before and after the timed rounds for each system's worker process and its
server processes. On a busy machine the wall-clock median moves with the load; CPU per step
moves much less, and the wait says how much the load cost. Minor page faults per step come from
``/proc/<pid>/stat``: each is a fresh 4 KB page the kernel zeroed and mapped, memory a process
gave back (or never had) and touches again."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: tid -> (ns on CPU, ns waiting to run)
Snapshot = dict[int, tuple[int, int]]
#: the key of a process's minor page faults in its snapshot (no thread has id -1)
FAULTS = -1


def threads(pid: int) -> Snapshot:
    out: Snapshot = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            run, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        out[int(tid)] = (int(run), int(wait))
    if out:
        out[FAULTS] = (minor_faults(pid), 0)
    return out


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far, all threads (``minflt`` in ``/proc/<pid>/stat``,
    read after the command's closing parenthesis: a command may hold spaces)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def available() -> bool:
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists()


@dataclass
class Usage:
    """Per step: milliseconds of CPU and of run-queue wait, and minor page faults."""

    worker_cpu: float
    server_main_cpu: float  # the first server process's main thread (optserve: event loop)
    server_other_cpu: float  # its other threads and any other server process
    wait: float  # run-queue wait of all of them
    worker_faults: float = 0.0  # minor page faults per step, the worker process
    server_faults: float = 0.0  # and every server process

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def take(pids: list[int]) -> dict[int, Snapshot]:
    return {pid: threads(pid) for pid in pids}


def _delta(before: Snapshot, after: Snapshot) -> dict[int, tuple[int, int]]:
    out = {}
    for tid, (run, wait) in after.items():
        run0, wait0 = before.get(tid, (0, 0))
        out[tid] = (run - run0, wait - wait0)
    return out


def usage(worker: int, servers: list[int], before: dict[int, Snapshot],
          after: dict[int, Snapshot], steps: int) -> Usage:
    per = 1e6 * max(steps, 1)
    w = _delta(before.get(worker, {}), after.get(worker, {}))
    worker_faults = w.pop(FAULTS, (0, 0))[0]
    main = other = wait = faults = 0
    wait = sum(x[1] for x in w.values())
    for k, pid in enumerate(servers):
        delta = _delta(before.get(pid, {}), after.get(pid, {}))
        faults += delta.pop(FAULTS, (0, 0))[0]
        for tid, (run, wt) in delta.items():
            if k == 0 and tid == pid:
                main += run
            else:
                other += run
            wait += wt
    n = max(steps, 1)
    return Usage(sum(x[0] for x in w.values()) / per, main / per, other / per, wait / per,
                 worker_faults / n, faults / n)
