"""A keyed delete on a real, small file system (a tmpfs) that another writer fills to the last
block at the worst moments: just before each write of the delete's tombstone, and just after
the delete's commit (the rename of the session's directory), before its tombstone is logged.

The delete is done either way (a retried create is the 409 ``session_deleted``, also after a
restart), and the space of the session's files is freed before it returns:

- the tombstone is written into the delete reserve's own blocks, so no free block is needed
  and none can be taken from it (was: the reserve was unlinked to free 64 KiB and the tombstone
  written again, and a writer taking those blocks first made the delete a 507);
- a tombstone that cannot be appended to the tombstone log stays in the ``.deleted-*`` folder
  with nothing else (was: the session's files stayed there too, their space taken, until the
  next start), logged at once when the space of those files lets it, else by the next delete or
  readiness check (``test_a_tombstone_the_log_refuses_waits_alone``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from app.engine.delete_reserve import RESERVE, RESERVE_BYTES
from app.engine.interface import IdemKey
from app.engine.store import TOMBSTONE, TOMBSTONES, Buffer, Files, Store
from app.errors import Conflict
from tests.integration.test_disk_full import Mount, fill, tmpfs  # noqa: F401 - the fixture
from tests.unit.test_store_faults import KEY, SID, engine, grad, spec

pytestmark = pytest.mark.integration

CREATED = IdemKey("made-then-full", "create made-then-full")
DELETED = IdemKey("deleted-on-a-full-disk", "delete deleted-on-a-full-disk")


class FillingFiles(Files):
    """The store's file calls, and another writer that takes every free block of ``disk`` at
    the moment ``at`` names: ``"tombstone"``, as any file but a session log is written (a
    delete's tombstone: its temporary file); ``"commit"``, once the sessions folder is
    fsynced (a delete's rename of the session's directory, its commit point)."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.at: str | None = None
        self.fills = 0
        self.wal_fds: set[int] = set()

    def _fill(self) -> None:
        fill(self.disk)
        self.fills += 1

    def open_append(self, path: Path) -> int:
        fd = super().open_append(path)
        self.wal_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.wal_fds.discard(fd)
        super().close(fd)

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> int:
        if self.at == "tombstone" and fd not in self.wal_fds:
            self._fill()
        return super().pwritev(fd, parts, offset)

    def fsync_dir(self, path: Path) -> None:
        super().fsync_dir(path)
        if self.at == "commit" and path == self.disk / "sessions":
            self._fill()


def assert_deleted_with_keys(exc: BaseException) -> None:
    assert isinstance(exc, Conflict) and exc.code == "session_deleted", exc
    assert exc.extra == {"idempotency_key": CREATED.key, "session_id": SID}, exc.extra


def logged_stones(disk: Path) -> list[dict[str, str]]:
    """The tombstone log's keyed lines (not the deleted sessions' last versions:
    app.engine.last_versions)."""
    return [stone for line in (disk / TOMBSTONES).read_bytes().splitlines()
            if "key" in (stone := json.loads(line))]


@pytest.mark.parametrize("at", ["tombstone", "commit"])
def test_a_keyed_delete_while_another_writer_fills_the_disk(
        tmpfs: Mount, at: str) -> None:  # noqa: F811 - the fixture
    disk = tmpfs(4)
    files = FillingFiles(disk)

    async def retried_create_refused(eng: object) -> None:
        with pytest.raises(Conflict) as info:
            await eng.create(spec(), idem=CREATED)  # type: ignore[attr-defined]
        assert_deleted_with_keys(info.value)

    async def go() -> None:
        eng = engine(disk, files, "step")
        await eng.start()
        try:
            await eng.create(spec(), idem=CREATED)
            assert (disk / RESERVE).stat().st_size == RESERVE_BYTES
            files.at = at
            assert not await eng.delete(SID, idem=DELETED)
            files.at = None
            assert files.fills >= 1
            assert await eng.list_sessions() == []
            await retried_create_refused(eng)
            assert not (disk / "sessions" / KEY).exists()
            # (written into the reserve's blocks, or, committed on a disk that filled, its
            # log append refused until the session's files were removed: logged all the same)
            assert list((disk / "sessions").glob(".deleted-*")) == []
            assert {s["key"] for s in logged_stones(disk)} >= {CREATED.key, DELETED.key}
            if at == "tombstone":  # (topped up from what the delete freed)
                assert (disk / RESERVE).stat().st_size > 0
            (disk / "filler.bin").unlink()
            assert (await eng.status()).ready  # (logs a waiting tombstone; tops the reserve up)
            assert list((disk / "sessions").glob(".deleted-*")) == []
            assert {s["key"] for s in logged_stones(disk)} >= {CREATED.key, DELETED.key}
            assert (disk / RESERVE).stat().st_size == RESERVE_BYTES
        finally:
            await eng.stop(snapshot=False)
        again = engine(disk)
        await again.start()
        try:
            assert await again.list_sessions() == []
            await retried_create_refused(again)
            assert await again.delete(SID, idem=DELETED)  # (its retry: answered, not a 404)
        finally:
            await again.stop(snapshot=False)
    asyncio.run(go())


class LogRefusingFiles(Files):
    """The store's file calls; while ``refuse`` is set, an fsync of the tombstone log fails
    (ENOSPC, as a disk that filled under its append)."""

    def __init__(self) -> None:
        self.refuse = False
        self.refused = 0

    def fsync(self, fd: int) -> None:
        if self.refuse and os.readlink(f"/proc/self/fd/{fd}").endswith(TOMBSTONES):
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().fsync(fd)


def test_a_tombstone_the_log_refuses_waits_alone(tmp_path: Path) -> None:
    """A keyed delete committed (its directory renamed) whose tombstone the tombstone log does
    not take: the delete is done, the session's files are removed at once and the tombstone
    waits alone in its ``.deleted-*`` folder (was: with every file of the session, until the
    next start); the first readiness check once the log takes it logs it and removes the
    folder. A retried create is the 409 ``session_deleted`` throughout, and after a restart."""
    files = LogRefusingFiles()

    async def retried_create_refused(eng: object) -> None:
        with pytest.raises(Conflict) as info:
            await eng.create(spec(), idem=CREATED)  # type: ignore[attr-defined]
        assert_deleted_with_keys(info.value)

    async def go() -> None:
        eng = engine(tmp_path, files, "step")
        await eng.start()
        try:
            await eng.create(spec(), idem=CREATED)
            files.refuse = True
            assert not await eng.delete(SID, idem=DELETED)
            assert files.refused == 2  # (its own append, and once more after its files went)
            await retried_create_refused(eng)
            left = list((tmp_path / "sessions").glob(".deleted-*"))
            assert len(left) == 1 and [p.name for p in left[0].iterdir()] == [TOMBSTONE]
            assert json.loads((left[0] / TOMBSTONE).read_bytes().splitlines()[0])["key"] == \
                DELETED.key
            await eng.status()  # (the log still refuses it: it waits)
            assert left[0].exists() and files.refused == 3
            files.refuse = False
            assert (await eng.status()).ready
            assert not left[0].exists()
            assert {s["key"] for s in logged_stones(tmp_path)} >= {CREATED.key, DELETED.key}
        finally:
            await eng.stop(snapshot=False)
        again = engine(tmp_path)
        await again.start()
        try:
            assert await again.list_sessions() == []
            await retried_create_refused(again)
            assert await again.delete(SID, idem=DELETED)
        finally:
            await again.stop(snapshot=False)
    asyncio.run(go())



def test_a_start_on_a_full_disk_knows_a_delete_whose_tombstone_waits(
        tmpfs: Mount, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - the fixture
    """A keyed delete of a session stepped to v3, cut after its commit point (the rename)
    before its tombstone lines (its key, its create's key, its last version) reached the log;
    the server starts again on a disk another writer keeps full, so the start cannot log them
    (they wait in their ``.deleted-*`` folder). The start reads them from the folder: the
    delete's retry is answered as done, the create's retry refused, the id made again starts at
    v4, and the delete retried after that deletes nothing; once there is room they are logged.
    Before, the start read the log alone: the retry was a 404, the create's retry was taken, the
    session made again was at v0 (its versions 1-3 naming other values than the deleted one's
    did), and the delete retried after it deleted the new session."""
    disk = tmpfs(4)

    async def crashed_after_the_commit() -> None:
        eng = engine(disk, None, "step")
        await eng.start()
        try:
            await eng.create(spec(), idem=CREATED)
            for k in range(3):
                await eng.step(SID, grad(k), return_params=False)
            assert (await eng.pull(SID, None)).version == 3
            with monkeypatch.context() as m:  # (the crash: nothing after the rename ran)
                m.setattr(Store, "_bury", lambda self, trash: False)
                assert not await eng.delete(SID, idem=DELETED)
        finally:
            await eng.stop(snapshot=False)

    async def started_on_a_full_disk() -> None:
        files = FillingFiles(disk)
        files.at = "tombstone"  # (takes the room the start's failed append freed: the probe)
        eng = engine(disk, files, "step")
        await eng.start()
        try:
            assert len(list((disk / "sessions").glob(".deleted-*"))) == 1
            log = disk / TOMBSTONES  # (none of the lines reached it)
            assert (not log.exists() or log.stat().st_size == 0) and files.fills >= 1
            assert await eng.delete(SID, idem=DELETED)
            with pytest.raises(Conflict) as info:
                await eng.create(spec(), idem=CREATED)
            assert_deleted_with_keys(info.value)
            made = await eng.create(spec(durability="memory"))  # (nothing to write)
            assert (made.version, made.step) == (4, 0)
            assert await eng.delete(SID, idem=DELETED)  # (answered: nothing deleted)
            pulled = await eng.pull(SID, None)
            assert pulled.version == 4
            first = spec().groups[0].params
            assert set(pulled.params) == set(first)
            for name, value in first.items():
                assert torch.equal(pulled.params[name], value), name
            files.at = None
            (disk / "filler.bin").unlink()
            assert (await eng.status()).ready  # (logs the waiting lines)
            assert not list((disk / "sessions").glob(".deleted-*"))
        finally:
            await eng.stop(snapshot=False)

    async def started_again() -> None:
        eng = engine(disk)
        await eng.start()
        try:
            assert await eng.delete(SID, idem=DELETED)
            assert (await eng.create(spec())).version == 4
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(crashed_after_the_commit())
    fill(disk)
    asyncio.run(started_on_a_full_disk())
    asyncio.run(started_again())
