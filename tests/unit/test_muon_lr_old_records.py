"""A Muon ``lr`` whose shape scaling overflows, taken by a PATCH or a group added by a server
from before the check that refuses it (its log record lacks ``scaled_lr``), replays as it ran:
the session is restored with that lr, a step is refused until the lr is changed back (422
``option_overflow``, the session as it was), and it then steps as torch's Muon does. Were the
check run on such a record, the records after it would make the log unreadable (a record
refused at replay with records following is a corrupt log)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, embedded_engine
from app.engine import front as front_module
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops.params import AddParamGroup, UpdateParamGroup
from app.errors import Invalid


@pytest.mark.parametrize("how", ["patch", "add_group"])
def test_an_old_change_to_a_muon_lr_past_its_scaled_range_replays_as_it_ran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    w0 = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    grad = torch.linspace(-1, 1, 12).reshape(4, 3)
    v0 = torch.ones(40, 3)
    v_grad = torch.full((40, 3), 0.5)
    index = 0 if how == "patch" else 1

    def old_update(*args: Any, **kwargs: Any) -> UpdateParamGroup:
        return UpdateParamGroup(*args, **{**kwargs, "scaled_lr": False})

    def old_add(*args: Any, **kwargs: Any) -> AddParamGroup:
        return AddParamGroup(*args, **{**kwargs, "scaled_lr": False})

    async def old_server() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("Muon", [GroupSpec({"w": w0.clone()})], {"lr": 0.02},
                                        id="m"))
            with monkeypatch.context() as m:
                m.setattr(front_module, "UpdateParamGroup", old_update)
                m.setattr(front_module, "AddParamGroup", old_add)
                if how == "patch":
                    await eng.update_param_group("m", 0, {"lr": 3e38})
                else:
                    await eng.add_param_group("m", GroupSpec({"v": v0.clone()}, {"lr": 3e38}))
                await eng.update_param_group("m", index, {"weight_decay": 0.05})
        finally:
            await eng.stop(snapshot=False)  # (as a crash leaves it: the log only)

    async def restarted() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            assert await eng.refused() == {}
            info = await eng.describe("m")
            assert (info.revision, info.lr[index]) == (2, 3e38)
            assert info.param_groups[index]["weight_decay"] == 0.05
            grads = {"w": grad.clone()} if how == "patch" else {"w": grad.clone(),
                                                                "v": v_grad.clone()}
            with pytest.raises(Invalid) as refused:
                await eng.step("m", grads, return_params=False)
            assert (refused.value.code, refused.value.field) == (
                "option_overflow", f"param_groups.{index}.lr")
            assert (await eng.describe("m")).version == 0
            await eng.update_param_group("m", index, {"lr": 0.02})
            out = await eng.step("m", {k: t.clone() for k, t in grads.items()},
                                 return_params=True)
        finally:
            await eng.stop()
        w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
        opt = torch.optim.Muon([w], lr=0.02, weight_decay=0.05 if how == "patch" else 0.1)
        if how == "add_group":
            opt.add_param_group({"params": [v], "lr": 0.02, "weight_decay": 0.05})
            v.grad = v_grad.clone()
        w.grad = grad.clone()
        opt.step()
        assert out.params is not None and torch.equal(out.params["w"], w.detach())
        if how == "add_group":
            assert torch.equal(out.params["v"], v.detach())

    asyncio.run(old_server())
    asyncio.run(restarted())
