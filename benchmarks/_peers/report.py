"""The Markdown tables and the JSON record of a run."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks._peers import cpu
from benchmarks._peers.cases import fmt_n
from benchmarks._peers.driver import Cell, Result
from benchmarks._peers.targets import PEERS, targets_table
from benchmarks._peers.timing import median_ms, quantile_ms, reps_for


def fmt_ms(ms: float) -> str:
    if ms != ms:
        return "-"
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:.0f}"


def _cells(result: Result) -> dict[tuple[str, str, int], Cell]:
    return {(c.system, c.optimizer, c.n): c for c in result.cells}


def _median(cell: Cell | None) -> float:
    return median_ms(cell.samples) if cell and cell.samples else float("nan")


def header(result: Result, command: str) -> list[str]:
    plan = result.plan
    facts = result.facts
    threads = ", ".join(f"{i} {f['step_threads']}" for i, f in facts.items()
                        if "step_threads" in f)
    reps = plan.reps or "(" + ", ".join(f"{reps_for(n)} at {fmt_n(n)}" for n in plan.sizes) + ")"
    ray = next((f["ray"] for f in facts.values() if "ray" in f), None)
    lines = [
        f"command: `{command}`",
        f"torch {torch.__version__}, Python {platform.python_version()}"
        + (f", Ray {ray}" if ray else "") + f", {platform.machine()}, "
        f"{os.cpu_count()} cores; one process per system, torch intra-op "
        f"threads 1 everywhere (`torch.set_num_threads(1)`; `OPTSERVE_TORCH_THREADS=1`); "
        f"threads seen where steps ran: {threads or 'n/a'}",
        f"N float32 parameters in one tensor: {', '.join(fmt_n(n) for n in plan.sizes)}; "
        f"{plan.warmup} untimed steps, then {plan.rounds} interleaved rounds of "
        f"{reps} steps per system (round-robin, rotating start); median ms per step as the "
        f"worker sees it; every cell checked bitwise against an in-process replay",
        f"durability: {', '.join(plan.durabilities)}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in result.load.get('start', []))}, at end "
        f"{'/'.join(f'{x:.1f}' for x in result.load.get('end', []))}; run took "
        f"{result.wall_s:.0f} s",
    ]
    for instance, f in facts.items():
        if "command" in f:
            lines.append(f"{instance}: `{f['command']}`")
        if "transports" in f:
            lines.append(f"{instance}: TensorPipe transports {f['transports']}, channels "
                         f"{f['channels']}")
        if "heap_reuse" in f:
            lines.append(f"{instance}: optserve's heap reuse (mallopt) "
                         f"{'on' if f['heap_reuse'] else 'off'}")
    for why in result.skipped.values():
        lines.append(f"skipped: {why}")
    return lines


def step_table(result: Result, durability: str) -> list[str]:
    """Rows optimizer x N; a column per system (the optserve ones at ``durability``)."""
    plan = result.plan
    cells = _cells(result)
    cols = [i for i in result.instances
            if i != "disk-fsync" and ("[" not in i or i.endswith(f"[{durability}]"))]
    binary = f"optserve-binary[{durability}]"
    # the floor is echo + a plain in-process step; with heap reuse it is stricter
    floors = [f for f in ("in-process", "in-process-heap") if f in cols] or ["in-process"]
    names = [c.split("[")[0] for c in cols]
    lines = [
        f"| optimizer | N | {' | '.join(names)} | "
        + "".join(f"binary / (echo + {floor}) | " for floor in floors)
        + "binary / best peer |",
        "|---|---|" + "---|" * (len(cols) + len(floors) + 1),
    ]
    for optimizer in plan.optimizers:
        for n in plan.sizes:
            row = []
            for col in cols:
                cell = cells.get((col, optimizer, n))
                if cell is None:
                    row.append("-")
                elif cell.check in ("ok", "-") and cell.samples:
                    row.append(f"{fmt_ms(_median(cell))} {cell.check}".rstrip(" -"))
                else:
                    row.append(f"{fmt_ms(_median(cell))} **{cell.check}**")
            b = _median(cells.get((binary, optimizer, n)))
            ratios = []
            for floor in floors:
                base = _median(cells.get(("echo", optimizer, n))) + _median(
                    cells.get((floor, optimizer, n)))
                ratios.append(f"{b / base:.2f}" if b == b and base == base else "-")
            peers = {p: _median(cells.get((p, optimizer, n))) for p in PEERS
                     if (p, optimizer, n) in cells}
            peers = {p: v for p, v in peers.items() if v == v}
            best = min(peers, key=lambda p: peers[p]) if peers else None
            ratio_peer = f"{b / peers[best]:.2f} ({best})" if best and b == b else "-"
            lines.append(f"| {optimizer} | {fmt_n(n)} | {' | '.join(row)} | "
                         f"{' | '.join(ratios)} | "
                         f"{ratio_peer} |")
    return lines


def disk_table(result: Result) -> list[str]:
    """The disk beside what ``durability: step`` adds over ``memory`` (when both ran)."""
    plan = result.plan
    cells = _cells(result)
    both = {"memory", "step"} <= set(plan.durabilities)
    head = "| N | record bytes | write+fsync ms (median) | write+fsync ms (p90) |"
    if both:
        head += "".join(f" optserve-binary step - memory, {o} |" for o in plan.optimizers)
    lines = [head, "|---|---|---|---|" + ("---|" * len(plan.optimizers) if both else "")]
    for n in plan.sizes:
        samples = [s for o in plan.optimizers
                   for s in (cells[("disk-fsync", o, n)].samples
                             if ("disk-fsync", o, n) in cells else [])]
        if not samples:
            continue
        line = (f"| {fmt_n(n)} | {4 * n:,} | {fmt_ms(median_ms(samples))} | "
                f"{fmt_ms(quantile_ms(samples, 0.9))} |")
        if both:
            for o in plan.optimizers:
                d = (_median(cells.get(("optserve-binary[step]", o, n)))
                     - _median(cells.get(("optserve-binary[memory]", o, n))))
                line += f" {'-' if d != d else f'{d:+.2f}'} |"
        lines.append(line)
    return lines


def _usage_table(result: Result, text: Callable[[cpu.Usage, bool], str]) -> list[str]:
    """One row per (optimizer, N), one column per system: ``text(usage, has_server)``."""
    plan = result.plan
    cells = _cells(result)
    cols = result.instances
    lines = [f"| optimizer | N | {' | '.join(cols)} |", "|---|---|" + "---|" * len(cols)]
    for optimizer in plan.optimizers:
        for n in plan.sizes:
            row = []
            for col in cols:
                cell = cells.get((col, optimizer, n))
                u = cell.usage if cell else None
                row.append("-" if u is None else
                           text(u, bool(u.server_main_cpu or u.server_other_cpu)))
            lines.append(f"| {optimizer} | {fmt_n(n)} | {' | '.join(row)} |")
    return lines


def cpu_table(result: Result) -> list[str]:
    """CPU ms per step by process for every system (Ray: its actor, then its raylet and GCS
    as "other"; torch-rpc: the "ps" process, whose work runs on RPC threads, so "other")."""
    def text(u: cpu.Usage, server: bool) -> str:
        out = fmt_ms(u.worker_cpu)
        return out + f" + {fmt_ms(u.server_main_cpu)}/{fmt_ms(u.server_other_cpu)}" \
            if server else out
    return _usage_table(result, text)


def faults_table(result: Result) -> list[str]:
    """Minor page faults per timed step: the worker process / its server processes (a fault
    is a fresh 4 KB page zeroed and mapped: memory the process gave back and takes again)."""
    def text(u: cpu.Usage, server: bool) -> str:
        out = f"{u.worker_faults:.0f}"
        return out + f" / {u.server_faults:.0f}" if server else out
    return _usage_table(result, text)


def markdown(result: Result, command: str) -> str:
    out = ["### optserve beside Ray and torch RPC: median ms per optimizer step", ""]
    out += [f"- {line}" for line in header(result, command)]
    for level in result.plan.durabilities:
        out += ["", f"#### optserve durability `{level}`", ""]
        out += step_table(result, level)
    if any(c.system == "disk-fsync" for c in result.cells):
        out += ["", "#### disk: write + fsync of one 4N-byte record (in the data directory)", ""]
        out += disk_table(result)
    targets = targets_table(result)
    if targets:
        out += ["", "#### issue 9's targets, from this run (benchmarks/_peers/targets.py)", ""]
        out += targets
    if any(c.usage for c in result.cells):
        out += ["", "#### CPU ms per step: worker process + server main thread / other server "
                "threads and processes (run-queue wait: in --json)", ""]
        out += cpu_table(result)
        out += ["", "#### minor page faults per step: worker process / server processes", ""]
        out += faults_table(result)
    return "\n".join(out)


def to_json(result: Result, command: str) -> dict[str, Any]:
    plan = result.plan
    return {
        "command": command,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sizes": plan.sizes, "optimizers": plan.optimizers, "systems": result.instances,
        "durabilities": plan.durabilities, "rounds": plan.rounds, "warmup": plan.warmup,
        "reps_per_round": {str(n): plan.reps or reps_for(n) for n in plan.sizes},
        "facts": result.facts, "skipped": result.skipped, "failures": result.failures,
        "load": result.load, "wall_s": result.wall_s, "ok": result.ok,
        "cells": [{
            "system": c.system, "optimizer": c.optimizer, "n": c.n, "steps": c.steps,
            "check": c.check, "median_ms": _median(c) if c.samples else None,
            "p10_ms": quantile_ms(c.samples, 0.1) if c.samples else None,
            "p90_ms": quantile_ms(c.samples, 0.9) if c.samples else None,
            "mean_ms": statistics.fmean(c.samples) * 1e3 if c.samples else None,
            "usage": c.usage.as_dict() if c.usage else None,
            "samples_ms": [s * 1e3 for s in c.samples],
        } for c in result.cells],
    }
