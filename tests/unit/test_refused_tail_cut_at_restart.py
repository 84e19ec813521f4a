"""A log whose last record is refused at replay (an operation refused after it was logged, whose
cut and the zeroing of its header both failed, then a crash) is restored without that record,
and the record is cut from the file at that start: the records the restarted server appends
come after the acknowledged ones, so the next restart restores them too. Before, the refused
record stayed in the file, the next acknowledged operation was logged after it under the same
sequence number, and the next restart refused the whole session (a record refused at replay
with records following is a corrupt log)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from app.engine import Front, embedded_engine, persist
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops import Step
from app.engine.store import Store


def test_a_record_refused_at_replay_is_cut_so_later_steps_survive_the_next_restart(
        tmp_path: Path) -> None:
    w0 = torch.linspace(-1, 1, 6)
    g1, g2 = torch.full((6,), 0.5), torch.linspace(0, 1, 6)

    def engine() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def first() -> None:
        eng = engine()
        await eng.start()
        try:
            await eng.create(CreateSpec("Adam", [GroupSpec({"w": w0.clone()})], {"lr": 0.1},
                                        id="a"))
            await eng.step("a", {"w": g1.clone()}, return_params=False)
        finally:
            await eng.stop(snapshot=False)  # (as a crash leaves it: the log only)
        # what a refused step whose cut and header zeroing failed leaves: a whole record that
        # replay refuses (a gradient of the wrong shape), the log's last
        store = Store(tmp_path)
        store.open()
        try:
            refused = persist.Record(Step({"w": torch.ones(5)}), 3, 2, [])
            store.append("default~a", persist.encode_record_parts(refused), "step")
        finally:
            store.close()

    async def second() -> None:
        eng = engine()
        await eng.start()
        try:
            assert await eng.refused() == {}
            assert (await eng.describe("a")).version == 1
            await eng.step("a", {"w": g2.clone()}, return_params=False)
        finally:
            await eng.stop(snapshot=False)

    async def third() -> torch.Tensor:
        eng = engine()
        await eng.start()
        try:
            assert await eng.refused() == {}
            info = await eng.describe("a")
            assert (info.version, info.step) == (2, 2)
            return (await eng.pull("a", None)).params["w"]
        finally:
            await eng.stop()

    asyncio.run(first())
    asyncio.run(second())
    got = asyncio.run(third())
    w = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([w], lr=0.1)
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    assert torch.equal(got, w.detach())
