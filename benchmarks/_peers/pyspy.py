"""Optional: record a server with py-spy while it is measured (``--py-spy DIR``), and
summarize a raw (collapsed-stack) profile by the functions that hold the most samples.

py-spy takes CPU itself (100 samples/s per process): figures from a profiled run are not the
ones to quote."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@contextmanager
def record(pids: dict[str, int], out_dir: Path, tag: str, native: bool = False) -> Iterator[None]:
    """py-spy record every pid (label -> pid) into ``out_dir/<label>-<tag>.txt`` (raw
    collapsed stacks per thread, active samples only: a thread waiting is not sampled) for
    the duration of the block."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy, or -e '.[bench]')")
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for label, pid in pids.items():
        name = f"{label}-{tag}".replace("[", "-").replace("]", "")
        cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--threads",
               "--rate", "200", "-o", str(out_dir / f"{name}.txt")]
        if native:
            cmd.append("--native")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    time.sleep(1.0)  # attach
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _frame(raw: str) -> str:
    # "function (file.py:123)" -> "function (file.py)"
    name, _, where = raw.partition(" (")
    return f"{name} ({where.split(':')[0].rstrip(')')})" if where else name


def summarize(path: Path, top: int = 15) -> str:
    """Top functions of a raw py-spy profile: self samples (the innermost frame) and inclusive
    samples (anywhere on the stack), per thread, as percentages of that thread's samples."""
    self_c: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    incl_c: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = stack.split(";")
        thread, frames = frames[0], [_frame(f) for f in frames[1:]]
        count = int(count_s)
        totals[thread] += count
        if frames:
            self_c[thread][frames[-1]] += count
        for f in set(frames):
            incl_c[thread][f] += count
    out = [f"# {path.name}"]
    for thread, total in totals.most_common():
        out.append(f"## {thread}: {total} samples")
        out.append("self%   incl%   function")
        for fn, c in incl_c[thread].most_common(top):
            out.append(f"{100 * self_c[thread][fn] / total:5.1f}  {100 * c / total:6.1f}   {fn}")
        out.append("top self: " + "; ".join(
            f"{fn} {100 * c / total:.1f}%" for fn, c in self_c[thread].most_common(8)))
    return "\n".join(out)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
        print()
