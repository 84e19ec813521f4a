"""The run: one process per system, then per (N, optimizer) a case: set every system up,
spin the CPU, take untimed warm-up steps, time interleaved rounds, check every system's
result bitwise against an in-process replay of the same steps, tear down."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._peers import cpu, pyspy
from benchmarks._peers.base import REGISTRY, RunConfig, System, instance_id
from benchmarks._peers.cases import Case, bitwise_diff, fmt_n, replay
from benchmarks._peers.proc import SystemFailed, SystemProcess
from benchmarks._peers.timing import interleaved, reps_for, spin


@dataclass
class Plan:
    sizes: list[int]
    optimizers: list[str]
    systems: list[str]  # registry names, in table order
    durabilities: list[str]
    rounds: int
    reps: int | None  # per round; None: timing.reps_for(N)
    warmup: int
    spin_s: float
    case_spin_s: float
    config: RunConfig
    seed: int = 0
    py_spy_dir: Path | None = None
    py_spy_native: bool = False
    py_spy_workers: bool = False  # also record every system's worker process
    parallel_start: bool = False


@dataclass
class Cell:
    system: str  # instance id
    optimizer: str
    n: int
    samples: list[float]  # seconds per step
    steps: int  # steps taken since setup (warm-up included)
    check: str  # "ok", "-" (not checked), or what went wrong
    usage: cpu.Usage | None = None  # CPU and run-queue wait per timed step


@dataclass
class Result:
    plan: Plan
    instances: list[str]
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance -> facts
    skipped: dict[str, str] = field(default_factory=dict)  # system -> why
    cells: list[Cell] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    load: dict[str, list[float]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and all(c.check in ("ok", "-") for c in self.cells)


def _available(cls: type[System]) -> str | None:
    if cls.requires is None:
        return None
    import importlib.util

    if importlib.util.find_spec(cls.requires) is None:
        return (f"{cls.requires} is not installed: skipping the {cls.name} column "
                f"({cls.install_hint or 'pip install ' + cls.requires})")
    return None


class _Phases:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: list[str] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append(f"{name} {now - self.t:.1f}")
        self.t = now

    def __str__(self) -> str:
        return ", ".join(self.laps)


class Driver:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.procs: dict[str, SystemProcess] = {}
        self.classes: dict[str, type[System]] = {}
        self.result = Result(plan, [])

    # ------------------------------------------------------------------ processes
    def _fail(self, instance: str, exc: BaseException) -> None:
        self.result.failures.append(f"{instance}: {exc}")
        print(f"!! {instance} failed and is dropped from the rest of the run:\n{exc}",
              flush=True)
        proc = self.procs.pop(instance, None)
        if proc is not None:
            proc.close()

    def _all(self, command: str, arg: Any = None, only: list[str] | None = None
             ) -> dict[str, Any]:
        """Send ``command`` to every live system (or ``only``) at once, then collect."""
        targets = [i for i in (only if only is not None else list(self.procs))
                   if i in self.procs]
        sent = []
        for instance in targets:
            try:
                self.procs[instance].send(command, arg)
                sent.append(instance)
            except OSError as exc:
                self._fail(instance, exc)
        out = {}
        for instance in sent:
            try:
                out[instance] = self.procs[instance].recv()
            except SystemFailed as exc:
                self._fail(instance, exc)
        return out

    def start(self) -> None:
        """Spawn and start the systems one at a time (``parallel_start``: all at once, which
        is quicker for a few light systems but on a loaded 2-core machine timed Ray's GCS
        out). Torch's optimizer path is warmed in this process first (the first ``step()``
        imports a lot)."""
        if self.plan.parallel_start:
            self._start_all()
            return
        for optimizer in self.plan.optimizers:
            replay(Case(optimizer, 16), 2)
        for name in self.plan.systems:
            cls = REGISTRY[name]
            why = _available(cls)
            if why:
                print(f"** {why}", flush=True)
                self.result.skipped[name] = why
                continue
            for level in (self.plan.durabilities if cls.per_durability else [None]):
                instance = instance_id(name, level)
                self.classes[instance] = cls
                self.result.instances.append(instance)
                for attempt in (1, 2):  # a busy machine can time a start out (Ray's GCS)
                    t0 = time.perf_counter()
                    self.procs[instance] = SystemProcess(name, level, self.plan.config)
                    try:
                        facts = self.procs[instance].call("start")
                    except SystemFailed as exc:
                        self.procs.pop(instance).close()
                        print(f"!! {instance} did not start (attempt {attempt}):\n{exc}",
                              flush=True)
                        if attempt == 2:
                            self.result.failures.append(f"{instance}: did not start: {exc}")
                        continue
                    self.result.facts[instance] = dict(facts or {})
                    print(f"started {instance} in {time.perf_counter() - t0:.1f} s", flush=True)
                    break

    def _start_all(self) -> None:
        for name in self.plan.systems:
            cls = REGISTRY[name]
            why = _available(cls)
            if why:
                print(f"** {why}", flush=True)
                self.result.skipped[name] = why
                continue
            for level in (self.plan.durabilities if cls.per_durability else [None]):
                instance = instance_id(name, level)
                self.classes[instance] = cls
                self.procs[instance] = SystemProcess(name, level, self.plan.config)
                self.result.instances.append(instance)
        t0 = time.perf_counter()
        targets = list(self.procs)
        for instance in targets:
            self.procs[instance].send("start")
        for optimizer in self.plan.optimizers:  # while they start
            replay(Case(optimizer, 16), 2)
        for instance in targets:
            try:
                self.result.facts[instance] = dict(self.procs[instance].recv() or {})
                print(f"started {instance} ({time.perf_counter() - t0:.1f} s)", flush=True)
            except SystemFailed as exc:
                self._fail(instance, exc)

    def stop(self) -> None:
        procs = [self.procs.pop(instance) for instance in list(self.procs)]
        for proc in procs:
            with contextlib.suppress(OSError):
                proc.send("stop")
        for proc in procs:
            proc.close(stop_sent=True)

    # ------------------------------------------------------------------ one case
    def _runner(self, instance: str) -> Any:
        def run(k: int) -> list[float]:
            if instance not in self.procs:
                return []
            try:
                times: list[float] = self.procs[instance].call("run", k)
                return times
            except SystemFailed as exc:
                self._fail(instance, exc)
                return []
        return run

    def _pids(self, instance: str) -> tuple[int, list[int]]:
        """The system's worker process and its server processes (main server first)."""
        facts = self.result.facts.get(instance, {})
        servers = facts.get("server_pids") or (
            [facts["server_pid"]] if "server_pid" in facts else [])
        pid = self.procs[instance].proc.pid
        return (pid or 0), [int(p) for p in servers]

    def _profiled(self, case: Case, active: list[str]) -> Any:
        plan = self.plan
        if plan.py_spy_dir is None:
            return contextlib.nullcontext()
        pids = {i: self.result.facts[i]["server_pid"] for i in active
                if i.startswith("optserve") and "server_pid" in self.result.facts.get(i, {})}
        if plan.py_spy_workers:
            pids.update({f"{i}-worker": self.procs[i].proc.pid or 0 for i in active
                         if i in self.procs})
        return pyspy.record(pids, plan.py_spy_dir, f"{case.optimizer}-{fmt_n(case.n)}",
                            native=plan.py_spy_native)

    def run_case(self, case: Case) -> str:
        """Run one case; returns how long its phases took."""
        plan = self.plan
        clock = _Phases()
        active = [i for i in self.procs if self.classes[i].supports(case, plan.config)]
        self._all("setup", case, only=active)
        active = [i for i in active if i in self.procs]
        clock.lap("setup")
        reps = plan.reps or reps_for(case.n)
        spin(plan.case_spin_s)
        runners = {i: self._runner(i) for i in active}
        with self._profiled(case, active):
            interleaved(runners, 0, 0, warmup=plan.warmup)
            pids = {i: self._pids(i) for i in active if i in self.procs}
            before = cpu.take([p for w, ss in pids.values() for p in [w, *ss]])
            samples = interleaved(runners, plan.rounds, reps)
            after = cpu.take([p for w, ss in pids.values() for p in [w, *ss]])
        clock.lap("steps")
        steps = plan.warmup + plan.rounds * reps
        infos = self._all("info", only=active)
        for instance, info in infos.items():
            self.result.facts.setdefault(instance, {}).update(info or {})
        checks = self._check(case, [i for i in active if i in self.procs], steps)
        for instance in active:
            check = checks.get(instance, "FAILED (system dropped)")
            use = None
            if instance in pids and instance in self.procs:
                worker, servers = pids[instance]
                use = cpu.usage(worker, servers, before, after, len(samples.get(instance, [])))
            self.result.cells.append(Cell(instance, case.optimizer, case.n,
                                          samples.get(instance, []), steps, check, use))
        clock.lap("check")
        self._all("teardown", only=active)
        clock.lap("teardown")
        return str(clock)

    def _check(self, case: Case, instances: list[str], steps: int) -> dict[str, str]:
        out: dict[str, str] = {}
        refs: dict[str, Any] = {}
        for instance in instances:
            cls = self.classes[instance]
            try:
                if cls.check == "none":
                    out[instance] = "-"
                elif cls.check == "self":
                    problem = self.procs[instance].call("self_check")
                    out[instance] = "ok" if problem is None else f"MISMATCH: {problem}"
                else:
                    if cls.grad_transform not in refs:
                        refs[cls.grad_transform] = replay(case, steps, cls.grad_transform)
                    got = self.procs[instance].call("params")
                    problem = bitwise_diff(got, refs[cls.grad_transform])
                    out[instance] = "ok" if problem is None else f"MISMATCH: {problem}"
            except SystemFailed as exc:
                self._fail(instance, exc)
        return out

    # ------------------------------------------------------------------ the run
    def run(self) -> Result:
        t0 = time.perf_counter()
        self.result.load["start"] = list(os.getloadavg())
        try:
            self.start()
            spin(self.plan.spin_s)
            for n in self.plan.sizes:
                for optimizer in self.plan.optimizers:
                    case = Case(optimizer, n, self.plan.seed)
                    c0 = time.perf_counter()
                    phases = self.run_case(case)
                    print(f"  {optimizer} N={fmt_n(n)}: {time.perf_counter() - c0:.1f} s "
                          f"({phases}), load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            s0 = time.perf_counter()
            self.stop()
            print(f"stopped every system in {time.perf_counter() - s0:.1f} s", flush=True)
        self.result.load["end"] = list(os.getloadavg())
        self.result.wall_s = time.perf_counter() - t0
        return self.result
