"""What durability costs: step round trips per durability level, snapshot time, restart time.

    .venv/bin/python -m benchmarks.durability                 # everything (a few minutes)
    .venv/bin/python -m benchmarks.durability --sizes 1e4,1e6 --skip-restart

1. Step round trip (raw httpx, safetensors body in and out, Adam) at each N for sessions
   created with ``durability`` ``memory``, ``interval`` and ``step``, on one server whose data
   directory is on this machine's disk; snapshots are pushed out of the way
   (``OPTSERVE_SNAPSHOT_EVERY_STEPS`` huge) so the columns are the log alone. Median and p90.
2. Snapshot write time per N (in-process: encode + temp file + fsync + rename + fsync dir +
   log truncate), which a ``step``/``interval`` session pays every
   ``OPTSERVE_SNAPSHOT_EVERY_STEPS`` steps and on shutdown.
3. Restart: sessions of N params with logged steps to replay (written by the engine
   in-process, then left as a crash would leave them), timed from ``python -m app`` to
   ``/readyz`` 200; then a SIGTERM (snapshots everything) and a restart with nothing to replay;
   and an empty data directory as the baseline (interpreter, torch import, warm-up).

Prints markdown tables. Timings on a shared machine are noisy; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
import torch
from safetensors.torch import save as st_save

from app.engine import CreateSpec, GroupSpec, embedded_engine
from benchmarks._server import free_port, server

LEVELS = ("memory", "interval", "step")
BINARY = "application/octet-stream"


def reps_for(n: int) -> int:
    return {10_000: 200, 1_000_000: 30, 10_000_000: 8}.get(n, 10)


def step_round_trips(sizes: list[int], data_dir: Path) -> list[tuple[int, str, float, float]]:
    """Per N, one session per level, stepped in turn (memory, interval, step, memory, ...) so
    that whatever else the machine is doing weighs on every level alike."""
    env = {"OPTSERVE_DATA_DIR": str(data_dir), "OPTSERVE_SNAPSHOT_EVERY_STEPS": "100000000",
           "OPTSERVE_SNAPSHOT_EVERY_S": "1e9", "OPTSERVE_LOG_LEVEL": "warning"}
    rows = []
    with server(env) as url, httpx.Client(base_url=url, timeout=600) as http:
        for n in sizes:
            g = st_save({"w": torch.randn(n)})
            for level in LEVELS:
                meta = {"optimizer": "Adam", "options": '{"lr": 0.001}', "durability": level,
                        "id": f"{level}-{n}"}
                r = http.post("/v1/sessions", content=st_save({"w": torch.randn(n)}, meta),
                              headers={"Content-Type": BINARY})
                assert r.status_code == 201, r.text

            def step(level: str, n: int = n, g: bytes = g) -> float:
                t0 = time.perf_counter()
                r = http.post(f"/v1/sessions/{level}-{n}/step", content=g,
                              headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 200, r.text
                return time.perf_counter() - t0
            times: dict[str, list[float]] = {lv: [] for lv in LEVELS}
            for rep in range(reps_for(n) + 2):
                for level in LEVELS:
                    t = step(level)
                    if rep >= 2:  # two warm-up rounds
                        times[level].append(t * 1e3)
            for level in LEVELS:
                ts = sorted(times[level])
                rows.append((n, level, statistics.median(ts), ts[int(len(ts) * 0.9) - 1]))
                http.delete(f"/v1/sessions/{level}-{n}")
                print(f"  step N={n:.0e} {level}: {rows[-1][2]:.2f} ms", flush=True)
    return rows


async def _snapshot_ms(n: int, data_dir: Path) -> float:
    eng = embedded_engine("cpu", data_dir=data_dir, durability="step")
    await eng.start()
    try:
        await eng.create(CreateSpec("Adam", [GroupSpec({"w": torch.randn(n)})], {"lr": 1e-3},
                                    id="snap"))
        await eng.step("snap", {"w": torch.randn(n)}, return_params=False)
        key = "default~snap"
        host = eng.host
        times = []
        for _ in range(5):
            session = host._sessions[key]
            session.seq_at_snapshot = -1  # due
            t0 = time.perf_counter()
            await host._upkeep.snapshot(key, session)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        await eng.delete("snap")
        await eng.stop()


async def _write_logs(data_dir: Path, sessions: int, n: int, steps_each: int) -> None:
    """Sessions with ``steps_each`` logged steps each and no snapshot since creation, as
    ``kill -9`` would leave them (records written through the engine's own path)."""
    eng = embedded_engine("cpu", data_dir=data_dir, durability="step",
                          snapshot_every_steps=10**9, snapshot_every_s=1e9)
    await eng.start()
    g = torch.randn(n)
    for i in range(sessions):
        await eng.create(CreateSpec("Adam", [GroupSpec({"w": torch.randn(n)})], {"lr": 1e-3},
                                    id=f"s{i}", durability="interval"))
        for _ in range(steps_each):
            await eng.step(f"s{i}", {"w": g}, return_params=False)
    await eng.stop(snapshot=False)  # the store fsyncs every log on close; no snapshot


def _start(data_dir: Path) -> tuple[subprocess.Popen[bytes], float, str, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update({"OPTSERVE_PORT": str(port), "OPTSERVE_DATA_DIR": str(data_dir),
                "OPTSERVE_DEVICE": "cpu", "OPTSERVE_LOG_FORMAT": "text"})
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.02)
    return proc, time.perf_counter() - t0, url, log


def _restored_seconds(log: Path) -> tuple[float, int]:
    text = log.read_text()
    secs = [float(m.group(2)) for m in re.finditer(
        r"restored session \S+ at version \d+ \((\d+) logged updates replayed.*?\) in "
        r"([0-9.]+) s", text)]
    replayed = sum(int(m.group(1)) for m in re.finditer(r"\((\d+) logged updates replayed",
                                                        text))
    return sum(secs), replayed


def restart_times(data_dir: Path, sessions: int, n: int, total_steps: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    empty = data_dir / "empty"
    proc, t, _, _ = _start(empty)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    rows.append(("empty data directory (interpreter, torch, warm-up)", f"{t:.2f}", "-", "-"))

    logged = data_dir / "logged"
    t0 = time.perf_counter()
    asyncio.run(_write_logs(logged, sessions, n, total_steps // sessions))
    log_mb = sum(p.stat().st_size for p in logged.rglob("wal.bin")) / 1e6
    print(f"  wrote {total_steps} logged steps ({log_mb:.0f} MB of log) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    proc, t, _, log = _start(logged)
    restore_s, replayed = _restored_seconds(log)
    assert replayed == total_steps, (replayed, log.read_text()[-2000:])
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    stop_s = time.perf_counter() - t0
    proc2, t2, _, log2 = _start(logged)
    restore2_s, _ = _restored_seconds(log2)
    per_step = (restore_s - restore2_s) / replayed * 1e3
    rows.append((f"{sessions} sessions x {n:.0e} params, {replayed} logged steps to replay "
                 f"({log_mb:.0f} MB of log)", f"{t:.2f}", f"{restore_s:.2f}",
                 f"{per_step:.2f}"))
    rows.append((f"same after SIGTERM (snapshots written in {stop_s:.2f} s), nothing to replay",
                 f"{t2:.2f}", f"{restore2_s:.2f}", "-"))
    proc = proc2
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e4,1e6,1e7")
    ap.add_argument("--skip-restart", action="store_true")
    ap.add_argument("--restart-sessions", type=int, default=10)
    ap.add_argument("--restart-n", type=float, default=1e6)
    ap.add_argument("--replay-steps", type=int, default=1000,
                    help="logged steps to replay, in total over the sessions")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where to put the data (default: a temp dir); use the disk you "
                         "will serve from")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="optserve-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    steps = step_round_trips(sizes, root / "steps")
    snaps = {n: asyncio.run(_snapshot_ms(n, root / "snap")) for n in sizes}
    restart = [] if args.skip_restart else restart_times(
        root, args.restart_sessions, int(args.restart_n), args.replay_steps)

    print()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, data in {root} "
          f"(log record = the gradients, 4 N bytes for float32)")
    print()
    print("| N | memory ms (p90) | interval ms (p90) | step ms (p90) | step - memory | "
          "snapshot ms |")
    print("|---|---|---|---|---|---|")
    by = {(n, lv): (med, p90) for n, lv, med, p90 in steps}
    for n in sizes:
        cells = [f"{by[(n, lv)][0]:.2f} ({by[(n, lv)][1]:.2f})" for lv in LEVELS]
        extra = by[(n, "step")][0] - by[(n, "memory")][0]
        print(f"| {n:.0e} | {' | '.join(cells)} | {extra:+.2f} | {snaps[n]:.1f} |")
    if restart:
        print()
        print("| restart | to /readyz s | restore s (log) | replay ms per step |")
        print("|---|---|---|---|")
        for row in restart:
            print("| " + " | ".join(row) + " |")
    print()
    print(orjson.dumps({"steps": steps, "snapshot_ms": {str(n): v for n, v in snaps.items()},
                        "restart": restart}).decode())


if __name__ == "__main__":
    main()
