"""Parameter-server training with optserve: 4 worker processes, one optimizer session.

    .venv/bin/python -m examples.parameter_server                 # sync, then async
    .venv/bin/python -m examples.parameter_server --mode sync --rounds 40
    .venv/bin/python -m examples.parameter_server --url http://127.0.0.1:8000

Without ``--url`` it starts a local server (``python -m app`` on a free loopback port, CPU,
sessions kept in memory) and stops it at the end.

The task (generated in code, fixed seed): three interleaved 2-D spirals, 300 points per class
with a little noise (:func:`spirals`); the model is a 2-32-32-3 tanh MLP trained with Adam
(lr 0.02) on cross-entropy. The 900 points are split into 4 equal shards, one per worker.

- **sync**: the session is created with ``"sync": {"workers": 4, "reduce": "mean"}``. Each
  worker computes the gradient of its shard's mean loss and calls ``opt.step()`` of a
  ``RemoteOptimizer(..., worker="w<k>")``; the server waits for all four, steps once with the
  mean gradient (which is the full-batch gradient) and every worker gets the same new
  parameters. The printed loss per round is the mean of the four shard losses, i.e. the
  full-batch loss.
- **async**: the session has no ``sync``; every push steps at once (Downpour style). Each push
  carries the version its gradient was computed from; ``"max_staleness": 2`` refuses older
  ones (the worker pulls fresh parameters and goes on) and ``"staleness_lr": "inverse"``
  scales a stale push's lr by 1/(1+staleness).

At the end a late joiner (this process) pulls the parameters into a fresh model with
``optserve.pull_params`` and reports the accuracy on all 900 points.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import torch
from torch import nn
from torch.nn import functional as F

import optserve

WORKERS = 4
SEED = 0


def spirals(per_class: int = 300, classes: int = 3, noise: float = 0.15,
            seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``classes`` interleaved spiral arms in 2-D (the CS231n toy set), shuffled."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        r = torch.linspace(0.05, 1.0, per_class)
        t = torch.linspace(c * 4.0, (c + 1) * 4.0, per_class) + noise * torch.randn(
            per_class, generator=g)
        xs.append(torch.stack([r * torch.sin(t), r * torch.cos(t)], dim=1))
        ys.append(torch.full((per_class,), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(y), generator=g)
    return x[order], y[order]


def make_model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def shard(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = spirals()
    n = len(y) // WORKERS
    return x[k * n:(k + 1) * n], y[k * n:(k + 1) * n]


# --------------------------------------------------------------------------- workers
def train_shard(url: str, session: str, k: int, steps: int, out: Any) -> None:
    """Worker ``k``'s part: its shard, its replica of the model, a RemoteOptimizer joined to the
    shared session as ``w<k>``. Reports ``(k, step, loss, version, refused)`` per step."""
    x, y = shard(k)
    model = make_model()
    with optserve.Client(url, max_retries=2) as client:
        opt = optserve.RemoteOptimizer(model.parameters(), client=client, session_id=session,
                                       worker=f"w{k}")
        refused = 0
        for i in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            try:
                opt.step()
            except optserve.ConflictError as exc:
                if exc.code != "stale_gradient":
                    raise
                refused += 1
                opt.pull_params()  # too stale: drop this gradient, continue from fresh params
            out.put((k, i, float(loss.detach()), opt.version, refused))
    out.put((k, None, 0.0, 0, refused))


def worker_process(k: int, jobs: Any, out: Any) -> None:
    """A worker process: trains one job after another (``(url, session, steps)``), until
    ``None``."""
    torch.set_num_threads(1)  # 4 workers and the server share the machine's cores
    while (job := jobs.get()) is not None:
        url, session, steps = job
        try:
            train_shard(url, session, k, steps, out)
        except Exception as exc:  # reported to the coordinator, which stops
            out.put((k, -1, 0.0, 0, repr(exc)))


class Workers:
    """``WORKERS`` processes, started once (before this process does any torch work, so a
    forked child inherits no torch thread pool) and reused for both modes."""

    def __init__(self) -> None:
        # torch.optim's first Optimizer() imports torch._dynamo (seconds): once, here, rather
        # than in every worker. It runs no kernel, so the fork below inherits no thread pool.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        method = "fork" if sys.platform == "linux" else "spawn"  # spawn: seconds per import
        ctx = mp.get_context(method)
        self.out: Any = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(WORKERS)]
        self.procs = [ctx.Process(target=worker_process, args=(k, self.jobs[k], self.out),
                                  daemon=True) for k in range(WORKERS)]
        for p in self.procs:
            p.start()

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)

    def run(self, url: str, session: str, steps: int, label: str) -> None:
        for q in self.jobs:
            q.put((url, session, steps))
        by_step: dict[int, list[float]] = {}
        finished, refused = 0, 0
        t0 = time.perf_counter()
        while finished < WORKERS:
            try:
                k, i, loss, version, extra = self.out.get(timeout=1)
            except queue.Empty:
                if any(not p.is_alive() for p in self.procs):
                    raise SystemExit("a worker process died") from None
                continue
            if i == -1:
                raise SystemExit(f"worker {k} failed: {extra}")
            if i is None:
                finished += 1
                refused += extra
                continue
            by_step.setdefault(i, []).append(loss)
            if len(by_step[i]) == WORKERS and (i % 10 == 0 or i == steps - 1):
                mean = sum(by_step[i]) / WORKERS
                what = "round" if label == "sync" else "step "
                print(f"  [{label}] {what} {i + 1:3d}: mean worker loss {mean:.4f} (session "
                      f"version {version})", flush=True)
        took = time.perf_counter() - t0
        print(f"  [{label}] {steps} steps x {WORKERS} workers in {took:.1f} s"
              + (f"; stale pushes refused: {refused}" if label == "async" else ""))


def evaluate(client: optserve.Client, session: str, label: str) -> None:
    late = make_model()  # a late joiner: any init, the session's values are pulled in
    with torch.no_grad():
        for p in late.parameters():
            p.zero_()
    got = optserve.pull_params(client, session, into=late)
    x, y = spirals()
    with torch.no_grad():
        logits = late(x)
        loss = F.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    print(f"  [{label}] late joiner pulled version {got.version}: full-set loss {loss:.4f}, "
          f"accuracy {acc:.1%}")


# --------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def local_server() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(port),
           "OPTSERVE_DEVICE": os.environ.get("OPTSERVE_DEVICE", "cpu"),
           "OPTSERVE_DURABILITY": "memory", "OPTSERVE_LOG_LEVEL": "warning",
           "OPTSERVE_DATA_DIR": tempfile.mkdtemp(prefix="optserve-ps-example-")}
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the local optserve server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--url", help="a running optserve server (default: start a local one)")
    ap.add_argument("--mode", choices=["sync", "async", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=100, help="steps per worker")
    ap.add_argument("--max-staleness", type=int, default=2)
    args = ap.parse_args()
    workers = Workers()  # first: forked before this process runs any torch op
    try:
        run(args, workers)
    finally:
        workers.close()


def run(args: argparse.Namespace, workers: Workers) -> None:
    x, _ = spirals()
    print(f"spirals: {len(x)} points, 3 classes, {WORKERS} shards of {len(x) // WORKERS}; "
          "MLP 2-32-32-3, Adam lr 0.02")
    server = local_server() if args.url is None else _given(args.url)
    with server as url, optserve.Client(url) as client:
        params = dict(make_model().named_parameters())
        names = {str(i): p for i, p in enumerate(params.values())}  # as parameters() names
        if args.mode in ("sync", "both"):
            session = f"ps-sync-{uuid.uuid4().hex[:8]}"
            client.create_session("Adam", names, options={"lr": 0.02}, id=session,
                                  sync={"workers": WORKERS, "reduce": "mean", "timeout_s": 60})
            print(f"sync: session {session}, rounds of {WORKERS} workers, mean reduction")
            workers.run(url, session, args.rounds, "sync")
            evaluate(client, session, "sync")
            client.delete_session(session)
        if args.mode in ("async", "both"):
            session = f"ps-async-{uuid.uuid4().hex[:8]}"
            client.create_session("Adam", names, options={"lr": 0.02}, id=session,
                                  max_staleness=args.max_staleness, staleness_lr="inverse")
            print(f"async: session {session}, max_staleness {args.max_staleness}, "
                  "staleness_lr inverse")
            workers.run(url, session, args.rounds, "async")
            evaluate(client, session, "async")
            client.delete_session(session)


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":  # also: python -m examples.parameter_server
    main()
