"""Parameter-server throughput: aggregate optimizer steps/s and gradient pushes/s for 1, 2, 4
and 8 worker processes, sync rounds and async pushes, at N = 1e5 and 1e6 float32 parameters
(one Adam session; each push sends N gradients as safetensors and gets the N updated
parameters back, as ``RemoteOptimizer.step()`` does).

    .venv/bin/python -m benchmarks.parameter_server              # the table, then a profile
    .venv/bin/python -m benchmarks.parameter_server --quick      # fewer pushes per worker
    .venv/bin/python -m benchmarks.parameter_server --no-profile

- sync: ``"sync": {"workers": K, "reduce": "mean"}``; each worker pushes R times as worker
  ``w<k>``; a round = one step. steps/s = rounds/s, pushes/s = K x rounds/s.
- async: no ``sync``; every push is one step. steps/s = pushes/s.

Rates are totals over the wall time from the first push to the last answer; each case runs
three times (``--repeat``) and the median run is reported. The server runs in
its own process (uvicorn, httptools, uvloop, ``OPTSERVE_DURABILITY=memory`` by default, so the
disk is not measured), the workers in processes of their own with one torch thread each, all on
the same machine: on a 2-core box they compete with the server for the cores.

"Where the time goes" splits one case (default: sync, 4 workers, N = 1e6) by the server's own
Prometheus histograms (body decode, device-worker queue and run per operation, response encode)
against the workers' round trip, then prints the top functions of a cProfile of the server's
event-loop thread and of its device-worker thread for the same case.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import pstats
import queue
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import torch

import optserve
from benchmarks._server import PIDS as SERVER_PIDS
from benchmarks._server import free_port
from benchmarks._server import server as bench_server

SIZES = (100_000, 1_000_000)
WORKER_COUNTS = (1, 2, 4, 8)


# --------------------------------------------------------------------------- worker processes
def _push_loop(job: dict[str, Any]) -> dict[str, Any]:
    g = torch.randn(job["n"], generator=torch.Generator().manual_seed(job["k"]))
    worker = f"w{job['k']}"
    lat: list[float] = []
    with optserve.Client(job["url"], max_retries=0, timeout=120) as client:
        client.get_params(job["session"], min_version=0)  # connect before the start line
        while time.time() < job["start_at"]:
            time.sleep(0.001)
        first = time.perf_counter()
        t_first = time.time()
        for _ in range(job["reps"]):
            t0 = time.perf_counter()
            client.step(job["session"], {"w": g}, worker=worker)
            lat.append(time.perf_counter() - t0)
        t_last = t_first + (time.perf_counter() - first)
    return {"start": t_first, "end": t_last, "lat": lat}


def _worker_process(jobs: Any, out: Any) -> None:
    torch.set_num_threads(1)
    while (job := jobs.get()) is not None:
        try:
            out.put(_push_loop(job))
        except Exception as exc:  # handed to the coordinator
            out.put({"error": repr(exc)})


class Pool:
    """Worker processes started once (forked before any torch op here) and reused."""

    def __init__(self, size: int) -> None:
        ctx: Any = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        self.out: Any = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(size)]
        self.procs = [ctx.Process(target=_worker_process, args=(q, self.out), daemon=True)
                      for q in self.jobs]
        for p in self.procs:
            p.start()

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for q, job in zip(self.jobs, jobs, strict=False):
            q.put(job)
        results: list[dict[str, Any]] = []
        while len(results) < len(jobs):
            try:
                r = self.out.get(timeout=5)
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    raise RuntimeError("a worker process died") from None
                continue
            if "error" in r:
                raise RuntimeError(f"worker failed: {r['error']}")
            results.append(r)
        return results

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)


# --------------------------------------------------------------------------- the server
@contextmanager
def server(profile_dir: str | None = None, durability: str = "memory",
           torch_threads: int = 0) -> Iterator[str]:
    port = free_port()
    env = {"OPTSERVE_DEVICE": os.environ.get("OPTSERVE_DEVICE", "cpu"),
           "OPTSERVE_DURABILITY": durability, "OPTSERVE_TORCH_THREADS": str(torch_threads)}
    cmd = None
    if profile_dir is not None:
        cmd = [sys.executable, "-m", "benchmarks.parameter_server", "--serve-profiled",
               str(port), profile_dir]
    with bench_server(env, cmd, port) as url:  # benchmarks.bench_app: the app plus an echo
        yield url


def serve_profiled(port: int, out_dir: str) -> None:
    """The server with two cProfiles, off until SIGUSR1 and written to ``out_dir`` at SIGUSR2
    (so only the measured window is profiled): one for the event-loop thread, one for the jobs
    of the device-worker thread."""
    import signal

    import uvicorn

    from app.engine import worker as worker_mod
    from app.main import create_app

    loop_prof, worker_prof = cProfile.Profile(), cProfile.Profile()
    active = [False]
    original = worker_mod.DeviceWorker.run

    async def run(self: Any, fn: Any, op: str = "other") -> Any:
        def job() -> Any:
            return worker_prof.runcall(fn) if active[0] else fn()
        return await original(self, job, op)
    worker_mod.DeviceWorker.run = run  # type: ignore[method-assign]

    def start(*_: Any) -> None:
        active[0] = True
        loop_prof.enable()  # signal handlers run on the main thread: the event loop's

    def stop(*_: Any) -> None:
        loop_prof.disable()
        active[0] = False
        loop_prof.dump_stats(os.path.join(out_dir, "event_loop.pstats"))
        worker_prof.dump_stats(os.path.join(out_dir, "device_worker.pstats"))
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning",
                            loop="uvloop", http="httptools")
    uvicorn.Server(config).run()


# --------------------------------------------------------------------------- one case
@dataclass
class Case:
    mode: str
    n: int
    workers: int
    steps_per_s: float
    pushes_per_s: float
    median_ms: float
    wall_s: float


def reps_for(n: int, workers: int, quick: bool) -> int:
    per_worker = {100_000: 240, 1_000_000: 60}[n] // max(1, workers // 2)
    per_worker = max(16, per_worker)
    return max(4, per_worker // 3) if quick else per_worker


def run_case(pool: Pool, url: str, mode: str, n: int, k: int, reps: int) -> Case:
    session = f"bench-ps-{mode}-{n}-{k}"
    with optserve.Client(url, timeout=120) as client:
        sync = {"workers": k, "reduce": "mean", "timeout_s": 120} if mode == "sync" else None
        client.create_session("Adam", {"w": torch.zeros(n)}, options={"lr": 1e-3},
                              id=session, sync=sync)
        try:
            start_at = time.time() + 0.3
            results = pool.run([{"url": url, "session": session, "n": n, "k": i,
                                 "reps": reps, "start_at": start_at} for i in range(k)])
            version = client.get_session(session).version
        finally:
            client.delete_session(session)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    pushes = sum(len(r["lat"]) for r in results)
    lat = [x for r in results for x in r["lat"]]
    return Case(mode, n, k, version / wall, pushes / wall, statistics.median(lat) * 1e3, wall)


# --------------------------------------------------------------------------- profile
_SAMPLE = re.compile(r'^(optserve_[a-z_]+)_(sum|count)\{([^}]*)\} ([0-9.e+-]+)$')


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(3), m.group(2))] = float(m.group(4))
    return out


def where_time_goes(pool: Pool, mode: str, n: int, k: int, reps: int, top: int,
                    durability: str, torch_threads: int) -> None:
    with tempfile.TemporaryDirectory() as prof_dir:
        with server(prof_dir, durability, torch_threads) as url:
            run_case(pool, url, mode, n, k, max(4, reps // 4))  # warm up
            before = scrape(url)
            os.kill(SERVER_PIDS[url], signal.SIGUSR1)
            case = run_case(pool, url, mode, n, k, 2 * reps)
            os.kill(SERVER_PIDS[url], signal.SIGUSR2)
            after = scrape(url)
            time.sleep(0.5)  # the dump
        delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
        pushes = case.pushes_per_s * case.wall_s
        steps = case.steps_per_s * case.wall_s
        print(f"\n### Where the time goes: {mode}, {k} workers, N = {n:.0e} "
              f"(profiled server: {case.steps_per_s:.1f} steps/s, {case.pushes_per_s:.1f} "
              f"pushes/s, median push round trip {case.median_ms:.1f} ms)\n")
        print("| server part | total s | per push ms | per step ms |")
        print("|---|---|---|---|")

        def row(label: str, total: float) -> None:
            print(f"| {label} | {total:.3f} | {total / pushes * 1e3:.2f} | "
                  f"{total / steps * 1e3:.2f} |")
        for ph in ("decode", "encode"):
            row(f"request body decode/response encode: {ph}",
                delta.get(("optserve_step_phase_seconds", f'phase="{ph}"', "sum"), 0.0))
        for (metric, labels, kind), value in sorted(delta.items()):
            if metric == "optserve_worker_seconds" and kind == "sum" and value > 0:
                row(f"device worker {labels.replace(chr(34), '')}", value)
        busy = sum(v for (metric, labels, kind), v in delta.items()
                   if metric == "optserve_worker_seconds" and kind == "sum"
                   and 'phase="run"' in labels)
        print(f"\ndevice worker busy {busy:.2f} s of {case.wall_s:.2f} s wall "
              f"({busy / case.wall_s:.0%}); the workers' median round trip is "
              f"{case.median_ms:.1f} ms per push.")
        for name in ("event_loop", "device_worker"):
            path = os.path.join(prof_dir, f"{name}.pstats")
            if not os.path.exists(path):
                continue
            print(f"\n#### cProfile, server {name.replace('_', ' ')} thread (the measured "
                  f"run, top {top} by own time)\n```")
            stats = pstats.Stats(path)
            stats.sort_stats("tottime").print_stats(top)
            print("```")


# --------------------------------------------------------------------------- main
def spin(seconds: float) -> None:
    """Wake the CPU up (the VM runs slow for a while after sitting idle)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-profiled":
        serve_profiled(int(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer pushes per worker")
    ap.add_argument("--max-n", type=float, default=1e6)
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--profile-case", default="sync,1e6,4", help="mode,N,workers")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is kept")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="the server's OPTSERVE_TORCH_THREADS (0: torch's default)")
    ap.add_argument("--durability", default="memory", choices=["memory", "interval", "step"])
    args = ap.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    pool = Pool(max(counts))  # before any torch op in this process
    rows: list[Case] = []
    try:
        with server(durability=args.durability, torch_threads=args.torch_threads) as url:
            spin(3.0)
            for n in (s for s in SIZES if s <= args.max_n):
                for mode in ("async", "sync"):
                    for k in counts:
                        reps = reps_for(n, k, args.quick)
                        run_case(pool, url, mode, n, k, 2)  # warm up
                        runs = sorted((run_case(pool, url, mode, n, k, reps)
                                       for _ in range(args.repeat)),
                                      key=lambda c: c.steps_per_s)
                        case = runs[len(runs) // 2]  # the median run
                        rows.append(case)
                        print(f"  measured {mode} N={n:.0e} workers={k}: "
                              f"{case.steps_per_s:.1f} steps/s", flush=True)
        print(f"\ntorch {torch.__version__}, {os.cpu_count()} cores, server durability "
              f"{args.durability}, server torch threads {args.torch_threads} (0: torch's "
              "default); Adam; each push = N float32 up + N float32 back (safetensors)\n")
        print("| mode | N | workers | steps/s | pushes/s | pushes/s vs 1 worker | "
              "median push round trip ms |")
        print("|---|---|---|---|---|---|---|")
        base: dict[tuple[str, int], float] = {}
        for c in rows:
            base.setdefault((c.mode, c.n), c.pushes_per_s)
            print(f"| {c.mode} | {c.n:.0e} | {c.workers} | {c.steps_per_s:.1f} | "
                  f"{c.pushes_per_s:.1f} | {c.pushes_per_s / base[(c.mode, c.n)]:.2f}x | "
                  f"{c.median_ms:.1f} |")
        if not args.no_profile:
            mode, n_text, k_text = args.profile_case.split(",")
            n, k = int(float(n_text)), int(k_text)
            where_time_goes(pool, mode, n, k, reps_for(n, k, args.quick), args.top,
                            args.durability, args.torch_threads)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
