"""A conditional import's preconditions in the engine: checked against the session's version and
revision in the same hop as the import (a refusal changes nothing, revision included); carried
to a remote host as part of the operation; not logged and not checked again at replay (they
held when it ran; a record logged when imports kept them as arguments replays without them),
so the log replays, and the revision comes back the same after a restart, from the log and
from a snapshot. (Every conditional change: ``test_conditional_changes``.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from app.engine import Front, embedded_engine, persist
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops import Expected, ImportState
from app.errors import PreconditionFailed

ray_host = pytest.importorskip("app.engine.ray_host")


def spec(session_id: str) -> CreateSpec:
    g = torch.Generator().manual_seed(5)
    return CreateSpec("SGD", [GroupSpec({"w": torch.randn(4, generator=g)})],
                      {"lr": 0.1, "momentum": 0.9}, id=session_id)


def test_preconditions_cross_to_a_remote_host_and_are_not_logged() -> None:
    op = ImportState({"state": {}, "param_groups": []}, True, expected=Expected(5, 9))
    back = ray_host.op_from_wire(ray_host.op_to_wire(op))
    assert isinstance(back, ImportState)
    assert (back.expected, back.request) == (Expected(5, 9), True)
    logged = persist.decode_record(persist.encode_record(persist.Record(op, 3, 6, []))).op
    assert isinstance(logged, ImportState) and logged.expected is None
    assert logged.state == op.state and logged.request
    assert op.replayed().expected is None and op.expected == Expected(5, 9)


def test_a_record_logged_with_its_preconditions_replays_without_them() -> None:
    """Before every change took a precondition, an import logged its own (``base_version``,
    ``base_revision`` in its record's arguments): such a record reads back with them, and its
    replay drops them."""
    tree = {"state": {"state": {}, "param_groups": []}, "request": True, "base_version": 5,
            "base_revision": 9}
    old = ImportState.from_tree(tree)
    assert old.expected == Expected(5, 9) and old.request
    assert old.replayed().expected is None


def test_revisions_count_changes_and_survive_restarts(tmp_path: Path) -> None:
    """Create (0), a step (1), a push and a zero_grad (not changes of the state), an lr PATCH
    (2), refused conditional imports (still 2), a conditional import naming 2 (3); after a
    crash (the log replayed, conditional imports included) and after a graceful stop (the
    snapshot loaded) the version and revision are as they were, and a conditional import
    naming the restored revision is taken."""
    async def live() -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            info = await eng.create(spec("r"))
            assert info.revision == 0
            await eng.step("r", {"w": torch.ones(4)}, return_params=False)
            await eng.push("r", {"w": torch.ones(4)})
            await eng.zero_grad("r")
            info = await eng.update_param_group("r", 0, {"lr": 0.05})
            assert (info.version, info.revision) == (1, 2)
            state = (await eng.export_state("r")).state_dict
            for version, revision, field in ((0, None, "base_version"),
                                             (None, 1, "base_revision")):
                with pytest.raises(PreconditionFailed) as refused:
                    await eng.import_state("r", state, expected=Expected(version, revision))
                assert refused.value.field == field
                assert (refused.value.extra["current_version"],
                        refused.value.extra["current_revision"]) == (1, 2)
            info = await eng.describe("r")
            assert (info.version, info.revision) == (1, 2)
            info = await eng.import_state("r", state, expected=Expected(1, 2))
            assert (info.version, info.revision) == (2, 3)
        finally:
            await eng.stop(snapshot=False)  # (as a crash leaves it: the log only)

    async def again(expected: tuple[int, int], snapshot: bool) -> None:
        eng: Front = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                     warm_up=False)
        await eng.start()
        try:
            info = await eng.describe("r")
            assert (info.version, info.revision) == expected
            state = (await eng.export_state("r")).state_dict
            info = await eng.import_state("r", state, expected=Expected(None, info.revision))
            await eng.step("r", {"w": torch.ones(4)}, return_params=False,
                           base_version=info.version)
        finally:
            await eng.stop(snapshot=snapshot)

    asyncio.run(live())
    asyncio.run(again((2, 3), snapshot=True))  # (replayed from the log; then a snapshot)
    asyncio.run(again((4, 5), snapshot=False))  # (loaded from the snapshot, then the log)
    asyncio.run(again((6, 7), snapshot=False))


def test_a_skipped_step_revises_only_with_option_changes() -> None:
    """``nonfinite: skip``: a step skipped for a NaN gradient changes nothing (the revision
    stays, and a conditional import naming it is taken); one that carries an lr change changes
    the group (the revision moves, and an import naming the old one is a 412)."""
    async def run() -> None:
        eng: Front = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            made = spec("s")
            made.nonfinite = "skip"
            await eng.create(made)
            nan = {"w": torch.tensor([1.0, float("nan"), 0.0, 0.0])}
            out = await eng.step("s", nan, return_params=False)
            assert out.skipped
            info = await eng.describe("s")
            assert (info.version, info.revision) == (0, 0)
            out = await eng.step("s", nan, return_params=False, options={0: {"lr": 0.2}})
            assert out.skipped
            info = await eng.describe("s")
            assert (info.version, info.revision, info.lr) == (0, 1, [0.2])
            state = (await eng.export_state("s")).state_dict
            with pytest.raises(PreconditionFailed):
                await eng.import_state("s", state, expected=Expected(None, 0))
            info = await eng.import_state("s", state, expected=Expected(None, 1))
            assert (info.version, info.revision) == (1, 2)
        finally:
            await eng.stop()
    asyncio.run(run())
