"""The store's readiness check of its data directory's free space
(``OPTSERVE_READY_MIN_FREE_BYTES``): below the bound :meth:`Store.health` names the bytes free
and the setting; the measure (statvfs) stands :data:`FREE_SPACE_TTL_S`, so a probe polling
``/readyz`` does not measure at each call; 0 never measures; a ``memory`` durability host
does not check. The free space is what the test's ``Files`` says (the file system calls the
store makes; a real small disk: tests/integration/test_disk_full.py)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.engine import store as store_module
from app.engine.free_space import FREE_SPACE_TTL_S
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.store import Files, Store


class MeasuredFiles(Files):
    """The real file system calls; ``free_bytes`` says ``free`` and counts its calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.measures = 0

    def free_bytes(self, path: Path) -> int:
        self.measures += 1
        return self.free


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(store_module.time, "monotonic", clock)
    return clock


@pytest.fixture
def files() -> MeasuredFiles:
    return MeasuredFiles(free=100 << 20)


@pytest.fixture
def store(tmp_path: Path, files: MeasuredFiles) -> Iterator[Store]:
    s = Store(tmp_path / "data", files=files, min_free_bytes=16 << 20)
    s.open()
    try:
        yield s
    finally:
        s.close()


def test_below_the_bound_is_not_ready(store: Store, files: MeasuredFiles,
                                      clock: Clock) -> None:
    assert store.health() is None
    files.free = (16 << 20) - 1
    clock.now += FREE_SPACE_TTL_S
    assert store.health() == (
        f"the data directory is (nearly) full: {(16 << 20) - 1} bytes free, under "
        f"OPTSERVE_READY_MIN_FREE_BYTES ({16 << 20}); a write could fail")
    files.free = 16 << 20  # the bound itself is enough
    clock.now += FREE_SPACE_TTL_S
    assert store.health() is None


def test_a_measure_stands_its_time(store: Store, files: MeasuredFiles, clock: Clock) -> None:
    assert store.health() is None
    measured = files.measures
    files.free = 0
    for _ in range(100):  # polled: the measure stands
        clock.now += FREE_SPACE_TTL_S / 200
        assert store.health() is None
    assert files.measures == measured
    clock.now += FREE_SPACE_TTL_S / 2 + 0.01  # (past its time)
    assert "0 bytes free" in str(store.health())
    assert files.measures == measured + 1


def test_a_measure_that_fails_is_left_to_the_other_checks(store: Store, files: MeasuredFiles,
                                                          clock: Clock,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    def broken(path: Path) -> int:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(files, "free_bytes", broken)
    clock.now += FREE_SPACE_TTL_S
    assert store.health() is None


def test_no_bound_measures_nothing(tmp_path: Path, clock: Clock) -> None:
    files = MeasuredFiles(free=0)
    s = Store(tmp_path / "data", files=files, min_free_bytes=0)
    s.open()
    try:
        assert s.health() is None
        assert files.measures == 0
    finally:
        s.close()


@pytest.mark.parametrize(("durability", "bound"), [("step", 1 << 20), ("interval", 1 << 20),
                                                   ("memory", 0)])
def test_the_host_bounds_a_durable_store_only(tmp_path: Path, durability: str,
                                              bound: int) -> None:
    host = EmbeddedHost(HostConfig(device="cpu", data_dir=tmp_path / "data",
                                   durability=durability,  # type: ignore[arg-type]
                                   ready_min_free_bytes=1 << 20))
    assert host._store is not None and host._store.min_free_bytes == bound


def test_a_removed_data_dir_is_not_ready_until_it_is_made_again(store: Store,
                                                                clock: Clock) -> None:
    """The data directory removed while the server runs (its free space cannot be measured:
    that check stands aside): not ready, naming it, whatever the bound; ready again once the
    maintenance's repair made it again (the lock's file taken again). It answered ready."""
    assert store.health() is None
    aside = store.root.with_name("data.removed")
    store.root.rename(aside)
    shutil.rmtree(aside)
    clock.now += FREE_SPACE_TTL_S
    assert store.health() == (
        f"the data directory {store.root} is gone (removed while the server ran?): the server "
        "cannot write its sessions' logs there until its maintenance makes it again")
    assert store.repair() is True and store.root.is_dir()
    assert store.health() is None


def test_a_removed_data_dir_is_not_ready_without_a_bound(tmp_path: Path) -> None:
    s = Store(tmp_path / "data", files=MeasuredFiles(free=0), min_free_bytes=0)
    s.open()
    try:
        shutil.rmtree(s.root)
        assert str(s.root) in str(s.health())
        s.repair()
        assert s.health() is None
    finally:
        s.close()


class SizedFiles(MeasuredFiles):
    """A file system of ``total`` bytes, ``free`` of them free."""

    def __init__(self, free: int, total: int) -> None:
        super().__init__(free)
        self.total = total

    def total_bytes(self, path: Path) -> int:
        return self.total


@pytest.mark.parametrize(("bound", "warned"), [(1 << 30, False), ((1 << 30) + 1, True),
                                               (0, False)])
def test_a_bound_past_the_disks_size_is_a_warning_at_the_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, bound: int, warned: bool) -> None:
    """``OPTSERVE_READY_MIN_FREE_BYTES`` more than the data directory's file system holds in
    all can never be met: the start logs a warning saying so (nothing said before: the server
    was simply never ready); the disk's size itself, or 0, says nothing."""
    s = Store(tmp_path / "data", files=SizedFiles(free=1 << 29, total=1 << 30),
              min_free_bytes=bound)
    with caplog.at_level(logging.WARNING, logger="optserve.store"):
        s.open()
    try:
        said = [r.getMessage() for r in caplog.records if "holds in all" in r.getMessage()]
        if warned:
            assert said == [
                f"OPTSERVE_READY_MIN_FREE_BYTES ({bound}) is more than the data directory's "
                f"file system holds in all ({1 << 30} bytes, {s.root}): /readyz will answer "
                "503 not_ready for as long as this server runs; lower it (0 turns the check "
                "off)"]
            assert "under OPTSERVE_READY_MIN_FREE_BYTES" in str(s.health())
        else:
            assert said == []
    finally:
        s.close()
