"""Embedding tables: a step with a row-sparse push (only the touched rows travel, only they come
back) against a dense push of the whole table's gradient, beside in-process torch, through the
SDK on a real server (uvicorn subprocess, safetensors bodies).

    .venv/bin/python -m benchmarks.embedding                 # 1e6 x 64 table, 1e3 and 1e4 rows
    .venv/bin/python -m benchmarks.embedding --rows 1e5 --quick

Prints one table row per (optimizer, touched rows): ms per step (median) for the in-process
sparse step, the HTTP sparse step answered with the touched rows (``?return=touched``) and
with nothing, a pull of the same rows, the HTTP dense step (whole gradient up; nothing, or the
whole table, back) and the in-process dense step; and the bytes each request and answer carry.
SparseAdam takes only sparse gradients, so its dense columns are empty.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import torch

import optserve
from benchmarks._server import server
from benchmarks._timing import median_ms
from optserve import _api

DIM = 64
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("SGD", {"lr": 0.1}),
    "SparseAdam": ("SparseAdam", {"lr": 1e-3}),
}


def spin(seconds: float) -> None:
    """Wake the CPU up (the VM runs slow for a while after sitting idle)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def sparse_grad(rows: int, touched: int, seed: int) -> torch.Tensor:
    """``touched`` distinct rows of a ``rows`` x DIM table, in random order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(rows, generator=g)[:touched]
    return torch.sparse_coo_tensor(idx.reshape(1, -1), torch.randn(touched, DIM, generator=g),
                                   (rows, DIM), check_invariants=False)


def wire_bytes(raw: httpx.Client, sid: str, grads: dict[str, torch.Tensor], ret: Any
               ) -> tuple[int, int]:
    """(request body bytes, answer body bytes) of one SDK step with these gradients."""
    call = _api.step(sid, grads, return_params=ret, binary=True)
    assert call.content is not None
    r = raw.post(call.path, params=call.params, content=call.content,
                 headers={"content-type": "application/octet-stream",
                          "accept": "application/octet-stream"})
    r.raise_for_status()
    return len(call.content), len(r.content)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=float, default=1e6, help="table rows (x 64 float32)")
    ap.add_argument("--touched", type=str, default="1e3,1e4",
                    help="rows each batch touches, comma-separated")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--durability", choices=["memory", "interval", "step"], default="memory")
    args = ap.parse_args()
    rows = int(args.rows)
    touched_list = [int(float(t)) for t in args.touched.split(",")]
    sparse_reps, dense_reps = (10, 2) if args.quick else (40, 4)
    threads = os.environ.get("OPTSERVE_TORCH_THREADS", "0")
    if threads != "0":
        torch.set_num_threads(int(threads))

    table = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(0))
    results = []
    env = {"OPTSERVE_DURABILITY": args.durability, "OPTSERVE_TORCH_THREADS": threads}
    with server(env) as url, httpx.Client(base_url=url, timeout=600) as raw, \
            optserve.Client(url, timeout=600) as client:
        spin(3.0)
        for label, (name, options) in OPTIMIZERS.items():
            sid = f"bench-emb-{label}"
            client.create_session(name, {"emb": table}, options=options, id=sid)
            local = table.clone()
            local_opt = getattr(torch.optim, name)([local], **options)
            dense_ok = name != "SparseAdam"
            for touched in touched_list:
                grads = [sparse_grad(rows, touched, seed) for seed in range(8)]
                counter = itertools.count()

                def next_grad(grads: list[torch.Tensor] = grads,
                              it: Iterator[int] = counter) -> torch.Tensor:
                    return grads[next(it) % len(grads)]

                def local_sparse(local: torch.Tensor = local,
                                 local_opt: torch.optim.Optimizer = local_opt) -> None:
                    local.grad = next_grad()
                    local_opt.step()
                inproc = median_ms(local_sparse, sparse_reps)
                touched_ms = median_ms(lambda sid=sid: client.step(
                    sid, {"emb": next_grad()}, return_params="touched"), sparse_reps)
                none_ms = median_ms(lambda sid=sid: client.step(
                    sid, {"emb": next_grad()}, return_params=False), sparse_reps)
                idx = grads[0]._indices()[0]
                pull_ms = median_ms(lambda sid=sid, idx=idx: client.pull_rows(
                    sid, {"emb": idx}), sparse_reps)
                up, down = wire_bytes(raw, sid, {"emb": grads[0]}, "touched")
                row: dict[str, Any] = {"opt": label, "touched": touched, "inproc": inproc,
                                       "touched_ms": touched_ms, "none_ms": none_ms,
                                       "pull_ms": pull_ms, "sparse_up": up,
                                       "sparse_down": down}
                if dense_ok:
                    dense = grads[0].to_dense()

                    def local_dense(local: torch.Tensor = local, dense: torch.Tensor = dense,
                                    local_opt: torch.optim.Optimizer = local_opt) -> None:
                        local.grad = dense
                        local_opt.step()
                    row["dense_inproc"] = median_ms(local_dense, dense_reps)
                    row["dense_none"] = median_ms(lambda sid=sid, dense=dense: client.step(
                        sid, {"emb": dense}, return_params=False), dense_reps)
                    row["dense_all"] = median_ms(lambda sid=sid, dense=dense: client.step(
                        sid, {"emb": dense}, return_params=True), dense_reps)
                    row["dense_up"], row["dense_down"] = wire_bytes(raw, sid, {"emb": dense},
                                                                    True)
                    del dense
                results.append(row)
                print(f"  measured {label} touched={touched:.0e}", flush=True)
            client.delete_session(sid)

    def cell(row: dict[str, Any], key: str, bytes_: bool = False) -> str:
        if key not in row:
            return "n/a"
        return fmt_bytes(row[key]) if bytes_ else f"{row[key]:.2f}"

    print()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, server torch threads {threads} "
          f"(0 = torch default), durability {args.durability}; table {rows:.0e} x {DIM} "
          f"float32 ({fmt_bytes(rows * DIM * 4)}); ms are medians per step")
    print("| optimizer | rows touched | in-process sparse | HTTP sparse, touched back | "
          "HTTP sparse, nothing back | pull those rows | sparse bytes up / down | "
          "HTTP dense, nothing back | HTTP dense, table back | dense bytes up / down | "
          "in-process dense |")
    print("|" + "---|" * 11)
    for r in results:
        print(f"| {r['opt']} | {r['touched']:.0e} | {cell(r, 'inproc')} | "
              f"{cell(r, 'touched_ms')} | {cell(r, 'none_ms')} | {cell(r, 'pull_ms')} | "
              f"{cell(r, 'sparse_up', True)} / {cell(r, 'sparse_down', True)} | "
              f"{cell(r, 'dense_none')} | {cell(r, 'dense_all')} | "
              f"{cell(r, 'dense_up', True)} / {cell(r, 'dense_down', True)} | "
              f"{cell(r, 'dense_inproc')} |")


if __name__ == "__main__":
    main()
