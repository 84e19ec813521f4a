"""The step on a GPU through the engine: pinned host buffers, one host-to-device copy of the
gradient and one device-to-host copy of the parameters per step, beside the same optimizer
in-process on the GPU (no copies), for default, foreach and fused variants. Prints one table.

    python -m benchmarks.gpu --sizes 1e7,1e8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch

from app.engine import CreateSpec, GroupSpec, embedded_engine

VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("Adam", "default", {}), ("Adam", "foreach", {"foreach": True}),
    ("Adam", "fused", {"fused": True}), ("AdamW", "fused", {"fused": True}),
    ("SGD", "momentum", {"momentum": 0.9}), ("SGD", "fused", {"momentum": 0.9, "fused": True}),
]


def in_process(name: str, options: dict[str, Any], n: int, steps: int) -> float:
    p = torch.zeros(n, device="cuda", requires_grad=True)
    g = torch.randn(n, device="cuda")
    opt = getattr(torch.optim, name)([p], lr=1e-3, **options)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        p.grad = g
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


async def through_engine(name: str, options: dict[str, Any], n: int, steps: int
                         ) -> tuple[float, float]:
    eng = embedded_engine("cuda", warm_up=False)
    await eng.start()
    try:
        await eng.create(CreateSpec(name, [GroupSpec({"p": torch.zeros(n)})],
                                    {"lr": 1e-3, **options}, id="b"))
        g = torch.randn(n).pin_memory()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = await eng.step("b", {"p": g}, return_params=True)
            times.append(time.perf_counter() - t)
            assert out.params is not None and out.params["p"].is_pinned()
        copy_ms = 2 * n * 4 / (25e9) * 1e3  # two PCIe-ish copies at ~25 GB/s, for reference
        return statistics.median(times[2:]) * 1e3, copy_ms
    finally:
        await eng.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1e7,1e8")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    sizes = [int(float(x)) for x in args.sizes.split(",")]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| optimizer | variant | N | in-process ms | engine ms (pinned, H2D + D2H) | "
          "engine / in-process |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for name, variant, options in VARIANTS:
            local = in_process(name, options, n, args.steps)
            engine, _ = asyncio.run(through_engine(name, options, n, args.steps))
            print(f"| {name} | {variant} | {n:.0e} | {local:.2f} | {engine:.2f} | "
                  f"{engine / local:.2f} |", flush=True)


if __name__ == "__main__":
    main()
