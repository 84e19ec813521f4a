"""A keyed create retried after its session was deleted is refused (409 ``session_deleted``
naming the key and the session), not run again: plain and sharded sessions, live and after a
crash; another request under the key is still a 422; the keys kept are bounded."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, directory, embedded_engine
from app.engine.directory import Directory
from app.engine.interface import CreateSpec, GroupSpec, IdemKey
from app.engine.store import TOMBSTONE, Durability, Store, frame_record, read_log
from app.errors import Conflict, Invalid, OptserveError
from tests.torch_reference import Reference, assert_tensors_equal


def spec(shards: int = 1, lr: float = 0.1, id: str | None = None) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({"a": torch.ones(2), "b": torch.zeros(3)})],
                      {"lr": lr}, shards=shards, id=id)


def create_key(name: str) -> IdemKey:
    return IdemKey(name, f"create {name}")


def refused(exc: BaseException, key: str, session_id: str) -> None:
    assert isinstance(exc, Conflict) and exc.code == "session_deleted", exc
    assert exc.field == "Idempotency-Key"
    assert exc.extra == {"idempotency_key": key, "session_id": session_id}, exc.extra


async def retries_refused(eng: Front, made: dict[str, str]) -> None:
    """Each key's retry is the 409 (and nothing is made); another request under it a 422."""
    for name, sid in made.items():
        for shards in (1, 2):
            with pytest.raises(Conflict) as err:
                await eng.create(spec(shards), idem=create_key(name))
            refused(err.value, name, sid)
        with pytest.raises(Invalid) as bad:
            await eng.create(spec(), idem=IdemKey(name, "another request"))
        assert bad.value.code == "idempotency_key_reused"
    assert await eng.list_sessions() == []


@pytest.mark.parametrize("durability", ["step", "memory"])
def test_a_create_retried_after_its_session_was_deleted_is_refused(
        tmp_path: Path, durability: str) -> None:
    """Keyed creates (with and without an id, one sharded), deleted with and without a key of
    their own: each create's retry is a 409 ``session_deleted``, also after a crash (no
    snapshot; the keys come back from the tombstone log, the sharded one from the directory)
    where the sessions were kept on disk. A create key whose session lives is answered with it
    as before, and a delete's own key still answers its retry."""
    durability_: Durability = "step" if durability == "step" else "memory"

    async def live() -> dict[str, str]:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability=durability_, warm_up=False)
        await eng.start()
        made: dict[str, str] = {}
        for name, shards, sid in (("k-plain", 1, None), ("k-id", 1, "mine"),
                                  ("k-sharded", 2, "split")):
            s = spec(shards)
            s.id = sid
            info = await eng.create(s, idem=create_key(name))
            again = await eng.create(s, idem=create_key(name))
            assert again.replayed and again.id == info.id
            made[name] = info.id
        assert not await eng.delete(made["k-plain"], idem=IdemKey("d-plain", "delete plain"))
        assert not await eng.delete("mine")
        assert not await eng.delete("split", idem=IdemKey("d-split", "delete split"))
        assert await eng.delete(made["k-plain"], idem=IdemKey("d-plain", "delete plain"))
        await retries_refused(eng, made)
        await eng.stop(snapshot=False)
        return made

    async def after_a_crash(made: dict[str, str]) -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability=durability_, warm_up=False)
        await eng.start()
        try:
            if durability == "memory":  # nothing was kept on disk: the keys make new ones
                info = await eng.create(spec(), idem=create_key("k-plain"))
                assert not info.replayed and info.id != made["k-plain"]
                return
            await retries_refused(eng, made)
            assert await eng.delete(made["k-plain"], idem=IdemKey("d-plain", "delete plain"))
        finally:
            await eng.stop()
    made = asyncio.run(live())
    asyncio.run(after_a_crash(made))


def test_a_delete_cut_before_its_tombstone_was_logged_keeps_both_keys(tmp_path: Path) -> None:
    """A crash after the delete's commit point (the rename) and before its tombstone lines
    reached the log: the next start logs both, the delete's key and the create's."""
    lines = [{"tenant": "t", "key": "d1", "fingerprint": "DELETE", "id": "x"},
             {"tenant": "t", "key": "c1", "fingerprint": "POST", "id": "x", "kind": "create"}]
    trash = tmp_path / "sessions" / ".deleted-t~x-1-2"
    trash.mkdir(parents=True)
    (trash / TOMBSTONE).write_text("\n".join(json.dumps(line) for line in lines))
    st = Store(tmp_path)
    st.open()
    try:
        assert st.tombstones(10) == lines
        assert not trash.exists()
        st.write_snapshot("t~y", b"snap")
        st.delete("t~y", [{**lines[0], "id": "y"}, {**lines[1], "key": "c2", "id": "y"}])
        assert [(t["key"], t["id"]) for t in st.tombstones(10)] == [
            ("d1", "x"), ("c1", "x"), ("d1", "y"), ("c2", "y")]
    finally:
        st.close()


def test_the_deleted_creates_kept_are_bounded(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from app.engine.deleted_creates import DeletedCreates
    kept = DeletedCreates(keep=3)
    for i in range(5):
        kept.note("t", f"k{i}", "fp", f"s{i}")
    assert len(kept) == 3
    kept.check("t", IdemKey("k1", "fp"))  # forgotten: the create runs
    with pytest.raises(Conflict) as err:
        kept.check("t", IdemKey("k2", "fp"))
    refused(err.value, "k2", "s2")
    kept.check("u", IdemKey("k2", "fp"))  # per tenant

    on_disk = Directory(tmp_path / "dir")
    for i in range(5):
        on_disk.note_created("t", f"k{i}", "fp", f"t~s{i}")
        on_disk.forget_created("t", f"k{i}", f"t~s{i}")
        mark = tmp_path / "dir" / ".deleted-creates" / directory.create_name("t", f"k{i}")
        os.utime(mark, (1000.0 + i, 1000.0 + i))  # (marked a second apart)
    assert on_disk.created("t", "k0") == {"key": "t~s0", "fingerprint": "fp", "deleted": True}
    on_disk.prune_deleted(keep=2)  # (every 100 marks, KEEP of them)
    assert len(os.listdir(tmp_path / "dir" / ".deleted-creates")) == 2
    assert on_disk.created("t", "k2") is None and on_disk.created("t", "k3") is not None

    monkeypatch.setattr(directory, "KEEP", 3)
    in_memory = Directory(None)
    for i in range(5):
        in_memory.note_created("t", f"k{i}", "fp", f"t~s{i}")
        in_memory.forget_created("t", f"k{i}", f"t~s{i}")
    assert in_memory.created("t", "k1") is None
    assert in_memory.created("t", "k2") == {"key": "t~s2", "fingerprint": "fp",
                                            "deleted": True}


def test_the_deleted_creates_on_disk_stay_bounded_across_restarts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fronts that each delete fewer sessions than a prune waits for (a restart, a short-lived
    front) still keep at most KEEP marks: a directory opened on a folder holding more prunes it."""
    monkeypatch.setattr(directory, "KEEP", 3)
    for i in range(8):  # eight fronts, one delete each
        front = Directory(tmp_path / "dir")
        front.note_created("t", f"k{i}", "fp", f"t~s{i}")
        front.forget_created("t", f"k{i}", f"t~s{i}")
        mark = tmp_path / "dir" / ".deleted-creates" / directory.create_name("t", f"k{i}")
        os.utime(mark, (1000.0 + i, 1000.0 + i))  # (marked a second apart)
        assert len(os.listdir(tmp_path / "dir" / ".deleted-creates")) <= 3 + 1
    Directory(tmp_path / "dir")
    assert len(os.listdir(tmp_path / "dir" / ".deleted-creates")) == 3
    kept = Directory(tmp_path / "dir")
    assert kept.created("t", "k4") is None  # the oldest went
    assert kept.created("t", "k7") == {"key": "t~s7", "fingerprint": "fp", "deleted": True}


class Crash(Exception):
    """Where a ``kill -9`` stops the delete: nothing after it runs, nothing more is written."""


@pytest.mark.parametrize("at", ["before-the-shards", "between-the-shards", "after-the-shards"])
def test_a_sharded_delete_cut_anywhere_leaves_the_session_or_its_key_marked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str) -> None:
    """A keyed create of a sharded session, a step, then a delete that a crash cuts: before any
    shard's files go, between the two shards, or after both (before its directory entry goes).
    After a restart on the same directory the session is whole (a retried create is answered
    with it, its parameters are torch's after the step, and a retried delete deletes it), or
    the create key is marked: its retry is a 409 ``session_deleted``, never a second session."""
    g = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    ckey, dkey = create_key("k-cut"), IdemKey("d-cut", "delete cut")

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def cut() -> list[str]:
        eng = make()
        await eng.start()
        s = spec(2)
        s.id = "cut"
        await eng.create(s, idem=ckey)
        await eng.step("cut", g, return_params=False)
        deleted = 0
        real_delete = Store.delete

        def store_delete(store: Store, session_id: str, *args: object, **kw: object) -> None:
            nonlocal deleted
            if at == "before-the-shards" or (at == "between-the-shards" and deleted):
                raise Crash(session_id)
            real_delete(store, session_id, *args, **kw)  # type: ignore[arg-type]
            deleted += 1

        def remove(d: Directory, key: str) -> None:
            raise Crash(key)
        with monkeypatch.context() as m:
            m.setattr(Store, "delete", store_delete)
            m.setattr(Directory, "remove", remove)
            with pytest.raises(Crash):
                await eng.delete("cut", idem=dkey)
        assert deleted == {"before-the-shards": 0, "between-the-shards": 1,
                           "after-the-shards": 2}[at]
        await eng.stop(snapshot=False)  # (what the kill leaves)

    async def after_the_crash() -> None:
        eng = make()
        await eng.start()
        try:
            if at == "before-the-shards":  # the session is whole: the retry is answered
                again = await eng.create(spec(2), idem=ckey)
                assert again.replayed and again.id == "cut" and again.version == 1
                ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
                ref.step(g)
                assert_tensors_equal(dict((await eng.pull("cut", None)).params), ref.params,
                                     "after the step")
            else:  # a shard is gone: the delete cannot be undone, the key is marked
                with pytest.raises(Conflict) as err:
                    await eng.create(spec(2), idem=ckey)
                refused(err.value, "k-cut", "cut")
            # a shard is left: the delete's retry ends it; else it is answered
            assert await eng.delete("cut", idem=dkey) == (at == "after-the-shards")
            with pytest.raises(Conflict) as err:
                await eng.create(spec(2), idem=ckey)
            refused(err.value, "k-cut", "cut")
            assert await eng.list_sessions() == []
            assert list((tmp_path / "sessions").iterdir()) == []
        finally:
            await eng.stop()
    asyncio.run(cut())
    asyncio.run(after_the_crash())


def test_a_damaged_sessions_delete_keeps_its_create_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step fails half-way and the session's files no longer load, so it cannot be rebuilt:
    it is out of service (503 ``session_damaged``) until deleted. Its delete keeps the create's
    key all the same (a damaged session keeps its create key in memory), live and after a
    restart: the create's retry is a 409 ``session_deleted``."""
    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def live() -> str:
        eng = make()
        await eng.start()
        info = await eng.create(spec(), idem=create_key("k-damaged"))
        wal = tmp_path / "sessions" / f"default~{info.id}" / "wal.bin"
        wal.write_bytes(b"\0" * 64 + wal.read_bytes())  # (a log that no longer loads)
        real = torch.optim.SGD.step

        def half_way(self: torch.optim.Optimizer, closure: Any = None) -> Any:
            real(self, closure)  # the parameters change, then it fails
            raise RuntimeError("simulated: out of memory")
        with monkeypatch.context() as m:
            m.setattr(torch.optim.SGD, "step", half_way)
            with pytest.raises(OptserveError) as failed:
                await eng.step(info.id, {"a": torch.ones(2), "b": torch.ones(3)},
                               return_params=False)
        assert failed.value.code == "session_damaged", failed.value
        assert not await eng.delete(info.id)
        with pytest.raises(Conflict) as err:
            await eng.create(spec(), idem=create_key("k-damaged"))
        refused(err.value, "k-damaged", info.id)
        await eng.stop(snapshot=False)
        return info.id

    async def restarted(sid: str) -> None:
        eng = make()
        await eng.start()
        try:
            with pytest.raises(Conflict) as err:
                await eng.create(spec(), idem=create_key("k-damaged"))
            refused(err.value, "k-damaged", sid)
            assert await eng.list_sessions() == [] and await eng.refused() == {}
        finally:
            await eng.stop()
    asyncio.run(restarted(asyncio.run(live())))


def test_a_create_retried_while_its_session_is_refused_is_not_made_again(
        tmp_path: Path) -> None:
    """Keyed creates without an id whose sessions are refused at the next start (their files
    are damaged): the retry made a second session. The key is read from the files' JSON
    headers (the snapshot's meta when there is a snapshot, its checksum failing or not; else
    the log's first record, the create, when it is whole), and the retry is a 409
    ``session_exists`` naming the key and the refused session; another request under the key
    is a 422. A session whose files tell nothing (a snapshot cut inside its header) is
    refused as before and the retry makes a new session, the files left untouched."""
    g = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def made(names: list[str], snapshot: bool) -> dict[str, str]:
        eng = make()
        await eng.start()
        ids = {}
        for name in names:
            info = await eng.create(spec(), idem=create_key(name))
            await eng.step(info.id, g, return_params=False)
            await eng.step(info.id, g, return_params=False)
            ids[name] = info.id
        await eng.stop(snapshot=snapshot)
        return ids

    ids = asyncio.run(made(["k-snap", "k-cut"], snapshot=True))
    ids.update(asyncio.run(made(["k-log"], snapshot=False)))

    def files(name: str) -> Path:
        return tmp_path / "sessions" / f"default~{ids[name]}"
    snap = files("k-snap") / "snapshot.bin"
    raw = bytearray(snap.read_bytes())
    raw[-5] ^= 0x10  # (in its tensors: the checksum fails)
    snap.write_bytes(raw)
    (files("k-cut") / "snapshot.bin").write_bytes(
        (files("k-cut") / "snapshot.bin").read_bytes()[:40])
    wal = files("k-log") / "wal.bin"
    raw = bytearray(wal.read_bytes())
    raw[len(frame_record(read_log(wal)[0][0])) + 30] ^= 0x10  # (the first step's record:
    #                                                 a valid one follows, not a torn tail)
    wal.write_bytes(raw)
    before = {p: p.read_bytes() for p in (tmp_path / "sessions").rglob("*.bin")}

    async def restarted() -> None:
        eng = make()
        await eng.start()
        try:
            assert set(await eng.refused()) == set(ids.values())
            for name in ("k-snap", "k-log"):
                with pytest.raises(Conflict) as err:
                    await eng.create(spec(), idem=create_key(name))
                e = err.value
                assert (e.status, e.code, e.field) == (409, "session_exists", "Idempotency-Key")
                assert e.extra == {"idempotency_key": name, "session_id": ids[name]}, e.extra
                with pytest.raises(Invalid) as bad:
                    await eng.create(spec(), idem=IdemKey(name, "another request"))
                assert bad.value.code == "idempotency_key_reused"
            assert await eng.list_sessions() == []
            fresh = await eng.create(spec(), idem=create_key("k-cut"))
            assert not fresh.replayed and fresh.id != ids["k-cut"]
        finally:
            await eng.stop()
    asyncio.run(restarted())
    assert all(p.read_bytes() == content for p, content in before.items())


@pytest.mark.parametrize("shards", [1, 2])
def test_a_refused_deletes_create_key_outlives_the_keys_pruned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A keyed create without an id whose delete is refused (the disk fails before any file
    goes): the session lives on. More deleted creates than are kept (2 here, 10,000 in
    service) come after it: a plain session's key is its own (kept with it, never among the
    deleted ones); a sharded one's was marked deleted in the directory before its shards were
    asked, and that mark is kept while the session lives. Either way the create's retry is
    answered with the session, live and after a restart, never a second session."""
    from app.engine import host as host_module
    monkeypatch.setattr(host_module, "_TOMBSTONES", 2)
    monkeypatch.setattr(directory, "KEEP", 2)
    monkeypatch.setattr(directory, "_PRUNE_EVERY", 1)
    g = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
    ckey = create_key("k-live")

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def answered(eng: Front, sid: str) -> None:
        again = await eng.create(spec(shards), idem=ckey)
        assert again.replayed and again.id == sid, again
        assert [i.id for i in await eng.list_sessions()] == [sid]
        await eng.step(sid, g, return_params=False)
        ref.step(g)
        assert_tensors_equal(dict((await eng.pull(sid, None)).params), ref.params, "stepped")

    async def live() -> str:
        eng = make()
        await eng.start()
        info = await eng.create(spec(shards), idem=ckey)

        def refuse(store: Store, key: str, *args: object, **kw: object) -> None:
            raise OSError(28, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr(Store, "delete", refuse)
            with pytest.raises(Exception):  # noqa: B017, PT011 - the disk's refusal
                await eng.delete(info.id, idem=IdemKey("d-live", "delete live"))
        if shards > 1:
            mark = tmp_path / "directory" / ".deleted-creates" / \
                directory.create_name("default", "k-live")
            os.utime(mark, (1000.0, 1000.0))  # (the oldest mark)
        for i in range(3):
            other = await eng.create(spec(shards), idem=create_key(f"k-{i}"))
            assert not await eng.delete(other.id)
        with pytest.raises(Conflict) as gone:
            await eng.create(spec(shards), idem=create_key("k-2"))
        refused(gone.value, "k-2", other.id)
        await answered(eng, info.id)
        await eng.stop(snapshot=False)
        return info.id

    async def restarted(sid: str) -> None:
        eng = make()
        await eng.start()
        try:
            await answered(eng, sid)
        finally:
            await eng.stop()
    asyncio.run(restarted(asyncio.run(live())))



def test_the_tombstone_log_stays_bounded_while_the_server_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every keyed create and keyed delete of a session (the SDK keys each) appends a line to
    the tombstone log. It was cut to the lines kept only at a start, so a server that ran
    long with sessions made and deleted grew it without bound (and its next start read all of
    it at once). It stays within twice the lines kept (3 keys a side here) while the server
    runs, and the keys kept still answer: the last creates' retries are refused, live and
    after a restart, the last deletes' retries answered as done."""
    from app.engine import host as host_module
    monkeypatch.setattr(host_module, "_TOMBSTONES", 3)
    log = tmp_path / "tombstones.jsonl"

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def kept(eng: Front, made: dict[str, str]) -> None:
        for name, sid in list(made.items())[-3:]:
            with pytest.raises(Conflict) as err:
                await eng.create(spec(), idem=create_key(name))
            refused(err.value, name, sid)
            assert await eng.delete(sid, idem=IdemKey(f"d-{name}", f"delete {sid}"))
        assert await eng.list_sessions() == []

    async def live() -> dict[str, str]:
        eng = make()
        await eng.start()
        made: dict[str, str] = {}
        try:
            for i in range(40):
                info = await eng.create(spec(), idem=create_key(f"k-{i}"))
                made[f"k-{i}"] = info.id
                assert not await eng.delete(info.id, idem=IdemKey(f"d-k-{i}",
                                                                  f"delete {info.id}"))
                # (and the deleted sessions' last versions: 3 kept, cut past twice as many)
                assert len(log.read_bytes().splitlines()) <= 4 * 3 + 2 * 3, i
            await kept(eng, made)
        finally:
            await eng.stop()
        return made

    async def restarted(made: dict[str, str]) -> None:
        eng = make()
        await eng.start()
        try:
            await kept(eng, made)
        finally:
            await eng.stop()
    asyncio.run(restarted(asyncio.run(live())))
