"""A sharded session after a restart that found it less than whole: one shard refused at start
(its files damaged), or a keyed create cut by a crash before its ``.creates`` index was written
(every shard made, or only some). The kill -9 is what the files say: the engine stopped with
no snapshot, the state on disk made as the crash leaves it."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from app.engine import Front, embedded_engine
from app.engine.directory import Directory
from app.engine.front import Limits
from app.engine.interface import CreateSpec, GroupSpec, IdemKey
from app.errors import Conflict, Invalid, NotFound, TooMany
from tests.stored_files import stored_files as files
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import refused

PARAMS = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([1.0, 2.0])}
GRAD = {"a": torch.tensor([0.25, 1.0, -0.5]), "b": torch.tensor([-1.0, 0.5])}


def spec(sid: str | None) -> CreateSpec:
    return CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in PARAMS.items()})],
                      {"lr": 0.1}, id=sid, shards=2)


def engine(tmp_path: Path) -> Front:
    return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)


def stepped(steps: int) -> dict[str, torch.Tensor]:
    ref = Reference(torch.optim.Adam, [(PARAMS, {})], {"lr": 0.1})
    for _ in range(steps):
        ref.step(GRAD)
    return ref.params


def on_other_shard_only(tmp_path: Path, behind: int,
                        op: Callable[[Front], Awaitable[object]]) -> None:
    """The files a crash leaves when ``op`` (on a started engine, which then stops without a
    snapshot) reached every shard of session ``c`` but ``behind``: that shard's files are put
    back as they were before it."""
    shard = tmp_path / "sessions" / f"default#c~shard{behind}of2"
    saved = tmp_path.parent / f"{tmp_path.name}-saved"
    shutil.copytree(shard, saved)

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await op(eng)
        await eng.stop(snapshot=False)
    asyncio.run(run())
    shutil.rmtree(shard)
    shutil.copytree(saved, shard)


def test_a_sharded_session_with_a_refused_shard_is_kept_whole(tmp_path: Path) -> None:
    """Shard 1's snapshot fails its checksum at start: the session is refused (``/readyz``
    names it). Its keyed create's retry was a 404 (the retry found the session's index entry,
    then its refused shard); it is a 409 ``session_exists`` naming the key and the session, as
    for an unsharded session refused at start, and another request under the key is a 422.
    Its delete deleted shard 0's files and its directory entry, and left shard 1's to come
    back at every start, refused; it is a 404 as the unsharded one's is, and nothing is
    deleted: every file is as it was, through another restart, and the id stays taken."""
    key = IdemKey("k-refused", "create refused")

    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec("r"), idem=key)
        await eng.step("r", GRAD, return_params=False)
        await eng.stop(snapshot=True)

    asyncio.run(made())
    snap = tmp_path / "sessions" / "default#r~shard1of2" / "snapshot.bin"
    raw = bytearray(snap.read_bytes())
    raw[-5] ^= 0x10  # (in its tensors: the checksum fails)
    snap.write_bytes(raw)
    before = files(tmp_path)

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert set(await eng.refused()) == {"r"}
            with pytest.raises(Conflict) as err:
                await eng.create(spec("r"), idem=key)
            e = err.value
            assert (e.status, e.code, e.field) == (409, "session_exists", "Idempotency-Key")
            assert e.extra == {"idempotency_key": "k-refused", "session_id": "r"}, e.extra
            with pytest.raises(Invalid) as bad:
                await eng.create(spec("other"), idem=IdemKey("k-refused", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            for idem in (None, IdemKey("d-refused", "delete r")):
                with pytest.raises(NotFound) as gone:
                    await eng.delete("r", idem=idem)
                assert gone.value.status == 404 and gone.value.code == "session_not_found"
                assert "'r'" in gone.value.detail and "refused at start" in gone.value.detail
            # reads name the session (not its shard's key) and say why, as the delete does
            for read in (eng.describe("r"), eng.pull("r", None), eng.export_state("r"),
                         eng.step("r", GRAD, return_params=False)):
                with pytest.raises(NotFound) as missing:
                    await read
                assert missing.value.code == "session_not_found"
                assert missing.value.detail == (
                    "no session 'r': it was refused at start (its shard 1's files are damaged; "
                    "GET /readyz lists it)"), missing.value.detail
            with pytest.raises(Conflict) as taken:
                await eng.create(spec("r"))
            assert taken.value.code == "session_exists"
            assert await eng.list_sessions() == []
        finally:
            await eng.stop()

    asyncio.run(restarted())
    assert files(tmp_path) == before
    asyncio.run(restarted())
    assert files(tmp_path) == before


class Crash(Exception):
    """Where a ``kill -9`` stops the create: nothing after it runs, nothing more is written."""


async def create_cut_before_its_index(eng: Front, made: CreateSpec, key: IdemKey,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``eng.create`` of ``made`` under ``key``, cut (:class:`Crash`) where its ``.creates``
    index would be written, then the engine stopped as a ``kill -9`` leaves it."""
    def note_created(d: Directory, *args: object) -> None:
        raise Crash(args)
    with monkeypatch.context() as m:
        m.setattr(Directory, "note_created", note_created)
        with pytest.raises(Crash):
            await eng.create(made, idem=key)
    await eng.stop(snapshot=False)


@pytest.mark.parametrize(("shards_made", "sid"), [(2, "c"), (2, None), (1, None)])
def test_a_sharded_create_cut_before_its_index_is_answered_or_finished_by_its_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards_made: int,
        sid: str | None) -> None:
    """A keyed create of a sharded session cut by a crash after its directory entry was
    claimed but before its ``.creates`` index was written: with every shard made (with an id
    and without), or only shard 0 (shard 1's create never reached its disk). Its retry (same
    key, same request) was a 409 ``session_exists``, or with no id made a second session. With
    every shard there, each made under the retry's key, the retry is answered with the session
    (``replayed``) and the index is written; with a shard missing (never acknowledged, nothing
    could run on it) the retry finishes the create: the missing shard is made, and it is
    answered as created. Either way one session, which steps as torch does; a later retry,
    also after a restart, is answered with it; another request under the key is a 422."""
    key = IdemKey("k-cut", "create cut")

    async def cut() -> None:
        eng = engine(tmp_path)
        await eng.start()

        await create_cut_before_its_index(eng, spec(sid), key, monkeypatch)

    asyncio.run(cut())
    [entry] = [p.name for p in (tmp_path / "directory").iterdir() if not p.name.startswith(".")]
    made_id = entry.partition("~")[2]
    assert sid is None or made_id == sid
    if shards_made == 1:
        shutil.rmtree(tmp_path / "sessions" / f"default#{made_id}~shard1of2")
    assert not list((tmp_path / "directory" / ".creates").iterdir())

    async def retried() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            if shards_made == 1:  # its reads name the session, not its missing shard
                with pytest.raises(NotFound) as gone:
                    await eng.describe(made_id)
                assert gone.value.code == "session_not_found"
                assert gone.value.detail.startswith(f"no session {made_id!r}: its shard 1 of 2 "
                                                    "is missing"), gone.value.detail
                assert "Idempotency-Key" in gone.value.detail
            with pytest.raises(Invalid) as bad:
                await eng.create(spec(sid), idem=IdemKey("k-cut", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            info = await eng.create(spec(sid), idem=key)
            assert info.id == made_id and info.version == 0
            assert info.replayed == (shards_made == 2)
            again = await eng.create(spec(sid), idem=key)
            assert again.replayed and again.id == made_id
            out = await eng.step(made_id, GRAD, return_params=True)
            assert out.params is not None
            assert_tensors_equal(dict(out.params), stepped(1), "after the retried create")
            assert [s.id for s in await eng.list_sessions()] == [made_id]
        finally:
            await eng.stop(snapshot=False)

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            info = await eng.create(spec(sid), idem=key)
            assert info.replayed and info.id == made_id and info.version == 1
            with pytest.raises(Invalid) as bad:
                await eng.create(spec(sid), idem=IdemKey("k-cut", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            assert [s.id for s in await eng.list_sessions()] == [made_id]
            assert_tensors_equal(dict((await eng.pull(made_id, None)).params), stepped(1),
                                 "after the restart")
        finally:
            await eng.stop()

    asyncio.run(retried())
    asyncio.run(restarted())


@pytest.mark.parametrize("shards_made", [2, 1])
def test_a_sharded_create_cut_before_its_index_then_deleted_is_not_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards_made: int) -> None:
    """A keyed create (no id) of a sharded session cut by a crash before its ``.creates``
    index was written (every shard made, or only shard 0), then deleted after the restart
    before any retry. The retry made a new session (the router forgot the cut create once its
    session was gone); it is a 409 ``session_deleted`` naming the key and the session, as for
    any deleted keyed create, also after another restart; another request under the key is a
    422. Nothing is left: no session, no directory entry."""
    key = IdemKey("k-gone", "create gone")

    async def cut() -> None:
        eng = engine(tmp_path)
        await eng.start()

        await create_cut_before_its_index(eng, spec(None), key, monkeypatch)

    asyncio.run(cut())
    [entry] = [p.name for p in (tmp_path / "directory").iterdir() if not p.name.startswith(".")]
    made_id = entry.partition("~")[2]
    if shards_made == 1:
        shutil.rmtree(tmp_path / "sessions" / f"default#{made_id}~shard1of2")

    async def retried(delete: bool) -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            if delete:
                assert not await eng.delete(made_id)
            with pytest.raises(Conflict) as err:
                await eng.create(spec(None), idem=key)
            refused(err.value, "k-gone", made_id)
            with pytest.raises(Invalid) as bad:
                await eng.create(spec(None), idem=IdemKey("k-gone", "another request"))
            assert bad.value.code == "idempotency_key_reused"
            assert await eng.list_sessions() == []
            assert [p for p in (tmp_path / "directory").iterdir()
                    if not p.name.startswith(".")] == []
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(retried(delete=True))
    asyncio.run(retried(delete=False))


def test_a_sharded_create_cut_part_way_is_finished_by_its_retry_at_the_session_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OPTSERVE_MAX_SESSIONS=2``, one plain session, and a keyed create (no id) of a sharded
    session cut by a crash once shard 0 was made (its entry claimed, counted toward the
    limit). Its retry was a 429 ``too_many_sessions``: the limit was checked before the
    router, counting the cut create's own entry. It finishes the create, as below the limit;
    the session steps as torch, and the tenant's next new create is the 429 naming ``id``."""
    key = IdemKey("k-limit", "create at the limit")

    def limited() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False,
                               limits=Limits(max_sessions=2))

    async def cut() -> None:
        eng = limited()
        await eng.start()
        plain = spec("plain")
        plain.shards = 1
        await eng.create(plain)

        await create_cut_before_its_index(eng, spec(None), key, monkeypatch)

    asyncio.run(cut())
    [entry] = [p.name for p in (tmp_path / "directory").iterdir() if not p.name.startswith(".")]
    made_id = entry.partition("~")[2]
    shutil.rmtree(tmp_path / "sessions" / f"default#{made_id}~shard1of2")

    async def retried() -> None:
        eng = limited()
        await eng.start()
        try:
            info = await eng.create(spec(None), idem=key)
            assert info.id == made_id and info.version == 0 and not info.replayed
            out = await eng.step(made_id, GRAD, return_params=True)
            assert out.params is not None
            assert_tensors_equal(dict(out.params), stepped(1), "after the retried create")
            with pytest.raises(TooMany) as err:
                await eng.create(spec("another"))
            e = err.value
            assert (e.status, e.code, e.field, e.extra) == \
                (429, "too_many_sessions", "id", {"limit": 2}), e
            assert sorted(s.id for s in await eng.list_sessions()) == sorted(["plain", made_id])
        finally:
            await eng.stop()
    asyncio.run(retried())


def test_a_create_of_a_sharded_id_in_flight_is_a_409_and_leaves_its_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded create with an id still making its shards while a second create of the id
    arrives. The second took the entry for a create cut short (no shard there yet), dropped
    it and made its session; the first then failed on its shard and removed the second's
    entry: a session without its entry, lost at the next start. The second is a 409
    ``session_exists`` naming ``id``; the first is made, keeps its entry, steps as torch, and
    is there after a restart."""
    from app.engine.shards import ShardedSession
    real = ShardedSession.create
    entered, go = asyncio.Event(), asyncio.Event()

    async def gated(*args: object, **kw: object) -> object:
        if not entered.is_set():
            entered.set()
            await go.wait()
        return await real(*args, **kw)  # type: ignore[arg-type]

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            with monkeypatch.context() as m:
                m.setattr(ShardedSession, "create", staticmethod(gated))
                first = asyncio.create_task(eng.create(spec("x")))
                await entered.wait()
                other = spec("x")
                other.options = {"lr": 0.5}
                with pytest.raises(Conflict) as err:
                    await eng.create(other)
                e = err.value
                assert (e.status, e.code, e.field) == (409, "session_exists", "id"), e
                go.set()
                info = await first
            assert info.id == "x" and info.lr == [0.1]
            await eng.step("x", GRAD, return_params=False)
        finally:
            await eng.stop()
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert [s.id for s in await eng.list_sessions()] == ["x"]
            assert_tensors_equal(dict((await eng.pull("x", None)).params), stepped(1),
                                 "after the restart")
        finally:
            await eng.stop()
    asyncio.run(run())


@pytest.mark.parametrize("cut", ["torn", "empty"])
def test_an_unkeyed_sharded_create_cut_part_way_is_undone_at_start(
        tmp_path: Path, cut: str) -> None:
    """An unkeyed create of a sharded session that a crash cut once shard 0 was made and while
    shard 1's create record was being written (torn, or not yet written: an empty log), so
    never acknowledged: the start discards shard 1 (an interrupted create) and now undoes the
    rest too, shard 0's files and the directory entry, so the id is free: a 404 naming the
    session, a create of the id made whole, the list and the count without it. It was left
    half made: its reads were 404s naming ``shard1of2``, and a create of its id a 409
    ``session_exists`` for good (a delete of a session nobody had made freed it)."""

    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec("u"))
        await eng.stop(snapshot=False)

    asyncio.run(made())
    wal = tmp_path / "sessions" / "default#u~shard1of2" / "wal.bin"
    raw = wal.read_bytes()
    wal.write_bytes(raw[:len(raw) // 2] if cut == "torn" else b"")

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            with pytest.raises(NotFound) as gone:
                await eng.describe("u")
            assert "'u'" in str(gone.value), gone.value
            assert [i.id for i in await eng.list_sessions()] == []
            assert (await eng.status()).sessions == 0
            info = await eng.create(spec("u"))
            # (shard 0, undone, was deleted at version 0: app.engine.last_versions)
            assert (info.id, info.version) == ("u", 1)
            await eng.step("u", GRAD, return_params=False)
            assert_tensors_equal(dict((await eng.pull("u", None)).params), stepped(1), "u")
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(restarted())
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == [
        "default#u~shard0of2", "default#u~shard1of2"]


@pytest.mark.parametrize("behind", [0, 1])
@pytest.mark.parametrize("keyed", [False, True])
def test_a_step_that_reached_some_shards_only_is_undone_at_start(
        tmp_path: Path, behind: int, keyed: bool) -> None:
    """A step of a sharded session that a crash cut between its shards' commits (the files
    as the kill leaves them: one shard's log holds it, the other's does not; never
    acknowledged) is undone at the next start: the shard that applied it is restored without
    it, and the session is whole, as before the step (torch's values after one step, not
    two), and steps on. Left apart, it answered 503 ``shards_out_of_step`` until the step's
    retry with its key, and an unkeyed step has none: out of service for good. A keyed
    step's retry is then applied once."""
    key = IdemKey("k-cut-step", "step cut") if keyed else None

    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec("c"))
        await eng.step("c", GRAD, return_params=False)
        await eng.stop(snapshot=True)

    asyncio.run(made())

    async def cut(eng: Front) -> None:
        await eng.step("c", GRAD, return_params=False, idem=key)
    on_other_shard_only(tmp_path, behind, cut)

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert (await eng.describe("c")).version == 1
            assert_tensors_equal(dict((await eng.pull("c", None)).params), stepped(1), "undone")
            out = await eng.step("c", GRAD, return_params=False, idem=key)
            assert (out.version, out.replayed) == (2, False)
            assert_tensors_equal(dict((await eng.pull("c", None)).params), stepped(2), "on")
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(restarted())


@pytest.mark.parametrize("behind", [0, 1])
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("kind", ["push", "zero_grad"])
def test_a_push_or_zero_grad_that_reached_some_shards_only_is_undone_at_start(
        tmp_path: Path, behind: int, keyed: bool, kind: str) -> None:
    """A push into the accumulator, or a ``zero_grad``, of a sharded session that a crash cut
    between its shards' commits (the files as the kill leaves them: one shard's log holds it,
    the other's not; never acknowledged). Neither moves the version or the revision, so the
    shards looked whole: the session was served half pushed (the next step took one shard's
    part of the push) or half cleared. It is undone at the next start: the accumulator is
    whole as before it, a step then takes exactly that (torch's values), and a keyed one's
    retry is applied once."""
    key = IdemKey(f"k-cut-{kind}", f"{kind} cut") if keyed else None
    names = sorted(PARAMS)

    async def cut_op(eng: Front) -> None:
        if kind == "push":
            await eng.push("c", GRAD, idem=key)
        else:
            await eng.zero_grad("c", idem=key)

    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec("c"))
        if kind == "zero_grad":
            assert (await eng.push("c", GRAD)).accumulated == names
        await eng.stop(snapshot=True)

    asyncio.run(made())
    on_other_shard_only(tmp_path, behind, cut_op)
    before = [] if kind == "push" else names  # the accumulator as the operation found it

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert (await eng.describe("c")).accumulated == before
            if keyed:  # its retry is applied, once
                await cut_op(eng)
                await cut_op(eng)
                after = names if kind == "push" else []
                assert (await eng.describe("c")).accumulated == after
            else:
                after = before
            out = await eng.step("c", GRAD if not after else {}, return_params=True)
            assert out.version == 1 and out.params is not None
            assert_tensors_equal(dict(out.params), stepped(1), "the accumulator whole")
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(restarted())


def test_a_push_answers_what_every_shard_accumulated(tmp_path: Path) -> None:
    """Pushes of a sharded session's parameters one at a time (each into one shard): each
    answer's ``accumulated`` lists every parameter pushed so far, as an unsharded session's
    does (it listed only those of the shards the push went to), and the step takes them
    all."""

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            await eng.create(spec("c"))
            pushed: list[str] = []
            for name in sorted(GRAD):
                pushed.append(name)
                assert (await eng.push("c", {name: GRAD[name]})).accumulated == pushed
            assert (await eng.describe("c")).accumulated == pushed
            out = await eng.step("c", {}, return_params=True)
            assert out.params is not None
            assert_tensors_equal(dict(out.params), stepped(1), "every push stepped")
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(run())


def test_a_push_logged_before_pushes_went_to_every_shard_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory of an older server, whose push of one shard's parameter went to that
    shard alone (its record without ``every_shard``, the other shard never told): at start
    it looks like a push that reached some shards only, but it was acknowledged, and it is
    kept: the step then takes it."""
    from app.engine.ops.gradients import Push

    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec("c"))
        await eng.stop(snapshot=True)

    asyncio.run(made())
    plain = Push.to_tree

    def as_before(self: Push) -> dict[str, object]:
        return {k: v for k, v in plain(self).items() if k != "every_shard"}

    async def pushed(eng: Front) -> None:
        with monkeypatch.context() as m:
            m.setattr(Push, "to_tree", as_before)
            assert (await eng.push("c", {"a": GRAD["a"]})).accumulated == ["a"]
    on_other_shard_only(tmp_path, 1, pushed)  # (the push went to shard 0 alone, as it then did)

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert (await eng.describe("c")).accumulated == ["a"]
            out = await eng.step("c", {}, return_params=True)
            assert out.params is not None
            ref = Reference(torch.optim.Adam, [(PARAMS, {})], {"lr": 0.1})
            ref.step({"a": GRAD["a"]})
            assert_tensors_equal(dict(out.params), ref.params, "the push kept")
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(restarted())
