"""The price of the Ray engine's extra hop, and what a second node buys.

    .venv/bin/python -m benchmarks.cluster                      # everything (several minutes)
    .venv/bin/python -m benchmarks.cluster --sizes 1e4,1e6 --skip-nodes

1. Step round trip through the front (raw httpx, safetensors body in and out, Adam,
   durability ``memory`` so that only the transport differs) at each N: the embedded engine
   (``python -m app``) against the Ray engine (``python -m app`` with
   ``OPTSERVE_ENGINE=ray OPTSERVE_RAY_ADDRESS=local``: a one-node cluster started by the front,
   the session in a host actor). The two servers run side by side and are stepped in turn, so
   whatever else the machine does weighs on both alike. Median and p90 ms.
2. Where the time goes: the same step without HTTP, in one process: the embedded host called
   directly, and a host actor called through the Ray engine's client (numpy through Ray's object
   store one way, the packed parameters back the other); plus the bare optimizer step.
3. Aggregate steps/s of 8 sessions (one client thread each, N = 1e5 by default) on a simulated
   cluster (``ray.cluster_utils.Cluster``) of 1 node with 8 logical CPUs, and of 2 nodes with 4
   each; hosts ask for 1 CPU and spread, so each session has a host of its own. Every
   simulated node is this same machine: the figure shows the overhead of the layout, not more
   hardware.

Prints markdown tables. Timings on a shared machine are noisy; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch
from safetensors.torch import save as st_save

from benchmarks._server import free_port

BINARY = "application/octet-stream"


def reps_for(n: int) -> int:
    return {10_000: 200, 1_000_000: 30, 10_000_000: 8}.get(n, 20)


@contextmanager
def app_server(env: dict[str, str]) -> Iterator[str]:
    """``python -m app`` on a free port with these settings; its base URL once ready."""
    port = free_port()
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")},
            "OPTSERVE_PORT": str(port), "OPTSERVE_DEVICE": "cpu", "OPTSERVE_MAX_BODY_MB": "2048",
            "OPTSERVE_DURABILITY": "memory", "OPTSERVE_LOG_LEVEL": "warning",
            "OPTSERVE_TORCH_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "OPTSERVE_DATA_DIR": tempfile.mkdtemp(prefix="optserve-bench-"), **env}
    proc = subprocess.Popen([sys.executable, "-m", "app"], env=full)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def create(http: httpx.Client, sid: str, n: int) -> None:
    body = st_save({"w": torch.randn(n)}, metadata={"optimizer": "Adam", "id": sid,
                                                    "options": '{"lr": 0.001}'})
    r = http.post("/v1/sessions", content=body, headers={"Content-Type": BINARY})
    assert r.status_code == 201, r.text


def warm(seconds: float = 2.0) -> None:
    """The VM runs slow for a moment after idling: spin first."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


# ----------------------------------------------------------------------------- 1. HTTP
def http_round_trips(sizes: list[int]) -> list[tuple[int, str, float, float]]:
    rows = []
    with app_server({"OPTSERVE_ENGINE": "embedded"}) as e_url, \
            app_server({"OPTSERVE_ENGINE": "ray", "OPTSERVE_RAY_ADDRESS": "local",
                        "OPTSERVE_RAY_RESOURCES": '{"num_cpus": 1}'}) as r_url, \
            httpx.Client(timeout=600) as http:
        for n in sizes:
            g = st_save({"w": torch.randn(n)})
            urls = {"embedded": e_url, "ray": r_url}
            sids = {name: f"b{n}" for name in urls}
            for name, url in urls.items():
                r = http.post(f"{url}/v1/sessions", content=st_save(
                    {"w": torch.randn(n)}, metadata={"optimizer": "Adam", "id": sids[name],
                                                     "options": '{"lr": 0.001}'}),
                    headers={"Content-Type": BINARY})
                assert r.status_code == 201, r.text
            times: dict[str, list[float]] = {k: [] for k in urls}
            warm()
            for i in range(reps_for(n) + 3):
                for name, url in urls.items():
                    t0 = time.perf_counter()
                    r = http.post(f"{url}/v1/sessions/{sids[name]}/step", content=g,
                                  headers={"Content-Type": BINARY, "Accept": BINARY})
                    took = time.perf_counter() - t0
                    assert r.status_code == 200, r.text
                    if i >= 3:
                        times[name].append(took * 1000)
            for name, xs in times.items():
                rows.append((n, name, statistics.median(xs), pct(xs, 0.9)))
                print(f"  N={n:.0e} {name}: {statistics.median(xs):.2f} ms", flush=True)
    return rows


# ----------------------------------------------------------------------------- 2. no HTTP
async def _engine_only(sizes: list[int]) -> list[tuple[int, float, float, float]]:
    import ray

    from app.engine.host import EmbeddedHost, HostConfig
    from app.engine.interface import CreateSpec, GroupSpec
    from app.engine.ray_host import HostActor, RayHost

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, namespace="optserve-bench",
             object_store_memory=1 << 30)
    rows = []
    try:
        local = EmbeddedHost(HostConfig("cpu", torch_threads=1, warm_up=False))
        await local.start()
        root = tempfile.mkdtemp(prefix="optserve-bench-")
        actor = ray.remote(HostActor).options(num_cpus=1).remote("bench", {
            "root": root, "device": "cpu", "torch_threads": 1, "default_nonfinite": "reject",
            "durability": "memory", "snapshot_every_steps": 1000, "snapshot_every_s": 300.0,
            "fsync_interval_s": 0.05, "idempotency_window": 1000, "warm_up": False,
            "namespace": "optserve-bench", "commit_timeout_s": 30.0})
        remote = RayHost(actor, "bench")
        await remote.start()
        for n in sizes:
            spec = CreateSpec("Adam", [GroupSpec({"w": torch.randn(n)}, {})], {"lr": 0.001})
            await local.create(f"t~{n}", spec)
            await remote.create(f"t~{n}", spec)
            grads = {"w": torch.randn(n)}
            bare = torch.randn(n, requires_grad=True)
            opt = torch.optim.Adam([bare], lr=0.001)
            times: dict[str, list[float]] = {"local": [], "ray": [], "torch": []}
            warm(1.0)
            for i in range(reps_for(n) + 3):
                t0 = time.perf_counter()
                await local.step(f"t~{n}", grads, want_params=True)
                t1 = time.perf_counter()
                await remote.step(f"t~{n}", grads, want_params=True)
                t2 = time.perf_counter()
                bare.grad = grads["w"]
                opt.step()
                t3 = time.perf_counter()
                if i >= 3:
                    times["local"].append((t1 - t0) * 1000)
                    times["ray"].append((t2 - t1) * 1000)
                    times["torch"].append((t3 - t2) * 1000)
            rows.append((n, *(statistics.median(times[k]) for k in ("torch", "local", "ray"))))
            print(f"  N={n:.0e} engine only: {rows[-1]}", flush=True)
        await local.stop(snapshot=False)
    finally:
        ray.shutdown()
    return rows


# ----------------------------------------------------------------------------- 3. nodes
def aggregate(nodes: int, sessions: int, n: int, seconds: float) -> float:
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 8 // nodes, "include_dashboard": False,
        "object_store_memory": 512 * 1024 * 1024})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=8 // nodes, object_store_memory=512 * 1024 * 1024)
    cluster.wait_for_nodes()
    try:
        with app_server({"OPTSERVE_ENGINE": "ray", "OPTSERVE_RAY_ADDRESS": cluster.address,
                         "OPTSERVE_RAY_PLACEMENT": "spread", "OPTSERVE_WARM_UP": "0",
                         "OPTSERVE_RAY_RESOURCES": '{"num_cpus": 1}'}) as url:
            return _drive(url, sessions, n, seconds)
    finally:
        ray.shutdown()
        cluster.shutdown()


def aggregate_embedded(sessions: int, n: int, seconds: float) -> float:
    with app_server({"OPTSERVE_ENGINE": "embedded"}) as url:
        return _drive(url, sessions, n, seconds)


def _drive(url: str, sessions: int, n: int, seconds: float) -> float:
    with httpx.Client(base_url=url, timeout=600) as http:
        for i in range(sessions):
            create(http, f"agg{i}", n)
    g = st_save({"w": torch.randn(n)})
    counts = [0] * sessions
    start = threading.Barrier(sessions + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as h:
            start.wait()
            while not stop.is_set():
                r = h.post(f"/v1/sessions/agg{i}/step", content=g,
                           headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 200, r.text
                counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    warm(1.0)
    start.wait()
    t0 = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - t0)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e4,1e6,1e7")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-nodes", action="store_true")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--nodes-n", type=float, default=1e5)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    torch.set_num_threads(1)
    out: list[str] = []
    if not args.skip_http:
        rows = http_round_trips(sizes)
        out += ["", "Step round trip through the front (Adam, safetensors both ways, durability "
                "memory), median (p90) ms:", "",
                "| N params | embedded | ray | ray − embedded |", "|---|---|---|---|"]
        for n in sizes:
            e = next(r for r in rows if r[0] == n and r[1] == "embedded")
            r = next(r for r in rows if r[0] == n and r[1] == "ray")
            out.append(f"| {n:.0e} | {e[2]:.2f} ({e[3]:.2f}) | {r[2]:.2f} ({r[3]:.2f}) | "
                       f"+{r[2] - e[2]:.2f} |")
    if not args.skip_engine:
        rows2 = asyncio.run(_engine_only(sizes))
        out += ["", "Without HTTP (one process; params returned), median ms:", "",
                "| N params | torch Adam step | embedded host | Ray host actor | hop |",
                "|---|---|---|---|---|"]
        for n, bare, local, remote in rows2:
            out.append(f"| {n:.0e} | {bare:.2f} | {local:.2f} | {remote:.2f} | "
                       f"+{remote - local:.2f} |")
    if not args.skip_nodes:
        n = int(args.nodes_n)
        emb = aggregate_embedded(args.sessions, n, args.seconds)
        one = aggregate(1, args.sessions, n, args.seconds)
        two = aggregate(2, args.sessions, n, args.seconds)
        out += ["", f"Aggregate steps/s, {args.sessions} sessions of {n:.0e} params (Adam, one "
                f"client thread each, {args.seconds:g} s):", "",
                "| layout | steps/s |", "|---|---|",
                f"| embedded engine (one process) | {emb:.1f} |",
                f"| Ray, 1 node × 8 CPUs, a host per session | {one:.1f} |",
                f"| Ray, 2 nodes × 4 CPUs (same machine) | {two:.1f} |"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
