"""The delete reserve's upkeep on real ``python -m app`` servers:

- the temporary files a crash or an older server left in the data directory (the reserve as
  servers before ddfc298 wrote it, ``.delete-reserve.tmp``; a cut of the tombstone log's; the
  write probe's) are removed at the start, every session restored as torch.optim has it (was:
  kept for good);
- a reserve left short by a full disk is whole again within about a second of the room's
  return, with no readiness check or delete to ask for it, so a keyed delete on a disk that
  then fills to the last block again is a 204 (was: topped up only by a readiness check, the
  delete a 507 where nothing polled ``/readyz``).

Every value is checked against an in-process ``torch.optim`` run of the same operations.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from app.engine.delete_reserve import RESERVE, RESERVE_BYTES
from app.engine.store import STALE_TEMPS
from tests.integration.test_disk_full import (  # noqa: F401 - the fixture
    KEYED_BODY,
    Big,
    MiB,
    Mount,
    assert_storage_full,
    fill,
    free_bytes,
    reserve_held,
    retried_create_is_deleted,
    tmpfs,
)
from tests.integration.test_durability import (
    Proc,
    Reference,
    create_body,
    pull,
    step_n,
)

pytestmark = pytest.mark.integration

#: how long the reserve may take to come back once there is room (the look is each second;
#: a loaded machine may be slow to schedule the flusher)
TOP_UP_WITHIN_S = 30.0


def test_stale_temporaries_are_removed_at_the_start(tmp_path: Path) -> None:
    """A ``kill -9``, then the temporary files a crash (or a server before ddfc298, which
    wrote its reserve as ``.delete-reserve.tmp`` and renamed it) leaves in the data directory:
    the next start removes each, and keeps everything else, the sessions restored as
    torch.optim has them and stepping on as it does."""
    data = tmp_path / "data"
    proc = Proc(data)
    refs = {"a": Reference(seed=1), "b": Reference(seed=2)}
    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            for i, sid in enumerate(refs, start=1):
                assert c.post("/v1/sessions", json=create_body(sid, seed=i)).status_code == 201
                step_n(c, sid, refs[sid], 3, tag=i)
        proc.kill9()
        left = {name: os.urandom(5000) for name in STALE_TEMPS}
        for name, content in left.items():
            (data / name).write_bytes(content)
        (data / f"{RESERVE}.tmp").write_bytes(bytes(RESERVE_BYTES // 2))  # (cut short)
        kept = {p.name for p in data.iterdir()} - set(left)
        assert {RESERVE, "sessions"} <= kept
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert not [name for name in STALE_TEMPS if (data / name).exists()]
            assert {p.name for p in data.iterdir()} >= kept
            assert (data / RESERVE).stat().st_size == RESERVE_BYTES
            for i, (sid, ref) in enumerate(refs.items(), start=1):
                version, got = pull(c, sid)
                assert version == ref.version == 3 and ref.same_params(got), sid
                step_n(c, sid, ref, 2, tag=10 + i)
                version, got = pull(c, sid)
                assert version == 5 and ref.same_params(got), sid
    finally:
        proc.stop()


def wait_for_reserve(disk: Path) -> None:
    """Wait (polling the file, no request to the server) until the reserve is whole."""
    deadline = time.monotonic() + TOP_UP_WITHIN_S
    while not reserve_held(disk):
        size = (disk / RESERVE).stat().st_size if (disk / RESERVE).exists() else None
        assert time.monotonic() < deadline, (
            f"the delete reserve holds {size} of {RESERVE_BYTES} bytes {TOP_UP_WITHIN_S} s "
            f"after the disk had {free_bytes(disk)} bytes free again")
        time.sleep(0.05)


def test_a_short_reserve_is_topped_up_once_there_is_room(
        tmpfs: Mount) -> None:  # noqa: F811 - the fixture
    """A reserve left short (16 KiB of its 64), then a start on a disk full to the last block:
    the reserve stays short while the disk is full. Room returns (1 MiB freed): the reserve is
    whole again without a readiness check or a delete asking for it. The disk then fills to
    the last block again: a keyed delete is a 204 (its tombstone in the reserve's blocks), a
    retried create the 409 ``session_deleted``, and the other session is as torch.optim has
    it, also after a ``kill -9`` and a restart."""
    disk = tmpfs(8)
    key = {"Idempotency-Key": "made-before-the-disk-filled"}
    body = KEYED_BODY
    other = Big("other", 1000)
    proc = Proc(disk, env={"OPTSERVE_READY_MIN_FREE_BYTES": "0"},
                started=lambda r: r.status_code in (200, 503))

    def retried(c: httpx.Client) -> None:
        retried_create_is_deleted(c, key)

    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert c.post("/v1/sessions", json=body, headers=key).status_code == 201
            assert other.create(c).status_code == 201
            assert other.post_step(c, 0).status_code == 200
            other.acknowledged(0)
        proc.kill9()
        os.truncate(disk / RESERVE, 16 * 1024)  # (left short: a delete took what fitted)
        filler = fill(disk)
        proc.start()  # (its readiness polls: no room for the reserve)
        assert (disk / RESERVE).stat().st_size == 16 * 1024
        os.truncate(filler, filler.stat().st_size - MiB)  # room returns
        wait_for_reserve(disk)
        fill(disk)  # to the last block again
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert_storage_full(other.post_step(c, 1))
            r = c.delete("/v1/sessions/keyed")
            assert r.status_code == 204, r.text
            retried(c)
            other.assert_same(c, state=True)
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            retried(c)
            other.assert_same(c, state=True)
    finally:
        proc.stop()
