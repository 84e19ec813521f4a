"""The Ray engine's data directory removed while the server runs (``rm -rf``): its hosts write
their sessions' files again from memory, and with them what a restart needs to find those
sessions (``app.engine.kept_entries``): each host's ``host.json``, the sessions' directory
entries, their keyed creates' indexes and the marks of past deletes. Also a new host's
``host.json`` on a full disk, and a damaged one. Fronts and host actors run their real code
in this process (``test_ray_deletes``' ``Cluster``); a restart stops every host without a
snapshot (a ``kill -9``) and makes a new front."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from app.engine.front import Front
from app.engine.interface import IdemKey
from app.errors import Conflict, NotFound
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import create_key, refused, spec

pytest.importorskip("app.engine.ray_host")
ray = pytest.importorskip("ray")

from tests.unit.test_ray_deletes import Cluster, entries  # noqa: E402

GRADS = [{"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])},
         {"a": torch.tensor([-2.0, 0.25]), "b": torch.tensor([0.5, 0.0, -1.5])}]


def stepped(steps: int) -> dict[str, torch.Tensor]:
    """torch's parameters after the first ``steps`` of GRADS."""
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
    for g in GRADS[:steps]:
        ref.step(g)
    return ref.params


def in_turn(cluster: Cluster, *phases: Callable[[Front], Awaitable[None]],
            front: Callable[[], Front] | None = None) -> None:
    """Each phase on a new front over the cluster (``front``: how to make one), in an event
    loop of its own; after it, pass or fail, every host stops without a snapshot (a ``kill
    -9``: the next phase's front starts them again from their files)."""
    for phase in phases:
        async def run(phase: Callable[[Front], Awaitable[None]] = phase) -> None:
            try:
                await phase((front or cluster.front)())
            finally:
                await cluster.kill()
        asyncio.run(run())


async def assert_params(front: Front, sid: str, steps: int) -> None:
    assert_tensors_equal(dict((await front.pull(sid, None)).params), stepped(steps),
                         f"{sid} after {steps} steps")


@pytest.mark.parametrize("shards", [1, 2])
def test_a_ray_data_directory_removed_while_serving_keeps_every_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """Two keyed creates (one with an id the server chose), a step each, the data directory
    removed, another step each (which writes the session's files again before it is
    acknowledged), then a restart: both sessions are found again with torch's parameters after
    both steps, a retried create is answered with its session (not a second one), and a keyed
    delete after it is kept as before (its retry answered, the create's retry refused)."""
    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    keys = {"named": create_key("k-named"), "chosen": create_key("k-chosen")}
    made: dict[str, str] = {}

    async def before(front: Front) -> None:
        made["named"] = (await front.create(spec(shards, id="named"), idem=keys["named"])).id
        made["chosen"] = (await front.create(spec(shards), idem=keys["chosen"])).id
        for sid in made.values():
            await front.step(sid, GRADS[0], return_params=False)
        hosts = sorted(p.name for p in (data / "hosts").iterdir())
        shutil.rmtree(data)
        for sid in made.values():
            await front.step(sid, GRADS[1], return_params=False)
        # (written again before the steps were answered, not by a restart)
        assert sorted(entries(front)) == sorted(f"default~{sid}" for sid in made.values())
        assert sorted(p.name for p in (data / "hosts").iterdir()
                      if (p / "host.json").exists()) == hosts
        assert len(list((data / "directory" / ".creates").iterdir())) == 2

    async def after(front: Front) -> None:
        for name, sid in made.items():
            await assert_params(front, sid, 2)
            again = await front.create(spec(shards, id=None if name == "chosen" else name),
                                       idem=keys[name])
            assert again.replayed and again.id == sid and again.version == 2
        assert sorted(i.id for i in await front.list_sessions()) == sorted(made.values())
        dkey = IdemKey("d-chosen", "delete chosen")
        assert await front.delete(made["chosen"], idem=dkey) is False
        assert await front.delete(made["chosen"], idem=dkey) is True
        with pytest.raises(Conflict) as err:
            await front.create(spec(shards), idem=keys["chosen"])
        refused(err.value, "k-chosen", made["chosen"])
        with pytest.raises(NotFound):
            await front.describe(made["chosen"])
        await assert_params(front, made["named"], 2)
    in_turn(cluster, before, after)


def test_the_entries_and_the_marks_of_deletes_are_written_again_by_the_maintenance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no operation after the removal, each host's maintenance writes its sessions again
    (and their entries) within its period, and the marks of a session deleted before the
    removal (its keyed create's and its keyed delete's) and its last version: after a restart
    the sessions are found, the deleted one's create retried is refused (not made again), its
    delete retried is answered, and its id made again continues its versions."""
    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    # (the maintenance's period: a quarter of the snapshot interval, at least 0.5 s)
    monkeypatch.setenv("OPTSERVE_SNAPSHOT_EVERY_S", "2")
    dkey = IdemKey("d-gone", "delete gone")

    def marks() -> list[str]:
        return sorted(f"{folder}/{len(list((data / 'directory' / folder).iterdir()))}"
                      for folder in (".deletes", ".deleted-creates")
                      if (data / "directory" / folder).is_dir())

    async def before(front: Front) -> None:
        for sid, shards in (("plain", 1), ("sharded", 2), ("gone", 2)):
            await front.create(spec(shards, id=sid), idem=create_key(f"k-{sid}"))
            await front.step(sid, GRADS[0], return_params=False)
        assert await front.delete("gone", idem=dkey) is False
        assert marks() == [".deleted-creates/1", ".deletes/1"]
        last = data / "directory" / ".versions" / "default~gone"
        assert last.exists()
        shutil.rmtree(data)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if len(entries(front)) == 2 and len(marks()) == 2 and "/0" not in str(marks()) \
                    and last.exists():
                break
        assert sorted(entries(front)) == ["default~plain", "default~sharded"]
        assert marks() == [".deleted-creates/1", ".deletes/1"]
        assert last.exists()  # (the deleted session's last version, 1)

    async def after(front: Front) -> None:
        for sid in ("plain", "sharded"):
            await assert_params(front, sid, 1)
        assert await front.delete("gone", idem=dkey) is True
        for shards in (1, 2):
            with pytest.raises(Conflict) as err:
                await front.create(spec(shards, id="gone"), idem=create_key("k-gone"))
            refused(err.value, "k-gone", "gone")
        assert sorted(i.id for i in await front.list_sessions()) == ["plain", "sharded"]
        assert (await front.create(spec(1, id="gone"))).version == 2  # (deleted at 1)
    in_turn(cluster, before, after)


def test_a_new_hosts_folder_that_cannot_be_written_makes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that needs a new host on a full disk: 507 ``storage_full``, no host started
    and no folder of it left (a ``host.json`` cut short was taken for a host whose restart
    failed); once there is room, the create makes the session."""
    import errno

    from app.engine import ray_host
    from app.errors import StorageFull

    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    real = ray_host.write_atomic

    def full(path: Path, parts: list[bytes], files: object = None) -> None:
        path.write_bytes(bytes(parts[0])[:3])  # (what a write cut by ENOSPC may leave)
        raise OSError(errno.ENOSPC, "No space left on device")

    async def run(front: Front) -> None:
        monkeypatch.setattr(ray_host, "write_atomic", full)
        with pytest.raises(StorageFull) as err:
            await front.create(spec(id="full"))
        assert err.value.code == "storage_full" and "No space left" in str(err.value)
        assert list((data / "hosts").iterdir()) == [] and cluster.actors == {}
        assert entries(front) == []
        monkeypatch.setattr(ray_host, "write_atomic", real)
        await front.create(spec(id="full"))
        await front.step("full", GRADS[0], return_params=False)
        await assert_params(front, "full", 1)
    in_turn(cluster, run)


def test_a_front_serves_on_when_the_data_directory_is_removed_with_no_session_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The removal when no session is left to write again: the front lists nothing, makes a
    new session (its first write makes the directory's folders again) and is ready; the host
    that held the
    deleted one writes its ``host.json`` again with its maintenance; after a restart the new
    session is there."""
    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    monkeypatch.setenv("OPTSERVE_SNAPSHOT_EVERY_S", "2")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # (the readiness's first check)

    async def before(front: Front) -> None:
        await front.create(spec(id="old"))
        host = next((data / "hosts").iterdir()).name
        await front.delete("old")
        shutil.rmtree(data)
        assert await front.list_sessions() == []
        await front.create(spec(id="new"))  # (before any probe: its writes make the folders)
        await front.step("new", GRADS[0], return_params=False)
        status = await front.router.status()
        assert status.ready, status.reason
        for _ in range(100):
            if (data / "hosts" / host / "host.json").exists():
                break
            await asyncio.sleep(0.1)
        assert (data / "hosts" / host / "host.json").exists()

    async def after(front: Front) -> None:
        assert [i.id for i in await front.list_sessions()] == ["new"]
        await assert_params(front, "new", 1)
    in_turn(cluster, before, after)


def test_a_damaged_host_json_is_a_503_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``host.json`` an older version's write cut short: the sessions of that host are a
    503 ``storage_error`` naming the file (not a 500); written again, they are served."""
    from app.errors import Unavailable

    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)

    async def before(front: Front) -> None:
        await front.create(spec(id="s"))
        await front.step("s", GRADS[0], return_params=False)

    async def after(front: Front) -> None:  # (a front reads host.json at its first route)
        (saved,) = (data / "hosts").glob("*/host.json")
        whole = saved.read_bytes()
        saved.write_bytes(whole[:5])
        with pytest.raises(Unavailable) as err:
            await front.pull("s", None)
        assert err.value.code == "storage_error" and "host.json" in str(err.value)
        saved.write_bytes(whole)
        await assert_params(front, "s", 1)
    in_turn(cluster, before, after)


def test_a_create_undone_by_a_shards_refusal_is_not_marked_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed sharded create one of whose shards is refused (4xx): the shard made is deleted
    again and the create's index dropped, so its retry makes the session. A removal of the
    data directory after it does not bring that create back as a deleted session's (the host
    that deleted the shard keeps no mark of it): the retry still makes the session."""
    from app.engine import ray_host
    from app.errors import Invalid

    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    monkeypatch.setenv("OPTSERVE_SNAPSHOT_EVERY_S", "2")
    real = ray_host.HostActor.create

    async def refusing(actor: ray_host.HostActor, key: str, *args: object) -> object:
        if key.endswith("shard1of2"):
            raise Invalid("refused here", field="params")
        return await real(actor, key, *args)  # type: ignore[arg-type]

    async def run(front: Front) -> None:
        with monkeypatch.context() as m:
            m.setattr(ray_host.HostActor, "create", refusing)
            with pytest.raises(Invalid):
                await front.create(spec(2, id="undone"), idem=create_key("k-undone"))
        await front.create(spec(id="live"))
        hosts = sorted(p.name for p in (data / "hosts").iterdir())
        shutil.rmtree(data)
        for _ in range(100):
            if all((data / "hosts" / h / "host.json").exists() for h in hosts):
                break
            await asyncio.sleep(0.1)
        assert all((data / "hosts" / h / "host.json").exists() for h in hosts)
        marks = data / "directory" / ".deleted-creates"
        assert not marks.exists() or list(marks.iterdir()) == []
        made = await front.create(spec(2, id="undone"), idem=create_key("k-undone"))
        assert made.id == "undone" and not made.replayed
        await front.step("undone", GRADS[0], return_params=False)
        await assert_params(front, "undone", 1)
    in_turn(cluster, run)


def test_a_keyed_delete_right_after_the_removal_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed delete of a keyed create's session right after the removal, before any host
    wrote anything again (no maintenance runs in this test): answered, and so is its retry
    (the front's mark of it makes the directory's folders again); the host marks the create's
    key itself (its front found no index to mark), so after a restart the create's retry is
    refused, not made again."""
    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)
    dkey = IdemKey("d-x", "delete x")

    async def before(front: Front) -> None:
        made = await front.create(spec(2), idem=create_key("k-x"))
        await front.step(made.id, GRADS[0], return_params=False)
        shutil.rmtree(data)
        assert await front.delete(made.id, idem=dkey) is False
        assert await front.delete(made.id, idem=dkey) is True

    async def after(front: Front) -> None:
        for shards in (1, 2):
            with pytest.raises(Conflict) as err:
                await front.create(spec(shards), idem=create_key("k-x"))
            assert err.value.code == "session_deleted"
        assert await front.list_sessions() == []
    in_turn(cluster, before, after)


def test_new_sessions_go_to_the_hosts_already_running_after_the_removal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `pack` placement and no cap per host, a session made right after the removal goes
    to the host already running (its host.json gone with the directory, known to the front),
    not to a new one (which a full cluster has no room for: a 503 after the host start's
    timeout), and the host writes its host.json again first: a restart (a ``kill -9`` before
    any maintenance) finds that session. (The first one, idle since the removal, is written
    again by the maintenance, which does not run here: a crash before it loses it.)"""
    from app.config import Settings
    from app.engine import ray_host

    data = tmp_path / "data"
    cluster = Cluster(data, monkeypatch)

    def front() -> Front:
        settings = Settings(engine="ray", data_dir=data, device="cpu", warm_up=False,
                            ray_placement="pack", ray_sessions_per_host=0)
        router = ray_host.RayRouter(ray_host.ray_options(settings))
        router._actor = cluster
        return Front(router)

    async def before(f: Front) -> None:
        first = await f.create(spec(id="first"))
        shutil.rmtree(data)
        second = await f.create(spec(id="second"))
        assert first.placement is not None and second.placement is not None
        assert second.placement["host"] == first.placement["host"]
        assert len(cluster.actors) == 1
        await f.step("second", GRADS[0], return_params=False)

    async def after(f: Front) -> None:
        assert "second" in [i.id for i in await f.list_sessions()]
        await assert_params(f, "second", 1)
    in_turn(cluster, before, after, front=front)
