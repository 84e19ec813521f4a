"""The engine on a CUDA device, exact against in-process CUDA torch: torch's own ``optim_db``
configurations of every optimizer the service runs, stepped through the engine (gradients from
pinned host memory, parameters back through pinned memory) and compared bitwise with the same
optimizer run in-process on the same GPU; fused and foreach variants where torch offers them;
and a restart replaying the log onto the GPU.

Without a GPU every test here is skipped, with that reason (``scripts/gpu-check`` runs them on
a machine that has one)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, GroupSpec, embedded_engine, optimizers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here (scripts/gpu-check runs these)")


def configs() -> list[tuple[str, dict[str, Any]]]:
    """optim_db's configurations for cuda/float32 that JSON can carry (no tensor options)."""
    if not torch.cuda.is_available():
        return []
    from torch.testing._internal.common_optimizers import optim_db

    out = []
    for info in optim_db:
        name = info.optim_cls.__name__
        if name not in optimizers.SUPPORTED:
            continue
        for i, oi in enumerate(info.optim_inputs_func("cuda", torch.float32)):
            kwargs = dict(oi.kwargs)
            if any(isinstance(v, torch.Tensor) for v in kwargs.values()) or "params" in kwargs:
                continue
            out.append((f"{name}-{i}", {"optimizer": name, **kwargs}))
    return out


def grads(k: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(k)).pin_memory()


@pytest.mark.parametrize("case", configs(), ids=lambda c: c[0])
def test_optim_db_on_cuda_is_exact(case: tuple[str, dict[str, Any]]) -> None:
    _, options = case
    options = dict(options)
    name = options.pop("optimizer")
    shape = (8, 8)  # 2-D (Muon takes only matrices)
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    async def run() -> None:
        eng = embedded_engine("cuda", warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec(name, [GroupSpec({"p": p0.clone()})], options,
                                        id="c"))
            local = p0.clone().cuda().requires_grad_(True)
            opt = getattr(torch.optim, name)([local], **options)
            for k in range(3):
                g = grads(k, shape)
                out = await eng.step("c", {"p": g}, return_params=True)
                local.grad = g.cuda()
                opt.step()
                assert out.params is not None
                got = out.params["p"]
                assert got.is_pinned() and got.device.type == "cpu"
                assert torch.equal(got, local.detach().cpu()), (name, options, k)
        finally:
            await eng.stop()
    asyncio.run(run())


def test_a_cuda_session_restarts_onto_the_gpu_bitwise() -> None:
    data = Path(tempfile.mkdtemp(prefix="optserve-cuda-"))
    p0 = torch.randn(1000, generator=torch.Generator().manual_seed(1))

    async def run() -> None:
        eng = embedded_engine("cuda", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        await eng.create(CreateSpec("Adam", [GroupSpec({"p": p0.clone()})],
                                    {"lr": 1e-2, "fused": True}, id="r"))
        for k in range(3):
            await eng.step("r", {"p": grads(k, (1000,))}, return_params=False)
        before = await eng.pull("r", None)
        state = await eng.export_state("r")
        await eng.stop(snapshot=False)
        again = embedded_engine("cuda", data_dir=data, durability="step", warm_up=False)
        await again.start()
        try:
            after = await again.pull("r", None)
            assert torch.equal(after.params["p"], before.params["p"])
            restored = await again.export_state("r")
            assert torch.equal(restored.state_dict["state"][0]["exp_avg"],
                               state.state_dict["state"][0]["exp_avg"])
            assert (await again.describe("r")).device.startswith("cuda")
        finally:
            await again.stop()
    asyncio.run(run())
