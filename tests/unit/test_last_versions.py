"""The bounds of ``app.engine.last_versions``: the embedded host keeps the last versions of its
last ``KEEP`` deleted sessions (an id deleted longer ago starts at 0 again, as documented), in
its tombstone log counted apart from keyed deletes' lines, so that many deletes without a key do
not push a keyed delete's line out of the log (its retry after a restart is still answered).
Values are compared with an in-process ``torch.optim.SGD``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.interface import IdemKey

PARAMS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7}
GRAD = {"w": torch.full((2, 3), 0.25)}


def spec(sid: str) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({n: t.clone() for n, t in PARAMS.items()}, {})],
                      {"lr": 0.1}, id=sid, durability="step")


def make(tmp_path: Path) -> Front:
    return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, snapshot: bool = True) -> AsyncIterator[Front]:
    """An engine on ``tmp_path``, started; stopped at the end (with a snapshot or not)."""
    eng = make(tmp_path)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop(snapshot=snapshot)


async def made_stepped_deleted(eng: Front, sid: str, *, idem: IdemKey | None = None) -> None:
    await eng.create(spec(sid))
    await eng.step(sid, GRAD, return_params=False)
    assert not await eng.delete(sid, idem=idem)


async def made_and_stepped(eng: Front, sid: str, first: int) -> None:
    """Made at ``first``; one step: torch's values at ``first + 1``."""
    assert (await eng.create(spec(sid))).version == first
    out = await eng.step(sid, GRAD, return_params=True)
    p = PARAMS["w"].clone().requires_grad_()
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = GRAD["w"].clone()
    opt.step()
    assert out.version == first + 1 and torch.equal(out.params["w"], p.detach())


def test_the_last_versions_kept_are_bounded_and_kept_apart_from_keyed_deletes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine import host as host_module
    monkeypatch.setattr(host_module, "_TOMBSTONES", 3)
    key = IdemKey("del-keyed", "DELETE keyed")
    log = tmp_path / "tombstones.jsonl"

    async def live() -> None:
        async with running(tmp_path) as eng:
            await made_stepped_deleted(eng, "keyed", idem=key)
            for i in range(20):  # (unkeyed: a version line each, nothing else)
                await made_stepped_deleted(eng, f"s{i}")
                # (3 keyed keys' lines and 3 versions kept, cut past twice as many)
                assert len(log.read_bytes().splitlines()) <= 2 * (2 * 3 + 3), i
            assert await eng.delete("keyed", idem=key)  # (answered)

    async def restarted() -> None:
        async with running(tmp_path) as eng:
            # the keyed delete's line outlived 20 unkeyed deletes' lines
            assert await eng.delete("keyed", idem=key)
            # the last 3 ids continue (deleted at 1); older ones were evicted: from 0
            for i in (17, 18, 19):
                await made_and_stepped(eng, f"s{i}", 2)
            for i in (0, 16):
                await made_and_stepped(eng, f"s{i}", 0)

    asyncio.run(live())
    asyncio.run(restarted())


def test_an_id_deleted_again_and_again_takes_one_place_across_a_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host keeps the last versions of its last ``KEEP`` deleted ids (3 here): ``a``
    deleted at 1, then ``b`` made, stepped and deleted 5 times (at 1, 3, ..., 9) leave 2 ids
    kept, in memory and after a restart alike: ``a`` made again starts at 2, ``b`` at 10. The
    start read the log's last 3 version lines, all of them ``b``'s: ``a`` started at 0 after a
    restart (its versions 0 and 1 naming other values than the deleted session's), where the
    server that deleted it would have started it at 2."""
    from app.engine import host as host_module
    monkeypatch.setattr(host_module, "_TOMBSTONES", 3)

    async def live() -> None:
        async with running(tmp_path) as eng:
            await made_stepped_deleted(eng, "a")
            for k in range(5):
                assert (await eng.create(spec("b"))).version == 2 * k
                await eng.step("b", GRAD, return_params=False)
                assert not await eng.delete("b")

    async def restarted() -> None:
        async with running(tmp_path) as eng:
            await made_and_stepped(eng, "a", 2)
            await made_and_stepped(eng, "b", 10)

    asyncio.run(live())
    asyncio.run(restarted())


def test_a_restored_create_record_keeps_its_first_version(tmp_path: Path) -> None:
    """Made again at 2 and stepped, then stopped without a snapshot: the restart replays the
    create's record (its ``first_version``) and the step: at 3, torch's values; and once
    more deleted and made again: at 4."""
    async def first() -> None:
        async with running(tmp_path, snapshot=False) as eng:
            await made_stepped_deleted(eng, "r")
            await made_and_stepped(eng, "r", 2)

    async def second() -> None:
        async with running(tmp_path) as eng:
            got = await eng.pull("r", None)
            assert got.version == 3
            assert not await eng.delete("r")
            await made_and_stepped(eng, "r", 4)
    asyncio.run(first())
    asyncio.run(second())
