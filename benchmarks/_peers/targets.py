"""Issue 9's speed targets read off one run, each as reached or not with its figure.

Only what the run measured is judged: a target whose systems or sizes did not run is left
out. The figures are this run's medians (compare within one run: this VM drifts by up to 2x
between runs). The targets measured by other benchmarks (one request per step with a local
OneCycleLR: ``benchmarks.step_latency``; a 1e7 Adam session's memory: ``benchmarks.memory``;
1,000 small tensors: ``benchmarks.many_tensors``) are not here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks._peers.cases import fmt_n
from benchmarks._peers.driver import Cell, Result
from benchmarks._peers.timing import median_ms

PEERS = ("ray", "torch-rpc")  # what a user would pick instead of optserve
#: over TCP, durability ``memory``: (N, the most optserve's binary step may take, as a multiple
#: of the floor, and whether the floor holds the in-process step): 1e3 against the echo alone
#: ("the request path without the framework's fixed costs"), 1e6 and 1e7 against the echo plus
#: a plain in-process step
TCP = ((1_000, 2.0, False), (1_000_000, 1.2, True), (10_000_000, 1.0, True))
#: ``durability: step`` at 1e7: at most ``memory`` + this many times the disk's write+fsync
DISK_FACTOR = 1.2
#: bfloat16 gradients at 1e7: at most this fraction of the float32 step over TCP
BF16_FRACTION = 0.6
BIG = 10_000_000


@dataclass(frozen=True)
class Target:
    what: str
    optimizer: str
    figure: str
    limit: str
    reached: bool


def judge(result: Result) -> list[Target]:
    medians = {(c.system, c.optimizer, c.n): median_ms(c.samples)
               for c in result.cells if c.samples}
    # the disk's write+fsync of the 1e7 record: every optimizer's samples together, as the
    # report's disk table gives it (the disk-fsync system runs in each optimizer's rounds)
    fsyncs = [s for c in result.cells if c.system == "disk-fsync" and c.n == BIG
              for s in c.samples]
    disk = median_ms(fsyncs) if fsyncs else None

    def m(system: str, optimizer: str, n: int) -> float | None:
        """A system's median (an optserve system's at durability ``memory`` unless named)."""
        found = medians.get((system, optimizer, n))
        return medians.get((f"{system}[memory]", optimizer, n)) if found is None else found

    out: list[Target] = []
    for opt in result.plan.optimizers:
        for n, limit, with_step in TCP:
            binary, echo = m("optserve-binary", opt, n), m("echo", opt, n)
            step = m("in-process", opt, n)
            if binary is None or echo is None or (with_step and step is None):
                continue
            floor = echo + (step or 0.0) if with_step else echo
            ratio = binary / floor
            out.append(Target(
                f"TCP binary, `memory`, {fmt_n(n)}: binary / (echo"
                + (" + in-process)" if with_step else ")"), opt,
                f"{ratio:.2f} ({binary:.3g} ms against {floor:.3g})", f"≤ {limit:g}",
                ratio <= limit))
        for n in result.plan.sizes:
            shm = m("optserve-shm", opt, n)  # (its default: edits checked, metrics on)
            peers = {p: v for p in PEERS if (v := m(p, opt, n)) is not None}
            if shm is None or not peers:
                continue
            best = min(peers, key=lambda p: peers[p])
            out.append(Target(f"same host, {fmt_n(n)}: optserve-shm / fastest peer", opt,
                              f"{shm / peers[best]:.2f} ({shm:.3g} ms against {best}'s "
                              f"{peers[best]:.3g})", "< 1", shm < peers[best]))
        step, memory = m("optserve-binary[step]", opt, BIG), m("optserve-binary[memory]", opt, BIG)
        if step is not None and memory is not None and disk is not None:
            extra = step - memory
            out.append(Target(f"`step` at {fmt_n(BIG)}: step - memory, against the disk's "
                              "write+fsync", opt, f"{extra:+.1f} ms (disk {disk:.3g} ms)",
                              f"≤ {DISK_FACTOR:g} x disk = {DISK_FACTOR * disk:.3g} ms",
                              extra <= DISK_FACTOR * disk))
        bf16 = m("optserve-bf16", opt, BIG)
        if bf16 is not None and memory is not None:
            out.append(Target(f"bf16 gradients at {fmt_n(BIG)}: bf16 / float32 over TCP", opt,
                              f"{bf16 / memory:.2f} ({bf16:.3g} ms against {memory:.3g})",
                              f"≤ {BF16_FRACTION:g}", bf16 / memory <= BF16_FRACTION))
    return out


def targets_table(result: Result) -> list[str]:
    """The targets as a Markdown table (empty when the run measured none of them)."""
    targets = judge(result)
    if not targets:
        return []
    lines = ["| target | optimizer | figure | limit | reached |", "|---|---|---|---|---|"]
    lines += [f"| {t.what} | {t.optimizer} | {t.figure} | {t.limit} | "
              f"{'yes' if t.reached else '**no**'} |" for t in targets]
    return lines


def from_json(record: dict[str, Any]) -> Result:
    """A run as ``benchmarks.peers --json`` saved it (the cells' samples; enough to judge)."""
    plan = SimpleNamespace(optimizers=list(record["optimizers"]), sizes=list(record["sizes"]))
    cells = [Cell(c["system"], c["optimizer"], int(c["n"]),
                  [s / 1e3 for s in c["samples_ms"]], int(c["steps"]), str(c["check"]))
             for c in record["cells"]]
    return Result(plan, list(record["systems"]), cells=cells)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks._peers.targets RUN.json``: the targets of a saved run."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks._peers.targets RUN.json (benchmarks.peers --json)",
              file=sys.stderr)
        return 2
    print("\n".join(targets_table(from_json(json.loads(Path(args[0]).read_text())))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
