"""The directory's removal of one creation's entry (:meth:`Directory.remove_made`) against a
claim of the same id between its read and its unlink, and the key's lock it holds for that,
across threads and processes (the fronts of a cluster share the folder): let go when its
holder is killed (``kill -9``), its files never left to pile up. The interleaving is forced:
the remover's read of the entry (``Directory.get``) waits there until the others are done, or
a short while when they wait for it. The same for a failed keyed create's index
(:meth:`Directory.drop_created`) against another front's retry of the create claiming it
again, and for its move by a delete (:meth:`Directory.forget_created`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.engine import directory
from app.engine.directory import Directory, create_name

KEY = "default~x"
OLD, NEW = {"host": "h-1", "made": "m-old"}, {"host": "h-2", "made": "m-new"}


def test_remove_made_leaves_an_entry_claimed_between_its_read_and_its_unlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fronts drop one creation's entry at once; the second's drop and a new claim of the
    id land while the first is between its read of the entry and its unlink (it waits there
    until they are done, or 0.3 s when they wait for it). Before, the first unlinked the new
    creation's entry: the session made under it had no entry (lost at the next start, its id
    free for a second create). The new entry stays; the first drop is the one that removed
    the old entry, the second finds it gone."""
    directory = Directory(tmp_path)
    assert directory.claim(KEY, OLD)
    real_get, read, done = Directory.get, threading.Event(), threading.Event()

    def get_then_pause(d: Directory, key: str) -> dict[str, Any] | None:
        entry = real_get(d, key)
        if threading.current_thread().name == "first":
            read.set()
            done.wait(0.3)
        return entry
    monkeypatch.setattr(Directory, "get", get_then_pause)
    results: dict[str, bool] = {}

    def first() -> None:
        results["first"] = directory.remove_made(KEY, "m-old")
    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert read.wait(5.0)
    results["second"] = directory.remove_made(KEY, "m-old")
    results["claimed"] = directory.claim(KEY, NEW)
    done.set()
    thread.join(5.0)
    assert not thread.is_alive()
    assert real_get(directory, KEY) == NEW
    assert results == {"first": True, "second": False, "claimed": True}
    assert os.listdir(tmp_path / ".locks") == []


CHILD = """
import sys, time
from pathlib import Path
from app.engine import directory
from app.engine.directory import Directory

root, key, made, go = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
wait_s = float(sys.argv[5])
real_get = Directory.get

def get_then_pause(d, k):
    entry = real_get(d, k)
    (root.parent / "read").write_text("1")
    until = time.monotonic() + wait_s
    while not go.exists() and time.monotonic() < until:
        time.sleep(0.01)
    return entry

Directory.get = get_then_pause
print(Directory(root).remove_made(key, made), flush=True)
"""


def remover(root: Path, wait_s: float) -> subprocess.Popen[str]:
    """Another front (a process) removing the old creation's entry, paused after its read
    until ``go`` exists, for at most ``wait_s``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(root), KEY, "m-old",
         str(root.parent / "go"), str(wait_s)], env=env, stdout=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    until = time.monotonic() + 30.0
    while not path.exists():
        assert proc.poll() is None, "the remover ended before its read"
        assert time.monotonic() < until, "the remover never read the entry"
        time.sleep(0.01)


def test_a_key_lock_holds_across_processes_until_its_holder_is_killed(tmp_path: Path) -> None:
    """Another front (a process) removing the old creation's entry is killed (``kill -9``)
    between its read and its unlink, holding the key's lock. This process's drop of that
    creation and a claim of the id wait while it lives (they would land between its read and
    its unlink: before, they did not wait, and its unlink would remove the entry just claimed,
    as above), and are made once the kernel let its lock go; the lock file it left is
    removed."""
    root = tmp_path / "directory"
    directory = Directory(root)
    assert directory.claim(KEY, OLD)
    proc = remover(root, 3600.0)
    results: list[bool] = []

    def drop_and_claim() -> None:
        results.append(directory.remove_made(KEY, "m-old"))
        results.append(directory.claim(KEY, NEW))
    try:
        wait_for(tmp_path / "read", proc)
        thread = threading.Thread(target=drop_and_claim)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and results == [], "the drop and claim did not wait"
        assert directory.get(KEY) == OLD
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30.0)
        thread.join(10.0)
        assert not thread.is_alive()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert results == [True, True] and directory.get(KEY) == NEW
    assert os.listdir(root / ".locks") == []


def test_lock_files_left_by_dead_processes_are_swept_at_start(tmp_path: Path) -> None:
    """A lock file nobody holds (its process died holding it, and no lock of its key was
    taken since) goes when a directory is opened on the folder (a front's start); one held
    (by another process: here another open file) stays to its holder."""
    import fcntl
    root = tmp_path / "directory"
    Directory(root)
    (root / ".locks" / "default~dead").write_bytes(b"")
    held = os.open(root / ".locks" / "default~held", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        Directory(root)
        assert os.listdir(root / ".locks") == ["default~held"]
    finally:
        os.close(held)
    Directory(root)
    assert os.listdir(root / ".locks") == []


def test_an_embedded_delete_leaves_the_entry_of_its_sharded_id_made_again_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded engine keeps a sharded session's layout in the directory. A delete of
    sharded session ``x`` is held once its shards are deleted, before its entry goes;
    meanwhile a create of ``x`` (2 shards, another lr) finds the entry stale, drops it and
    makes its session. The delete then ends: the new session keeps its entry and its place
    (before, the delete removed both: ``x`` stepped as a plain session that was not there, and
    was lost at the next start). It steps as torch, and again after a restart."""
    import asyncio

    import torch

    from app.engine import Front, embedded_engine
    from app.engine.shards import ShardedSession
    from tests.torch_reference import Reference, assert_tensors_equal
    from tests.unit.test_deleted_creates import spec

    grads = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    other = spec(2, lr=0.5, id="x")
    ref = Reference(torch.optim.SGD, [(dict(g.params), g.options) for g in other.groups],
                    other.options)

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def steps_as_torch(eng: Front) -> None:
        await eng.step("x", grads, return_params=False)
        ref.step(grads)
        assert_tensors_equal(dict((await eng.pull("x", None)).params), ref.params, "x")

    async def run() -> None:
        eng = make()
        await eng.start()
        s = spec(2, id="x")
        await eng.create(s)
        deleted, go = asyncio.Event(), asyncio.Event()
        real = ShardedSession.delete

        async def delete_then_wait(session: ShardedSession, key: str, **kw: Any) -> bool:
            replayed = await real(session, key, **kw)
            deleted.set()
            await go.wait()
            return replayed
        monkeypatch.setattr(ShardedSession, "delete", delete_then_wait)
        deleting = asyncio.ensure_future(eng.delete("x"))
        await deleted.wait()
        await eng.create(other)
        go.set()
        await deleting
        assert Directory(tmp_path / "directory").keys() == ["default~x"]
        await steps_as_torch(eng)
        await eng.stop(snapshot=False)
        eng = make()
        await eng.start()
        try:
            await steps_as_torch(eng)
        finally:
            await eng.stop()
    asyncio.run(run())


def test_two_embedded_creates_over_a_stale_entry_make_one_sharded_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry of a sharded session ``x`` none of whose shards exists (stale); two creates of
    ``x`` at once both find it stale, the second's look at the host held until the first
    create is done (the embedded host answers at once; a host that yields there is the
    interleaving forced).
    One makes the session; the other is a 409 ``session_exists`` and leaves its entry (before,
    it removed the first's entry as stale: the session made had none, lost at the next
    start). It steps as torch, and again after a restart."""
    import asyncio

    import torch

    from app.engine import Front, embedded_engine
    from app.engine.router import InProcessHost
    from app.engine.shards import plan_layout
    from app.errors import Conflict
    from tests.torch_reference import Reference, assert_tensors_equal
    from tests.unit.test_deleted_creates import spec

    grads = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    specs = [spec(2, lr=lr, id="x") for lr in (0.5, 0.25)]

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)

    async def run() -> None:
        eng = make()
        await eng.start()
        layout = plan_layout(specs[0].groups, 2).to_json()
        assert Directory(tmp_path / "directory").claim(
            KEY, {"layout": layout, "shards": ["local"] * 2, "created_by": None,
                  "made": "m-stale"})
        first_done, second_in, looks = asyncio.Event(), asyncio.Event(), 0
        real = InProcessHost.refused

        async def looks_meet(host: InProcessHost) -> dict[str, str]:
            # (a stale check's look at the host: the first waits for the second to be there,
            # the second for the first create to be done)
            nonlocal looks
            if sys._getframe(1).f_code.co_name == "_stale":
                looks += 1
                if looks == 1:
                    await asyncio.wait_for(second_in.wait(), 10.0)
                elif looks == 2:
                    second_in.set()
                    await first_done.wait()
            return await real(host)
        monkeypatch.setattr(InProcessHost, "refused", looks_meet)
        tasks = [asyncio.ensure_future(eng.create(s)) for s in specs]
        for t in tasks:
            t.add_done_callback(lambda _: first_done.set())
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        monkeypatch.undo()
        made = [i for i, o in enumerate(outs) if not isinstance(o, BaseException)]
        assert len(made) == 1, outs
        lost = outs[1 - made[0]]
        assert isinstance(lost, Conflict) and lost.code == "session_exists", lost
        entry = Directory(tmp_path / "directory").get(KEY)
        assert entry is not None and entry.get("made") != "m-stale", entry
        s = specs[made[0]]
        ref = Reference(torch.optim.SGD, [(dict(g.params), g.options) for g in s.groups],
                        s.options)
        for restart in (False, True):
            if restart:
                await eng.stop(snapshot=False)
                eng = make()
                await eng.start()
            await eng.step("x", grads, return_params=False)
            ref.step(grads)
            assert_tensors_equal(dict((await eng.pull("x", None)).params), ref.params, "x")
        await eng.stop()
    asyncio.run(run())


TENANT, IDEM = "default", "k-1"


def test_drop_created_leaves_an_index_claimed_between_its_read_and_its_unlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fronts drop one failed keyed create's index (``.creates/``) at once; the second's
    drop and another front's retry of the create, claiming the index again, land while the
    first is between its read of the index and its unlink (it waits there until they are done,
    or 0.3 s when they wait for it). Before, the first unlinked the index just claimed: the
    session made under it had no index, and the next retry of the create made a second one.
    The index stays; the first drop is the one that removed the old index, the second finds
    it gone, and no lock file is left."""
    directory = Directory(tmp_path)
    assert directory.claim_created(TENANT, IDEM, "fp", KEY) is None
    real_unlink, read, done = Path.unlink, threading.Event(), threading.Event()

    def pause_then_unlink(path: Path, missing_ok: bool = False) -> None:
        if threading.current_thread().name == "first" and path.parent.name == ".creates":
            read.set()
            done.wait(0.3)
        real_unlink(path, missing_ok=missing_ok)
    monkeypatch.setattr(Path, "unlink", pause_then_unlink)
    results: dict[str, Any] = {}

    def first() -> None:
        results["first"] = directory.drop_created(TENANT, IDEM, KEY)
    thread = threading.Thread(target=first, name="first")
    thread.start()
    assert read.wait(5.0)
    results["second"] = directory.drop_created(TENANT, IDEM, KEY)
    results["claimed"] = directory.claim_created(TENANT, IDEM, "fp", KEY)
    done.set()
    thread.join(5.0)
    assert not thread.is_alive()
    assert directory.created(TENANT, IDEM) == {"key": KEY, "fingerprint": "fp"}
    assert results == {"first": True, "second": False, "claimed": None}
    assert os.listdir(tmp_path / ".locks") == []


@pytest.mark.parametrize("on_disk", [True, False], ids=["on-disk", "in-memory"])
def test_drop_created_leaves_the_index_of_a_try_holding_the_ids_entry(
        tmp_path: Path, on_disk: bool) -> None:
    """A failed keyed create's index goes only while no try of that create holds its id's
    entry: one that claimed the id again (another front's retry) is making the session under
    the index. An entry of another create of the id (another key, or none) does not keep it;
    nor does an index naming another id get dropped."""
    directory = Directory(tmp_path if on_disk else None)
    assert directory.claim_created(TENANT, IDEM, "fp", KEY) is None
    assert directory.claim(KEY, {"host": "h-2", "made": "m-2", "created_by": IDEM})
    dropped = directory.drop_created(TENANT, IDEM, KEY)
    assert directory.created(TENANT, IDEM) == {"key": KEY, "fingerprint": "fp"}
    assert dropped is False
    assert directory.remove_made(KEY, "m-2")
    assert directory.claim(KEY, {"host": "h-3", "made": "m-3", "created_by": "other"})
    dropped = directory.drop_created(TENANT, IDEM, "default~y")
    assert directory.created(TENANT, IDEM) == {"key": KEY, "fingerprint": "fp"}
    assert dropped is False
    assert directory.drop_created(TENANT, IDEM, KEY) is True
    assert directory.created(TENANT, IDEM) is None


def test_forget_created_waits_for_a_claim_of_the_index_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One front deletes a keyed create's session (its index moves to ``.deleted-creates/``)
    while another front's retry of the create claims the index: the retry's link finds the
    index there, and the delete's move lands before the retry reads it (it waits there until
    the move is done, or waits for the index's lock). Before, the move took no lock: the retry
    read the index as gone and linked it again, a live index of the session being deleted
    beside its mark (the next retry was answered with a session that is gone, or made it
    again). The move now waits for the claim, which holds the index's lock, and then moves
    the index the claim read: only the mark is left, and no lock file."""
    deleting, retrying = Directory(tmp_path), Directory(tmp_path)
    assert deleting.claim_created(TENANT, IDEM, "fp", KEY) is None
    held = f".creates.{create_name(TENANT, IDEM)}"  # (the index's lock)
    real_link, failed = os.link, []

    def move() -> None:
        try:
            deleting.forget_created(TENANT, IDEM, KEY)
        except BaseException as exc:  # (seen by the test's thread)
            failed.append(exc)
            raise
    mover = threading.Thread(target=move)

    def link_then_move(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        try:
            real_link(src, dst, *args, **kw)
        except FileExistsError:
            if Path(dst).parent.name == ".creates" and mover.ident is None:
                mover.start()
                until = time.monotonic() + 10.0
                while mover.is_alive() and directory._KEY_LOCKS.get(held, (None, 0))[1] < 2:
                    assert time.monotonic() < until, "the move neither ended nor waited"
                    time.sleep(0.001)
            raise
    monkeypatch.setattr(os, "link", link_then_move)
    claimed = retrying.claim_created(TENANT, IDEM, "fp", KEY)
    monkeypatch.undo()
    mover.join(10.0)
    assert not mover.is_alive() and failed == []
    assert claimed is None  # (the index named this session: the retry finishes it)
    assert os.listdir(tmp_path / ".creates") == []
    assert retrying.created(TENANT, IDEM) == {"key": KEY, "fingerprint": "fp", "deleted": True}
    assert os.listdir(tmp_path / ".locks") == []


@pytest.mark.parametrize("on_disk", [True, False], ids=["on-disk", "in-memory"])
def test_forget_created_leaves_the_index_of_another_session(tmp_path: Path,
                                                           on_disk: bool) -> None:
    """A delete of session ``x`` made by a keyed create marks the key's index deleted only
    while it names ``x``: an index of another create under the key, made once ``x``'s index
    was dropped (``y``), stays live (before, the delete moved it, and ``y``'s retry was a 409
    ``session_deleted``, naming ``y``, a session that is there); ``y``'s own delete marks
    it."""
    d = Directory(tmp_path if on_disk else None)
    other = "default~y"
    assert d.claim_created(TENANT, IDEM, "fp-y", other) is None
    d.forget_created(TENANT, IDEM, KEY)
    assert d.created(TENANT, IDEM) == {"key": other, "fingerprint": "fp-y"}
    d.forget_created(TENANT, IDEM, other)
    assert d.created(TENANT, IDEM) == {"key": other, "fingerprint": "fp-y", "deleted": True}
    if on_disk:
        assert os.listdir(tmp_path / ".creates") == [] and os.listdir(tmp_path / ".locks") == []


def test_a_dropped_index_is_on_disk_when_drop_created_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's folder is fsynced after the unlink, before ``drop_created`` returns (as
    every claim and removal of the directory): before, a machine's crash right after could
    bring the dropped index back."""
    from app.engine.store import Files
    directory = Directory(tmp_path)
    assert directory.claim_created(TENANT, IDEM, "fp", KEY) is None
    index = tmp_path / ".creates" / create_name(TENANT, IDEM)
    synced: list[tuple[Path, bool]] = []
    real = Files.fsync_dir

    def fsync_dir(files: Files, path: Path) -> None:
        synced.append((path, index.exists()))
        real(files, path)
    monkeypatch.setattr(Files, "fsync_dir", fsync_dir)
    assert directory.drop_created(TENANT, IDEM, KEY) is True
    assert synced == [(tmp_path / ".creates", False)]
    assert directory.created(TENANT, IDEM) is None


def test_a_creations_making_lock_is_held_by_one_try_across_fronts_and_processes(
        tmp_path: Path) -> None:
    """The lock a keyed sharded create holds while it asks its shards' hosts
    (:meth:`Directory.try_making`): a second try (another front on the folder, in this
    process or another) does not get it while the first holds it, gets it once it is let go,
    and gets it when its holder is killed (``kill -9``); other creations' locks are their own,
    and no lock file stays. Without a data directory it is held in memory."""
    root = tmp_path / "directory"
    one, two = Directory(root), Directory(root)
    release = one.try_making("m-1")
    assert release is not None
    assert two.try_making("m-1") is None and one.try_making("m-1") is None
    other = two.try_making("m-2")
    assert other is not None
    other()
    release()
    again = two.try_making("m-1")
    assert again is not None
    again()
    assert os.listdir(root / ".locks") == []
    code = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from app.engine.directory import Directory
        assert Directory(Path(sys.argv[1])).try_making("m-1") is not None
        print("held", flush=True)
        time.sleep(3600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        assert one.try_making("m-1") is None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30.0)
        after = one.try_making("m-1")
        assert after is not None
        after()
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert os.listdir(root / ".locks") == []
    memory = Directory(None)
    held = memory.try_making("m-1")
    assert held is not None and memory.try_making("m-1") is None
    held()
    assert memory.try_making("m-1") is not None
