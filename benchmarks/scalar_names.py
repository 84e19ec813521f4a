"""What a client naming a scalar per step makes the server hold: one session, steps each
sending ``{"loss_<step>": 1.0}`` (a new name every step), against ``python -m app`` (what
``scripts/serve`` runs) at its defaults but ``OPTSERVE_DURABILITY=memory`` and the settings
given. It prints the server's resident memory (``VmRSS``) before and after the steps, how many
were taken and how the others were answered, and the size of one ``GET .../history`` (what the
web page polls) with the memory after it.

The history keeps a column per scalar name, a value per row of its ring: before
``metrics.MAX_SCALAR_NAMES`` every new name was taken, so memory and the history's answer grew
with the steps; now the names past it are refused (422 ``invalid_scalars``).

    .venv/bin/python -m benchmarks.scalar_names --steps 8000
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._server import PIDS, app_env, app_server, free_port
from benchmarks.hostile_memory import rss_mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8000, help="steps, each with a new name")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a server setting (repeatable)")
    args = ap.parse_args()
    env = app_env(free_port(), args.env)
    x = {"dtype": "float32", "shape": [1], "data": [1.0]}
    log = Path(tempfile.mkdtemp(prefix="optserve-names-")) / "server.log"
    print(f"server log: {log}")
    with app_server(env, log) as url, httpx.Client(base_url=url, timeout=600) as c:
        pid = PIDS[url]
        c.post("/v1/sessions", json={"id": "names", "optimizer": "SGD", "options": {"lr": 0.1},
                                     "params": {"x": x}}).raise_for_status()
        before = rss_mb(pid)
        answers: collections.Counter[str] = collections.Counter()
        started = time.perf_counter()
        for i in range(args.steps):
            r = c.post("/v1/sessions/names/step",
                       json={"grads": {"x": x}, "scalars": {f"loss_{i}": 1.0}})
            answers[str(r.status_code) if r.status_code == 200
                    else f"{r.status_code} {r.json().get('code')}"] += 1
        took = time.perf_counter() - started
        after = rss_mb(pid)
        r = c.get("/v1/sessions/names/history")
        r.raise_for_status()
        print(f"| steps | answers | RSS before | RSS after the steps | GET .../history | "
              f"RSS after it | s |\n|---|---|---|---|---|---|---|\n"
              f"| {args.steps} | {', '.join(f'{k}: {v}' for k, v in sorted(answers.items()))} "
              f"| {before} MB | {after} MB | {len(r.content) / 1e6:.1f} MB "
              f"| {rss_mb(pid)} MB | {took:.1f} |")


if __name__ == "__main__":
    main()
