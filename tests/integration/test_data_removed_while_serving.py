"""The data directory removed while the server runs (an operator's ``rm -rf``, a temp-file
cleaner under ``/tmp``): what the server acknowledged, before and after, survives a restart.

The server kept serving from memory and kept writing each session's records to its log's
descriptor, a file no longer in any folder: steps were acknowledged and a ``kill -9`` then lost
them, and a session with nothing to write lost everything. Its lock's file went too, so a
second server could take the directory. Now its maintenance (every ``min(snapshot_every_s, 60)
/ 4`` s) finds sessions whose files are gone and writes them again from memory, a snapshot
that drops the unlinked log for a new one, and takes the lock again; a sharded session's
directory entry is written again with its shards (before, a restart answered 404 for it, its
shards on disk), and the tombstone log with the keys of past deletes the server keeps in
memory (before, a keyed delete or create retried after a restart ran as new)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from app.config import EXIT_CONFIG
from tests import forked_server
from tests.integration.test_durability import Proc
from tests.integration.test_two_servers_one_data_dir import REPO, Local, assert_holds, step


def remove(data: Path) -> None:
    """``rm -rf`` of the data directory, in one step the server cannot race: moved aside, then
    removed (its files unlinked with it). A plain ``shutil.rmtree`` walks the tree while the
    server's maintenance may already be writing it again, and then fails on the last
    ``rmdir`` (``Directory not empty``), as an operator's ``rm -rf`` would."""
    aside = data.with_name(data.name + ".removed")
    data.rename(aside)
    shutil.rmtree(aside)

pytestmark = pytest.mark.integration


def made_and_stepped(url: str, twins: dict[str, Local]) -> None:
    """Each twin's session made (``sharded``: in two shards) and stepped once, as torch."""
    for sid, local in twins.items():
        body = {**local.create_body(), "id": sid, **({"shards": 2} if sid == "sharded"
                                                   else {})}
        r = httpx.post(f"{url}/v1/sessions", json=body, timeout=60)
        assert r.status_code == 201, r.text
        assert step(url, local, 1, sid) == 1

#: the unsharded sessions of the first test
PLAIN = ("idle", "busy")


def test_a_removed_data_dir_is_written_again_and_nothing_acknowledged_is_lost(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    # maintenance every second (snapshots due after 4 s: an idle session is never due)
    proc = Proc(data, env={"OPTSERVE_SNAPSHOT_EVERY_S": "4"}).start()
    second = None
    try:
        url = proc.url
        twins = {"idle": Local(), "busy": Local(), "sharded": Local()}
        for sid, local in twins.items():
            body = {**local.create_body(), "id": sid}
            if sid == "sharded":
                body["shards"] = 2
            r = httpx.post(f"{url}/v1/sessions", json=body, timeout=60)
            assert r.status_code == 201, r.text
        assert step(url, twins["busy"], 1, "busy") == 1
        assert step(url, twins["sharded"], 1, "sharded") == 1
        # a keyed create and a keyed delete: their keys live in the tombstone log
        gone = {**Local().create_body(), "id": "gone"}
        r = httpx.post(f"{url}/v1/sessions", json=gone,
                       headers={"Idempotency-Key": "c-1"}, timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.delete(f"{url}/v1/sessions/gone", headers={"Idempotency-Key": "d-1"}, timeout=60)
        assert r.status_code == 204, r.text
        assert (data / "tombstones.jsonl").exists()
        # idle: snapshotted once (its create's record then cut from its log), never due again
        idle = data / "sessions" / "default~idle"
        deadline = time.monotonic() + 60
        while (idle / "wal.bin").stat().st_size or not (idle / "snapshot.bin").exists():
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        remove(data)
        for k in (2, 3):  # acknowledged while their files are gone
            assert step(url, twins["busy"], k, "busy") == k
        written = [data / "sessions" / f"default~{sid}" / "snapshot.bin" for sid in PLAIN]
        written += [data / "sessions" / f"default#sharded~shard{i}of2" / "snapshot.bin"
                    for i in range(2)]
        written += [data / ".lock", data / "directory" / "default~sharded",
                    data / "tombstones.jsonl"]
        deadline = time.monotonic() + 60
        while not all(path.exists() for path in written):
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)
        assert "were removed from the data directory while the server ran" in proc.log()
        assert step(url, twins["busy"], 4, "busy") == 4  # after the heal: to the new log
        # the lock is held again: a second server is refused
        log = tmp_path / "second.log"
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")},
               "OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": "1", "OPTSERVE_DATA_DIR": str(data),
               "OPTSERVE_DEVICE": "cpu", "OPTSERVE_WARM_UP": "0",
               "OPTSERVE_DATA_DIR_WAIT_S": "0.5"}
        second = forked_server.start(env, REPO, log)
        assert second.wait(120) == EXIT_CONFIG, log.read_text(errors="replace")
        assert "is in use by another optserve process" in log.read_text(errors="replace")
        proc.kill9()
        proc.start()
        assert_holds(proc.url, twins["idle"], 0, "idle")
        assert_holds(proc.url, twins["busy"], 4, "busy")
        assert_holds(proc.url, twins["sharded"], 1, "sharded")
        assert step(proc.url, twins["busy"], 5, "busy") == 5
        assert step(proc.url, twins["idle"], 6, "idle") == 1
        assert step(proc.url, twins["sharded"], 7, "sharded") == 2
        # the keys of the delete and of the deleted session's create, answered as before
        r = httpx.delete(f"{proc.url}/v1/sessions/gone",
                         headers={"Idempotency-Key": "d-1"}, timeout=60)
        assert r.status_code == 204, r.text
        assert r.headers.get("idempotent-replayed") == "true"
        r = httpx.post(f"{proc.url}/v1/sessions", json=gone,
                       headers={"Idempotency-Key": "c-1"}, timeout=60)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "session_deleted"
        # and the deleted session's last version (0), written again with them: made again
        # under its id, the session continues past it (app.engine.last_versions)
        r = httpx.post(f"{proc.url}/v1/sessions", json=gone, timeout=60)
        assert (r.status_code, r.json()["version"]) == (201, 1), r.text
    finally:
        if second is not None and second.poll() is None:
            second.kill()
        proc.stop()


def test_a_step_after_the_removal_writes_its_session_again_before_it_is_acknowledged(
        tmp_path: Path) -> None:
    """At the default maintenance period (15 s), a step that finds its log removed writes its
    session again first (a sharded one's shards and its directory entry): a ``kill -9`` right
    after its answer loses nothing."""
    data = tmp_path / "data"
    proc = Proc(data).start()
    try:
        twins = {"busy": Local(), "sharded": Local()}
        made_and_stepped(proc.url, twins)
        remove(data)
        for sid, local in twins.items():
            assert step(proc.url, local, 2, sid) == 2
            assert step(proc.url, local, 3, sid) == 3
        proc.kill9()
        killed_log = proc.log()
        proc.start()
        for sid, local in twins.items():
            assert_holds(proc.url, local, 3, sid)
        assert "the files of session default~busy were removed" in killed_log
        assert "the directory entry of sharded session default~sharded was removed" in \
            killed_log
        for sid, local in twins.items():
            assert step(proc.url, local, 4, sid) == 4
    finally:
        proc.stop()


def test_a_session_whose_log_was_not_open_is_written_again_at_its_next_step(
        tmp_path: Path) -> None:
    """A session whose log descriptor was closed when its files went (by the open logs' bound,
    ``OPTSERVE_MAX_OPEN_LOGS``, here 1: the other session's step closes it; or by a snapshot
    whose new log could not be opened, the race the maintenance loses now and then): its next
    step found no open log to see unlinked, reopened it by its path, in a folder no longer
    there, and was a 503 ``storage_error`` (until the maintenance wrote the session again). It
    writes the session again first, as a step that finds its open log removed does."""
    data = tmp_path / "data"
    proc = Proc(data, env={"OPTSERVE_MAX_OPEN_LOGS": "1"}).start()
    try:
        twins = {"first": Local(), "second": Local()}
        for sid, local in twins.items():
            r = httpx.post(f"{proc.url}/v1/sessions", json={**local.create_body(), "id": sid},
                           timeout=60)
            assert r.status_code == 201, r.text
        assert step(proc.url, twins["first"], 1, "first") == 1
        assert step(proc.url, twins["second"], 1, "second") == 1  # (first's log closed)
        remove(data)
        for k in (2, 3):
            for sid in ("first", "second"):
                assert step(proc.url, twins[sid], k, sid) == k
        proc.kill9()
        proc.start()
        for sid, local in twins.items():
            assert_holds(proc.url, local, 3, sid)
    finally:
        proc.stop()


@pytest.mark.parametrize("every_steps", ["1000", "1"])
def test_a_stop_right_after_the_removal_writes_everything_again(
        tmp_path: Path, every_steps: str) -> None:
    """The data directory removed, then SIGTERM before the maintenance looked (its period is
    15 s by default). The stop snapshotted the sessions with operations since their last
    snapshot, and did nothing else: a snapshot did not know it wrote removed files again
    (no ``written_again``), so a sharded session's directory entry stayed gone and the
    restart answered 404 for it, its shards on disk (as when the maintenance's own snapshot of
    a due session ran just after a removal: its next pass found nothing removed); and the
    sessions with nothing new (every step snapshotted: ``OPTSERVE_SNAPSHOT_EVERY_STEPS=1``)
    and the tombstone log were lost. Now the stop writes again what the maintenance would."""
    data = tmp_path / "data"
    proc = Proc(data, env={"OPTSERVE_SNAPSHOT_EVERY_STEPS": every_steps}).start()
    try:
        twins = {"plain": Local(), "sharded": Local()}
        made_and_stepped(proc.url, twins)
        r = httpx.post(f"{proc.url}/v1/sessions", json={**Local().create_body(), "id": "gone"},
                       timeout=60)
        assert r.status_code == 201, r.text
        r = httpx.delete(f"{proc.url}/v1/sessions/gone", headers={"Idempotency-Key": "d-1"},
                         timeout=60)
        assert r.status_code == 204, r.text
        remove(data)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0, proc.log()
        stopped_log = proc.log()
        assert "the directory entry of sharded session default~sharded was removed" in \
            stopped_log
        assert "the tombstone log was removed" in stopped_log
        proc.start()
        for sid, local in twins.items():
            assert_holds(proc.url, local, 1, sid)
            assert step(proc.url, local, 2, sid) == 2
        r = httpx.delete(f"{proc.url}/v1/sessions/gone", headers={"Idempotency-Key": "d-1"},
                         timeout=60)
        assert r.status_code == 204, r.text
        assert r.headers.get("idempotent-replayed") == "true"
    finally:
        proc.stop()


def test_not_ready_while_the_data_dir_is_gone(tmp_path: Path) -> None:
    """``/readyz`` answered 200 with the data directory removed (its free space could not be
    measured, and that check stood aside), while no session's log could be written there: now
    a 503 ``not_ready`` naming the directory, with ``Retry-After``, until the maintenance
    makes it again (every 2 s here); then ready, and the session steps on as torch's. A
    server whose bound the disk can meet logs no warning about it at its start."""
    data = tmp_path / "data"
    proc = Proc(data, env={"OPTSERVE_SNAPSHOT_EVERY_S": "8"}).start()
    try:
        local = Local()
        made_and_stepped(proc.url, {"one": local})
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            for _ in range(5):
                remove(data)
                r = client.get("/readyz")
                if r.status_code != 200 or not data.exists():
                    break  # (else the maintenance made it again first: remove it again)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "5"
            assert r.headers["content-type"].startswith("application/problem+json")
            problem = r.json()
            assert (problem["code"], problem["status"]) == ("not_ready", 503)
            assert f"the data directory {data} is gone" in problem["detail"], problem
            deadline = time.monotonic() + 60
            while (r := client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.1)
            assert r.json()["status"] == "ready" and data.is_dir()
        assert step(proc.url, local, 2, "one") == 2
        assert "holds in all" not in proc.log()
    finally:
        proc.stop()
