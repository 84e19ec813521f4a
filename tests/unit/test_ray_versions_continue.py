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
import os
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


@pytest.mark.parametrize("on_disk", [True, False])
def test_the_directory_keeps_the_highest_last_version_of_the_last_ids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: bool) -> None:
    """``Directory.note_version``: a shard's version is kept under its sharded session's key;
    a lower version does not lower the one kept (the shards of a session, all at one version,
    write theirs at once); the oldest past KEEP go (by the time they were written); a damaged
    file is taken for none (the id starts at 0), with a warning."""
    from app.engine import directory as directory_module
    from app.engine import last_versions
    monkeypatch.setattr(directory_module, "KEEP", 2)
    monkeypatch.setattr(directory_module, "_PRUNE_EVERY", 1000)  # (pruned below)
    monkeypatch.setattr(last_versions, "KEEP", 2)
    d = Directory(tmp_path / "directory" if on_disk else None)
    if not on_disk:
        d._versions = last_versions.LastVersions(2)
    d.note_version("t#s~shard1of2", 4)
    d.note_version("t~s", 3)
    assert d.last_version("t~s") == 4 == d.last_version("t#s~shard0of3")
    d.note_version("t~s", 6)
    assert d.last_version("t~s") == 6
    d.note_version("t~a", 1)
    d.note_version("t~b", 2)  # (a third id: the oldest, t~s, goes)
    if on_disk:  # (pruned by the times they were written: set apart here, then pruned)
        for age, key in enumerate(("t~b", "t~a", "t~s")):
            os.utime(tmp_path / "directory" / ".versions" / key, (1e9 - age, 1e9 - age))
        d.prune_deleted()
    assert [d.last_version(k) for k in ("t~s", "t~a", "t~b")] == [None, 1, 2]
    if on_disk:
        (tmp_path / "directory" / ".versions" / "t~a").write_bytes(b"{")
        assert d.last_version("t~a") is None
