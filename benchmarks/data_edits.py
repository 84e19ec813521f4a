"""What finding edits through ``p.data`` costs ``RemoteOptimizer`` (``detect_data_edits``,
``optserve._edits``): N float32 values in one parameter (or ``--tensors`` of them), Adam, the
server as ``scripts/serve`` starts it (``python -m app``, every setting at its default but
``OPTSERVE_TORCH_THREADS=1`` and ``OPTSERVE_DURABILITY=memory``), one torch thread here, over
HTTP (safetensors) and the same-host transport with and without ``zero_copy``.

    .venv/bin/python -m benchmarks.data_edits              # N = 1e7, 15 steps per variant
    .venv/bin/python -m benchmarks.data_edits --n 4000 --tensors 1000 --steps 40
    .venv/bin/python -m benchmarks.data_edits --in-process     # no server: the pieces alone

Per transport it prints the median ms of

- ``check``: the comparison alone (``push_params(only_edited=True)`` with nothing edited: every
  parameter compared bit for bit with its reference);
- ``step on`` / ``step off``: a whole ``step()`` with ``detect_data_edits`` True / False, the
  two optimizers stepping in turn (interleaved), after a CPU spin and untimed warm-up steps;
- ``cpu on`` / ``cpu off``: this process's CPU time in those steps (all its threads: the
  client's share, less exposed to the server's and other processes' noise than wall time).

``--in-process`` times the pieces alone, with no server or optimizer, at 1 and 2 torch
threads: the comparison of one parameter with its reference (an answer's tensor) and the copy
into a kept reference (``zero_copy``, small parameters).

Nothing is asserted: the figures go into the CHANGELOG with this command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import optserve
from benchmarks._peers.timing import spin
from benchmarks._server import free_port, server, user_defaults
from optserve._edits import References

WAYS = {"http": ("http", True), "local zero_copy": ("local", True),
        "local copy": ("local", False)}


def in_process(n: int, tensors: int, reps: int) -> None:
    params = {str(i): torch.nn.Parameter(torch.randn(n // tensors)) for i in range(tensors)}
    answers, kept = References(), References()
    for name, p in params.items():
        answers.adopt(name, p.detach().clone())
    kept.snapshot(params.items())

    def median(fn: object) -> float:
        times = []
        for k in range(reps + 3):
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            if k >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        spin(1.0)
        compare = median(lambda: answers.edited_among(params, set()))
        copy = median(lambda: kept.snapshot(params.items()))
        print(f"torch threads {threads}: compare {compare:.2f} ms, copy into the kept "
              f"references {copy:.2f} ms (N = {n:.0e} in {tensors} parameter(s), median of "
              f"{reps})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tensors", type=int, default=1, help="N split into this many parameters")
    ap.add_argument("--in-process", action="store_true", help="the pieces alone, no server")
    args = ap.parse_args()
    if args.in_process:
        in_process(int(args.n), args.tensors, max(args.steps, 30))
        return
    torch.set_num_threads(1)  # (as the server's OPTSERVE_TORCH_THREADS=1)
    n = int(args.n) // args.tensors
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(i))
             for i in range(args.tensors)]
    print(f"N = {n * args.tensors:.0e} float32 in {args.tensors} parameter(s), Adam, torch "
          f"threads {torch.get_num_threads()}, median ms over {args.steps} steps")
    print(f"{'transport':<18}{'check':>8}{'step on':>10}{'step off':>10}{'cpu on':>9}"
          f"{'cpu off':>9}")
    port = free_port()
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1",
           "OPTSERVE_DURABILITY": "memory"}
    with server(env, command=[sys.executable, "-m", "app"], port=port,
                unset=user_defaults(env)) as url:
        for way, (transport, zero_copy) in WAYS.items():
            with optserve.Client(url, transport=transport, timeout=300) as c:
                params = {d: [torch.nn.Parameter(torch.randn(n)) for _ in grads]
                          for d in (True, False)}
                opts = {d: optserve.RemoteOptimizer(params[d], "Adam", c, lr=1e-3,
                                                    zero_copy=zero_copy,
                                                    detect_data_edits=d)
                        for d in (True, False)}
                times: dict[bool, list[float]] = {True: [], False: []}
                cpu: dict[bool, list[float]] = {True: [], False: []}
                checks: list[float] = []
                spin(2.0)
                for k in range(args.warmup + args.steps):
                    for d in (True, False):
                        for p, g in zip(params[d], grads, strict=True):
                            p.grad = g
                        t0, c0 = time.perf_counter(), time.process_time()
                        opts[d].step()
                        if k >= args.warmup:
                            times[d].append((time.perf_counter() - t0) * 1e3)
                            cpu[d].append((time.process_time() - c0) * 1e3)
                    t0 = time.perf_counter()
                    opts[True].push_params(only_edited=True)
                    if k >= args.warmup:
                        checks.append((time.perf_counter() - t0) * 1e3)
                for opt in opts.values():
                    opt.close(delete_session=True)
            print(f"{way:<18}{statistics.median(checks):>8.1f}"
                  f"{statistics.median(times[True]):>10.1f}"
                  f"{statistics.median(times[False]):>10.1f}"
                  f"{statistics.median(cpu[True]):>9.1f}{statistics.median(cpu[False]):>9.1f}")


if __name__ == "__main__":
    main()
