"""A tensor ``lr`` given as the optimizer's default is one tensor in torch: ``defaults["lr"]``
and the ``lr`` of every group built from the defaults are the same object, so a scheduler's
in-place fills (``group["lr"].fill_(...)``) change them all, and a group added later without an
``lr`` starts from the scheduled value. A session keeps that aliasing exactly as torch does:
through the service's dry runs and rollbacks, across a restart (the log replayed, or a snapshot
restored) and after a state import (torch's ``load_state_dict`` leaves ``defaults`` as they were
and gives the groups the loaded values). Each sequence is compared bitwise with torch doing the
same: parameters, the exported state dict (groups' options, state, scheduler) and the
defaults."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine

SCHEDULERS = {
    "LinearLR": {"start_factor": 0.5, "total_iters": 2},
    "StepLR": {"step_size": 2, "gamma": 0.5},
}
PARAMS = {"w": (3, 2), "b": (2,), "h": (4,), "x": (3,)}
SID = "s"


def seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float32)


def grads(k: int, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: seeded(PARAMS[n], 1000 * k + i) for i, n in enumerate(names)}


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Equal trees, tensors bitwise (dtype and shape included)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), (path, got, want)
        assert got.dtype == want.dtype and got.shape == want.shape, (path, got, want)
        assert torch.equal(got.reshape(-1).view(torch.uint8),
                           want.detach().reshape(-1).view(torch.uint8)), (path, got, want)
    elif isinstance(want, dict):  # (keys compared as text: a torch.load's ints, JSON's str)
        assert {str(k) for k in got} == {str(k) for k in want}, (path, set(got), set(want))
        by_str = {str(k): v for k, v in got.items()}
        for k in want:
            assert_same(by_str[str(k)], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), (path, got, want)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same(a, b, f"{path}.{i}")
    else:
        assert got == want, (path, got, want)


class Twin:
    """The same session in process: torch's optimizer and scheduler, named parameters."""

    def __init__(self, sched: str, groups: list[list[str]]) -> None:
        self.params = {n: seeded(PARAMS[n], i) for i, n in enumerate(PARAMS)}
        self.opt = torch.optim.Adam([{"params": [(n, self.params[n]) for n in g]}
                                     for g in groups], lr=torch.tensor(0.01))
        self.sched = getattr(torch.optim.lr_scheduler, sched)(self.opt, **SCHEDULERS[sched])

    def spec(self, sched: str, groups: list[list[str]]) -> CreateSpec:
        return CreateSpec("Adam", [GroupSpec({n: seeded(PARAMS[n], list(PARAMS).index(n))
                                              for n in g}) for g in groups],
                          {"lr": torch.tensor(0.01)},
                          scheduler={"name": sched, "options": SCHEDULERS[sched]}, id=SID)

    def names(self) -> list[str]:
        return [n for g in self.opt.param_groups for n in g["param_names"]]

    def step(self, k: int) -> None:
        for n, g in grads(k, self.names()).items():
            self.params[n].grad = g
        self.opt.step()
        self.sched.step()
        for n in self.names():
            self.params[n].grad = None

    def add_group(self, name: str) -> None:
        self.opt.add_param_group({"params": [(name, self.params[name])]})


async def step(eng: Front, twin: Twin, k: int) -> None:
    await eng.step(SID, grads(k, twin.names()), return_params=False)
    twin.step(k)


async def add_group(eng: Front, twin: Twin, name: str) -> None:
    await eng.add_param_group(SID, GroupSpec({name: seeded(PARAMS[name],
                                                           list(PARAMS).index(name))}, {}))
    twin.add_group(name)


async def check(eng: Front, twin: Twin, when: str) -> None:
    got = (await eng.pull(SID, None)).params
    assert got is not None
    assert_same(got, {n: twin.params[n] for n in twin.names()}, f"{when}: params")
    sd = (await eng.export_state(SID)).state_dict
    assert_same(sd["param_groups"], twin.opt.state_dict()["param_groups"], f"{when}: groups")
    assert_same(sd["state"], twin.opt.state_dict()["state"], f"{when}: state")
    assert_same(sd["scheduler"], twin.sched.state_dict(), f"{when}: scheduler")
    defaults = (await eng.describe(SID)).defaults
    lr = defaults["lr"]  # (a JSON tensor whose data is an array)
    got_lr = torch.from_numpy(numpy.asarray(lr["data"])).reshape(lr["shape"])
    assert_same(got_lr, twin.opt.defaults["lr"], f"{when}: defaults.lr")


def engine(data: Path, every: int) -> Front:
    return embedded_engine("cpu", data_dir=data, durability="step", snapshot_every_steps=every)


class Run:
    """An engine on one data directory, restarted as a test asks: ``log`` (kill -9: nothing
    but the log and what snapshots it had), ``snapshot`` (a snapshot after every record, so
    the restore rebuilds from one) or not at all."""

    def __init__(self, data: Path, restart: str) -> None:
        self.data, self.restart = data, restart
        self.eng = engine(data, 1 if restart == "snapshot" else 1000)

    async def __aenter__(self) -> Run:
        await self.eng.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.eng.stop(snapshot=False)

    async def maybe_restart(self) -> None:
        if self.restart == "none":
            return
        await self.eng.stop(snapshot=False)
        self.eng = engine(self.data, 1 if self.restart == "snapshot" else 1000)
        await self.eng.start()


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_a_group_added_after_scheduling_starts_from_torchs_default(
        tmp_path: Path, sched: str, restart: str) -> None:
    groups = [["w", "b"], ["h"]]  # two groups built from the defaults: one lr tensor in torch

    async def go() -> None:
        twin = Twin(sched, groups)
        async with Run(tmp_path, restart) as r:
            await r.eng.create(twin.spec(sched, groups))
            for k in range(3):
                await step(r.eng, twin, k)
            await check(r.eng, twin, "scheduled")
            await r.maybe_restart()
            await check(r.eng, twin, "restarted")
            await add_group(r.eng, twin, "x")
            await check(r.eng, twin, "added")
            await r.maybe_restart()
            for k in range(3, 6):
                await step(r.eng, twin, k)
            await check(r.eng, twin, "stepped after the add")
    asyncio.run(go())


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
def test_an_import_leaves_the_defaults_as_torchs_load_state_dict_does(
        tmp_path: Path, restart: str) -> None:
    groups = [["w", "b"], ["h"]]

    async def go() -> None:
        twin = Twin("LinearLR", groups)
        async with Run(tmp_path, restart) as r:
            await r.eng.create(twin.spec("LinearLR", groups))
            await step(r.eng, twin, 0)
            sd = (await r.eng.export_state(SID)).state_dict
            for k in range(1, 3):
                await step(r.eng, twin, k)
            await r.eng.import_state(SID, copy.deepcopy(sd))
            mine = copy.deepcopy(sd)
            twin.opt.load_state_dict({"state": mine["state"],
                                      "param_groups": mine["param_groups"]})
            twin.sched.load_state_dict(mine["scheduler"])
            await check(r.eng, twin, "imported")
            await r.maybe_restart()
            await step(r.eng, twin, 3)
            await add_group(r.eng, twin, "x")
            await r.maybe_restart()
            for k in range(4, 6):
                await step(r.eng, twin, k)
            await check(r.eng, twin, "stepped after the import")
    asyncio.run(go())
