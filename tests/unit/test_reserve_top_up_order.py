"""The delete reserve's background top-up (:meth:`Store.top_up_reserve`, the flusher's look
while the reserve is short) takes room only after the acknowledged operations that wait for
it: a log awaiting its healing snapshot (a failed background fsync) is healed first, and the
tombstone of a delete that the tombstone log refused is logged first. Each look is called
here by hand, so the test does not wait on the flusher's clock; the flusher's own looks (each
second) see the same conditions.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from app.engine.delete_reserve import RESERVE, RESERVE_BYTES
from app.engine.store import TOMBSTONE, TOMBSTONES, Store
from tests.unit.test_store_faults import FaultyFiles


class Files(FaultyFiles):
    """:class:`FaultyFiles`; while ``refuse_stones`` is set, an fsync of the tombstone log
    fails (ENOSPC, as a disk that filled under its append)."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_stones = False

    def fsync(self, fd: int) -> None:
        if self.refuse_stones and os.readlink(f"/proc/self/fd/{fd}").endswith(TOMBSTONES):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().fsync(fd)


def shorten(store: Store, to: int = 1000) -> Path:
    """Leave the reserve short (as a delete on a full disk that could not top it up does);
    the flusher's own looks are held off (each look is this test's)."""
    store._reserve_look = float("inf")
    path = store.root / RESERVE
    os.truncate(path, to)
    store.reserve.whole = False
    return path


def test_a_short_reserve_waits_for_a_healing_snapshot(tmp_path: Path) -> None:
    """A session's background fsync failed (its log suspect: acknowledged records in doubt
    until a fresh snapshot): the reserve, short, is not topped up though the disk has room,
    neither by the background look nor by a readiness check; once the snapshot heals the log,
    the next look tops it up."""
    files = Files()
    store = Store(tmp_path, interval_s=0.01, files=files)
    store.open()
    try:
        assert (tmp_path / RESERVE).stat().st_size == RESERVE_BYTES and store.reserve.whole
        store.create("s", [b"create"], "interval")
        files.arm("fsync", errno.EIO)
        store.append("s", [b"a step"], "interval")  # acknowledged; its fsync is the flusher's
        deadline = time.monotonic() + 60
        while store.suspects() != ["s"]:
            assert time.monotonic() < deadline, "the flusher never marked the log suspect"
            time.sleep(0.01)
        reserve = shorten(store)
        store.top_up_reserve()
        assert store.health() is not None  # (the suspect log)
        assert reserve.stat().st_size == 1000 and not store.reserve.whole
        store.write_snapshot("s", b"everything the log held")
        assert store.suspects() == []
        store.top_up_reserve()
        assert reserve.stat().st_size == RESERVE_BYTES and store.reserve.whole
    finally:
        store.close()


def test_a_short_reserve_waits_for_a_tombstone_not_yet_logged(tmp_path: Path) -> None:
    """A keyed delete whose tombstone the tombstone log refused (it waits in its
    ``.deleted-*`` folder): the reserve, short, is not topped up while the tombstone cannot be
    logged; once the log takes it, one look logs the tombstone first, then tops the reserve
    up."""
    files = Files()
    store = Store(tmp_path, interval_s=0.01, files=files)
    store.open()
    try:
        store.create("s", [b"create"], "step")
        stone = {"tenant": "default", "id": "s", "key": "deleted-while-the-log-refused"}
        files.refuse_stones = True
        store.delete("s", stone)
        waiting = list((tmp_path / "sessions").glob(".deleted-*"))
        assert len(waiting) == 1 and [p.name for p in waiting[0].iterdir()] == [TOMBSTONE]
        reserve = shorten(store)
        store.top_up_reserve()
        assert reserve.stat().st_size == 1000 and waiting[0].exists()
        files.refuse_stones = False
        store.top_up_reserve()
        assert not waiting[0].exists()
        logged = [json.loads(line) for line in (tmp_path / TOMBSTONES).read_bytes().splitlines()]
        assert stone in logged
        assert reserve.stat().st_size == RESERVE_BYTES and store.reserve.whole
    finally:
        store.close()
