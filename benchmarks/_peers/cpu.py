"""Where the time goes without a profiler: per-thread CPU time and run-queue wait from
``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds on a CPU, nanoseconds runnable but waiting
for one), read before and after the timed rounds for each system's worker process and its
server processes. On a busy machine the wall-clock median moves with the load; CPU per step
moves much less, and the wait says how much the load cost."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

#: tid -> (ns on CPU, ns waiting to run)
Snapshot = dict[int, tuple[int, int]]


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
    return out


def available() -> bool:
    return Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists()


@dataclass
class Usage:
    """Milliseconds per step."""

    worker_cpu: float
    server_main_cpu: float  # the first server process's main thread (optserve: event loop)
    server_other_cpu: float  # its other threads and any other server process
    wait: float  # run-queue wait of all of them

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
    main = other = wait = 0
    wait = sum(x[1] for x in w.values())
    for k, pid in enumerate(servers):
        for tid, (run, wt) in _delta(before.get(pid, {}), after.get(pid, {})).items():
            if k == 0 and tid == pid:
                main += run
            else:
                other += run
            wait += wt
    return Usage(sum(x[0] for x in w.values()) / per, main / per, other / per, wait / per)
