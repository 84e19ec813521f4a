"""The Ray engine's deletes and keyed creates, without a cluster: fronts (:class:`RayRouter`
behind :class:`Front`) over host actors that run their real code (:class:`HostActor` around an
embedded host, its store in a temporary folder) in this process, found by name as Ray finds
them. A front is started again by making a new one over the same data directory; the cluster,
by stopping every host without a snapshot (a ``kill -9``) so the next front starts them again
from their files.

A delete cut anywhere (refused by a host, a crash between its steps) leaves the session whole,
which a retried keyed create is answered with, or the create's key marked: a 409
``session_deleted``, never a second session. A keyed delete retried through a front that did not
answer it (another one, or the same one started again) is answered (204), also when a session
with the same id was made since on another host (it is left alone)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.config import Settings
from app.engine import directory
from app.engine.directory import Directory
from app.engine.front import Front
from app.engine.interface import CreateSpec, GroupSpec, IdemKey
from app.engine.ops import Expected
from app.engine.store import Store
from app.errors import Conflict, Invalid, NotFound
from tests.stored_files import stored_files
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import Crash, create_key, refused, spec

ray_host = pytest.importorskip("app.engine.ray_host")
ray = pytest.importorskip("ray")

GRADS = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        return self.fn(*args)


class Handle:
    """A host actor's handle: ``handle.<method>.remote(*args)`` runs the actor's method."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, method: str) -> _Method:
        return _Method(getattr(self.actor, method))


class Cluster:
    """Named host actors in this process; they outlive the fronts, as Ray's detached ones do."""

    def __init__(self, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_dir = data_dir
        self.actors: dict[str, Handle] = {}
        #: the host actors ``ray.kill`` ended (a front gives up a host it started: a
        #: placement that failed after the host's start), in order
        self.killed: list[str] = []
        monkeypatch.setattr(ray, "get_actor", self.get_actor)
        monkeypatch.setattr(ray, "kill", self.kill_actor)
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 64.0})
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
        monkeypatch.setattr(ray, "get_runtime_context",
                            lambda: SimpleNamespace(get_node_id=lambda: "node"))

    def get_actor(self, name: str, namespace: str | None = None) -> Handle:
        try:
            return self.actors[name]
        except KeyError:
            raise ValueError(f"no actor {name}") from None

    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        """``ray.kill``: the actor ends (its handle is gone from the cluster; a front's next
        ``get_actor`` of its name finds none); never the real one, which would refuse these
        handles (Ray is not started here) or, in a process where it is, kill by a handle it
        does not know."""
        name = next((n for n, h in self.actors.items() if h is handle), None)
        if name is None:
            raise ValueError(f"ray.kill of a handle of no actor here: {handle!r}")
        del self.actors[name]
        self.killed.append(name)

    def options(self, **opts: Any) -> Any:  # (the actor class a router spawns hosts with)
        def remote(name: str, config: dict[str, Any]) -> Handle:
            return self.actors.setdefault(name, Handle(ray_host.HostActor(name, config)))
        return SimpleNamespace(remote=remote)

    def front(self) -> Front:
        """A new front over the deployment (one host per session, so a session made again
        lands on another host than the one that deleted it)."""
        settings = Settings(engine="ray", data_dir=self.data_dir, device="cpu", warm_up=False,
                            ray_placement="pack", ray_sessions_per_host=1)
        router = ray_host.RayRouter(ray_host.ray_options(settings))
        router._actor = self
        return Front(router)

    async def kill(self) -> None:
        """Every host stops without a snapshot and is started again from its files when a
        front next needs it."""
        for handle in self.actors.values():
            if handle.actor._host is not None:
                await handle.actor._host.stop(snapshot=False)
        self.actors.clear()


def entries_of(front: Front, sid: str) -> dict[str, Any]:
    directory: Directory = front.router.directory  # type: ignore[attr-defined]
    entry = directory.get(f"default~{sid}")
    assert entry is not None
    return entry


def entries(front: Front) -> list[str]:
    directory: Directory = front.router.directory  # type: ignore[attr-defined]
    return directory.keys()


CUTS = [(1, "before-the-hosts"), (1, "after-the-hosts"), (1, "after-the-entry"),
        (2, "before-the-hosts"), (2, "between-the-shards"), (2, "after-the-hosts"),
        (2, "after-the-entry")]


async def delete_and_die(front: Any, sid: str, idem: IdemKey,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed delete of ``sid`` whose front dies once the hosts have run it (``Crash``
    instead of its answer)."""
    real = ray_host._Placed.delete

    async def dies_after(placed: Any, key: str, *, idem: IdemKey | None = None,
                         expected: Expected | None = None) -> bool:
        await real(placed, key, idem=idem, expected=expected)
        raise Crash(key)
    with monkeypatch.context() as m:
        m.setattr(ray_host._Placed, "delete", dies_after)
        with pytest.raises(Crash):
            await front.delete(sid, idem=idem)


@pytest.mark.parametrize(("shards", "at"), CUTS, ids=[f"{s}-{a}" for s, a in CUTS])
def test_a_ray_delete_cut_anywhere_leaves_the_session_or_its_key_marked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, at: str) -> None:
    """A keyed create (plain or sharded), a step, then a keyed delete cut: refused by the
    hosts (their disks fail before any files go), between the two shards, once the hosts
    deleted it (before its directory entry goes), or once its entry went. Then the front and
    the cluster start again, and other sessions take the freed hosts. The session is whole
    (the retried create is answered with it, torch's parameters after the step, and a retried
    delete deletes it), or the create's key is marked: its retry is a 409
    ``session_deleted``, never a second session. The retried delete is answered once the
    hosts deleted the session, and no entry is left behind."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey, dkey = create_key("k-cut"), IdemKey("d-cut", "delete cut")

    async def cut() -> None:
        front = cluster.front()
        s = spec(shards)
        s.id = "cut"
        await front.create(s, idem=ckey)
        await front.step("cut", GRADS, return_params=False)
        deleted, calls, lock = 0, 0, threading.Lock()
        real_delete, real_remove = Store.delete, Directory.remove

        def store_delete(store: Store, key: str, *args: Any, **kw: Any) -> None:
            nonlocal deleted, calls
            with lock:  # (the shards' hosts delete at once: the first call is let through)
                calls += 1
                first = calls == 1
            if at == "before-the-hosts" or (at == "between-the-shards" and not first):
                raise Crash(key)
            real_delete(store, key, *args, **kw)
            deleted += 1

        def remove(d: Directory, key: str) -> None:
            if at == "after-the-entry":
                real_remove(d, key)
            raise Crash(key)
        with monkeypatch.context() as m:
            m.setattr(Store, "delete", store_delete)
            m.setattr(Directory, "remove", remove)
            with pytest.raises(Exception) as err:  # noqa: PT011 - a crash, or the hosts' refusal
                await front.delete("cut", idem=dkey)
        assert "cut" in str(err.value) or isinstance(err.value, Crash), err.value
        assert deleted == {"before-the-hosts": 0, "between-the-shards": 1}.get(at, shards)
        await cluster.kill()

    async def after_the_crash() -> None:
        front = cluster.front()
        try:
            # sessions take the hosts that deleted it, if they did (a create run again would
            # go to a new host, which knows nothing of the key)
            fillers = [f"filler{i}" for i in range(shards)]
            for sid in fillers:
                filler = spec()
                filler.id = sid
                await front.create(filler)
            if at == "before-the-hosts":  # the session is whole: the retry is answered
                again = await front.create(spec(shards), idem=ckey)
                assert again.replayed and again.id == "cut" and again.version == 1
                ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
                ref.step(GRADS)
                assert_tensors_equal(dict((await front.pull("cut", None)).params),
                                     ref.params, "after the step")
            else:  # the hosts deleted some of it: the key is marked
                with pytest.raises(Conflict) as err:
                    await front.create(spec(shards), idem=ckey)
                refused(err.value, "k-cut", "cut")
            done = at in ("after-the-hosts", "after-the-entry")
            assert await front.delete("cut", idem=dkey) == done
            with pytest.raises(Conflict) as err:
                await front.create(spec(shards), idem=ckey)
            refused(err.value, "k-cut", "cut")
            assert sorted(i.id for i in await front.list_sessions()) == fillers
            assert entries(front) == [f"default~{sid}" for sid in fillers]
            with pytest.raises(NotFound):
                await front.describe("cut")
        finally:
            await cluster.kill()
    asyncio.run(cut())
    asyncio.run(after_the_crash())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_keyed_ray_delete_retried_through_another_front_is_answered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A keyed delete whose front dies once the hosts deleted the session (before the
    directory heard of it), retried through other fronts (the same front started again,
    another front on the directory): answered (True: 204 ``Idempotent-Replayed``) by the hosts
    while the session's entry is there, then from the directory once it is gone, not a 404;
    another request under the key is a 422. A session made with the same id since (on another
    host, which holds no tombstone of the key) is left alone by the retry, as the embedded
    engine leaves it."""
    cluster = Cluster(tmp_path, monkeypatch)
    dkey = IdemKey("d-gone", "delete gone")

    async def run() -> None:
        try:
            first = cluster.front()
            s = spec(shards)
            s.id = "gone"
            await first.create(s, idem=create_key("k-gone"))
            await first.step("gone", GRADS, return_params=False)
            await delete_and_die(first, "gone", dkey, monkeypatch)
            assert entries(first) == ["default~gone"]

            second = cluster.front()  # (a restart, or another front)
            assert await second.delete("gone", idem=dkey)  # (the hosts' tombstones)
            assert entries(second) == []
            third = cluster.front()
            assert await third.delete("gone", idem=dkey)  # (the directory's)
            with pytest.raises(Invalid) as bad:
                await third.delete("gone", idem=IdemKey("d-gone", "delete another"))
            assert bad.value.code == "idempotency_key_reused"
            with pytest.raises(NotFound):
                await third.delete("gone")

            # the freed hosts take other sessions; the id is made again on a new host
            for i in range(shards):
                filler = spec()
                filler.id = f"filler{i}"
                await third.create(filler)
            remade = spec(lr=0.5)
            remade.id = "gone"
            await third.create(remade)
            await cluster.kill()
            fourth = cluster.front()
            assert await fourth.delete("gone", idem=dkey)
            info = await fourth.describe("gone")
            # (left alone; made again after the version the old one was deleted at)
            assert info.version == 2 and info.lr == [0.5]
            assert sorted(i.id for i in await fourth.list_sessions()) == \
                sorted([f"filler{i}" for i in range(shards)] + ["gone"])
        finally:
            await cluster.kill()
    asyncio.run(run())


class AsTorch:
    """torch's SGD on a create's parameters, stepped beside a session: its parameters are
    compared bitwise after each step."""

    def __init__(self, s: Any) -> None:
        self.ref = Reference(torch.optim.SGD, [(dict(g.params), g.options) for g in s.groups],
                             s.options)
        self.grads = {n: torch.full_like(t, 0.25) + torch.arange(t.numel()).reshape(t.shape)
                      for g in s.groups for n, t in g.params.items()}
        self.steps = 0

    async def step(self, front: Front, sid: str) -> None:
        await front.step(sid, self.grads, return_params=False)
        self.ref.step(self.grads)
        self.steps += 1
        assert_tensors_equal(dict((await front.pull(sid, None)).params), self.ref.params,
                             f"step {self.steps}")


DIED = [(1, "before-the-hosts"), (1, "after-the-hosts"), (2, "before-the-hosts"),
        (2, "after-the-hosts")]


@pytest.mark.parametrize(("shards", "at"), DIED, ids=[f"{s}-{a}" for s, a in DIED])
def test_a_keyed_ray_create_whose_front_died_is_answered_or_made_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, at: str) -> None:
    """A keyed create without an id whose front dies before anything more is done (its
    directory entry is left; no clean-up runs): once the hosts made the session, or before
    they were asked. Retried through the next front, it is answered with the session the hosts
    made (201 ``Idempotent-Replayed``), not made a second time; one the hosts never made is
    made by the retry, once, under the first try's key: its entry, no second one left behind
    (hidden from the list, counted toward the session limit). Either way one session, which
    steps as torch, and a further retry is answered with it. (The key is kept in the directory
    before the hosts are asked.)"""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-died")

    async def run() -> None:
        try:
            first = cluster.front()
            real_host, real_sharded = ray_host.RayHost.create, ray_host.ShardedSession.create

            async def host_dies(host: Any, key: str, s: Any, **kw: Any) -> Any:
                if at == "after-the-hosts":
                    await real_host(host, key, s, **kw)
                raise Crash(key)

            async def shards_die(key: str, *args: Any, **kw: Any) -> Any:
                if at == "after-the-hosts":
                    await real_sharded(key, *args, **kw)
                raise Crash(key)

            def remove(d: Directory, key: str) -> None:
                raise Crash(key)  # (a kill runs no clean-up)
            with monkeypatch.context() as m:
                if shards == 1:
                    m.setattr(ray_host.RayHost, "create", host_dies)
                else:
                    m.setattr(ray_host.ShardedSession, "create", staticmethod(shards_die))
                m.setattr(Directory, "remove", remove)
                with pytest.raises(Crash):
                    await first.create(spec(shards), idem=ckey)
            made = entries(first)
            assert len(made) == 1
            await cluster.kill()

            second = cluster.front()
            again = await second.create(spec(shards), idem=ckey)
            # (made under the first try's key: its entry is the session's, no claim is left
            # behind, hidden from the list and counted toward OPTSERVE_MAX_SESSIONS)
            assert f"default~{again.id}" == made[0], (again, made)
            assert again.replayed == (at == "after-the-hosts"), again
            assert [i.id for i in await second.list_sessions()] == [again.id]
            assert entries(second) == made
            assert await second.router.count("default~") == 1
            torch_ = AsTorch(spec(shards))
            for _ in range(2):
                await torch_.step(second, again.id)
            await cluster.kill()
            third = cluster.front()
            replayed = await third.create(spec(shards), idem=ckey)
            assert replayed.replayed and replayed.id == again.id and replayed.version == 2
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_sharded_ray_session_made_again_gets_a_coordinator_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded session (momentum, stepped) is deleted through one front while another still
    has its directory entry, whose next call reaches the first shard's host with it (a 404: it
    made a coordinator of the deleted session there, kept by the session's id). A session made
    again with the same id, another layout, on the same hosts, gets a coordinator of its own
    (its entry's creation, the directory's): it steps bitwise as torch's SGD, through both
    fronts (the one with the old entry reads the directory again); nothing of the old one's
    coordinator (its layout, its version) is used."""
    cluster = Cluster(tmp_path, monkeypatch)
    # hosts named in the order they start (a session placed again takes the first one first)
    names = iter(range(1, 1_000))
    monkeypatch.setattr(ray_host, "uuid", SimpleNamespace(
        uuid4=lambda: uuid.UUID(int=next(names) << 96)))

    async def run() -> None:
        try:
            first, second = cluster.front(), cluster.front()
            old = spec(2)
            old.id, old.options = "again", {"lr": 0.1, "momentum": 0.9}
            await first.create(old)
            await first.step("again", GRADS, return_params=False)
            hosts = entries_of(first, "again")["shards"]
            assert not await second.delete("again")
            with pytest.raises(NotFound):
                await first.describe("again")  # (its entry was cached: a stale coordinator)

            new = CreateSpec("SGD", [GroupSpec({"c": torch.linspace(-1.0, 1.0, 4),
                                                "d": torch.arange(5.0)})],
                             {"lr": 0.5, "momentum": 0.9}, shards=2)
            new.id = "again"
            assert (await second.create(new)).version == 2  # (the old one's: 1)
            assert entries_of(second, "again")["shards"] == hosts  # (the same hosts)
            torch_ = AsTorch(new)
            for front in (second, first, second):
                await torch_.step(front, "again")
            assert (await first.describe("again")).version == 5
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_refused_ray_deletes_create_mark_outlives_the_marks_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A keyed create without an id whose delete the hosts refuse: its key is marked deleted
    (before the hosts were asked), the session lives on. More deleted creates than the
    directory keeps (2 here, 10,000 in service) are marked after it, pruning the oldest: the
    live session's mark is kept (among the 2), so its create's retry is still answered with
    it (not a second session), through the same front and after a restart."""
    monkeypatch.setattr(directory, "KEEP", 2)
    monkeypatch.setattr(directory, "_PRUNE_EVERY", 1)
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-live")

    async def run() -> None:
        try:
            front = cluster.front()
            live = await front.create(spec(shards), idem=ckey)

            def refuse(store: Store, key: str, *args: Any, **kw: Any) -> None:
                raise Crash(key)
            with monkeypatch.context() as m:
                m.setattr(Store, "delete", refuse)
                with pytest.raises(Exception) as err:  # noqa: PT011 - the hosts' refusal
                    await front.delete(live.id, idem=IdemKey("d-live", "delete live"))
            assert live.id in str(err.value) or isinstance(err.value, Crash), err.value
            mark = tmp_path / "directory" / ".deleted-creates" / \
                directory.create_name("default", "k-live")
            os.utime(mark, (1000.0, 1000.0))  # (the oldest mark)
            for i in range(3):
                other = await front.create(spec(shards), idem=create_key(f"k-{i}"))
                assert not await front.delete(other.id)
            torch_ = AsTorch(spec(shards))
            for again in (front, cluster.front()):
                if again is not front:
                    await cluster.kill()
                made = await again.create(spec(shards), idem=ckey)
                assert made.replayed and made.id == live.id, made
                assert [i.id for i in await again.list_sessions()] == [live.id]
                await torch_.step(again, live.id)
            # (2 kept: the live session's, the last other one's)
            assert len(os.listdir(tmp_path / "directory" / ".deleted-creates")) == 2
            with pytest.raises(Conflict) as gone:
                await front.create(spec(shards), idem=create_key("k-2"))
            refused(gone.value, "k-2", other.id)
        finally:
            await cluster.kill()
    asyncio.run(run())


def held_keys(cluster: Cluster) -> list[str]:
    """Every session key (shards too) the hosts' files hold, once per host holding it."""
    return sorted(p.name for p in (cluster.data_dir / "hosts").glob("*/sessions/*")
                  if (p / "wal.bin").exists() or (p / "snapshot.bin").exists())


@pytest.mark.parametrize("sid", ["half", None])
def test_a_sharded_ray_create_cut_part_way_is_finished_by_its_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sid: str | None) -> None:
    """A keyed create of a 2-shard session (with an id and without) whose front dies once
    shard 0's host made its shard, before shard 1's was asked (no clean-up runs). Its retry
    through the next front made a second session (without an id) or dropped the entry and
    made it again elsewhere (with one), leaving shard 0 on its host for good. The retry
    finishes the create on the entry's hosts (shard 1 made, shard 0 kept: answered as
    created, not replayed); the hosts hold that session's two shards and nothing else; it
    steps as torch; another request under the key is a 422, a further retry is answered."""
    from app.engine.shards import shard_spec
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-half")

    async def run() -> None:
        try:
            first = cluster.front()

            async def half(key: str, s: Any, layout: Any, shards: Any, **kw: Any) -> Any:
                host, skey = shards[0]
                await host.create(skey, shard_spec(s, layout, 0), idem=kw["idem"])
                raise Crash(key)  # (the front dies: shard 1's host is never asked)

            def remove(d: Directory, key: str) -> None:
                raise Crash(key)  # (a kill runs no clean-up)
            s = spec(2)
            s.id = sid
            with monkeypatch.context() as m:
                m.setattr(ray_host.ShardedSession, "create", staticmethod(half))
                m.setattr(Directory, "remove", remove)
                with pytest.raises(Crash):
                    await first.create(s, idem=ckey)
            [made] = entries(first)
            made_id = made.partition("~")[2]
            assert held_keys(cluster) == [f"default#{made_id}~shard0of2"]
            await cluster.kill()

            second = cluster.front()
            with pytest.raises(Invalid) as bad:
                await second.create(s, idem=IdemKey("k-half", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            again = await second.create(s, idem=ckey)
            assert again.id == made_id and not again.replayed and again.version == 0, again
            assert entries(second) == [made]
            assert held_keys(cluster) == [f"default#{made_id}~shard{i}of2" for i in range(2)]
            assert [i.id for i in await second.list_sessions()] == [made_id]
            torch_ = AsTorch(spec(2))
            for _ in range(2):
                await torch_.step(second, made_id)
            await cluster.kill()
            third = cluster.front()
            replayed = await third.create(s, idem=ckey)
            assert replayed.replayed and replayed.id == made_id and replayed.version == 2
            assert held_keys(cluster) == [f"default#{made_id}~shard{i}of2" for i in range(2)]
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_ray_session_refused_at_start_is_kept_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A keyed create (plain, sharded), stepped, snapshotted; its (last shard's) snapshot
    then fails its checksum, so its host refuses it at start (``/readyz`` names it). The
    create's retry is a 409 ``session_exists`` naming the key and the session (as on the
    embedded engine), another request under the key a 422; a delete (with a key and without)
    is a 404 deleting nothing (no shard, no entry, no mark: the files are left to an
    operator), reads are 404s naming the session, and a create with its id is a 409: every
    file is as it was, through another restart."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-refused")

    async def made() -> None:
        front = cluster.front()
        s = spec(shards)
        s.id = "r"
        await front.create(s, idem=ckey)
        await front.step("r", GRADS, return_params=False)
        for handle in cluster.actors.values():
            await handle.actor._host.stop(snapshot=True)
        cluster.actors.clear()

    asyncio.run(made())
    name = "default~r" if shards == 1 else "default#r~shard1of2"
    [snap] = (tmp_path / "hosts").glob(f"*/sessions/{name}/snapshot.bin")
    raw = bytearray(snap.read_bytes())
    raw[-5] ^= 0x10  # (in its tensors: the checksum fails)
    snap.write_bytes(raw)
    before = stored_files(tmp_path)

    async def restarted() -> None:
        front = cluster.front()
        try:
            assert set(await front.refused()) == {"r"}
            with pytest.raises(Conflict) as err:
                await front.create(spec(shards), idem=ckey)
            e = err.value
            assert (e.status, e.code, e.field) == (409, "session_exists", "Idempotency-Key"), e
            assert e.extra == {"idempotency_key": "k-refused", "session_id": "r"}, e.extra
            with pytest.raises(Invalid) as bad:
                await front.create(spec(shards), idem=IdemKey("k-refused", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            for idem in (None, IdemKey("d-refused", "delete r")):
                with pytest.raises(NotFound) as gone:
                    await front.delete("r", idem=idem)
                assert gone.value.code == "session_not_found"
                assert "'r'" in gone.value.detail and "refused at start" in gone.value.detail
            with pytest.raises(NotFound) as read:
                await front.describe("r")
            assert "'r'" in read.value.detail and "shard1of2" not in read.value.detail
            again = spec(shards)
            again.id = "r"
            with pytest.raises(Conflict) as taken:
                await front.create(again)
            assert taken.value.code == "session_exists"
            with pytest.raises(Conflict) as err:  # (still: nothing was marked deleted)
                await front.create(spec(shards), idem=ckey)
            assert err.value.code == "session_exists"
            assert await front.list_sessions() == []
            assert entries(front) == ["default~r"]
        finally:
            await cluster.kill()

    asyncio.run(restarted())
    assert stored_files(tmp_path) == before
    asyncio.run(restarted())
    assert stored_files(tmp_path) == before


async def answered_after_a_restart(cluster: Cluster, shards: int, ckey: IdemKey, sid: str,
                                   version: int) -> None:
    """After every actor is killed, a new front answers the key's create with session ``sid``
    (replayed, at ``version``), and the hosts hold its files and nothing else."""
    await cluster.kill()
    replayed = await cluster.front().create(spec(shards), idem=ckey)
    assert replayed.replayed and replayed.id == sid and replayed.version == version
    assert held_keys(cluster) == session_files(sid, shards)


def session_files(sid: str, shards: int) -> list[str]:
    """What :func:`held_keys` lists for one session."""
    if shards == 1:
        return [f"default~{sid}"]
    return [f"default#{sid}~shard{i}of{shards}" for i in range(shards)]


CUT_503 = [(1, "keyed", True), (1, "keyed", False), (1, "unkeyed", True),
           (1, "unkeyed", False), (2, "keyed", True)]


@pytest.mark.parametrize(("shards", "keyed", "made"), CUT_503,
                         ids=[f"{s}-{k}-{'made' if m else 'not-made'}" for s, k, m in CUT_503])
def test_a_ray_create_cut_by_a_503_leaves_no_session_without_its_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, keyed: str,
        made: bool) -> None:
    """A create (without an id) whose host (a sharded one's shard 1 host) answers 503
    ``host_restarting`` once it made its session (or shard), or before it did: the create
    may or may not have been applied. The front removed the entry (and the create's index),
    leaving what the host made there for good: never listed, never counted, back at every
    start, and the keyed create's retry made a second session. The entry and index are kept
    (a keyed create's always: its retry is answered with the session, or finishes it on the
    same hosts, under the same key; an unkeyed one's while a host holds any of it, so the
    client lists it and can delete it), and removed only when no host holds any of it. After
    a restart the hosts hold exactly the sessions the directory names; a kept session steps as
    torch."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-503") if keyed == "keyed" else None

    async def run() -> None:
        try:
            first = cluster.front()
            real = ray_host.RayHost.create

            async def cut(host: Any, key: str, s: Any, **kw: Any) -> Any:
                if shards == 1 or key.endswith(f"shard{shards - 1}of{shards}"):
                    if made:
                        await real(host, key, s, **kw)
                    raise ray_host.Unavailable("the host is restarting",
                                               code="host_restarting")
                return await real(host, key, s, **kw)
            with monkeypatch.context() as m:
                m.setattr(ray_host.RayHost, "create", cut)
                with pytest.raises(ray_host.Unavailable) as err:
                    await first.create(spec(shards), idem=ckey)
            assert err.value.code == "host_restarting"
            await cluster.kill()

            second = cluster.front()
            kept = entries(second)
            if ckey is None:
                assert len(kept) == int(made), kept
                sids = [k.partition("~")[2] for k in kept]
                assert [i.id for i in await second.list_sessions()] == sids
                assert held_keys(cluster) == [f for sid in sids
                                              for f in session_files(sid, shards)]
                assert await second.router.count("default~") == len(sids)
                if sids:  # (the client finds it, and deletes it)
                    assert not await second.delete(sids[0])
                    assert entries(second) == [] and held_keys(cluster) == []
                return
            [entry] = kept
            again = await second.create(spec(shards), idem=ckey)
            assert f"default~{again.id}" == entry, (again, kept)
            assert again.replayed == (made and shards == 1), again
            assert entries(second) == [entry]
            assert [i.id for i in await second.list_sessions()] == [again.id]
            assert held_keys(cluster) == session_files(again.id, shards)
            torch_ = AsTorch(spec(shards))
            await torch_.step(second, again.id)
            await answered_after_a_restart(cluster, shards, ckey, again.id, version=1)
        finally:
            await cluster.kill()
    asyncio.run(run())


AT_ONCE = [(1, "before-the-index"), (1, "at-the-hosts"), (2, "before-the-index"),
           (2, "at-the-hosts")]


@pytest.mark.parametrize(("shards", "at"), AT_ONCE, ids=[f"{s}-{a}" for s, a in AT_ONCE])
def test_a_keyed_ray_create_run_by_two_fronts_at_once_makes_one_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, at: str) -> None:
    """A keyed create without an id (plain, sharded) still in flight through one front
    (placing it, before its index is written; or with its hosts, once it is) when the
    client's retry reaches another front, which runs to the end first. The retry made a
    second session (its index replacing the first's, or beside it: the first still at its
    hosts looked like a create cut short). The first try's index decides: the retry finishes
    that create on its hosts (at-the-hosts), or the first try, finding the retry's index,
    drops its entry and is answered with the retry's session. One session, one entry, which
    both answer (one of them as replayed) and both fronts list; it steps as torch, and a
    later retry through a new front is answered with it."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-once")

    async def run() -> None:
        try:
            first, second = cluster.front(), cluster.front()
            entered, go = asyncio.Event(), asyncio.Event()
            calls = 0

            def gated(real: Any) -> Any:
                async def wait_first(*args: Any, **kw: Any) -> Any:
                    nonlocal calls
                    calls += 1
                    if calls == 1:  # (the first front's)
                        entered.set()
                        await go.wait()
                    return await real(*args, **kw)
                return wait_first
            with monkeypatch.context() as m:
                if at == "before-the-index":
                    m.setattr(ray_host.RayRouter, "_place", gated(ray_host.RayRouter._place))
                elif shards == 1:
                    m.setattr(ray_host.RayHost, "create", gated(ray_host.RayHost.create))
                else:
                    m.setattr(ray_host.ShardedSession, "create",
                              staticmethod(gated(ray_host.ShardedSession.create)))
                one = asyncio.create_task(first.create(spec(shards), idem=ckey))
                await entered.wait()
                two = await second.create(spec(shards), idem=ckey)
                go.set()
                one_ = await one
            assert one_.id == two.id, (one_, two)
            assert not two.replayed and one_.replayed, (one_, two)
            for front in (first, second):
                assert [i.id for i in await front.list_sessions()] == [two.id]
            assert entries(second) == [f"default~{two.id}"]
            assert held_keys(cluster) == session_files(two.id, shards)
            torch_ = AsTorch(spec(shards))
            for front in (first, second):
                await torch_.step(front, two.id)
            await answered_after_a_restart(cluster, shards, ckey, two.id, version=2)
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_keyed_ray_create_cut_on_a_host_gone_since_is_made_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed create without an id cut before its host made the session (its front died),
    whose host is then gone for good (its actor and its folder, host.json too): the retry is
    not sent to it (a 404 on a create), nor does it leave the first try's entry behind: the
    session is made anew on a host placed now, one entry, and steps as torch."""
    import shutil
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-gone-host")

    async def run() -> None:
        try:
            first = cluster.front()

            async def dies(host: Any, key: str, s: Any, **kw: Any) -> Any:
                raise Crash(key)

            def remove(d: Directory, key: str) -> None:
                raise Crash(key)  # (a kill runs no clean-up)
            with monkeypatch.context() as m:
                m.setattr(ray_host.RayHost, "create", dies)
                m.setattr(Directory, "remove", remove)
                with pytest.raises(Crash):
                    await first.create(spec(), idem=ckey)
            [made] = entries(first)
            await cluster.kill()
            shutil.rmtree(tmp_path / "hosts" / entries_of(first, made.partition("~")[2])["host"])

            second = cluster.front()
            again = await second.create(spec(), idem=ckey)
            assert not again.replayed and f"default~{again.id}" != made, again
            assert entries(second) == [f"default~{again.id}"]
            assert held_keys(cluster) == [f"default~{again.id}"]
            await AsTorch(spec()).step(second, again.id)
            replayed = await cluster.front().create(spec(), idem=ckey)
            assert replayed.replayed and replayed.id == again.id and replayed.version == 1
        finally:
            await cluster.kill()
    asyncio.run(run())


REMADE = [(1, "same-hosts"), (1, "other-hosts"), (2, "same-hosts"), (2, "other-hosts")]


@pytest.mark.parametrize(("shards", "where"), REMADE, ids=[f"{s}-{w}" for s, w in REMADE])
def test_a_keyed_ray_delete_cut_before_the_directory_heard_spares_the_id_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, where: str) -> None:
    """A keyed delete (plain, sharded) whose front dies once the hosts deleted the session,
    before the directory kept the delete's key; the cluster restarts, and a session is made
    again with the id: on the hosts that deleted the old one (which keep the key's
    tombstone) or on others (other sessions took those). The delete's retry, through a new
    front and again after another restart, is answered (204) and leaves the new session
    alone, as the embedded engine does: before, it deleted it (other hosts) or removed its
    entry, its shards left on their hosts for good (the same hosts)."""
    cluster = Cluster(tmp_path, monkeypatch)
    dkey = IdemKey("d-cut", "delete cut")

    async def run() -> None:
        try:
            first = cluster.front()
            s = spec(shards)
            s.id = "again"
            await first.create(s)
            await first.step("again", GRADS, return_params=False)
            await delete_and_die(first, "again", dkey, monkeypatch)
            await cluster.kill()

            second = cluster.front()
            fillers = []
            if where == "other-hosts":
                for i in range(shards):
                    filler = spec()
                    filler.id = f"filler{i}"
                    await second.create(filler)
                    fillers.append(filler.id)
            remade = spec(shards, lr=0.5)
            remade.id = "again"
            await second.create(remade)
            torch_ = AsTorch(spec(shards, lr=0.5))
            await torch_.step(second, "again")
            for front in (second, cluster.front()):
                assert await front.delete("again", idem=dkey)
                info = await front.describe("again")
                # (left alone; made again at v2, after the old one's last version)
                assert info.version == 2 + torch_.steps and info.lr == [0.5]
                assert sorted(i.id for i in await front.list_sessions()) == \
                    sorted([*fillers, "again"])
                await torch_.step(front, "again")
                await cluster.kill()
            with pytest.raises(Invalid) as bad:
                await cluster.front().delete("again", idem=IdemKey("d-cut", "another"))
            assert bad.value.code == "idempotency_key_reused"
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("then", ["start", "create", "discarded"])
def test_an_unkeyed_sharded_ray_create_cut_part_way_is_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str) -> None:
    """An unkeyed create of a 2-shard session with an id whose front dies once shard 0's host
    made its shard, before shard 1's was asked (no clean-up runs), or (``discarded``) whose
    shard 1's host crashed before its create record was whole (an empty log: its start
    discards the shard as a create a crash interrupted); the cluster restarts. No
    retry can finish it (it has no key), and it was never acknowledged. Before, it was kept
    for good: reads were 404s naming the missing shard, the list left it out and a create of
    its id was a 409 ``session_exists``, shard 0 on its host for good. Now it is undone (its
    shard deleted, its entry removed) by the next front's start, or by a create of its id,
    as the embedded engine's start undoes it: the id is made anew, steps as torch, and the
    hosts hold that session's shards and nothing else."""
    from app.engine.shards import shard_spec
    cluster = Cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0)
    monkeypatch.setattr(ray_host.ray, "is_initialized", lambda: True)

    async def run() -> None:
        try:
            first = cluster.front()

            async def half(key: str, s: Any, layout: Any, shards: Any, **kw: Any) -> Any:
                host, skey = shards[0]
                await host.create(skey, shard_spec(s, layout, 0), idem=kw["idem"])
                raise Crash(key)  # (the front dies: shard 1's host is never asked)

            def remove(d: Directory, key: str) -> None:
                raise Crash(key)  # (a kill runs no clean-up)
            if then == "discarded":
                await first.create(spec(2, id="half"))
                await cluster.kill()
                [wal] = (tmp_path / "hosts").glob("*/sessions/default#half~shard1of2/wal.bin")
                wal.write_bytes(b"")  # (the crash cut its create record: never acknowledged)
            else:
                with monkeypatch.context() as m:
                    m.setattr(ray_host.ShardedSession, "create", staticmethod(half))
                    m.setattr(Directory, "remove", remove)
                    with pytest.raises(Crash):
                        await first.create(spec(2, id="half"))
                assert entries(first) == ["default~half"]
                assert held_keys(cluster) == ["default#half~shard0of2"]
                await cluster.kill()

            second = cluster.front()
            if then == "start":
                await second.start()
                assert entries(second) == [] and held_keys(cluster) == []
                with pytest.raises(NotFound):
                    await second.describe("half")
            remade = await second.create(spec(2, lr=0.5, id="half"))
            # (after the version its undone part was deleted at: 0, as the embedded engine's)
            assert remade.id == "half" and remade.version == 1
            assert entries(second) == ["default~half"]
            assert held_keys(cluster) == session_files("half", 2)
            torch_ = AsTorch(spec(2, lr=0.5))
            for _ in range(2):
                await torch_.step(second, "half")
            await cluster.kill()
            third = cluster.front()
            await third.start()
            assert [i.id for i in await third.list_sessions()] == ["half"]
            await torch_.step(third, "half")
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_keyed_ray_delete_cut_between_the_shards_spares_the_id_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed delete of an unkeyed 2-shard session whose front dies once shard 1's host
    deleted its shard, before shard 0's did; the cluster restarts. A create of the id undoes
    what is left (shard 0 and the entry: test_an_unkeyed_sharded_ray_create_cut_part_way_is_
    undone) and makes the id anew. The delete's retry is answered (204) and leaves the new
    session alone, through two fronts: the host of shard 1 kept the key (the host of shard 0,
    which keeps the tenant's tombstone of a whole delete, never saw it)."""
    cluster = Cluster(tmp_path, monkeypatch)
    dkey = IdemKey("d-half", "delete half")

    async def run() -> None:
        try:
            first = cluster.front()
            await first.create(spec(2, id="half"))
            await first.step("half", GRADS, return_params=False)
            real_delete, real_remove = Store.delete, Directory.remove

            def store_delete(store: Store, key: str, *args: Any, **kw: Any) -> None:
                if key.endswith("shard0of2"):
                    raise Crash(key)  # (its host dies first: shard 1's deleted its shard)
                real_delete(store, key, *args, **kw)

            def remove(d: Directory, key: str) -> None:
                raise Crash(key)
            with monkeypatch.context() as m:
                m.setattr(Store, "delete", store_delete)
                m.setattr(Directory, "remove", remove)
                with pytest.raises(Exception):  # noqa: B017, PT011 - the crash
                    await first.delete("half", idem=dkey)
            assert held_keys(cluster) == ["default#half~shard0of2"]
            await cluster.kill()
            del real_remove

            second = cluster.front()
            await second.create(spec(2, lr=0.5, id="half"))
            torch_ = AsTorch(spec(2, lr=0.5))
            await torch_.step(second, "half")
            for front in (second, cluster.front()):
                assert await front.delete("half", idem=dkey)
                info = await front.describe("half")
                # (left alone; made again at v2, after the old one's last version)
                assert info.version == 2 + torch_.steps and info.lr == [0.5]
                await torch_.step(front, "half")
            assert held_keys(cluster) == session_files("half", 2)
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_sharded_ray_create_whose_second_host_cannot_be_made_kills_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-shard create (one session per host: two new hosts) whose second host's
    ``host.json`` cannot be written (a 503 ``storage_error``, nothing made): the host started
    for shard 0 is given up, killed through ``ray.kill`` (that one and nothing else) and its
    folder removed; no entry, no session. The retry makes the session on two new hosts, and
    it steps as torch."""
    cluster = Cluster(tmp_path, monkeypatch)
    real = ray_host.write_atomic
    written: list[str] = []

    def second_fails(path: Path, parts: Any) -> None:
        if path.name == ray_host.HOST_JSON:
            written.append(path.parent.name)
            if len(written) == 2:
                raise OSError(5, "Input/output error")
        real(path, parts)

    async def run() -> None:
        try:
            front = cluster.front()
            with monkeypatch.context() as m:
                m.setattr(ray_host, "write_atomic", second_fails)
                with pytest.raises(ray_host.Unavailable) as err:
                    await front.create(spec(2))
            assert err.value.code == "storage_error", err.value
            first = written[0]
            assert cluster.killed == [first] and list(cluster.actors) == []
            assert not (tmp_path / "hosts").exists() or \
                list((tmp_path / "hosts").iterdir()) == []
            assert entries(front) == [] and await front.list_sessions() == []
            made = await front.create(spec(2))
            assert cluster.killed == [first] and len(cluster.actors) == 2
            assert entries(front) == [f"default~{made.id}"]
            torch_ = AsTorch(spec(2))
            await torch_.step(front, made.id)
        finally:
            await cluster.kill()
    asyncio.run(run())
