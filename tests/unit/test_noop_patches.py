"""A ``PATCH`` that changes nothing (of the session or of a group: ``{}``, or the values held)
is no revision, live and after a restart: its record is logged (so a keyed one is still
answered from its key after a crash) and replays as it ran, keeping the revision; a record
logged before such PATCHes kept it (no ``noop_kept``) replays as it ran then, one revision
each. The parameters step as an in-process ``torch.optim.SGD`` all along."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from app.engine import Front, embedded_engine
from app.engine.front import DEFAULT_TENANT
from app.engine.interface import CreateSpec, GroupSpec, IdemKey
from app.engine.ops import Configure, UpdateParamGroup, decode

W0 = torch.linspace(-1, 1, 4)


def spec(session_id: str) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({"w": W0.clone()})], {"lr": 0.1, "momentum": 0.9},
                      id=session_id)


class Twin:
    """The in-process SGD the session's steps are checked against."""

    def __init__(self) -> None:
        self.w = W0.clone()
        self.opt = torch.optim.SGD([self.w], lr=0.1, momentum=0.9)

    def step(self, grad: torch.Tensor) -> None:
        self.w.grad = grad.clone()
        self.opt.step()


async def same_as(eng: Front, twin: Twin) -> None:
    got = (await eng.pull("r", None)).params["w"]
    assert torch.equal(got.cpu(), twin.w)


def test_a_noop_record_says_so_and_an_old_one_is_a_revision() -> None:
    new = Configure({}, request=True, noop_kept=True)
    assert decode("configure", new.to_tree()) == new
    group = UpdateParamGroup(0, {}, request=True, noop_kept=True)
    assert decode("update_group", group.to_tree()) == group
    old = decode("configure", {"options": {}, "request": True})
    assert isinstance(old, Configure) and not old.noop_kept


def test_noop_patches_keep_the_revision_live_and_after_a_crash(tmp_path: Path) -> None:
    twin = Twin()
    key = IdemKey("noop-1", "PATCH {}")

    async def live() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            await eng.create(spec("r"))
            grad = torch.full((4,), 0.5)
            await eng.step("r", {"w": grad}, return_params=False)
            twin.step(grad)
            before = await eng.describe("r")
            assert (before.version, before.revision) == (1, 1)
            first = await eng.configure("r", {}, idem=key)
            assert (first.version, first.revision, first.replayed) == (1, 1, False)
            for options in ({}, {"lr": 0.1}, {"momentum": 0.9}):
                info = await eng.update_param_group("r", 0, options)
                assert (info.version, info.revision) == (1, 1), options
            info = await eng.configure("r", {"max_staleness": None, "history":
                                             before.to_json()["history"]})
            assert info.revision == 1
            assert info.to_json() == before.to_json()
            # a record as servers before no-op PATCHes kept the revision logged it: a revision
            host, skey = await eng._host(DEFAULT_TENANT, "r")
            await host.execute(skey, Configure({}, request=True))
            assert (await eng.describe("r")).revision == 2
            info = await eng.update_param_group("r", 0, {"lr": 0.05})  # (a change)
            twin.opt.param_groups[0]["lr"] = 0.05
            assert (info.version, info.revision) == (1, 3)
            await same_as(eng, twin)
        finally:
            await eng.stop(snapshot=False)  # (as a crash leaves it: the log only)

    async def again(snapshot: bool) -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            info = await eng.describe("r")
            assert (info.version, info.revision) == (1, 3)
            repeated = await eng.configure("r", {}, idem=key)  # (answered from its key)
            assert (repeated.revision, repeated.replayed) == (3, True)
            info = await eng.update_param_group("r", 0, {"lr": 0.05})  # (as held: no-op)
            assert info.revision == 3
            await same_as(eng, twin)
        finally:
            await eng.stop(snapshot=snapshot)

    asyncio.run(live())
    asyncio.run(again(snapshot=True))  # (replayed from the log; then a snapshot)
    asyncio.run(again(snapshot=False))  # (loaded from the snapshot)
