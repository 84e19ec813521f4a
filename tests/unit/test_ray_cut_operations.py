"""A sharded operation that a crash cut between its shards' commits on the Ray engine (the
whole cluster stopped, a ``kill -9`` of every host, once some shards' hosts committed it and
before the others did), without a cluster: the real :class:`RayRouter` and
:class:`HostActor` code in this process (:class:`tests.unit.test_ray_deletes.Cluster`).

The operation was never acknowledged (its answer waits for every shard). The session's next
coordinator (in its first shard's host, started again) undoes it where the embedded engine's
start does (its record still the last of each log that took it, under a key the other shards
never saw): the session is whole as before it, steps as torch, and the operation's keyed
retry applies it once. Before, the session answered 503 ``shards_out_of_step`` until a keyed
retry completed it, and was out of service for good without one (an unkeyed operation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front
from app.engine.interface import IdemKey
from app.engine.router import InProcessHost
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import Crash, spec
from tests.unit.test_ray_deletes import Cluster

pytest.importorskip("app.engine.ray_host")

GRADS = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
LATER = {"a": torch.tensor([-0.25, 2.0]), "b": torch.tensor([0.5, 0.5, -4.0])}
@contextlib.contextmanager
def commits_lost_on(monkeypatch: pytest.MonkeyPatch, behind: int) -> Iterator[None]:
    """Within it, shard ``behind``'s host dies before it commits (the other shards' hosts
    commit): an operation then reaches the other shard only."""
    real = InProcessHost.commit

    async def lands_on_one(host: Any, key: str, *args: Any, **kw: Any) -> Any:
        if key.endswith(f"shard{behind}of2"):
            raise Crash(key)
        return await real(host, key, *args, **kw)
    with monkeypatch.context() as m:
        m.setattr(InProcessHost, "commit", lands_on_one)
        yield



async def made_and_stepped(cluster: Cluster, ref: Reference,
                           options: dict[str, Any] | None = None) -> Front:
    """A front on ``cluster`` holding the 2-shard SGD session ``cut`` (``options``, else
    lr 0.1), stepped once with ``GRADS``, as ``ref`` is."""
    front = cluster.front()
    s = spec(2, id="cut")
    if options is not None:
        s.options = options
    await front.create(s)
    await front.step("cut", GRADS, return_params=False)
    ref.step(GRADS)
    return front


async def steps_as_torch(front: Front, ref: Reference, grads: dict[str, torch.Tensor],
                         what: str) -> None:
    """``cut`` stepped with ``grads`` through ``front``: its parameters are ``ref``'s after
    the same step."""
    await front.step("cut", grads, return_params=False)
    ref.step(grads)
    assert_tensors_equal(dict((await front.pull("cut", None)).params), ref.params, what)

CUT = [(behind, keyed, died) for behind in (0, 1) for keyed in (False, True)
       for died in ("cluster", "coordinator")]


@pytest.mark.parametrize(("behind", "keyed", "died"), CUT,
                         ids=[f"shard{b}-behind-{'keyed' if k else 'unkeyed'}-{d}"
                              for b, k, d in CUT])
def test_a_ray_step_that_reached_some_shards_only_is_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: int, keyed: bool,
        died: str) -> None:
    """A 2-shard SGD session with momentum, stepped once; a second step (keyed or not) is
    committed by one shard's host only (the other's commit never lands: the whole cluster
    stops, every host without a snapshot, or only the coordinator's host, the first
    shard's, the other serving on). After the restart the session answers at once, at
    version 1, as torch after the first step; a step then runs as torch's second step; the
    cut step's keyed retry is applied once (torch's second step, then the other); another
    restart keeps it all."""
    cluster = Cluster(tmp_path, monkeypatch)
    idem = IdemKey("step-cut", "step cut") if keyed else None
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})],
                    {"lr": 0.1, "momentum": 0.9})

    async def run() -> None:
        try:
            front = await made_and_stepped(cluster, ref, {"lr": 0.1, "momentum": 0.9})
            with commits_lost_on(monkeypatch, behind), \
                    pytest.raises(Exception):  # noqa: B017, PT011 - the crash
                await front.step("cut", GRADS if keyed else LATER, return_params=False,
                                 idem=idem)
            if died == "cluster":
                await cluster.kill()
            else:  # (the first shard's host: the coordinator's)
                first = front.router.directory.get("default~cut")["shards"][0]  # type: ignore
                await cluster.actors.pop(first).actor._host.stop(snapshot=False)

            again = cluster.front()
            info = await again.describe("cut")
            assert info.version == 1, info
            assert_tensors_equal(dict((await again.pull("cut", None)).params), ref.params,
                                 "the cut step undone")
            if keyed:
                await again.step("cut", GRADS, return_params=False, idem=idem)
                ref.step(GRADS)
                replayed = await again.step("cut", GRADS, return_params=False, idem=idem)
                assert replayed.version == 2
            await steps_as_torch(again, ref, LATER, "a step after")
            await cluster.kill()
            third = cluster.front()
            assert (await third.describe("cut")).version == (3 if keyed else 2)
            assert_tensors_equal(dict((await third.pull("cut", None)).params), ref.params,
                                 "after another restart")
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("behind", [0, 1])
def test_a_ray_option_change_that_reached_some_shards_only_is_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: int) -> None:
    """An unkeyed ``PATCH .../param_groups/0`` (lr 0.1 to 0.5: the revision moves, the
    version does not) committed by one shard's host only, the whole cluster stopped. After
    the restart the session answers at its lr before the change, and steps as torch at it."""
    cluster = Cluster(tmp_path, monkeypatch)
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})

    async def run() -> None:
        try:
            front = await made_and_stepped(cluster, ref)
            revision = (await front.describe("cut")).revision
            with commits_lost_on(monkeypatch, behind), \
                    pytest.raises(Exception):  # noqa: B017, PT011 - the crash
                await front.update_param_group("cut", 0, {"lr": 0.5})
            await cluster.kill()

            again = cluster.front()
            info = await again.describe("cut")
            assert (info.version, info.revision, info.lr) == (1, revision, [0.1]), info
            await steps_as_torch(again, ref, LATER, "a step at the lr before the change")
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("behind", [0, 1])
def test_a_ray_push_that_reached_some_shards_only_is_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: int) -> None:
    """An unkeyed push into the accumulator (``POST .../grads``: neither the version nor the
    revision moves) committed by one shard's host only, the whole cluster stopped. After the
    restart the accumulator is empty, as before the push, and a step takes only its own
    gradients (torch's values): the shards no longer look whole with one shard's part of
    the push kept."""
    cluster = Cluster(tmp_path, monkeypatch)
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})

    async def run() -> None:
        try:
            front = await made_and_stepped(cluster, ref)
            with commits_lost_on(monkeypatch, behind), \
                    pytest.raises(Exception):  # noqa: B017, PT011 - the crash
                await front.push("cut", LATER)
            await cluster.kill()

            again = cluster.front()
            info = await again.describe("cut")
            assert (info.version, info.accumulated) == (1, []), info
            await steps_as_torch(again, ref, GRADS, "a step without the cut push")
        finally:
            await cluster.kill()
    asyncio.run(run())
