"""Server memory for one Adam session: resident memory above the idle process after steps,
against the budget of 1.2x (parameters + optimizer state + one gradient buffer).

    python -m benchmarks.memory --n 1e7 --steps 15
    python -m benchmarks.memory --n 1e7 --options '{"lr": 1e-3, "fused": true}' --no-metrics

Starts the server as ``scripts/serve`` does (``python -m app``, ``OPTSERVE_TORCH_THREADS=1``,
durability ``memory`` unless ``--durability``), reads its ``VmRSS``/``VmHWM`` from ``/proc``,
creates the session over JSON and steps it with safetensors bodies from a plain httpx client.
Prints one table.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

from benchmarks._server import PIDS, free_port, memory_mb, server, user_defaults


def heap_mb(pid: int) -> float:
    """Resident MB of the process's ``[heap]`` mapping (glibc's main arena: with the server's
    ``tune_allocator`` every block lives there, so a step that leaves holes shows here)."""
    heap, current = 0, ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                current = fields[5] if len(fields) > 5 else ""
            elif fields and fields[0] == "Rss:" and current == "[heap]":
                heap += int(fields[1])
    return heap / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="1e7")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--durability", default="memory")
    parser.add_argument("--verbose", action="store_true",
                        help="RSS above idle after each step, and the heap's own RSS")
    parser.add_argument("--rest-s", type=float, default=5.0,
                        help="seconds at rest after the steps before the last reading")
    parser.add_argument("--options", default='{"lr": 1e-3}',
                        help="the Adam session's options, JSON (e.g. with \"fused\": true, "
                             "torch's fused CPU kernel, which takes no N-sized temporaries)")
    parser.add_argument("--no-metrics", action="store_true",
                        help="create the session with \"metrics\": false (no buffer for the "
                             "update norm)")
    args = parser.parse_args()
    n = int(float(args.n))
    options = json.loads(args.options)
    port = free_port()
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1",
           "OPTSERVE_DURABILITY": args.durability,
           "OPTSERVE_DATA_DIR": tempfile.mkdtemp(prefix="optserve-mem-")}
    log = Path(tempfile.mkdtemp(prefix="optserve-mem-log-")) / "server.log"
    print(f"server log: {log}")
    with server(env, command=[sys.executable, "-m", "app"], port=port,
                unset=user_defaults(env), log=log) as url, \
            httpx.Client(base_url=url, timeout=600) as c:
        pid = PIDS[url]
        time.sleep(1.0)
        idle, _ = memory_mb(pid)
        p0 = torch.zeros(n)
        r = c.post("/v1/sessions", json={
            "optimizer": "Adam", "options": options, "metrics": not args.no_metrics,
            "params": {"p": {"dtype": "float32", "shape": [n],
                             "b64": base64.b64encode(p0.numpy().tobytes()).decode()}}})
        r.raise_for_status()
        sid = r.json()["id"]
        _, created_peak = memory_mb(pid)  # the create's own peak (its JSON body decoded)
        body = save({"p": torch.randn(n)})
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            r = c.post(f"/v1/sessions/{sid}/step", content=body,
                       headers={"Content-Type": "application/octet-stream",
                                "Accept": "application/octet-stream"})
            r.raise_for_status()
            times.append(time.perf_counter() - t)
            if args.verbose:
                print(f"step {len(times)}: RSS above idle {memory_mb(pid)[0] - idle:.0f} MB "
                      f"(heap {heap_mb(pid):.0f} MB)", file=sys.stderr)
        stepping, _ = memory_mb(pid)
        time.sleep(args.rest_s)  # the server gives back free heap pages once idle
        rss, hwm = memory_mb(pid)
    budget = 4 * n * 4 / 2**20  # params + exp_avg + exp_avg_sq + one gradient, float32
    print(f"options {json.dumps(options)}, metrics {'off' if args.no_metrics else 'on'}")
    print("| N | steps | idle RSS MB | above idle after the last step MB | above idle at rest "
          "MB | peak above idle MB | peak by the end of the create MB | params+state+grad MB | "
          "after the last step / that | at rest / that | peak / that | median step ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {n:.0e} | {args.steps} | {idle:.0f} | {stepping - idle:.0f} | {rss - idle:.0f} | "
          f"{hwm - idle:.0f} | {created_peak - idle:.0f} | {budget:.0f} | "
          f"{(stepping - idle) / budget:.2f} | "
          f"{(rss - idle) / budget:.2f} | {(hwm - idle) / budget:.2f} | "
          f"{statistics.median(times) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
