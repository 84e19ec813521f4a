"""A session that a second storage fault in a row took out of service (its operation failed,
and so did its rebuild from its store: the cut of the record or the read) heals itself once
its storage works again: its first use after ``damaged_retry_s`` restores it from its store
through the replay a restart runs, so it holds exactly the acknowledged operations (bitwise
an in-process torch run of them), and a retried idempotency key of an acknowledged step is
answered, not applied again. Until then every operation gets 503 ``session_damaged`` whose
``retry_after`` is the time left to the next try; a session that keeps nothing on disk
promises no retry.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine import store as store_module
from app.engine.host import EmbeddedHost
from app.engine.interface import IdemKey
from app.errors import OptserveError, Unavailable
from tests.unit.test_engine import assert_tree_bitwise
from tests.unit.test_store_faults import (
    SID,
    FaultyFiles,
    GatedFiles,
    Pair,
    assert_refusal,
    engine,
    grad,
    spec,
    wal_of,
)

RETRY_S = 0.3


def host_of(eng: Front) -> EmbeddedHost:
    return eng.router.local.embedded  # type: ignore[attr-defined,no-any-return]


class TorchRun:
    """The session of :func:`spec` as an in-process torch run of the acknowledged steps."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.params = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=0.01, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.steps = 0

    def step(self, k: int) -> None:
        for name, g in grad(k).items():
            self.params[name].grad = g
        self.opt.step()
        self.sched.step()
        self.steps += 1

    async def assert_same(self, eng: Front) -> None:
        got = await eng.pull(SID, None)
        assert got.step == self.steps and got.version == self.steps
        assert got.lr == [self.sched.get_last_lr()[0]]
        assert_tree_bitwise(got.params, self.params, "params")
        state = (await eng.export_state(SID)).state_dict
        assert_tree_bitwise(state["state"], self.opt.state_dict()["state"], "state")


async def damaged(eng: Front) -> Unavailable:
    with pytest.raises(Unavailable) as info:
        await eng.pull(SID, None)
    assert info.value.code == "session_damaged" and info.value.status == 503
    return info.value


@pytest.mark.parametrize("faults", ["apply-then-cut", "fsync-then-read"])
def test_a_session_damaged_by_two_storage_faults_heals_once_its_store_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, faults: str) -> None:
    """``apply-then-cut``: a step fails half-way in torch (the parameters changed, then it
    raised) and the cut of its record fails (EIO); ``fsync-then-read``: the step's record's
    fsync fails and the rebuild's read of the log fails (EIO). Either way the session is out of
    service; a try while the fault lasts keeps it so; once the store works, the next use after
    the backoff restores it."""
    files = FaultyFiles()
    reads = {"fail": False}
    real_read_log = store_module.read_log

    def read_log(path: Path, limit: int | None = None) -> Any:
        if reads["fail"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read_log(path, limit)
    monkeypatch.setattr(store_module, "read_log", read_log)
    poison = grad(99)["w"]
    real_step = torch.optim.Adam.step

    def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        g = self.param_groups[0]["params"][0].grad
        out = real_step(self, closure)  # the parameters change...
        if g is not None and torch.equal(g, poison):
            raise RuntimeError("simulated: out of memory")  # ...then it fails
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", half_way)

    async def go() -> None:
        eng = engine(tmp_path, files, "step")
        host_of(eng).config.damaged_retry_s = RETRY_S
        pair, ref = Pair(eng), TorchRun()
        await pair.start()
        keys = []
        for _ in range(3):  # acknowledged steps, each with its idempotency key
            keys.append(IdemKey(f"step-{pair.k}", f"fingerprint {pair.k}"))
            got = await eng.step(SID, grad(pair.k), return_params=False, idem=keys[-1])
            assert got.version == pair.k + 1
            ref.step(pair.k)
            await pair.twin_step()
        logged = wal_of(tmp_path).stat().st_size
        if faults == "apply-then-cut":
            cut = files.arm("ftruncate", errno.EIO, times=-1)
            with pytest.raises(OptserveError) as info:
                await eng.step(SID, {"w": poison, "b": grad(0)["b"]}, return_params=False)
            assert cut.hits >= 1
            assert wal_of(tmp_path).stat().st_size > logged  # the record could not be cut
        else:
            files.arm("fsync", errno.EIO)
            reads["fail"] = True
            with pytest.raises(OptserveError) as info:
                await eng.step(SID, grad(pair.k), return_params=False)
        if faults == "apply-then-cut":
            assert info.value.code == "session_damaged", info.value
            assert isinstance(info.value, Unavailable)
            assert info.value.retry_after == RETRY_S
        else:
            assert info.value.code == "storage_error", info.value  # (nothing was applied)
        first = await damaged(eng)
        assert first.retry_after is not None and 0 < first.retry_after <= 1
        assert "once the store works again" in first.detail
        with pytest.raises(Unavailable) as step_info:  # every operation, not only reads
            await eng.step(SID, grad(pair.k), return_params=False)
        assert step_info.value.code == "session_damaged"

        await asyncio.sleep(RETRY_S + 0.05)  # a try while the fault lasts: still out of service
        again = await damaged(eng)
        assert "its restore from its store failed" in again.detail, again.detail
        assert again.retry_after is not None and 0 < again.retry_after <= 1

        files.disarm()  # the store works again
        reads["fail"] = False
        with pytest.raises(Unavailable):  # not before the backoff
            await eng.step(SID, grad(pair.k), return_params=False)
        await asyncio.sleep(RETRY_S + 0.05)
        await ref.assert_same(eng)  # this read restored it: the acknowledged steps only
        await pair.assert_same()
        assert (await eng.status()).ready
        assert wal_of(tmp_path).stat().st_size == logged  # the failed record is gone

        # an acknowledged step's retry is answered from the restored table, not applied
        replayed = await eng.step(SID, grad(1), return_params=False, idem=keys[1])
        assert replayed.replayed and replayed.version == 2
        await ref.assert_same(eng)
        # and it goes on: one more step, then a restart holds every acknowledged step
        ref.step(pair.k)
        await pair.step()
        await ref.assert_same(eng)
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    asyncio.run(go())


def test_a_session_with_nothing_on_disk_promises_no_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that keeps nothing on disk (durability ``memory``), whose step fails half-way,
    cannot be restored: its 503 ``session_damaged`` says to delete it and carries no
    ``retry_after``, and it stays out of service after any wait."""
    real_step = torch.optim.SGD.step

    def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        real_step(self, closure)
        raise RuntimeError("simulated: out of memory")

    async def go() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        host_of(eng).config.damaged_retry_s = 0.0
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"p": torch.ones(3)})], {"lr": 0.1},
                                        id=SID))
            with monkeypatch.context() as m:
                m.setattr(torch.optim.SGD, "step", half_way)
                with pytest.raises(Unavailable) as info:
                    await eng.step(SID, {"p": torch.ones(3)}, return_params=False)
            assert info.value.code == "session_damaged" and info.value.retry_after is None
            assert "delete it" in info.value.detail
            time.sleep(0.01)
            for _ in range(2):
                later = await damaged(eng)
                assert later.retry_after is None and "cannot be restored" in later.detail
            assert not await eng.delete(SID)
        finally:
            await eng.stop()
    asyncio.run(go())


def test_a_damaged_session_is_not_snapshotted(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The half-changed tensors of a damaged session never reach a snapshot: a stop that
    snapshots every session leaves it out, and the next start restores the acknowledged
    steps only."""
    files = FaultyFiles()
    poison = grad(99)["w"]
    real_step = torch.optim.Adam.step

    def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        g = self.param_groups[0]["params"][0].grad
        out = real_step(self, closure)
        if g is not None and torch.equal(g, poison):
            raise RuntimeError("simulated: out of memory")
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", half_way)

    async def go() -> None:
        eng = engine(tmp_path, files, "step")
        ref = TorchRun()
        await eng.start()
        await eng.create(spec())
        for k in range(2):
            await eng.step(SID, grad(k), return_params=False)
            ref.step(k)
        files.arm("ftruncate", errno.EIO, times=1)
        with pytest.raises(Unavailable) as info:
            await eng.step(SID, {"w": poison, "b": grad(0)["b"]}, return_params=False)
        assert info.value.code == "session_damaged"
        await eng.stop(snapshot=True)  # the disk works again by now
        again = engine(tmp_path)
        await again.start()
        try:
            await ref.assert_same(again)
        finally:
            await again.stop(snapshot=False)
    asyncio.run(go())


def test_a_rebuild_never_replays_a_record_whose_cut_and_zeroing_failed(tmp_path: Path) -> None:
    """A step's record is written, its fsync fails, and so do its cut and the zeroing of its
    header (the disk fails every write by then): the record is whole in the file, past the
    log's good length. The session's rebuild reads the log only up to that length, so the
    refused step is not in it; once the disk works the next append cuts the record first."""
    files = GatedFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        logged = wal_of(tmp_path).stat().st_size
        files.close_gate()
        stepping = asyncio.ensure_future(pair.eng.step(SID, grad(pair.k),
                                                       return_params=False))
        assert await asyncio.to_thread(files.held.wait, 20), "the fsync never started"
        files.arm("ftruncate", errno.EIO, times=-1)
        files.arm("pwritev", errno.EIO, times=-1)
        files.open_gate(errno.EIO)
        with pytest.raises(OptserveError) as info:
            await stepping
        assert_refusal(info.value, errno.EIO)
        assert wal_of(tmp_path).stat().st_size > logged  # the refused record is whole there
        await pair.assert_same()  # not replayed
        files.disarm()
        await pair.step()  # (cuts the record first)
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    asyncio.run(go())


def test_a_sharded_sessions_commit_rolls_forward_through_a_shard_that_heals(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded session's step: one shard's apply fails half-way and the cut of its record
    fails too, so that shard is out of service (503 ``session_damaged`` with a retry) while
    the other shard has applied the step. The coordinator rolls the commit forward as it does
    for a host that restarts: once the shard's host restores it from its store, the commit
    applies the step there, once, and the session equals torch's."""
    from app.engine.host import HostConfig
    from app.engine.shards import ShardedSession
    from tests.unit.test_shards import sharded_step, two_flaky_shards

    files = FaultyFiles()
    real_step = torch.optim.Adam.step
    fail = {"left": 0}

    def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        g = self.param_groups[0]["params"][0].grad
        out = real_step(self, closure)
        if fail["left"] and g is not None and g.shape == (4,):  # shard "a" only, once
            fail["left"] -= 1
            raise RuntimeError("simulated: out of memory")
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", half_way)

    async def body() -> None:
        host = EmbeddedHost(HostConfig("cpu", data_dir=tmp_path, durability="step",
                                       warm_up=False, files=files, damaged_retry_s=RETRY_S))
        await host.start()
        try:
            shards, groups, layout, pairs = two_flaky_shards(host)
            session, _ = await ShardedSession.create(
                "t~s", CreateSpec("Adam", groups, {"lr": 0.1}), layout, pairs,
                commit_timeout_s=10.0)
            ref = torch.optim.Adam([p := torch.nn.Parameter(torch.ones(4)),
                                    q := torch.nn.Parameter(torch.ones(3))], lr=0.1)

            def ref_step(g: float) -> None:
                p.grad, q.grad = torch.full((4,), g), torch.full((3,), g)
                ref.step()

            await sharded_step(session, 1.0, "x")
            ref_step(1.0)
            fail["left"] = 1
            cut = files.arm("ftruncate", errno.EIO, times=1)
            out = await sharded_step(session, 2.0, "y")
            assert cut.hits == 1 and fail["left"] == 0
            ref_step(2.0)
            assert out.version == 2 and out.step == 2
            assert_tree_bitwise(dict(out.params), {"a": p.detach(), "b": q.detach()}, "y")
            again = await sharded_step(session, 2.0, "y")  # the retry is answered
            assert again.version == 2
            out = await sharded_step(session, 3.0, "z")
            ref_step(3.0)
            assert out.version == 3
            assert_tree_bitwise(dict(out.params), {"a": p.detach(), "b": q.detach()}, "z")
            state = (await session.export_state("t~s")).state_dict
            assert_tree_bitwise(state["state"], ref.state_dict()["state"], "state")
        finally:
            await host.stop()
    asyncio.run(body())
