"""The Ray engine's removals of directory entries name the creation they remove: a front that
removes a session's entry (a delete, a create undone) once another front has made the id again
leaves the new session's entry, which a plain removal took away (that session then had no
entry: its id free for a second create, lost to the next start). Without a cluster, the host
actors' real code in this process (:mod:`tests.unit.test_ray_deletes`); the interleaving is
forced by holding the first front where the other front's create lands. And what a create and a
delete leave on disk for a machine's crash, in order (fsynced)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from app.errors import Invalid
from tests.unit.test_deleted_creates import create_key, spec
from tests.unit.test_ray_create_claims import dies
from tests.unit.test_ray_deletes import AsTorch, Cluster, entries, entries_of, held_keys

ray_host = pytest.importorskip("app.engine.ray_host")


def test_a_delete_leaves_the_entry_of_its_id_made_again_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete of session ``x`` is held once its host deleted the session, before it removes
    the entry; meanwhile a create of ``x`` through another front finds the entry stale (no host
    holds it), drops it and makes its own session. The delete then ends: the new session's
    entry stays (before, the delete removed it: the next front found no ``x``), and the new
    session steps as torch through a new front."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            first, second = cluster.front(), cluster.front()
            s = spec(id="x")
            await first.create(s)
            deleted, go = asyncio.Event(), asyncio.Event()
            real = ray_host._Placed.delete

            async def delete_then_wait(placed: Any, key: str, **kw: Any) -> bool:
                replayed: bool = await real(placed, key, **kw)
                deleted.set()
                await go.wait()
                return replayed
            monkeypatch.setattr(ray_host._Placed, "delete", delete_then_wait)
            deleting = asyncio.ensure_future(first.delete("x"))
            await deleted.wait()
            other = spec(lr=0.5, id="x")
            again = await second.create(other)
            made = entries_of(second, "x")["made"]
            go.set()
            assert await deleting is False
            third = cluster.front()
            assert entries(third) == ["default~x"] and entries_of(third, "x")["made"] == made
            assert (await third.describe("x")).id == again.id == "x"
            await AsTorch(other).step(third, "x")
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_an_undone_create_leaves_the_entry_of_its_id_made_again_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed create of ``x`` whose front died once its entry was claimed, before its host
    was asked; two retries of it through two fronts finish it on its host, which refuses both
    (a 422). The first retry's refusal undoes the create (its entry and index go); a create of
    ``x`` without a key through a third front then makes a new session; only then does the
    second retry's refusal come. It undoes nothing of the new session (before, it removed its
    entry): the new session's entry stays and it steps as torch through a new front, and the
    key's next retry is a 409 ``session_exists``, not a second ``x``."""
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-undo")
    s = spec(id="x")

    async def run() -> None:
        try:
            await dies(cluster.front(), s, monkeypatch, idem=ckey)
            held, go = asyncio.Event(), asyncio.Event()
            calls = 0
            real = ray_host.RayHost.create

            async def refused(host: Any, key: str, s_: Any, **kw: Any) -> Any:
                nonlocal calls
                calls += 1
                call = calls
                if call == 1:  # (the second retry's, held until the new session is made)
                    held.set()
                    await go.wait()
                if call <= 2:
                    raise Invalid("the host refuses it", field="params", code="invalid_body")
                return await real(host, key, s_, **kw)
            monkeypatch.setattr(ray_host.RayHost, "create", refused)
            second = asyncio.ensure_future(cluster.front().create(s, idem=ckey))
            await held.wait()
            with pytest.raises(Invalid):
                await cluster.front().create(s, idem=ckey)
            assert entries(cluster.front()) == []
            other = spec(lr=0.5, id="x")
            await cluster.front().create(other)
            made = entries_of(cluster.front(), "x")["made"]
            go.set()
            with pytest.raises(Invalid):
                await second
            front = cluster.front()
            assert entries(front) == ["default~x"] and entries_of(front, "x")["made"] == made
            assert entries_of(front, "x")["created_by"] is None
            assert held_keys(cluster) == ["default~x"]
            await AsTorch(other).step(front, "x")
            with pytest.raises(Exception) as err:  # noqa: PT011 - checked below
                await front.create(s, idem=ckey)
            assert getattr(err.value, "code", None) == "session_exists", err.value
        finally:
            await cluster.kill()
    asyncio.run(run())



def test_a_ray_create_and_delete_are_on_disk_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a machine's crash (not only a process's) must find, in the order of the calls a
    create and a delete make: the create's mark in flight (its file, then its folder) is
    fsynced before the entry is claimed, and the entry's folder once it is claimed, both
    before the host is asked to make the session (before, neither was: a crash could keep the
    host's session and lose its entry, or keep an entry without the mark by which an
    abandoned create's entry is found and dropped); a delete's removal of the entry is
    fsynced before it answers."""
    import os

    from app.engine.store import Files
    cluster = Cluster(tmp_path, monkeypatch)
    events: list[tuple[str, ...]] = []
    real_fsync, real_fsync_dir, real_link = os.fsync, Files.fsync_dir, os.link
    real_create = ray_host.RayHost.create

    def fsync(fd: int) -> None:
        events.append(("file", Path(os.readlink(f"/proc/self/fd/{fd}")).parent.name))
        real_fsync(fd)

    def fsync_dir(files: Files, path: Path) -> None:
        exists = (tmp_path / "directory" / "default~x").exists()
        events.append(("dir", Path(path).name, "x" if exists else "-"))
        real_fsync_dir(files, path)

    def link(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        real_link(src, dst, *args, **kw)
        events.append(("link", Path(dst).name))

    async def create(host: Any, key: str, s: Any, **kw: Any) -> Any:
        events.append(("host create",))
        return await real_create(host, key, s, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Files, "fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(ray_host.RayHost, "create", create)

    def in_order(expected: list[tuple[str, ...]]) -> None:
        at = iter(events)
        assert all(e in at for e in expected), (expected, events)

    async def run() -> None:
        try:
            front = cluster.front()
            s = spec(id="x")
            await front.create(s)
            in_order([("file", ".creating"), ("dir", ".creating", "-"),
                      ("link", "default~x"), ("dir", "directory", "x"), ("host create",)])
            events.clear()
            await front.delete("x")
            assert ("dir", "directory", "-") in events, events
            assert entries(cluster.front()) == []
        finally:
            await cluster.kill()
    asyncio.run(run())


@pytest.mark.parametrize("where", ["made-anew", "undone"])
def test_a_keyed_create_removed_by_one_front_keeps_its_index_for_a_retry_made_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A keyed create without an id whose front died once its entry and index were claimed,
    before its host was asked. A retry of it through front A removes that creation: its host
    is gone for good, so it is to be made anew (``made-anew``), or its host refused it
    (``undone``). A is held between the removal of the entry and that of the index (its code
    there runs on a thread of its own); meanwhile a retry through front B finds the index
    without an entry, claims the id again and makes the session under the index: 201. Before,
    A then dropped the index: the next retry found no index and made a second session (and so
    did A, made anew). The index stays: the next retry is answered with B's session, the only
    one the hosts and the directory hold, which steps as torch."""
    import shutil
    import threading

    from app.engine.directory import Directory
    cluster = Cluster(tmp_path, monkeypatch)
    ckey = create_key("k-index")

    async def run() -> None:
        try:
            await dies(cluster.front(), spec(), monkeypatch, idem=ckey)
            [key] = entries(cluster.front())
            first = entries_of(cluster.front(), key.partition("~")[2])
            if where == "made-anew":
                await cluster.kill()
                shutil.rmtree(tmp_path / "hosts" / first["host"])
            router: Any = cluster.front().router
            real = Directory.remove_made
            removed, go = threading.Event(), threading.Event()
            out: dict[str, Any] = {}

            def remove_then_wait(d: Directory, k: str, made: str | None) -> bool:
                gone: bool = real(d, k, made)
                if threading.current_thread().name == "A":
                    removed.set()
                    out["released"] = go.wait(30.0)
                return gone
            monkeypatch.setattr(Directory, "remove_made", remove_then_wait)

            def front_a() -> None:
                if where == "made-anew":
                    out["a"] = router._indexed_create("default", ckey)
                else:
                    refusal = Invalid("the host refuses it", field="params",
                                      code="invalid_body")
                    out["a"] = asyncio.run(router._undo_create(key, first, ckey, refusal))
            thread = threading.Thread(target=front_a, name="A")
            thread.start()
            try:
                assert await asyncio.to_thread(removed.wait, 30.0)
                made = await cluster.front().create(spec(), idem=ckey)
                assert f"default~{made.id}" == key and not made.replayed, made
            finally:
                go.set()
                await asyncio.to_thread(thread.join, 30.0)
            assert not thread.is_alive() and out["released"]
            remade = entries_of(cluster.front(), made.id)
            assert remade["made"] != first["made"] and remade["created_by"] == ckey.key
            later = await cluster.front().create(spec(), idem=ckey)
            assert later.replayed and later.id == made.id, (later, made)
            assert entries(cluster.front()) == [key] and held_keys(cluster) == [key]
            if where == "made-anew":  # (A finishes B's create: looked at again)
                assert out["a"] == (key, remade), out["a"]
            else:
                assert out["a"] is True
            await AsTorch(spec()).step(cluster.front(), made.id)
        finally:
            await cluster.kill()
    asyncio.run(run())
