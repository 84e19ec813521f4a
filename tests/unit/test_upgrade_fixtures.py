"""Small data directories written by older commits (``tests/fixtures/upgrade/<case>/``:
``stored/`` as that commit's server left it, ``inputs.json`` the acknowledged requests that
made it), restored by this one. Expected values come from in-process torch at test time,
from those inputs: nothing computed elsewhere is the truth."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from app.engine import Front, embedded_engine
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.router import Host, InProcessHost
from app.engine.shards import ShardedSession, ShardLayout, old_revisions_aligned, shard_key
from app.errors import Unavailable
from tests.torch_reference import assert_trees_equal
from tests.upgrade_cases import copied_case, f32, sgd_after_its_step


def test_a_sharded_session_with_a_shard_snapshotted_before_revisions_is_restored_whole(
        tmp_path: Path) -> None:
    """c938206 (before revisions were counted) snapshotted one shard of a sharded SGD session
    (create, step and a push of one parameter's gradient: three logged updates) and left the
    other with its log only. Its snapshot holds no revision, while the other shard's log replay
    counts the step: the shards' revisions differed ([0, 1]), the session was missing from the
    listing and every read of it a 503 shards_out_of_step, until it went out of service."""
    inputs, data = copied_case("c938206-sharded-push", tmp_path)
    local, opt = sgd_after_its_step(inputs)
    acknowledged = {n: p.detach().clone() for n, p in local.items()}
    pushed = {n: f32(v) for n, v in inputs["push"].items()}
    nxt = {"u": f32([0.5, -1.0, 2.0]), "v": f32([-3.0, 0.25])}
    for n, p in local.items():
        p.grad = nxt[n] + pushed[n] if n in pushed else nxt[n].clone()
    opt.step()

    async def run() -> None:
        eng: Front = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            assert await eng.refused() == {}
            assert [info.id for info in await eng.list_sessions()] == ["sh"]
            params = await eng.pull("sh", None)
            assert (params.version, params.step) == (1, 1)
            assert_trees_equal(dict(params.params), acknowledged, "restored")
            out = await eng.step("sh", nxt, return_params=True)
            assert out.version == 2 and out.params is not None
            assert_trees_equal(dict(out.params), dict(local), "the next step")
        finally:
            await eng.stop()
    asyncio.run(run())

    async def again() -> None:  # (and so after the next restart, from what it wrote)
        eng: Front = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            assert await eng.refused() == {}
            params = await eng.pull("sh", None)
            assert params.version == 2
            assert_trees_equal(dict(params.params), dict(local), "after a second restart")
        finally:
            await eng.stop()
    asyncio.run(again())


def test_the_rule_that_aligns_old_revisions() -> None:
    """Shards at one version whose revisions differ where some was restored from a snapshot
    older than revisions are put at the highest; shards at different versions (an operation
    a crash cut between them) or with every revision known never are."""
    assert old_revisions_aligned([(1, 0, True), (1, 1, False)]) == 1
    assert old_revisions_aligned([(4, 3, False), (4, 1, True), (4, 2, True)]) == 3
    assert old_revisions_aligned([(1, 0, True), (2, 1, False)]) is None
    assert old_revisions_aligned([(1, 0, False), (1, 1, False)]) is None
    assert old_revisions_aligned([(1, 1, True), (1, 1, False)]) is None


def test_a_coordinator_puts_its_shards_at_one_revision_and_they_keep_it(tmp_path: Path) -> None:
    """What a Ray coordinator made anew does (its shards on hosts of their own, asked through
    the host interface): the c938206 shards, one restored from a snapshot without a revision,
    are put at one revision, and the shard moved is snapshotted there, so that its host
    restored again by itself (a Ray host restarted while the coordinator stays) still agrees
    with the other shard."""
    inputs, data = copied_case("c938206-sharded-push", tmp_path)
    layout = ShardLayout.from_json(
        json.loads((data / "directory" / "default~sh").read_text())["layout"])
    keys = [shard_key("default~sh", i, 2) for i in range(2)]
    local, opt = sgd_after_its_step(inputs)

    def embedded() -> EmbeddedHost:
        return EmbeddedHost(HostConfig("cpu", data_dir=data, durability="step",
                                       warm_up=False))

    async def run() -> None:
        host = embedded()
        await host.start()
        try:
            shards: list[tuple[Host, str]] = [(InProcessHost(host), k) for k in keys]
            session = ShardedSession("default~sh", layout, shards)
            assert [await h.revision_tip(k) for h, k in shards] == [(1, 0, True),
                                                                    (1, 1, False)]
            with pytest.raises(Unavailable) as apart:
                await session.describe("default~sh")
            assert apart.value.code == "shards_out_of_step"
            assert await session.align_old_revisions() == 1
            assert await session.align_old_revisions() is None  # (in step now)
            assert (await session.describe("default~sh")).version == 1
        finally:
            await host.stop(snapshot=False)  # (as a kill: only what was written stays)
        host = embedded()
        await host.start()
        try:
            shards = [(InProcessHost(host), k) for k in keys]
            assert [await h.revision_tip(k) for h, k in shards] == [(1, 1, False),
                                                                    (1, 1, False)]
            session = ShardedSession("default~sh", layout, shards)
            params = await session.pull("default~sh", None)
            assert (params.version, params.step) == (1, 1)
            assert_trees_equal(dict(params.params), dict(local), "restored again")
        finally:
            await host.stop()
    asyncio.run(run())


class _PutFailsTwice(InProcessHost):
    """A shard's host that cannot be reached for its first two :meth:`put_at_revision` (a Ray
    host restarting: the 503 a coordinator's call to it gets)."""

    failed = 0

    async def put_at_revision(self, key: str, revision: int) -> bool:
        if self.failed < 2:
            self.failed += 1
            raise Unavailable("the session's host is restarting", code="host_restarting",
                              retry_after=1.0)
        return await super().put_at_revision(key, revision)


def test_a_coordinator_whose_alignment_met_a_passing_failure_aligns_at_its_next_call(
        tmp_path: Path) -> None:
    """A Ray coordinator made anew aligns the c938206 shards' revisions; the shard to be put
    (shard 0, restored from a snapshot without a revision) could not be reached (its host
    restarting, for two asks). The failure was logged and left: the shards stayed apart, and
    the session's description (the listing) and every step were a 503 ``shards_out_of_step``
    until the coordinator's host restarted (out of service for good after twice
    ``commit_timeout_s``). Now the alignment is due until it is done, tried again by every
    call: a call while the host still cannot be reached answers its 503 (retryable), nothing
    put, and the first after it passed aligns every shard, then reads and steps as torch
    does."""
    inputs, data = copied_case("c938206-sharded-push", tmp_path)
    layout = ShardLayout.from_json(
        json.loads((data / "directory" / "default~sh").read_text())["layout"])
    keys = [shard_key("default~sh", i, 2) for i in range(2)]
    local, opt = sgd_after_its_step(inputs)
    acknowledged = {n: p.detach().clone() for n, p in local.items()}
    pushed = {n: f32(v) for n, v in inputs["push"].items()}
    nxt = {"u": f32([0.5, -1.0, 2.0]), "v": f32([-3.0, 0.25])}
    for n, p in local.items():
        p.grad = nxt[n] + pushed[n] if n in pushed else nxt[n].clone()
    opt.step()

    async def run() -> None:
        host = EmbeddedHost(HostConfig("cpu", data_dir=data, durability="step", warm_up=False))
        await host.start()
        try:
            flaky = _PutFailsTwice(host)
            shards: list[tuple[Host, str]] = [(flaky, keys[0]), (InProcessHost(host), keys[1])]
            session = ShardedSession("default~sh", layout, shards)
            await session.settle()  # (logged, not raised: the coordinator is made anyway)
            assert flaky.failed == 1
            assert [await h.revision_tip(k) for h, k in shards] == [(1, 0, True),
                                                                    (1, 1, False)]
            with pytest.raises(Unavailable) as still:  # (tried again: the failure's 503)
                await session.pull("default~sh", None)
            assert still.value.code == "host_restarting" and still.value.retry_after == 1.0
            assert flaky.failed == 2
            info = await session.describe("default~sh")
            assert (info.version, info.step) == (1, 1)
            assert [(await h.revision_tip(k))[:2] for h, k in shards] == [(1, 1), (1, 1)]
            params = await session.pull("default~sh", None)
            assert_trees_equal(dict(params.params), acknowledged, "read after the failure")
            out = await session.step("default~sh", nxt, want_params=True)
            assert out.version == 2 and out.params is not None
            assert_trees_equal(dict(out.params), dict(local), "stepped after the failure")
        finally:
            await host.stop()
    asyncio.run(run())
