"""What refusing a body that names tensors its session does not hold costs the server.

    .venv/bin/python -m benchmarks.unknown_names                   # 1,000 / 10,000 / 100,000
    .venv/bin/python -m benchmarks.unknown_names --names 100000 --reps 5
    .venv/bin/python -m benchmarks.unknown_names --routes step     # the step only

A session of one float32 parameter ``w`` of 2 (SGD) on the server as ``scripts/serve`` starts it
(``python -m app``, durability ``memory``); each body names N tensors of 2 float32 it does not
hold, as JSON (``"data"`` lists) and as safetensors, sent to each route asked for: a step
(``POST .../step``), a push (``POST .../grads``), an overwrite (``PUT .../params``). Per route,
N and format: the body's size, the median wall milliseconds per refusal (the 422
``unknown_parameter``, checked) and the server process's CPU milliseconds per refusal (user +
system, ``/proc/<pid>/stat``: what the server spends, however busy the machine is). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx
import torch
from safetensors.torch import save

from benchmarks._server import PIDS, app_env, app_server, free_port
from benchmarks._timing import median_ms

#: route -> (method, the body's key)
ROUTES = {"step": ("POST", "grads"), "grads": ("POST", "grads"), "params": ("PUT", "params")}


def server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", default="1000,10000,100000")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--routes", default=",".join(ROUTES),
                        help=f"comma-separated, of {', '.join(ROUTES)}")
    args = parser.parse_args()
    counts = [int(n) for n in args.names.split(",")]
    routes = args.routes.split(",")
    for route in routes:
        if route not in ROUTES:
            parser.error(f"unknown route {route!r}; expected {', '.join(ROUTES)}")
    rows = []
    with app_server(app_env(free_port())) as url, httpx.Client(base_url=url,
                                                               timeout=600) as c:
        pid = PIDS[url]
        r = c.post("/v1/sessions", json={"id": "s", "optimizer": "SGD", "options": {"lr": 0.1},
                                         "params": {"w": {"dtype": "float32", "shape": [2],
                                                          "data": [1.0, 2.0]}}})
        assert r.status_code == 201, r.text
        for n in counts:
            names = [f"unknown_{i:07d}" for i in range(n)]
            tensor = {"dtype": "float32", "shape": [2], "data": [0.5, 0.25]}
            binary = save({k: torch.tensor([0.5, 0.25]) for k in names})
            for route in routes:
                method, key = ROUTES[route]
                bodies = {
                    "JSON": (json.dumps({key: dict.fromkeys(names, tensor)}).encode(),
                             "application/json"),
                    "safetensors": (binary, "application/octet-stream"),
                }
                for fmt, (body, ctype) in bodies.items():
                    def refused(body: bytes = body, ctype: str = ctype, method: str = method,
                                route: str = route) -> None:
                        r = c.request(method, f"/v1/sessions/s/{route}", content=body,
                                      headers={"Content-Type": ctype})
                        assert r.status_code == 422, r.text
                        assert r.json()["code"] == "unknown_parameter", r.text
                    refused()  # (warm-up)
                    cpu0 = server_cpu_s(pid)
                    wall = median_ms(refused, args.reps, warmup=0)
                    cpu = (server_cpu_s(pid) - cpu0) / args.reps * 1e3
                    rows.append((route, n, fmt, len(body) / 1e6, wall, cpu))
                    time.sleep(0.2)
    print("| route | names | body | MB | wall ms (median) | server CPU ms |")
    print("|---|---:|---|---:|---:|---:|")
    for route, n, fmt, mb, wall, cpu in rows:
        print(f"| {route} | {n:,} | {fmt} | {mb:.2f} | {wall:.0f} | {cpu:.0f} |")


if __name__ == "__main__":
    main()
