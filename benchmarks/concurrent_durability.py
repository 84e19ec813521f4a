"""Concurrent sessions under durability ``step``: what K sessions stepped at once, each by its
own worker process, get from the server and from the disk, against durability ``memory``.

    .venv/bin/python -m benchmarks.concurrent_durability                 # N = 1e3, K = 1,2,4,8
    .venv/bin/python -m benchmarks.concurrent_durability --n 1e5 --sessions 1,4 --seconds 5

One server as ``scripts/serve`` starts it (``python -m app``, every setting at its default but
``OPTSERVE_TORCH_THREADS=1`` and its own port and data directory), Adam sessions of N float32
values created with ``durability`` ``memory`` or ``step``; K worker processes, each stepping its
own session over its own connection (``http.client``, a safetensors body in and out) for the
given seconds, all starting at once. Per K it prints the steps per second of all of them
together, the median ms per step and the server's CPU per step (its event loop's thread, and
its other threads together), for each durability; and, for the same data directory,
the disk's own rate: K threads, each appending a 4N-byte record to its own file and fsyncing
it, as the server's log does (the file system's journal may commit concurrent fsyncs together:
this is the rate a server that shared its fsyncs perfectly could not pass).

The server fsyncs each session's log on its own, on its I/O threads (at most four at once):
there is no group commit of its own (docs/durability.md). Each session's parameters are then
read back and compared bit for bit with in-process torch stepping the same gradient as many
times (``bitwise`` column). Nothing is asserted beyond that: the figures go into the notes with
this command.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from benchmarks._peers import cpu, transfer
from benchmarks._server import PIDS, free_port, server, user_defaults

BINARY = "application/octet-stream"
LEVELS = ("memory", "step")


def _worker(port: int, sid: str, body: bytes, start_at: float, seconds: float
            ) -> tuple[int, list[float]]:
    """One worker process: steps ``sid`` from ``start_at`` for ``seconds``; its step count and
    the ms of each step."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Content-Type": BINARY, "Accept": BINARY}
    times: list[float] = []
    time.sleep(max(0.0, start_at - time.time()))
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        conn.request("POST", f"/v1/sessions/{sid}/step", body, headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"step of {sid}: {r.status}")
        times.append((time.perf_counter() - t0) * 1e3)
    conn.close()
    return len(times), times


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds the process ``pid`` has used (``benchmarks._peers.cpu``): its main thread's
    (the event loop's), and all its other threads' together."""
    snapshot = cpu.threads(pid)
    main = sum(run for tid, (run, _) in snapshot.items() if tid == pid)
    rest = sum(run for tid, (run, _) in snapshot.items() if tid not in (pid, cpu.FAULTS))
    return main / 1e9, rest / 1e9


def _disk_rate(directory: Path, k: int, nbytes: int, seconds: float) -> float:
    """Records appended and fsynced per second by ``k`` threads, each to its own file."""
    directory.mkdir(parents=True, exist_ok=True)
    record = os.urandom(nbytes)
    counts = [0] * k
    stop = time.perf_counter() + seconds

    def write(i: int) -> None:
        fd = os.open(directory / f"log{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while time.perf_counter() < stop:
                os.write(fd, record)
                os.fsync(fd)
                counts[i] += 1
        finally:
            os.close(fd)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(k):
        (directory / f"log{i}").unlink()
    return sum(counts) / seconds


def _expected(initial: torch.Tensor, grad: torch.Tensor, steps: int) -> torch.Tensor:
    p = torch.nn.Parameter(initial.clone())
    opt = torch.optim.Adam([p], lr=1e-3)
    for _ in range(steps):
        p.grad = grad.clone()
        opt.step()
    return p.detach()


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One untimed request, on a connection of its own (the setup's and the checks' requests
    are far apart: a kept one would outlive the server's keep-alive)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def run(n: int, sessions: list[int], seconds: float, warmup: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    data_dir = Path(tempfile.mkdtemp(prefix="optserve-concurrent-"))
    port = free_port()
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1",
           "OPTSERVE_DATA_DIR": str(data_dir / "server")}
    gen = torch.Generator().manual_seed(0)
    initial, grad = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    body = b"".join(bytes(b) for b in transfer.safetensors_buffers({"w": grad}))
    headers = {"Content-Type": BINARY, "Accept": BINARY}
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    print(f"server: {' '.join(f'{k}={v}' for k, v in env.items() if k != 'OPTSERVE_DATA_DIR')} "
          f".venv/bin/python -m app (data in {data_dir})", flush=True)
    with server(env, command=[sys.executable, "-m", "app"], port=port,
                unset=user_defaults(env)) as url, ctx.Pool(max(sessions)) as pool:
        pid = PIDS[url]
        for k in sessions:
            row: dict[str, Any] = {"sessions": k, "bitwise": True}
            for level in LEVELS:
                sids = [f"c{k}-{level}-{i}" for i in range(k)]
                for sid in sids:
                    spec = {"id": sid, "optimizer": "Adam", "options": {"lr": 1e-3},
                            "durability": level,
                            "params": {"w": {"dtype": "float32", "shape": [n], "b64":
                                             base64.b64encode(initial.numpy().tobytes())
                                             .decode()}}}
                    status, answer = _request(port, "POST", "/v1/sessions", orjson.dumps(spec),
                                              {"Content-Type": "application/json"})
                    if status != 201:
                        raise RuntimeError(f"create: {status} {answer[:300]!r}")
                    for _ in range(warmup):
                        status, _ = _request(port, "POST", f"/v1/sessions/{sid}/step", body,
                                             headers)
                        assert status == 200
                start_at = time.time() + 0.5
                cpu_before = _cpu_s(pid)
                done = pool.starmap(_worker, [(port, sid, body, start_at, seconds)
                                              for sid in sids])
                cpu_after = _cpu_s(pid)
                total = sum(count for count, _ in done)
                row[f"{level} steps/s"] = total / seconds
                row[f"{level} ms"] = statistics.median(t for _, ts in done for t in ts)
                # (the workers' connections are closed once they stop: no CPU after them)
                row[f"{level} cpu"] = tuple((a - b) / total * 1e3 for a, b in
                                            zip(cpu_after, cpu_before, strict=True))
                for sid, (count, _) in zip(sids, done, strict=True):
                    status, answer = _request(port, "GET", f"/v1/sessions/{sid}/params",
                                              None, {"Accept": BINARY})
                    got = transfer.read_safetensors(bytearray(answer))["w"]
                    want = _expected(initial, grad, warmup + count)
                    row["bitwise"] &= status == 200 and torch.equal(
                        got.view(torch.int32), want.view(torch.int32))
                    _request(port, "DELETE", f"/v1/sessions/{sid}")
            row["disk writes+fsyncs/s"] = _disk_rate(data_dir / "disk", k, 4 * n, seconds)
            rows.append(row)
            print(f"  K={k}: memory {row['memory steps/s']:.0f}/s, step "
                  f"{row['step steps/s']:.0f}/s, disk {row['disk writes+fsyncs/s']:.0f}/s",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=float, default=1e3, help="float32 values per session")
    ap.add_argument("--sessions", default="1,2,4,8", help="K, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="stepping time per cell")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per session")
    args = ap.parse_args()
    n = int(args.n)
    sessions = [int(k) for k in args.sessions.split(",")]
    rows = run(n, sessions, args.seconds, args.warmup)
    print()
    print(f"N = {n:.0e} float32 per session, Adam; {os.cpu_count()} cores; K worker processes "
          f"stepping their own sessions at once for {args.seconds:g} s; record {4 * n:,} bytes")
    print()
    print("| sessions | memory steps/s | memory ms (median) | step steps/s | step ms (median) "
          "| step / memory | disk writes+fsyncs/s (K threads) | bitwise | server CPU ms per "
          "step, memory | server CPU ms per step, step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = {lv: f"{r[f'{lv} cpu'][0]:.3f} + {r[f'{lv} cpu'][1]:.3f}" for lv in LEVELS}
        print(f"| {r['sessions']} | {r['memory steps/s']:.0f} | {r['memory ms']:.2f} | "
              f"{r['step steps/s']:.0f} | {r['step ms']:.2f} | "
              f"{r['step steps/s'] / r['memory steps/s']:.2f} | "
              f"{r['disk writes+fsyncs/s']:.0f} | {'ok' if r['bitwise'] else 'DIFFERENT'} | "
              f"{cpu['memory']} | {cpu['step']} |")
    print()
    print("server CPU: the event loop's thread + all the server's other threads (the device "
          "worker, the I/O threads), per step")


if __name__ == "__main__":
    main()
