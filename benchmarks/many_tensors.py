"""Sessions of many small tensors (a transformer's shape): where the per-tensor cost goes.

    .venv/bin/python -m benchmarks.many_tensors                       # 1,000 x 4 and 100,000 x 1
    .venv/bin/python -m benchmarks.many_tensors --shapes 1000x4 --optimizers Adam --reps 30
    .venv/bin/python -m benchmarks.many_tensors --shapes 1000x4,20000x4 --optimizers Adam \
        --durability step

Optimizers as in ``benchmarks/peers.py`` (``Adam``: lr 1e-3; ``SGD-momentum``: lr 0.01,
momentum 0.9).

Per shape (K tensors of S float32 each) and optimizer, median ms per step of:

- ``in-process``: torch's own optimizer over K tensors, default options, 1 torch thread, the
  allocator tuned as the server tunes it;
- ``echo``: the step request's safetensors bytes posted to a minimal ASGI echo app under
  uvicorn and read back (the HTTP floor, ``benchmarks/echo_app.py``);
- ``optserve``: the server as ``scripts/serve`` starts it (``python -m app``,
  ``OPTSERVE_TORCH_THREADS=1``, durability ``memory`` unless ``--durability`` says otherwise,
  every other setting its default, per-step metrics included), a plain ``httpx.Client``
  posting safetensors with ``Accept: application/octet-stream`` (all K parameters come back);
- ``server CPU``: the server process's CPU time (user + system, ``/proc/<pid>/stat``) per
  step of the ``optserve`` client, warm-up steps included (what the server spends on a step,
  however busy the machine is);
- ``optserve, metrics off``: the same with the session's ``"metrics": false``;
- ``new metadata``: the ``optserve`` client, each step's body carrying a new
  ``__metadata__`` (a ``scalars`` loss, as the SDK sends one; a scheduler's options go the
  same way): the tensor entries are the same, the header is not;
- ``SDK same host``: ``optserve.RemoteOptimizer`` on that server (its same-host shared-memory
  transport; session durability ``memory``), the gradients set on K ``torch.nn.Parameter`` s
  and ``step()`` timed (the SDK's copies in and out included);
- ``SDK http``: the same over TCP (``optserve.Client(url, transport="http")``);
- ``SDK http client CPU``: this process's CPU time per step of ``SDK http`` (its encoding of
  the gradients, its decoding of the answer and its copies into the parameters, warm-up steps
  included).

The issue-9 target reads ``optserve <= 1.5 x (in-process + echo)``. The server's last answer
is checked bitwise against the in-process run of the same gradients. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks._peers.cases import OPTIMIZERS
from benchmarks._server import PIDS, free_port, server, user_defaults
from benchmarks._timing import median_ms
from benchmarks.echo_app import ECHO_PATH

BINARY = "application/octet-stream"


def _tensors(k: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i:06d}": torch.randn(s, generator=gen) for i in range(k)}


def in_process(k: int, s: int, opt: str, reps: int) -> tuple[float, dict[str, torch.Tensor]]:
    params = {n: t.clone() for n, t in _tensors(k, s, 1).items()}
    grads = [_tensors(k, s, 2), _tensors(k, s, 3)]
    spec = OPTIMIZERS[opt]
    optimizer = getattr(torch.optim, spec.name)(list(params.values()), **spec.options)
    return _grads_then(params, grads, optimizer.step, reps), params


def _grads_then(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]],
                step: Callable[[], object], reps: int) -> float:
    """Median ms of: set each parameter's ``.grad`` (the two gradient sets in turn), then
    ``step()``."""
    count = [0]

    def one() -> None:
        g = grads[count[0] % 2]
        for n, p in params.items():
            p.grad = g[n]
        step()
        count[0] += 1

    return median_ms(one, reps, warmup=WARMUP)


def cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (user + system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: untimed steps before each cell's timed ones
WARMUP = 3


def optserve(url: str, k: int, s: int, opt: str, reps: int, metrics: bool,
             new_metadata: bool = False, cpu: list[float] | None = None
             ) -> tuple[float, dict[str, torch.Tensor]]:
    """The plain-HTTP client's step (a ready safetensors body, the answer's bytes kept);
    ``new_metadata``: each body with new ``__metadata__`` (a loss, as the SDK sends one);
    ``cpu``: the server's CPU ms per step appended."""
    sid = f"many-{k}x{s}-{opt}-{int(metrics)}{'-meta' if new_metadata else ''}"
    spec = OPTIMIZERS[opt]
    body = {"id": sid, "optimizer": spec.name, "options": spec.options, "metrics": metrics,
            "params": {n: {"dtype": "float32", "shape": [s],
                           "b64": base64.b64encode(t.numpy().tobytes()).decode()}
                       for n, t in _tensors(k, s, 1).items()}}
    grads = [_tensors(k, s, 2), _tensors(k, s, 3)]
    bodies = ([st_save(grads[i % 2], {"scalars": orjson.dumps({"loss": 1.0 / (i + 1)}).decode()})
               for i in range(64)] if new_metadata else [st_save(g) for g in grads])
    count = [0]
    last: list[bytes] = [b""]
    with httpx.Client(base_url=url, timeout=600) as http:
        r = http.post("/v1/sessions", content=orjson.dumps(body),
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text[:500]

        def step() -> None:
            r = http.post(f"/v1/sessions/{sid}/step", content=bodies[count[0] % len(bodies)],
                          headers={"Content-Type": BINARY, "Accept": BINARY})
            assert r.status_code == 200, r.text[:500]
            last[0] = r.content
            count[0] += 1

        before = cpu_s(PIDS[url])
        ms = median_ms(step, reps, warmup=WARMUP)
        if cpu is not None:
            cpu.append((cpu_s(PIDS[url]) - before) * 1e3 / (reps + WARMUP))
        http.delete(f"/v1/sessions/{sid}")
    return ms, st_load(last[0])


def sdk(url: str, k: int, s: int, opt: str, reps: int, transport: str = "local",
        cpu: list[float] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """``RemoteOptimizer.step()`` over the same-host transport (``transport="http"``: over
    TCP, safetensors both ways). ``cpu``: the client's (this process's) CPU ms per step,
    warm-up steps included, appended (the SDK's own cost, however busy the machine is)."""
    import optserve

    spec = OPTIMIZERS[opt]
    params = {n: torch.nn.Parameter(t.clone()) for n, t in _tensors(k, s, 1).items()}
    grads = [_tensors(k, s, 2), _tensors(k, s, 3)]
    with optserve.Client(url, transport=transport) as client, optserve.RemoteOptimizer(
            list(params.values()), optimizer=spec.name, client=client, durability="memory",
            **spec.options) as remote:
        before = time.process_time()
        ms = _grads_then(params, grads, remote.step, reps)  # type: ignore[arg-type]
        if cpu is not None:
            cpu.append((time.process_time() - before) / (reps + WARMUP) * 1e3)
    return ms, {n: p.detach() for n, p in params.items()}


def echo(url: str, k: int, s: int, reps: int) -> float:
    body = st_save(_tensors(k, s, 2))
    with httpx.Client(base_url=url, timeout=600) as http:
        return median_ms(lambda: http.post(ECHO_PATH, content=body,
                                           headers={"Content-Type": BINARY}), reps, warmup=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1000x4,100000x1", help="KxS, comma-separated")
    ap.add_argument("--optimizers", default="Adam,SGD-momentum",
                    help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--reps", type=int, default=0, help="timed steps per cell (default by K)")
    ap.add_argument("--durability", choices=("memory", "interval", "step"), default="memory",
                    help="the server's OPTSERVE_DURABILITY (its sessions' default)")
    args = ap.parse_args()
    from app.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    shapes = [tuple(int(x) for x in spec.split("x")) for spec in args.shapes.split(",")]
    port = free_port()
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1",
           "OPTSERVE_DURABILITY": args.durability}
    rows = []
    log = Path(tempfile.mkdtemp(prefix="optserve-many-log-")) / "server.log"
    print(f"server log: {log}")
    with server(app="benchmarks.echo_app:app") as echo_url, \
            server(env, command=[sys.executable, "-m", "app"], port=port,
                   unset=user_defaults(env), log=log) as url:
        for k, s in shapes:
            reps = args.reps or (5 if k >= 50_000 else 30)
            echo_ms = echo(echo_url, k, s, reps)
            for opt in args.optimizers.split(","):
                local_ms, want = in_process(k, s, opt, reps)
                cpu: list[float] = []
                on_ms, got = optserve(url, k, s, opt, reps, True, cpu=cpu)
                off_ms, _ = optserve(url, k, s, opt, reps, False)
                meta_ms, _ = optserve(url, k, s, opt, reps, True, new_metadata=True)
                sdk_ms, sdk_got = sdk(url, k, s, opt, reps)
                http_cpu: list[float] = []
                http_ms, http_got = sdk(url, k, s, opt, reps, transport="http", cpu=http_cpu)
                # each ran 3 warm-up + reps steps of the same alternating gradients
                same = all(torch.equal(got[n], want[n]) and torch.equal(sdk_got[n], want[n])
                           and torch.equal(http_got[n], want[n]) for n in want)
                rows.append((k, s, opt, local_ms, echo_ms, on_ms, cpu[0], off_ms, meta_ms,
                             sdk_ms, http_ms, http_cpu[0], same))
                print(f"  {k}x{s} {opt}: in-process {local_ms:.2f}, echo {echo_ms:.2f}, "
                      f"optserve {on_ms:.2f} (server CPU {cpu[0]:.1f}, metrics off "
                      f"{off_ms:.2f}, new metadata "
                      f"{meta_ms:.2f}), SDK same host {sdk_ms:.2f}, SDK http {http_ms:.2f} "
                      f"(client CPU {http_cpu[0]:.1f})",
                      flush=True)
    print(f"\ndurability {args.durability}; ms per step (median), server and SDK client CPU ms "
          "per step (mean)")
    print("\n| tensors x floats | optimizer | in-process | echo | optserve | server CPU | "
          "metrics off | new metadata | SDK same host | SDK http | SDK http client CPU | "
          "optserve / (in-process + echo) | bitwise |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (k, s, opt, local_ms, echo_ms, on_ms, cpu_ms, off_ms, meta_ms, sdk_ms, http_ms,
         http_cpu_ms, same) in rows:
        print(f"| {k:,} x {s} | {opt} | {local_ms:.2f} | {echo_ms:.2f} | {on_ms:.2f} | "
              f"{cpu_ms:.1f} | {off_ms:.2f} | {meta_ms:.2f} | {sdk_ms:.2f} | {http_ms:.2f} | "
              f"{http_cpu_ms:.1f} | "
              f"{on_ms / (local_ms + echo_ms):.2f} | {'ok' if same else 'DIFFERS'} |")


if __name__ == "__main__":
    main()
