"""One process at a time on a data directory (:mod:`app.engine.data_dir_lock`), unit by unit:
the lock refuses a second holder in this process as in another, waits for a holder that
lets go, falls back to the directory itself where its file cannot be made, and the store holds
it from its open to its close."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.engine.data_dir_lock import LOCK_NAME, DataDirInUse, DataDirLock
from app.engine.store import Store


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire(0)
    assert first.held
    assert f"pid {os.getpid()} on " in (tmp_path / LOCK_NAME).read_text()
    second = DataDirLock(tmp_path)
    with pytest.raises(DataDirInUse) as refused:
        second.acquire(0.2)
    message = str(refused.value)
    assert f"the data directory {tmp_path.resolve()} is in use" in message
    assert f"pid {os.getpid()} on " in message
    assert "OPTSERVE_DATA_DIR" in message
    assert not second.held
    first.release()
    assert not first.held
    second.acquire(0)
    assert second.held
    second.release()


def test_a_start_waits_for_the_holder_to_let_go(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire(0)
    threading.Timer(0.5, first.release).start()
    second = DataDirLock(tmp_path)
    began = time.monotonic()
    second.acquire(30)
    waited = time.monotonic() - began
    assert second.held and not first.held
    assert 0.4 < waited < 20, waited
    second.release()


def test_where_its_file_cannot_be_made_the_directory_is_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open
    lock_file = str(tmp_path / LOCK_NAME)

    def full_disk(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path) == lock_file:
            raise OSError(errno.ENOSPC, "No space left on device", lock_file)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_disk)
    first = DataDirLock(tmp_path)
    first.acquire(0)
    assert not (tmp_path / LOCK_NAME).exists()
    second = DataDirLock(tmp_path)
    with pytest.raises(DataDirInUse, match="its pid is not noted"):
        second.acquire(0)
    first.release()
    second.acquire(0)
    second.release()


def test_the_store_holds_it_from_open_to_close(tmp_path: Path) -> None:
    first = Store(tmp_path)
    first.open()
    second = Store(tmp_path, lock_wait_s=0)
    with pytest.raises(DataDirInUse):
        second.open()
    first.close()
    second.open()
    assert second.lock.held
    second.close()
    assert not second.lock.held


def test_a_removed_lock_is_taken_again_or_reported_lost(tmp_path: Path) -> None:
    """The lock's file removed while it is held (the data directory removed under a running
    server) keeps nobody out: :meth:`DataDirLock.renew` takes a new one, and where another
    process took it first, says so (the store's health, so readiness, reports it)."""
    store = Store(tmp_path)
    store.open()
    try:
        first = store.lock
        (tmp_path / LOCK_NAME).unlink()
        store.repair()  # (the server's maintenance)
        assert first.lost is None and (tmp_path / LOCK_NAME).exists()
        with pytest.raises(DataDirInUse):  # the new file is held
            DataDirLock(tmp_path).acquire(0)
        (tmp_path / LOCK_NAME).unlink()
        other = DataDirLock(tmp_path)
        other.acquire(0)  # another process, first to the new file
        store.repair()
        assert first.lost is not None
        assert "another process holds it now" in first.lost
        assert store.health() == first.lost
        other.release()
        store.repair()  # free again: taken
        assert first.lost is None and store.health() is None
    finally:
        store.close()
