"""Conditional changes after a crash: their records hold no precondition (it held when each
ran), so the log replays every one of them through the same check and apply, and the session
comes back as an in-process ``torch.optim`` that took the same changes, bit for bit. And a
conditional delete of a session out of service (damaged: it is at no version) is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, embedded_engine
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops import Expected
from app.errors import NotFound, PreconditionFailed, Unavailable


def test_conditional_changes_replay_after_a_crash(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8)
    w0, grads = torch.randn(5, generator=g), [torch.randn(5, generator=g) for _ in range(3)]
    local = w0.clone()
    opt = torch.optim.SGD([local], lr=0.1, momentum=0.9)

    def local_step(grad: torch.Tensor) -> None:
        local.grad = grad.clone()
        opt.step()

    async def live() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"w": w0.clone()})],
                                        {"lr": 0.1, "momentum": 0.9}, id="c"))
            await eng.step("c", {"w": grads[0]}, return_params=False)
            local_step(grads[0])
            info = await eng.update_param_group("c", 0, {"lr": 0.05},
                                                expected=Expected(1, 1))
            opt.param_groups[0]["lr"] = 0.05
            assert (info.version, info.revision) == (1, 2)
            out = await eng.overwrite("c", {"w": torch.full((5,), 0.5)},
                                      expected=Expected(None, 2))
            with torch.no_grad():
                local.fill_(0.5)
            assert out.version == 2
            await eng.step("c", {"w": grads[1]}, return_params=False)
            local_step(grads[1])
        finally:
            await eng.stop(snapshot=False)  # (as a crash leaves it: the log only)

    async def again() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            info = await eng.describe("c")
            assert (info.version, info.revision, info.lr) == (3, 4, [0.05])
            out = await eng.step("c", {"w": grads[2]}, return_params=True)
            local_step(grads[2])
            assert out.params is not None and torch.equal(out.params["w"], local)
            state = (await eng.export_state("c")).state_dict
            assert torch.equal(state["state"][0]["momentum_buffer"],
                               opt.state[local]["momentum_buffer"])
        finally:
            await eng.stop()

    asyncio.run(live())
    asyncio.run(again())


def test_a_conditional_delete_of_a_damaged_session_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = torch.optim.SGD.step

    def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        real_step(self, closure)
        raise RuntimeError("simulated: out of memory")

    async def go() -> None:
        eng: Front = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"p": torch.ones(3)})], {"lr": 0.1},
                                        id="d"))
            with monkeypatch.context() as m:
                m.setattr(torch.optim.SGD, "step", half_way)
                with pytest.raises(Unavailable):
                    await eng.step("d", {"p": torch.ones(3)}, return_params=False)
            for expected, field in ((Expected(0, None), "base_version"),
                                    (Expected(None, 0), "base_revision"),
                                    (Expected(1, 1), "base_version"),
                                    (Expected(1, None, "If-Match", others=(2,)), "If-Match"),
                                    (Expected(None, None, "If-Match", weak=True), "If-Match")):
                with pytest.raises(PreconditionFailed) as refused:
                    await eng.delete("d", expected=expected)
                assert "at no version" in refused.value.detail
                assert refused.value.field == field  # (what the request sent)
            with pytest.raises(Unavailable):  # (still there, still out of service)
                await eng.describe("d")
            assert not await eng.delete("d")
            with pytest.raises(NotFound):
                await eng.describe("d")
        finally:
            await eng.stop()
    asyncio.run(go())
