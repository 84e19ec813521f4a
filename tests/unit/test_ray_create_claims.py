"""The Ray engine's creates cut part way and in flight, against the session limit and other
fronts, without a cluster (the host actors' real code in this process, as in
:mod:`tests.unit.test_ray_deletes`): a retry finishing a create that holds its entry is not
refused by ``OPTSERVE_MAX_SESSIONS``; an entry whose create is in flight through another front
is not dropped by a create of its id (409 ``session_exists``), one whose front died is taken
over; and the entries of unkeyed creates whose front died before any host made the session are
dropped (at start, at the limit), never one in flight. A front that dies is one whose create
raises and runs no clean-up: its create's mark in ``.creating/`` is left unlocked, as the kernel
leaves it when a ``kill -9`` ends the process (the lock itself across processes:
:func:`test_a_create_mark_is_in_flight_until_its_process_is_killed`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.engine.directory import Directory
from app.engine.front import Front, Limits
from app.engine.interface import IdemKey
from app.errors import Conflict, TooMany
from tests.unit.test_deleted_creates import Crash, create_key, spec
from tests.unit.test_ray_deletes import AsTorch, Cluster, entries, entries_of, held_keys

ray_host = pytest.importorskip("app.engine.ray_host")


def limited(cluster: Cluster, max_sessions: int) -> Front:
    front = cluster.front()
    front.limits = Limits(max_sessions=max_sessions)
    return front


def marks(cluster: Cluster) -> list[str]:
    """The marks of creates in ``.creating/`` (in flight, or left by a front that died)."""
    folder = cluster.data_dir / "directory" / ".creating"
    return sorted(os.listdir(folder)) if folder.exists() else []


def too_many(err: pytest.ExceptionInfo[TooMany], limit: int) -> None:
    e = err.value
    assert (e.status, e.code, e.field) == (429, "too_many_sessions", "id"), e
    assert e.extra == {"limit": limit}, e.extra


async def dies(front: Front, s: Any, monkeypatch: pytest.MonkeyPatch, *,
               idem: IdemKey | None = None, made: bool = False) -> None:
    """``front`` dies in the create: once its entry is claimed, before its host is asked (or
    once the host made the session); no clean-up runs."""
    real = ray_host.RayHost.create

    async def host_dies(host: Any, key: str, s: Any, **kw: Any) -> Any:
        if made:
            await real(host, key, s, **kw)
        raise Crash(key)

    def remove(d: Directory, key: str) -> None:
        raise Crash(key)
    with monkeypatch.context() as m:
        m.setattr(ray_host.RayHost, "create", host_dies)
        m.setattr(Directory, "remove", remove)
        with pytest.raises(Crash):
            await front.create(s, idem=idem)


class Gate:
    """The first host create waits (a create in flight) until ``go``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
        self.entered, self.go = asyncio.Event(), asyncio.Event()
        self.calls = 0
        gated = self.gated(ray_host.RayHost.create if shards == 1
                           else ray_host.ShardedSession.create)
        if shards == 1:
            monkeypatch.setattr(ray_host.RayHost, "create", gated)
        else:
            monkeypatch.setattr(ray_host.ShardedSession, "create", staticmethod(gated))

    def gated(self, real: Any) -> Any:
        async def wait_first(*args: Any, **kw: Any) -> Any:
            self.calls += 1
            if self.calls == 1:
                self.entered.set()
                await self.go.wait()
            return await real(*args, **kw)
        return wait_first


CUT = ["keyed", "keyed-sharded", "with-id"]


@pytest.mark.parametrize("cut", CUT)
def test_a_ray_create_cut_part_way_is_finished_by_its_retry_at_the_session_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str) -> None:
    """A tenant with one session and ``OPTSERVE_MAX_SESSIONS=2``; a create whose front dies
    once its entry is claimed, before its hosts made the session (keyed, plain and 2 shards
    with shard 0 made; unkeyed with an id). Its retry through the next front was a 429
    ``too_many_sessions``: the limit was checked before the router, counting the cut create's
    own entry. It finishes the create (as below the limit): the session steps as torch, and
    the tenant's next new create is the 429 naming ``id`` and the limit."""
    from app.engine.shards import shard_spec
    cluster = Cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0, raising=False)
    shards = 2 if cut == "keyed-sharded" else 1
    ckey = None if cut == "with-id" else create_key("k-limit")
    s = spec(shards)
    s.id = "x" if cut == "with-id" else None

    async def run() -> None:
        try:
            first = limited(cluster, 2)
            other = await first.create(spec())
            if shards == 1:
                await dies(first, s, monkeypatch, idem=ckey)
            else:
                async def half(key: str, s_: Any, layout: Any, hosts: Any, **kw: Any) -> Any:
                    host, skey = hosts[0]
                    await host.create(skey, shard_spec(s_, layout, 0), idem=kw["idem"])
                    raise Crash(key)  # (the front dies: shard 1's host is never asked)

                def remove(d: Directory, key: str) -> None:
                    raise Crash(key)
                with monkeypatch.context() as m:
                    m.setattr(ray_host.ShardedSession, "create", staticmethod(half))
                    m.setattr(Directory, "remove", remove)
                    with pytest.raises(Crash):
                        await first.create(s, idem=ckey)
            made = [k for k in entries(first) if k != f"default~{other.id}"]
            assert len(made) == 1 and len(entries(first)) == 2
            await cluster.kill()

            second = limited(cluster, 2)
            again = await second.create(s, idem=ckey)
            assert f"default~{again.id}" == made[0] and not again.replayed, again
            assert again.version == 0
            assert entries(second) == sorted([f"default~{other.id}", made[0]])
            assert sorted(i.id for i in await second.list_sessions()) == \
                sorted([other.id, again.id])
            torch_ = AsTorch(spec(shards))
            await torch_.step(second, again.id)
            with pytest.raises(TooMany) as err:
                await second.create(spec())
            too_many(err, 2)
            assert entries(second) == sorted([f"default~{other.id}", made[0]])
            assert marks(cluster) == []
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_ray_create_of_an_id_in_flight_through_another_front_is_a_409(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A create with an id (a keyed sharded one, an unkeyed plain one) in flight through one
    front (its entry claimed, its hosts not done) while another front gets a create of the same
    id. The second front took the entry for a create cut short (no host holds the session
    yet), dropped it and made its own session, leaving the first one's on its host without an
    entry. It is a 409 ``session_exists`` naming ``id``; the entry is the first one's, which
    is answered (201), steps as torch through both fronts, and is all the hosts hold. Once a
    create's front died (its mark left unlocked) a create of its id takes the entry over."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            first, second = cluster.front(), cluster.front()
            s = spec(shards, id="x")
            ckey = create_key("k-x") if shards == 2 else None
            with monkeypatch.context() as m:
                gate = Gate(m, shards)
                one = asyncio.create_task(first.create(s, idem=ckey))
                await gate.entered.wait()
                claimed = entries_of(first, "x")
                other = spec(shards, lr=0.5, id="x")
                for idem in (None, create_key("k-other")):
                    with pytest.raises(Conflict) as err:
                        await second.create(other, idem=idem)
                    e = err.value
                    assert (e.status, e.code, e.field) == (409, "session_exists", "id"), e
                    assert entries_of(second, "x") == claimed
                gate.go.set()
                info = await one
            assert info.id == "x" and info.version == 0 and not info.replayed
            assert entries(second) == ["default~x"] and entries_of(second, "x") == claimed
            assert held_keys(cluster) == (["default~x"] if shards == 1 else
                                          [f"default#x~shard{i}of2" for i in range(2)])
            torch_ = AsTorch(spec(shards))
            for front in (second, first):
                await torch_.step(front, "x")
            assert marks(cluster) == []

            # a create whose front died: its entry is taken over by a create of its id
            y = spec()
            y.id = "y"
            await dies(first, y, monkeypatch)
            dead = entries_of(second, "y")
            assert len(marks(cluster)) == 1
            taken = spec(lr=0.5)
            taken.id = "y"
            assert (await second.create(taken)).lr == [0.5]
            assert entries_of(second, "y")["made"] != dead["made"]
            assert (await first.describe("y")).lr == [0.5]
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_unkeyed_ray_creates_whose_front_died_are_dropped_never_one_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fronts die in creates: an unkeyed one before its host was asked, an unkeyed one once
    its host made the session, a keyed one before its host was asked; a fourth create is in
    flight through a live front. The first one's entry sat in the directory for good, counted
    toward ``OPTSERVE_MAX_SESSIONS``: a front at the limit (4 here) refused a new create with
    a 429. That entry is dropped when the limit is reached (the new create is made), and so is
    the entry of the next unkeyed create whose front dies, at the next front's start. The
    session a host made (listed, deletable), the keyed create's entry (its retry finishes it)
    and the create in flight (answered once let go, stepping as torch) are kept; the tenant's
    next new create is the 429."""
    cluster = Cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0, raising=False)
    monkeypatch.setattr(ray_host.ray, "is_initialized", lambda: True)
    ckey = create_key("k-dies")

    async def run() -> None:
        try:
            await dies(cluster.front(), spec(), monkeypatch)
            [abandoned] = entries(cluster.front())
            await dies(cluster.front(), spec(), monkeypatch, made=True)
            [held] = [k for k in entries(cluster.front()) if k != abandoned]
            await dies(cluster.front(), spec(), monkeypatch, idem=ckey)
            [keyed] = [k for k in entries(cluster.front()) if k not in (abandoned, held)]

            busy, front = cluster.front(), limited(cluster, 4)
            with monkeypatch.context() as m:
                gate = Gate(m, 1)
                flying = asyncio.create_task(busy.create(spec()))
                await gate.entered.wait()
                [in_flight] = [k for k in entries(front) if k not in (abandoned, held, keyed)]
                new = await front.create(spec())
                kept = sorted([held, keyed, in_flight, f"default~{new.id}"])
                assert entries(front) == kept
                with pytest.raises(TooMany) as err:
                    await front.create(spec())
                too_many(err, 4)
                assert entries(front) == kept
                gate.go.set()
                flown = await flying
            assert f"default~{flown.id}" == in_flight and flown.version == 0
            await AsTorch(spec()).step(front, flown.id)

            await dies(cluster.front(), spec(), monkeypatch)
            # (the marks looked at went with the sweep at the limit: this one's is left)
            assert len(entries(front)) == 5 and len(marks(cluster)) == 1
            await cluster.kill()
            restarted = limited(cluster, 4)
            await restarted.start()
            assert entries(restarted) == kept and marks(cluster) == []
            assert sorted(f"default~{i.id}" for i in await restarted.list_sessions()) == \
                sorted([held, in_flight, f"default~{new.id}"])
            retried = await restarted.create(spec(), idem=ckey)
            assert f"default~{retried.id}" == keyed and not retried.replayed
            with pytest.raises(TooMany) as err:
                await restarted.create(spec())
            too_many(err, 4)
            assert not await restarted.delete(held.partition("~")[2])
            assert entries(restarted) == sorted(k for k in kept if k != held)
        finally:
            await cluster.kill()
    asyncio.run(run())


_HOLDER = """
import sys, time
from pathlib import Path
from app.engine.directory import Directory
Directory(Path(sys.argv[1])).mark_creating("m1", "default~x")
print("marked", flush=True)
time.sleep(60)
"""


def test_a_create_mark_is_in_flight_until_its_process_is_killed(tmp_path: Path) -> None:
    """Another process marks a create in flight (its lock held): this one sees it in flight,
    not abandoned; once that process is killed (``kill -9``) the mark is left unlocked, so the
    create is no longer in flight and its mark is found abandoned, naming its key."""
    root = tmp_path / "directory"
    directory = Directory(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)],
                              stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "marked\n"
        assert directory.in_flight("m1") and not directory.in_flight("m2")
        assert directory.abandoned_creates() == []
        assert directory.in_flight("m1")  # (looking at it did not take the lock)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert not directory.in_flight("m1")
    [(made, key, mark)] = directory.abandoned_creates()
    assert (made, key) == ("m1", "default~x") and mark.parent == root / ".creating"
    directory.drop_mark(mark)
    assert os.listdir(root / ".creating") == []




def test_marks_naming_no_session_go_and_unreadable_ones_stay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The marks of creates whose front died, looked at: one written as this version writes it
    is found, naming its key, as before; an empty one (an older version's, cut by a crash) goes
    with a warning; one that cannot be read now (an I/O error: here a folder in its place) is
    left, with a warning, for the next look."""
    root = tmp_path / "directory"
    directory = Directory(root)
    directory.mark_creating("m1", "default~x").release()  # (its front let go of it, not done)
    folder = root / ".creating"
    (folder / "m2.00000001").write_bytes(b"")
    (folder / "m3.00000001").mkdir()
    with caplog.at_level(logging.WARNING, logger="optserve.directory"):
        [(made, key, mark)] = directory.abandoned_creates()
    assert (made, key) == ("m1", "default~x") and mark.parent == folder
    assert sorted(os.listdir(folder)) == sorted([mark.name, "m3.00000001"])
    warned = sorted(r.getMessage() for r in caplog.records if r.name == "optserve.directory")
    assert len(warned) == 2, warned
    assert "m2.00000001" in warned[0] and "names no session" in warned[0], warned
    assert "m3.00000001" in warned[1] and "left for the next look" in warned[1], warned

def test_a_ray_front_starts_over_create_marks_that_name_no_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """Marks in ``.creating/`` of creates whose front died that name no session: empty (an
    older version wrote its marks without an fsync, and a machine's crash cut one), bytes that
    are no UTF-8, a key cut to NUL bytes. Before, a front's start failed on them (the empty
    key's entry read as the directory itself, ``IsADirectoryError``; the others could not be
    decoded or opened). Now each goes with a warning, and the front starts; the mark of an
    unkeyed create whose front died beside them is still seen to as before (its entry, which
    no host made, is dropped), and a new create steps as torch."""
    cluster = Cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0)
    monkeypatch.setattr(ray_host.ray, "is_initialized", lambda: True)
    garbled = {"m-empty.00000001": b"", "m-bytes.00000002": b"\xff\xfe\x00default~x",
               "m-nul.00000003": b"default~\x00\x00\x00"}

    async def run() -> None:
        try:
            await dies(cluster.front(), spec(), monkeypatch)
            assert len(entries(cluster.front())) == 1 and len(marks(cluster)) == 1
            for name, raw in garbled.items():
                (tmp_path / "directory" / ".creating" / name).write_bytes(raw)
            restarted = cluster.front()
            with caplog.at_level(logging.WARNING, logger="optserve.directory"):
                await restarted.start()
            assert marks(cluster) == [] and entries(restarted) == []
            warned = sorted(r.getMessage() for r in caplog.records
                            if r.name == "optserve.directory")
            assert len(warned) == len(garbled), warned
            for name, said in zip(sorted(garbled), warned, strict=True):
                assert name in said and "names no session" in said, said
            made = await restarted.create(spec())
            assert entries(restarted) == [f"default~{made.id}"]
            await AsTorch(spec()).step(restarted, made.id)
        finally:
            await cluster.kill()
    asyncio.run(run())

def in_memory(cluster: Cluster) -> dict[str, list[str]]:
    """The sessions each host actor holds in its table (hosts holding none left out)."""
    return {name: keys for name, handle in sorted(cluster.actors.items())
            if handle.actor._host is not None
            and (keys := sorted(handle.actor._host.embedded.keys()))}


ORDERS = [(at, by) for at in ("mid", "late") for by in ("abandoned", "stale")]


@pytest.mark.parametrize(("at", "by"), ORDERS, ids=[f"{a}-{b}" for a, b in ORDERS])
def test_a_ray_create_whose_front_died_while_its_host_made_it_leaves_no_orphan(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, by: str) -> None:
    """A create of id ``x`` whose front dies (``kill -9``: no clean-up, its mark unlocked) once
    it asked its host, while the host is still making the session (``mid``: paused in its
    create) or before the request reached it (``late``). Another front drops the entry, as no
    host holds the session yet: at the limit or at start (``abandoned``), or through a create
    of ``x`` on another host (``stale``). Then the host finished, holding a session (files and
    table) that no entry named: never listed, counted or deleted, a second ``x`` beside the
    other front's. Now a host mid-create is waited for and the entry kept (the drop finds it
    held; the other create is a 409 ``session_exists``; the session steps as torch), and one
    asked after the drop makes nothing (503 ``create_dropped``): the hosts hold exactly the
    sessions the directory names, the surviving one stepping as torch."""
    cluster = Cluster(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0)

    async def run() -> None:
        entered, go = asyncio.Event(), asyncio.Event()
        asked: list[asyncio.Future[Any]] = []
        real_create, real_host_create = ray_host.RayHost.create, ray_host.InProcessHost.create
        paused = at != "mid"

        async def host_pauses(host: Any, key: str, s_: Any, **kw: Any) -> Any:
            nonlocal paused  # (the first create, in the host: mid-create)
            if not paused:
                paused = True
                entered.set()
                await go.wait()
            return await real_host_create(host, key, s_, **kw)

        async def delivered(host: Any, key: str, s_: Any, **kw: Any) -> Any:
            if at == "late":
                await go.wait()
            return await real_create(host, key, s_, **kw)

        async def asked_then_dies(host: Any, key: str, s_: Any, **kw: Any) -> Any:
            # (the request goes on without its front, as an actor task does)
            asked.append(asyncio.ensure_future(delivered(host, key, s_, **kw)))
            raise Crash(key)

        def remove(d: Directory, key: str) -> None:
            raise Crash(key)
        try:
            first, second = cluster.front(), cluster.front()
            s = spec(id="x")
            monkeypatch.setattr(ray_host.InProcessHost, "create", host_pauses)
            with monkeypatch.context() as m:
                m.setattr(ray_host.RayHost, "create", asked_then_dies)
                m.setattr(Directory, "remove", remove)
                with pytest.raises(Crash):
                    await first.create(s)
            claimed = entries_of(first, "x")
            if at == "mid":
                await entered.wait()
            other = spec(lr=0.5, id="x")
            other.placement = "spread"  # (a new host)

            async def drop() -> Any:
                if by == "abandoned":
                    return await second.router.drop_abandoned()  # type: ignore[attr-defined]
                return await second.create(other)
            dropping = asyncio.ensure_future(drop())
            # (late: the drop is done first; mid: it may wait for the host, which goes on)
            await asyncio.wait({dropping}, timeout=None if at == "late" else 0.5)
            go.set()
            [host_made] = await asyncio.gather(*asked, return_exceptions=True)
            [dropped] = await asyncio.gather(dropping, return_exceptions=True)

            if at == "mid":  # the host's create was done first: the entry stays
                assert not isinstance(host_made, BaseException), host_made
                assert host_made.id == "x" and host_made.version == 0
                if by == "abandoned":
                    assert dropped == 0
                else:
                    assert isinstance(dropped, Conflict), dropped
                    assert (dropped.status, dropped.code, dropped.field) == \
                        (409, "session_exists", "id")
                assert entries(second) == ["default~x"] and entries_of(second, "x") == claimed
                assert in_memory(cluster) == {claimed["host"]: ["default~x"]}
                survivor = spec()
            else:  # the host was asked once the entry was dropped: it made nothing
                assert isinstance(host_made, ray_host.Unavailable), host_made
                assert (host_made.status, host_made.code) == (503, "create_dropped")
                if by == "abandoned":
                    assert dropped == 1 and entries(second) == []
                    assert in_memory(cluster) == {} and held_keys(cluster) == []
                    assert await second.list_sessions() == []
                    return
                assert not isinstance(dropped, BaseException), dropped
                assert dropped.id == "x" and dropped.lr == [0.5]
                taken = entries_of(second, "x")
                assert taken["made"] != claimed["made"] and taken["host"] != claimed["host"]
                assert in_memory(cluster) == {taken["host"]: ["default~x"]}
                survivor = other
            assert held_keys(cluster) == ["default~x"]
            assert [i.id for i in await second.list_sessions()] == ["x"]
            torch_ = AsTorch(survivor)
            for front in (second, first):
                await torch_.step(front, "x")
            assert await second.router.drop_abandoned() == 0  # type: ignore[attr-defined]
            assert marks(cluster) == []
        finally:
            go.set()
            await cluster.kill()
    asyncio.run(run())


def test_a_keyed_ray_create_whose_creation_a_dead_front_dropped_is_made_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed create whose front dies before its host was asked; another front, dropping its
    entry, had its host forget the creation (so a late request of it makes nothing) and died
    before the entry went. The retry, finishing the create on that entry, meets the host's 503
    ``create_dropped``: it drops the entry (no host holds any of it) and makes the session anew
    under its key, once: answered 201 with the first try's id, the hosts holding it alone, its
    entry a new creation's, stepping as torch; a further retry is answered with it."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-dropped")

    async def run() -> None:
        try:
            first = cluster.front()
            await dies(first, spec(), monkeypatch, idem=ckey)
            [key] = entries(first)
            cut = first.router.directory.get(key)  # type: ignore[attr-defined]
            assert cut is not None
            second = cluster.front()
            router: Any = second.router
            assert not await router._host(cut["host"]).forget(key, cut["made"])
            again = await second.create(spec(), idem=ckey)
            assert f"default~{again.id}" == key and not again.replayed and again.version == 0
            assert entries(second) == [key]
            remade = entries_of(second, again.id)
            assert remade["made"] != cut["made"] and remade["created_by"] == ckey.key
            assert in_memory(cluster) == {remade["host"]: [key]}
            assert held_keys(cluster) == [key]
            await AsTorch(spec()).step(second, again.id)
            replayed = await cluster.front().create(spec(), idem=ckey)
            assert replayed.replayed and replayed.id == again.id and replayed.version == 1
            # (the dead front's mark goes with the next look at marks, the entry kept)
            monkeypatch.setattr(ray_host, "ABANDONED_AFTER_S", 0.0)
            assert await router.drop_abandoned() == 0 and entries(second) == [key]
            assert marks(cluster) == []
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_retried_ray_delete_leaves_the_entry_of_a_create_of_its_id_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed delete of ``x``, then a create of ``x`` in flight (its entry claimed, its host
    not asked yet) while the delete is retried. The retry took the new entry for one a crash
    left behind the delete (no host holds it) and removed it: the create was then answered 201
    with a session no entry named (never listed, a 404, its files kept for good). The retry
    is answered (204) and the entry left: the session is listed and steps as torch."""
    cluster = Cluster(tmp_path, monkeypatch)
    dkey = IdemKey("d-x", "delete x")

    async def run() -> None:
        try:
            front = cluster.front()
            s = spec(id="x")
            await front.create(s)
            assert not await front.delete("x", idem=dkey)
            with monkeypatch.context() as m:
                gate = Gate(m, 1)
                again = spec(lr=0.5, id="x")
                flying = asyncio.create_task(front.create(again))
                await gate.entered.wait()
                claimed = entries_of(front, "x")
                assert await cluster.front().delete("x", idem=dkey)
                assert entries_of(front, "x") == claimed
                gate.go.set()
                made = await flying
            assert made.id == "x" and made.lr == [0.5] and not made.replayed
            assert entries(front) == ["default~x"] and entries_of(front, "x") == claimed
            assert [i.id for i in await front.list_sessions()] == ["x"]
            assert in_memory(cluster) == {claimed["host"]: ["default~x"]}
            await AsTorch(again).step(front, "x")
            assert marks(cluster) == []
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_create_of_an_older_entry_is_seen_by_a_forget_and_a_retire(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry of a keyed create an older version claimed (no ``made``), whose front died
    before its host was asked, is finished by the create's retry: its host makes the session
    (held up here inside the host's create). Meanwhile another front drops the entry as
    unheld (``_drop_unheld``: its host forgets the creation), and a front gives the host up
    (``retire``). Before, such a create took no lock on its host: the forget found nothing
    held and the entry went while the session was being made (a session without its entry:
    never listed, its id free for another create), and the retire found the host empty and
    stopped it under the create. Now both wait for it or see it: the host is not retired, the
    entry stays, and the retry is answered with the session, which steps as torch."""
    from app.engine.host import EmbeddedHost
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-older")
    entered, go = asyncio.Event(), asyncio.Event()
    real = EmbeddedHost.create

    async def held_up(host: Any, key: str, s: Any, *, idem: IdemKey | None = None) -> Any:
        entered.set()
        await go.wait()
        return await real(host, key, s, idem=idem)

    async def run() -> None:
        try:
            first = cluster.front()
            await dies(first, spec(), monkeypatch, idem=ckey)
            [key] = entries(first)
            directory: Directory = first.router.directory  # type: ignore[attr-defined]
            older = directory.get(key)
            assert older is not None
            for field in ("made", "first_version"):  # (as an older version wrote it)
                older.pop(field, None)
            directory.put(key, older)
            monkeypatch.setattr(EmbeddedHost, "create", held_up)
            retry = asyncio.ensure_future(cluster.front().create(spec(), idem=ckey))
            await entered.wait()
            router: Any = cluster.front().router
            dropping = asyncio.ensure_future(router._drop_unheld(key, older))
            # (a forget that does not wait for the create drops the entry meanwhile)
            await asyncio.wait({dropping}, timeout=2.0)
            assert not await cluster.actors[older["host"]].actor.retire()
            go.set()
            info = await retry
            assert not await dropping  # (held: the entry stays)
            assert f"default~{info.id}" == key and entries(first) == [key]
            assert directory.get(key) == older
            assert in_memory(cluster) == {older["host"]: [key]}
            await AsTorch(spec()).step(cluster.front(), info.id)
        finally:
            go.set()
            await cluster.kill()
    asyncio.run(run())
