"""The Ray engine's sessions made again under a deleted one's id continue its versions
(``app.engine.last_versions``), without a cluster: fronts over host actors that run their real
code in this process (``test_ray_deletes.Cluster``: one session per host, so a session made
again lands on another host than the one that deleted it).

Each host writes the version a session is deleted at into the directory (``.versions/``) before
its delete's commit point, and a front passes every create (each shard's) the version after it.
Before, the Ray engine's hosts counted from 0 at every create: a session deleted at v1 and made
again was at v0, and a step brought it to v1 again with other values."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from app.engine.directory import Directory
from app.engine.interface import CreateSpec, GroupSpec
from app.errors import Unavailable
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_ray_deletes import GRADS, Cluster

pytest.importorskip("ray")

PARAMS = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5, 0.25, 3.0])}


def sgd(shards: int, scale: float = 1.0) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({n: v * scale for n, v in PARAMS.items()})],
                      {"lr": 0.1}, shards=shards, id="again")


def test_made_again_through_other_fronts_on_other_hosts_plain_and_sharded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain, stepped twice, deleted (v2) through front A; the cluster killed (every host
    stopped without a snapshot, started again from its files); made again as 2 shards through
    front B on new hosts: every shard at v3, a step v4 with torch's values; deleted; made again
    plain through front C: v5. The directory holds the id's last version (4)."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        a = cluster.front()
        await a.create(sgd(1))
        for _ in range(2):
            await a.step("again", GRADS, return_params=False)
        await a.delete("again")
        await cluster.kill()

        b = cluster.front()
        info = await b.create(sgd(2, 3.0))
        assert (info.version, info.step) == (3, 0)
        # (every shard at it: the coordinator's lockstep check passes, torch's values)
        assert (await b.step("again", GRADS, return_params=False)).version == 4
        ref = Reference(torch.optim.SGD, [({n: v * 3.0 for n, v in PARAMS.items()}, {})],
                        {"lr": 0.1})
        ref.step(GRADS)
        pulled = await b.pull("again", None)
        assert pulled.version == 4
        assert_tensors_equal(dict(pulled.params), ref.params, "made again as 2 shards")
        await b.delete("again")

        c = cluster.front()
        assert (await c.create(sgd(1))).version == 5
        directory: Directory = c.router.directory  # type: ignore[attr-defined]
        assert directory.last_version("default~again") == 4
        await c.delete("again")
        assert directory.last_version("default~again") == 5
        await cluster.kill()
    asyncio.run(run())


def test_a_delete_whose_version_cannot_be_written_deletes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory's last version is written before the host's delete commits: where it
    cannot be written (a disk error), the delete is a 503 ``storage_error`` and the session is
    whole (its values, its version); deleted once the disk is back, it is made again after
    it."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        front = cluster.front()
        await front.create(sgd(1))
        await front.step("again", GRADS, return_params=False)

        def fails(directory: Directory, key: str, version: int) -> None:
            raise OSError(5, "Input/output error")
        with monkeypatch.context() as m:
            m.setattr(Directory, "note_version", fails)
            with pytest.raises(Unavailable) as err:
                await front.delete("again")
        assert err.value.code == "storage_error"
        ref = Reference(torch.optim.SGD, [(PARAMS, {})], {"lr": 0.1})
        ref.step(GRADS)
        pulled = await front.pull("again", None)
        assert pulled.version == 1
        assert_tensors_equal(dict(pulled.params), ref.params, "after the refused delete")
        await front.delete("again")
        assert (await cluster.front().create(sgd(1))).version == 2
        await cluster.kill()
    asyncio.run(run())
