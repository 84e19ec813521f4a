"""The directory's removal of one creation's entry (:meth:`Directory.remove_made`) against a
claim of the same id between its read and its unlink, and the key's lock it holds for that,
across threads and processes (the fronts of a cluster share the folder): let go when its
holder is killed (``kill -9``), its files never left to pile up. The interleaving is forced:
the remover's read of the entry (``Directory.get``) waits there until the others are done, or
a short while when they wait for it."""

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

from app.engine.directory import Directory

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
