"""Step round-trip latency through the SDK, JSON and safetensors, beside an in-process torch
step and a raw HTTP echo of the same bytes on the same server stack, in one run.

    .venv/bin/python -m benchmarks.step_latency            # full table (N up to 1e7)
    .venv/bin/python -m benchmarks.step_latency --max-n 1e5 --quick

Prints one table row per (optimizer, N). Targets (issue #2, 2-core machine): binary at 1e7
within 1.3x of (echo + in-process step); 1e3 params under 2 ms; JSON never more than 2x
orjson's encode+decode of the same floats.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import orjson
import torch
from safetensors.torch import save as st_save

import optserve
from benchmarks._server import server

OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Adam": ("Adam", {"lr": 1e-3}),
    "SGD-momentum": ("SGD", {"lr": 1e-3, "momentum": 0.9}),
}


def reps_for(n: int, quick: bool) -> int:
    base = {1_000: 200, 10_000: 100, 100_000: 40, 1_000_000: 12, 10_000_000: 5}.get(n, 5)
    return max(3, base // 4) if quick else base


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def spin(seconds: float) -> None:
    """Wake the CPU up (the VM runs slow for a while after sitting idle)."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def inprocess_ms(opt_name: str, options: dict[str, Any], n: int, reps: int) -> float:
    p = torch.randn(n)
    opt = getattr(torch.optim, opt_name)([p], **options)
    g = torch.randn(n)

    def step() -> None:
        p.grad = g
        opt.step()
    return median_ms(step, reps)


def orjson_roundtrip_ms(n: int, reps: int) -> float:
    arr = np.random.default_rng(0).standard_normal(n).astype(np.float32)

    def both() -> None:
        orjson.loads(orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY))
    return median_ms(both, reps, warmup=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-n", type=float, default=1e7)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--durability", choices=["memory", "interval", "step"], default="memory",
                    help="the server's OPTSERVE_DURABILITY (memory: the step path alone; "
                    "benchmarks/durability.py measures the levels)")
    ap.add_argument("--json-max-n", type=float, default=1e7,
                    help="largest N for the (slow) JSON column")
    args = ap.parse_args()
    sizes = [n for n in (1_000, 10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_n]
    threads = os.environ.get("OPTSERVE_TORCH_THREADS", "0")
    if threads != "0":
        torch.set_num_threads(int(threads))

    rows = []
    env = {"OPTSERVE_DURABILITY": args.durability, "OPTSERVE_TORCH_THREADS": threads}
    with server(env) as url, httpx.Client(base_url=url, timeout=600) as raw, \
            optserve.Client(url, timeout=600) as client:
        spin(3.0)
        for n in sizes:
            g = torch.randn(n)
            body = st_save({"w": g})
            json_n = n <= args.json_max_n
            for label, (opt_name, options) in OPTIMIZERS.items():
                reps = reps_for(n, args.quick)
                sid = f"bench-{label}-{n}"
                client.create_session(opt_name, {"w": torch.randn(n)}, options=options, id=sid)
                echo = median_ms(functools.partial(
                    raw.post, "/_bench/echo", content=body,
                    headers={"content-type": "application/octet-stream"}), reps)
                local = inprocess_ms(opt_name, options, n, reps)
                binary = median_ms(functools.partial(client.step, sid, {"w": g}, binary=True),
                                   reps)
                js = jref = float("nan")
                if json_n:
                    jreps = max(3, reps // 4) if n >= 1_000_000 else reps
                    js = median_ms(functools.partial(client.step, sid, {"w": g}, binary=False),
                                   jreps, warmup=1)
                    jref = orjson_roundtrip_ms(n, jreps)
                client.delete_session(sid)
                rows.append((label, n, local, echo, binary, binary / (echo + local), js, jref,
                             js / jref))
                print(f"  measured {label} N={n:.0e}", flush=True)

    print()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, server torch threads "
          f"{threads} (0 = torch default), durability {args.durability}")
    head = ("| optimizer | N | in-process step ms | echo ms | SDK binary ms | "
            "binary / (echo+step) | SDK JSON ms | orjson enc+dec ms | JSON / orjson |")
    print(head)
    print("|" + "---|" * 9)
    for label, n, local, echo, binary, ratio, js, jref, jratio in rows:
        print(f"| {label} | {n:.0e} | {local:.3f} | {echo:.2f} | {binary:.2f} | {ratio:.2f} | "
              f"{js:.1f} | {jref:.1f} | {jratio:.2f} |")


if __name__ == "__main__":
    main()
