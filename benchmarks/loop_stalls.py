"""How long a request of one session can keep every other request waiting: the longest
``GET /healthz`` answer while a session of K one-element tensors is created, stepped and deleted.

    .venv/bin/python -m benchmarks.loop_stalls                        # 10,000 and 100,000
    .venv/bin/python -m benchmarks.loop_stalls --counts 300000 --max-params 0

The server is ``python -m app`` as ``scripts/serve`` starts it (``OPTSERVE_TORCH_THREADS=1``,
every other setting its default, durability ``step`` included), with
``OPTSERVE_MAX_SESSION_PARAMS`` set from ``--max-params`` when given (its default, 100,000,
refuses a session of more). For each K: a JSON create of K one-element Adam parameters
(``{"dtype", "shape", "data"}`` each), then binary steps (safetensors in and out, all K
parameters back; the first step of a layout works out what later ones reuse), then its delete,
while another process asks ``/healthz`` every 20 ms on its own connection (a thread of this one
would count this process's own pauses: encoding and decoding K tensors holds its interpreter
lock). Prints, per phase, the request's own time and the longest ``/healthz`` answer during it
(what any other client, of any tenant, waited at most): a request's work on the event loop
shows there; on the device worker or a thread it does not. The last step's parameters are
checked bitwise against torch's Adam on the same gradients.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from typing import Any

import httpx
import orjson
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from benchmarks._server import free_port, server, user_defaults

BINARY = "application/octet-stream"


def _poll(url: str, longest: Any, asked: Any, asking: Any, stop: Any) -> None:
    """The poller process: ``/healthz`` every 20 ms, the longest answer into ``longest``, the
    start of the one in flight into ``asking`` (``time.monotonic``, one clock for every
    process: 0 between them)."""
    with httpx.Client(base_url=url, timeout=600) as client:
        while not stop.is_set():
            t0 = time.monotonic()
            asking.value = t0
            client.get("/healthz").raise_for_status()
            took = time.monotonic() - t0
            with longest.get_lock():
                longest.value = max(longest.value, took)
                asked.value += 1
                asking.value = 0.0
            stop.wait(0.02)


class Poller:
    """``/healthz`` asked every 20 ms from a process of its own (a thread of this one would
    wait for this process's interpreter lock, which encoding and decoding K tensors hold: the
    client's own pauses would count as the server's); the longest answer since
    :meth:`reset`."""

    def __init__(self, url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._longest = ctx.Value("d", 0.0)
        self._asked = ctx.Value("q", 0, lock=False)
        self._asking = ctx.Value("d", 0.0, lock=False)
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_poll, daemon=True, args=(
            url, self._longest, self._asked, self._asking, self._stop))

    @property
    def longest(self) -> float:
        """The longest answer since :meth:`reset`, the one still awaited counted as far as it
        has waited (a stall near a request's end is answered only after it)."""
        with self._longest.get_lock():
            since = self._asking.value
            waited = time.monotonic() - since if since else 0.0
            return max(float(self._longest.value), waited)

    @property
    def asked(self) -> int:
        return int(self._asked.value)

    def __enter__(self) -> Poller:
        self._process.start()
        deadline = time.monotonic() + 60
        while not self.asked and self._process.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # (the process imports this module, torch with it)
        if not self.asked:
            raise RuntimeError("the /healthz poller did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._process.join(30)

    def reset(self) -> None:
        with self._longest.get_lock():
            self._longest.value, self._asked.value = 0.0, 0


def measure(url: str, k: int, steps: int) -> list[dict[str, Any]]:
    params = {f"p{i}": torch.tensor([float(i % 97) / 97]) for i in range(k)}
    body = orjson.dumps({"optimizer": "Adam", "options": {"lr": 1e-3}, "params": {
        n: {"dtype": "float32", "shape": [1], "data": t.tolist()} for n, t in params.items()}})
    local = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=1e-3)
    rows = []
    with httpx.Client(base_url=url, timeout=1800) as client, Poller(url) as poller:
        time.sleep(0.2)
        poller.reset()
        t0 = time.perf_counter()
        r = client.post("/v1/sessions", content=body, headers={"Content-Type": "application/json"})
        took = time.perf_counter() - t0
        longest, asked = poller.longest, poller.asked
        if r.status_code != 201:
            print(f"K={k}: create answered {r.status_code}: {r.text[:300]}", file=sys.stderr)
            return [{"k": k, "phase": "create", "status": r.status_code, "took": took,
                     "longest": longest, "asked": asked}]
        sid = r.json()["id"]
        rows.append({"k": k, "phase": "create", "status": r.status_code, "took": took,
                     "longest": longest, "asked": asked})
        got: dict[str, torch.Tensor] = {}
        for step in range(steps):
            grads = {n: torch.tensor([((i + step) % 89) / 89 - 0.5]) for i, n in enumerate(params)}
            sent = st_save(grads)
            poller.reset()
            t0 = time.perf_counter()
            r = client.post(f"/v1/sessions/{sid}/step", content=sent,
                            headers={"Content-Type": BINARY, "Accept": BINARY})
            took = time.perf_counter() - t0
            longest, asked = poller.longest, poller.asked  # (before this process decodes)
            r.raise_for_status()
            got = st_load(r.content)
            rows.append({"k": k, "phase": f"step {step + 1}", "status": r.status_code,
                         "took": took, "longest": longest, "asked": asked})
            for n, p in local.items():
                p.grad = grads[n]
            opt.step()
        same = all(torch.equal(got[n], p.detach()) for n, p in local.items())
        rows[-1]["ok"] = same
        poller.reset()
        t0 = time.perf_counter()
        r = client.delete(f"/v1/sessions/{sid}")
        rows.append({"k": k, "phase": "delete", "status": r.status_code,
                     "took": time.perf_counter() - t0, "longest": poller.longest,
                     "asked": poller.asked})
    if not same:
        print(f"K={k}: the last step's parameters differ from torch's", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10000,100000", help="K, comma-separated")
    ap.add_argument("--steps", type=int, default=2, help="binary steps after the create")
    ap.add_argument("--max-params", default=None,
                    help="the server's OPTSERVE_MAX_SESSION_PARAMS (default: its own default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    port = free_port()
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_TORCH_THREADS": "1"}
    if args.max_params is not None:
        env["OPTSERVE_MAX_SESSION_PARAMS"] = args.max_params
    rows: list[dict[str, Any]] = []
    with server(env, command=[sys.executable, "-m", "app"], port=port,
                unset=user_defaults(env)) as url:
        for k in (int(x) for x in args.counts.split(",")):
            rows += measure(url, k, args.steps)
    shown = ", ".join(f"{k}={v}" for k, v in env.items() if k != "OPTSERVE_PORT")
    print(f"\nserver: python -m app, {shown}, the rest at defaults\n")
    print("| K tensors | request | status | request s | longest /healthz s | /healthz asked | "
          "bitwise |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ok = {True: "ok", False: "**DIFFERS**"}.get(row.get("ok"), "")  # type: ignore[call-overload]
        print(f"| {row['k']:,} | {row['phase']} | {row['status']} | {row['took']:.2f} | "
              f"{row['longest']:.3f} | {row['asked']} | {ok} |")
    return 1 if any(row.get("ok") is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
