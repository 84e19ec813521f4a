"""The bound on open session logs (``OPTSERVE_MAX_OPEN_LOGS``, :class:`app.engine.store.Store`'s
``max_open``): the store kept one descriptor per session log for as long as the session
existed, so enough idle sessions took every descriptor the process may have and every create
and step failed (503 ``out_of_file_descriptors``) for good. Past the bound the least recently
used logs are closed and reopened by their session's next write: every record lands where it
belongs; an ``interval`` log is fsynced before it is closed; a ``step`` record awaiting its
fsync keeps its log open until that fsync, on the descriptor it was written through; a reopen
that fails (EMFILE, ENOSPC) refuses the operation before anything is written, the session
and its files as they were, and the retry succeeds and equals torch, also after a restart.
The same with a real server under a low ``RLIMIT_NOFILE``:
tests/integration/test_many_sessions_few_descriptors.py."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.store import (
    Buffer,
    Files,
    Store,
    default_open_logs,
    open_logs_warning,
    read_log,
)
from app.errors import OptserveError
from tests.stored_files import stored_files as tree_files
from tests.torch_reference import Reference, assert_tensors_equal


class WatchedFiles(Files):
    """The real file system, every call on a session log noted (``calls``: (call, log path,
    descriptor)), the log descriptors open now counted, ``open_append`` failing with
    ``fail_open`` (an errno) while it is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.paths: dict[int, str] = {}
        self.fail_open: int | None = None
        self.opens = 0
        self._lock = threading.Lock()

    def _note(self, call: str, fd: int) -> None:
        with self._lock:
            path = self.paths.get(fd)
            if path is not None:
                self.calls.append((call, path, fd))

    def open_append(self, path: Path) -> int:
        if self.fail_open is not None:
            raise OSError(self.fail_open, os.strerror(self.fail_open))
        fd = super().open_append(path)
        with self._lock:
            self.opens += 1
            self.paths[fd] = path.parent.name
        self._note("open", fd)
        return fd

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> int:
        self._note("write", fd)
        return super().pwritev(fd, parts, offset)

    def fsync(self, fd: int) -> None:
        self._note("fsync", fd)
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._note("close", fd)
        with self._lock:
            self.paths.pop(fd, None)
        super().close(fd)

    def open_now(self) -> int:
        with self._lock:
            return len(self.paths)

    def of(self, name: str) -> list[tuple[str, int]]:
        with self._lock:
            return [(call, fd) for call, path, fd in self.calls if path == name]


def record(session: str, i: int) -> bytes:
    return f"{session}:{i}:".encode() * (i + 1)


@pytest.fixture
def files() -> WatchedFiles:
    return WatchedFiles()


def store_of(tmp_path: Path, files: Files, max_open: int, interval_s: float = 3600.0) -> Store:
    store = Store(tmp_path, interval_s, files, max_open)
    store.open()
    return store


def test_the_default_bound_is_an_eighth_of_the_soft_limit_at_least_32() -> None:
    assert [default_open_logs(n) for n in (64, 120, 256, 1024, 65536)] == \
        [32, 32, 32, 128, 8192]
    assert default_open_logs() >= 32


def test_a_bound_past_half_the_descriptor_limit_is_warned_of(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``OPTSERVE_MAX_OPEN_LOGS`` set above half of the soft ``RLIMIT_NOFILE``: the store warns
    at start, naming the setting, the limit and the default it would get; at or below half,
    and left at 0 (the default, an eighth), it says nothing."""
    assert open_logs_warning(512, 1024) is None
    warning = open_logs_warning(513, 1024)
    assert warning is not None
    assert "OPTSERVE_MAX_OPEN_LOGS=513" in warning and "(1024)" in warning
    assert f"(0: {default_open_logs(1024)} here)" in warning
    import resource
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 4096))
    with caplog.at_level("WARNING", logger="optserve.store"):
        Store(tmp_path / "a", max_open=129)
        Store(tmp_path / "b", max_open=128)
        Store(tmp_path / "c")
    warned = [r.getMessage() for r in caplog.records if r.name == "optserve.store"]
    assert len(warned) == 1 and "OPTSERVE_MAX_OPEN_LOGS=129" in warned[0], warned
    assert "(256)" in warned[0]


def test_at_most_the_bound_are_open_and_every_record_lands_in_its_log(
        tmp_path: Path, files: WatchedFiles) -> None:
    """Eight sessions written in turn, three rounds, through a store that keeps two logs open:
    never more than two descriptors are open, each write after the first round reopens its
    log, and every log holds its three records in order (read back, and after a restart)."""
    store = store_of(tmp_path, files, 2)
    names = [f"s{i}" for i in range(8)]
    try:
        for i in range(3):
            for name in names:
                if i == 0:
                    (store.sessions_dir / name).mkdir()
                store.append(name, record(name, i), "step")
                assert store.open_logs() <= 2
                assert files.open_now() <= 2
        assert files.opens == 3 * len(names)  # (each write found its log closed)
        for name in names:
            assert store.log_length(name) == sum(len(record(name, i)) + 20 for i in range(3))
            assert store.read(name)[1] == [record(name, i) for i in range(3)]
    finally:
        store.close()
    assert files.open_now() == 0
    again = store_of(tmp_path, Files(), 2)
    try:
        for name in names:
            assert again.read(name)[1] == [record(name, i) for i in range(3)]
    finally:
        again.close()


def test_an_interval_log_is_fsynced_before_it_is_closed(
        tmp_path: Path, files: WatchedFiles) -> None:
    """A log written under durability ``interval`` (its fsync left to the flusher, here an
    hour away) is fsynced, on its own descriptor, before the bound closes it."""
    store = store_of(tmp_path, files, 1)
    try:
        for name in ("a", "b"):
            (store.sessions_dir / name).mkdir()
        store.append("a", b"first", "interval")
        store.append("b", b"second", "interval")
        calls = files.of("a")
        assert [c for c, _ in calls] == ["open", "write", "fsync", "close"], calls
        assert len({fd for _, fd in calls}) == 1
        assert store.open_logs() == 1
    finally:
        store.close()


def test_a_step_record_awaiting_its_fsync_keeps_its_log_open(
        tmp_path: Path, files: WatchedFiles) -> None:
    """``append(..., fsync=False)`` then ``sync``: the durability ``step`` write that runs
    beside its step. Between the two the log is not closed (its fsync must be the one that
    reports a failed write-back, on the descriptor the record went through); once synced, it
    is closed when room is needed."""
    store = store_of(tmp_path, files, 1)
    try:
        for name in ("a", "b", "c"):
            (store.sessions_dir / name).mkdir()
        store.append("a", b"a0", "step")
        before = store.log_length("a")
        store.append("a", b"a1", "step", fsync=False)
        store.append("b", b"b0", "step")  # past the bound: "a" may not be closed
        assert store.open_logs() == 2
        assert [c for c, _ in files.of("a")] == ["open", "write", "fsync", "write"]
        store.sync("a", before)
        calls = files.of("a")
        assert calls[-1][0] == "fsync" and calls[-1][1] == calls[-2][1]
        store.append("c", b"c0", "step")
        assert files.of("a")[-1][0] == "close"
        assert store.open_logs() == 1
        assert store.read("a")[1] == [b"a0", b"a1"]
    finally:
        store.close()


@pytest.mark.parametrize("err,status,code", [(errno.EMFILE, 503, "out_of_file_descriptors"),
                                             (errno.ENOSPC, 507, "storage_full")])
def test_a_reopen_that_fails_writes_nothing_and_the_retry_lands(
        tmp_path: Path, files: WatchedFiles, err: int, status: int, code: str) -> None:
    store = store_of(tmp_path, files, 1)
    try:
        for name in ("a", "b"):
            (store.sessions_dir / name).mkdir()
        store.append("a", b"a0", "step")
        store.append("b", b"b0", "step")  # "a" closed
        wal = store.sessions_dir / "a" / "wal.bin"
        on_disk, length = wal.read_bytes(), store.log_length("a")
        files.fail_open = err
        with pytest.raises(OptserveError) as refused:
            store.append("a", b"a1", "step")
        assert (refused.value.status, refused.value.code) == (status, code)
        assert (wal.read_bytes(), store.log_length("a")) == (on_disk, length)
        # (room was made for it first: "b" was closed, and nothing leaked)
        assert store.open_logs() == files.open_now() <= 1
        files.fail_open = None
        store.append("a", b"a1", "step")
        assert read_log(wal) == ([b"a0", b"a1"], store.log_length("a"), False)
        assert store.open_logs() == 1 and files.open_now() == 1
    finally:
        store.close()


# --------------------------------------------------------------------------- the engine

OPTIONS = {"lr": 0.1, "momentum": 0.9}


def params_of(i: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(3, generator=g)}


def grads_of(i: int, k: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (i + 1) + k)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(3, generator=g)}


async def assert_equals(eng: Front, sid: str, ref: Reference, version: int) -> None:
    out = await eng.pull(sid, None)
    assert out.version == version, (sid, out.version, version)
    assert_tensors_equal(dict(out.params), ref.params, sid)


def test_a_step_whose_log_cannot_be_reopened_leaves_the_session_as_it_was(
        tmp_path: Path, files: WatchedFiles) -> None:
    """Four sessions under durability ``step`` through an engine that keeps two logs open
    (one of them 300,000 parameters: its record, over 1 MB, is written beside its step), each
    stepped in turn. With no descriptor left (EMFILE on the reopen) the step of a session whose
    log was closed is a 503 ``out_of_file_descriptors``: its parameters and version, and every
    file, as they were. Once descriptors are back its retry steps as torch does, and after a
    restart (no snapshot: the logs replayed) every session equals torch."""
    sizes = [5, 300_000, 5, 5]
    refs = [Reference(torch.optim.SGD, [(params_of(i, n), {})], OPTIONS)
            for i, n in enumerate(sizes)]

    def make() -> Front:
        return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False,
                               files=files, max_open_logs=2)

    async def run() -> None:
        eng = make()
        await eng.start()
        try:
            for i, n in enumerate(sizes):
                await eng.create(CreateSpec("SGD", [GroupSpec(params_of(i, n))], OPTIONS,
                                            id=f"s{i}"))
            for i, n in enumerate(sizes):
                out = await eng.step(f"s{i}", grads_of(i, 0, n), return_params=True)
                refs[i].step(grads_of(i, 0, n))
                assert out.version == 1
                assert_tensors_equal(dict(out.params), refs[i].params, f"s{i}")
                assert files.open_now() <= 2
            for i in (0, 1):  # both closed now (s2, s3 stepped last)
                before = tree_files(tmp_path / "sessions")
                files.fail_open = errno.EMFILE
                with pytest.raises(OptserveError) as refused:
                    await eng.step(f"s{i}", grads_of(i, 1, sizes[i]), return_params=True)
                files.fail_open = None
                assert (refused.value.status, refused.value.code) == \
                    (503, "out_of_file_descriptors")
                assert tree_files(tmp_path / "sessions") == before
                await assert_equals(eng, f"s{i}", refs[i], 1)
            for k in (1, 2):
                for i, n in enumerate(sizes):
                    out = await eng.step(f"s{i}", grads_of(i, k, n), return_params=True)
                    refs[i].step(grads_of(i, k, n))
                    assert_tensors_equal(dict(out.params), refs[i].params, f"s{i} step {k}")
                    assert files.open_now() <= 2
        finally:
            await eng.stop(snapshot=False)
        assert files.open_now() == 0
        eng = make()
        await eng.start()
        try:
            for i in range(len(sizes)):
                await assert_equals(eng, f"s{i}", refs[i], 3)
        finally:
            await eng.stop(snapshot=False)

    asyncio.run(run())


def test_max_open_logs_is_a_setting_and_reaches_the_store(tmp_path: Path) -> None:
    from app.config import Settings

    assert Settings(max_open_logs=7).max_open_logs == 7
    with pytest.raises(ValueError, match="max_open_logs"):
        Settings(max_open_logs=-1)
    eng: Any = embedded_engine("cpu", data_dir=tmp_path, warm_up=False, max_open_logs=7)
    assert eng.router.local.embedded._store.max_open == 7
    eng = embedded_engine("cpu", data_dir=tmp_path, warm_up=False)
    assert eng.router.local.embedded._store.max_open == default_open_logs()
