"""Step round-trip latency through the SDK, JSON and safetensors, beside an in-process torch
step and a raw HTTP echo of the same bytes on the same server stack, in one run.

    .venv/bin/python -m benchmarks.step_latency            # full table (N up to 1e7)
    .venv/bin/python -m benchmarks.step_latency --max-n 1e5 --quick

Measured as ``benchmarks.peers`` measures (``benchmarks/_peers/timing.py``): a CPU spin, untimed
warm-up steps, then the variants interleaved in rounds, medians over all rounds.

Prints one table row per (optimizer, N). Targets (issue #2, 2-core machine): binary at 1e7
within 1.3x of (echo + in-process step); 1e3 params under 2 ms; JSON never more than 2x
orjson's encode+decode of the same floats.
"""

from __future__ import annotations

import argparse
import functools
import os

import httpx
import numpy as np
import orjson
import torch
from safetensors.torch import save as st_save

import optserve
from benchmarks._peers import transfer
from benchmarks._peers.cases import OPTIMIZERS, OptimizerSpec, fmt_n
from benchmarks._peers.timing import (
    WARMUP_STEPS,
    Runner,
    interleaved,
    median_ms,
    reps_for,
    spin,
    timed,
)
from benchmarks._server import server
from benchmarks.echo_app import ECHO_PATH


def inprocess_step(spec: OptimizerSpec, n: int) -> Runner:
    p = torch.randn(n)
    opt = getattr(torch.optim, spec.name)([p], **spec.options)
    g = torch.randn(n)

    def step() -> None:
        p.grad = g
        opt.step()
    return timed(step)


def orjson_roundtrip(n: int) -> Runner:
    arr = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    return timed(lambda: orjson.loads(orjson.dumps(arr, option=orjson.OPT_SERIALIZE_NUMPY)))


def echo_once(raw: httpx.Client, body: bytes) -> None:
    """The body to the echo route and back, moved as ``benchmarks.peers`` moves the echo's."""
    status, answer = transfer.post(raw, ECHO_PATH, [body],
                                   {"content-type": "application/octet-stream"})
    if status != 200 or len(answer) != len(body):
        raise RuntimeError(f"echo answered {status} with {len(answer)} of {len(body)} bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-n", type=float, default=1e7)
    ap.add_argument("--sizes", default=None,
                    help="N, comma-separated (default: 1e3 ... 1e7 up to --max-n)")
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--durability", choices=["memory", "interval", "step"], default="memory",
                    help="the server's OPTSERVE_DURABILITY (memory: the step path alone; "
                    "benchmarks/durability.py measures the levels)")
    ap.add_argument("--json-max-n", type=float, default=1e7,
                    help="largest N for the (slow) JSON column")
    ap.add_argument("--spin", type=float, default=3.0,
                    help="CPU spin (s) before the first case (as benchmarks.peers)")
    ap.add_argument("--case-spin", type=float, default=0.5, help="CPU spin (s) before each case")
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    sizes = ([int(float(x)) for x in args.sizes.split(",")] if args.sizes else
             [n for n in (1_000, 10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_n])
    threads = os.environ.get("OPTSERVE_TORCH_THREADS", "0")
    if threads != "0":
        torch.set_num_threads(int(threads))

    rows = []
    env = {"OPTSERVE_DURABILITY": args.durability, "OPTSERVE_TORCH_THREADS": threads}
    with server(env) as url, httpx.Client(base_url=url, timeout=600) as raw, \
            optserve.Client(url, timeout=600) as client:
        spin(args.spin)
        for n in sizes:
            g = torch.randn(n)
            body = st_save({"w": g})
            for label, spec in OPTIMIZERS.items():
                sid = f"bench-{label}-{n}"
                client.create_session(spec.name, {"w": torch.randn(n)}, options=spec.options,
                                      id=sid)
                runners = {
                    "echo": timed(functools.partial(echo_once, raw, body)),
                    "local": inprocess_step(spec, n),
                    "binary": timed(functools.partial(client.step, sid, {"w": g},
                                                      binary=True)),
                }
                reps = {name: reps_for(n) for name in runners}
                if n <= args.json_max_n:
                    runners["json"] = timed(functools.partial(client.step, sid, {"w": g},
                                                              binary=False))
                    runners["orjson"] = orjson_roundtrip(n)
                    reps["json"] = reps["orjson"] = (
                        max(1, reps_for(n) // 4) if n >= 1_000_000 else reps_for(n))
                spin(args.case_spin)
                samples = interleaved(runners, rounds, reps, warmup=WARMUP_STEPS)
                med = {name: median_ms(ts) for name, ts in samples.items()}
                js, jref = med.get("json", float("nan")), med.get("orjson", float("nan"))
                client.delete_session(sid)
                rows.append((label, n, med["local"], med["echo"], med["binary"],
                             med["binary"] / (med["echo"] + med["local"]), js, jref,
                             js / jref))
                print(f"  measured {label} N={fmt_n(n)}", flush=True)

    print()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, server torch threads "
          f"{threads} (0 = torch default), durability {args.durability}; {rounds} interleaved "
          f"rounds after {WARMUP_STEPS} warm-up steps, medians")
    head = ("| optimizer | N | in-process step ms | echo ms | SDK binary ms | "
            "binary / (echo+step) | SDK JSON ms | orjson enc+dec ms | JSON / orjson |")
    print(head)
    print("|" + "---|" * 9)
    for label, n, local, echo, binary, ratio, js, jref, jratio in rows:
        print(f"| {label} | {fmt_n(n)} | {local:.3f} | {echo:.2f} | {binary:.2f} | "
              f"{ratio:.2f} | {js:.1f} | {jref:.1f} | {jratio:.2f} |")


if __name__ == "__main__":
    main()
