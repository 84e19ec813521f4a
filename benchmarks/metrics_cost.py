"""What per-step metrics cost: the step round trip with ``"metrics": true`` against ``false``.

    .venv/bin/python -m benchmarks.metrics_cost                  # 1e6 and 1e7, Adam and SGD
    .venv/bin/python -m benchmarks.metrics_cost --sizes 1e6 --optimizers Adam --reps 40

1. Round trip: one server (``python -m app`` as ``scripts/serve`` starts it, CPU, durability
   ``memory``, ``OPTSERVE_TORCH_THREADS`` as given), per N and optimizer three sessions of N
   float32 parameters in one tensor: one with metrics, one with metrics stepped with
   ``?metrics=history`` (the norms taken after the answer), one without; stepped in turn (each
   first in turn) with the same safetensors gradients by a plain httpx client,
   ``Accept: application/octet-stream`` (the new parameters come back). Median and p90 ms, and
   the median differences against the round trip without metrics.
2. On the device alone (in-process, the same worker code): median ms of the optimizer step
   itself (chunked as the server steps it), of the metric work on the step's path (a step
   with its norms for the answer, ``before_step`` + the step + ``after_step``, less the step
   alone; for a parameter stepped in chunks that includes the chunks' copies, subtractions
   and norms taken in the step), and of the copy of the parameters the server takes for the
   next step after handing the answer over (``take_ahead``; none for a parameter stepped in
   chunks).

Prints markdown tables. Run it on a quiet machine: other load moves the medians more than
the metrics do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx
import torch
from safetensors.torch import save as st_save

from app.engine import chunked, metrics
from app.engine.session import Session
from benchmarks._server import free_port, server

BINARY = "application/octet-stream"
OPTIONS = {"Adam": '{"lr": 0.001}', "SGD": '{"lr": 0.01, "momentum": 0.9}'}
#: the sessions stepped in turn: metrics with the norms in the answer, metrics with the norms
#: only in the history (``?metrics=history``: taken after the answer), no metrics
KINDS = ["on", "history", "off"]


def round_trips(sizes: list[int], optimizers: list[str], reps: int, threads: str
                ) -> list[dict[str, Any]]:
    port = free_port()
    env = {"OPTSERVE_DURABILITY": "memory", "OPTSERVE_TORCH_THREADS": threads,
           "OPTSERVE_PORT": str(port), "OPTSERVE_LOG_LEVEL": "warning",
           "OPTSERVE_LOCAL_TRANSPORT": "0"}
    import sys
    rows = []
    with server(env, command=[sys.executable, "-m", "app"], port=port) as url, \
            httpx.Client(base_url=url, timeout=600) as http:
        for n in sizes:
            g = st_save({"w": torch.randn(n)})
            for opt in optimizers:
                for kind in KINDS:
                    on = kind != "off"
                    meta = {"optimizer": opt, "options": OPTIONS[opt], "id": f"{opt}-{n}-{kind}",
                            "metrics": "true" if on else "false"}
                    r = http.post("/v1/sessions", content=st_save({"w": torch.randn(n)}, meta),
                                  headers={"Content-Type": BINARY})
                    assert r.status_code == 201, r.text
                times: dict[str, list[float]] = {kind: [] for kind in KINDS}
                for rep in range(reps + 3):
                    shift = rep % len(KINDS)  # each kind first in turn
                    for kind in KINDS[shift:] + KINDS[:shift]:
                        query = "?metrics=history" if kind == "history" else ""
                        t0 = time.perf_counter()
                        r = http.post(f"/v1/sessions/{opt}-{n}-{kind}/step{query}", content=g,
                                      headers={"Content-Type": BINARY, "Accept": BINARY})
                        dt = (time.perf_counter() - t0) * 1e3
                        assert r.status_code == 200, r.text
                        if rep >= 3:  # warm-up
                            times[kind].append(dt)
                row: dict[str, Any] = {"n": n, "optimizer": opt}
                for kind in KINDS:
                    ts = sorted(times[kind])
                    row[kind] = (statistics.median(ts), ts[max(0, int(len(ts) * 0.9) - 1)])
                    http.delete(f"/v1/sessions/{opt}-{n}-{kind}")
                rows.append(row)
                print(f"  {opt} N={n:.0e}: " + ", ".join(f"{kind} {row[kind][0]:.2f} ms"
                                                        for kind in KINDS), flush=True)
    return rows


def device_only(sizes: list[int], optimizers: list[str], reps: int) -> list[dict[str, Any]]:
    from app.engine.interface import GroupSpec
    from app.runtime import tune_allocator

    tune_allocator()  # as the server does at start (python -m app)

    rows = []
    for n in sizes:
        for opt in optimizers:
            import orjson
            s = Session.build("bench", opt, [GroupSpec({"w": torch.randn(n)})],
                              orjson.loads(OPTIONS[opt]), None, "reject", torch.device("cpu"))
            g = {"w": torch.randn(n)}
            w = s.params["w"]
            step_ms, with_ms, ahead_ms = [], [], []
            for rep in range(reps + 2):
                # the step alone (chunked as the server steps it), then a step with the norms
                # in its answer (for a parameter the step takes in chunks, their update norms
                # are taken in the step: chunked.Watch), as ops.gradients.Step.apply runs them
                w.grad = g["w"]
                t0 = time.perf_counter()
                chunked.step(s.optimizer, opt)
                t1 = time.perf_counter()
                s.version += 1
                splits = chunked.plan(s.optimizer, opt)
                probe = metrics.before_step(s, g, None, splits)
                chunked.step(s.optimizer, opt, splits, probe.watch if probe else None)
                s.version += 1
                metrics.after_step(s, probe, [0.001], 0)
                t2 = time.perf_counter()
                w.grad = None
                # what the device worker does once the answer is handed over (worker.after_job)
                if probe is not None and probe.layout is not None:
                    metrics.take_ahead(s, probe.layout)
                t3 = time.perf_counter()
                if rep >= 2:
                    step_ms.append((t1 - t0) * 1e3)
                    with_ms.append((t2 - t1) * 1e3)
                    ahead_ms.append((t3 - t2) * 1e3)
            rows.append({"n": n, "optimizer": opt, "step": statistics.median(step_ms),
                         "metrics": statistics.median(with_ms) - statistics.median(step_ms),
                         "ahead": statistics.median(ahead_ms)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1e6,1e7")
    ap.add_argument("--optimizers", default="Adam,SGD")
    ap.add_argument("--reps", type=int, default=0, help="steps per variant (default by N)")
    ap.add_argument("--threads", default="1", help="OPTSERVE_TORCH_THREADS of the server")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    optimizers = args.optimizers.split(",")
    torch.set_num_threads(int(args.threads) or torch.get_num_threads())
    spin = time.perf_counter() + 3  # the VM runs slow for a while after sitting idle
    while time.perf_counter() < spin:
        pass
    reps = args.reps or (20 if max(sizes) >= 10_000_000 else 60)
    dev = device_only(sizes, optimizers, max(5, reps // 2))
    rt = round_trips(sizes, optimizers, reps, args.threads)
    print("\nRound trip (safetensors both ways, durability memory), median ms (p90):\n")
    print("| optimizer | N | metrics on | on, `?metrics=history` | metrics off | on - off | "
          "share of the round trip | history - off |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rt:
        on, hist, off = row["on"], row["history"], row["off"]
        print(f"| {row['optimizer']} | {row['n']:.0e} | {on[0]:.2f} ({on[1]:.2f}) | "
              f"{hist[0]:.2f} ({hist[1]:.2f}) | {off[0]:.2f} ({off[1]:.2f}) | "
              f"{on[0] - off[0]:+.2f} | {100 * (on[0] - off[0]) / off[0]:+.1f}% | "
              f"{hist[0] - off[0]:+.2f} |")
    print("\nOn the device alone (in-process, same code), median ms:\n")
    print("| optimizer | N | optimizer.step() | metrics on the step's path (norms) | "
          "metrics / step | copy for the next step (after the answer) |")
    print("|---|---|---|---|---|---|")
    for d in dev:
        print(f"| {d['optimizer']} | {d['n']:.0e} | {d['step']:.2f} | {d['metrics']:.2f} | "
              f"{100 * d['metrics'] / d['step']:.0f}% | {d['ahead']:.2f} |")


if __name__ == "__main__":
    main()
