"""Storage faults injected under the engine (a :class:`Files` that fails on cue): a failed
write or fsync fails the operation that needed it and applies nothing, the log stays valid,
the flusher survives a failed background fsync (the log is marked suspect, health says so, and
maintenance heals it with a snapshot), a failed truncate is repaired before the next write (or
dropped at restart), a snapshot that finds no space leaves the old snapshot and the log intact.

Every scenario runs the same acknowledged operations on a twin engine that never sees a fault
(durability ``memory``) and asserts the faulty engine's session equals it bitwise (parameters,
optimizer and scheduler state), then again after a restart on the same directory.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine, persist
from app.engine.delete_reserve import RESERVE, RESERVE_BYTES
from app.engine.interface import IdemKey
from app.engine.store import IN_DOUBT, TOMBSTONE, Buffer, Files, read_log, read_snapshot
from app.errors import Conflict, OptserveError, StorageFull, Unavailable
from app.wire.safetensors_body import read_safetensors, write_safetensors
from tests.unit.test_engine import assert_tree_bitwise

T = TypeVar("T")
Target = Literal["wal", "other"]
SID = "s"
KEY = f"default~{SID}"


# --------------------------------------------------------------------------- the fault layer

@dataclass
class Fault:
    call: str  # "pwritev", "fsync", "ftruncate", "replace", "mkdir" or "fsync_dir"
    err: int
    target: Target = "wal"  # "wal": session logs; "other": snapshot temp files, probes
    times: int = 1  # calls that fail before the fault is spent (-1: until disarmed)
    partial: bool = False  # pwritev: write half of the bytes, then fail
    skip: int = 0  # matching calls let through before the fault arms
    dst: str | None = None  # replace: only renames onto a file of this name
    hits: int = 0


class FaultyFiles(Files):
    """Fails the calls armed faults name; the rest go to the real file system. Log fds are
    told apart from other fds (snapshot temp files, the write probe) by ``open_append``."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self.wal_fds: set[int] = set()
        self.partial_bytes = 0
        self.wal_fsyncs = 0
        self.free: int | None = None  # what free_bytes reports (None: the real figure)
        self._lock = threading.Lock()

    def arm(self, call: str, err: int, **kw: Any) -> Fault:
        fault = Fault(call, err, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def disarm(self) -> None:
        with self._lock:
            self.faults.clear()

    def _trip(self, call: str, fd: int | None = None, dst: Path | None = None) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.call != call or f.times == 0:
                    continue
                if fd is not None and (fd in self.wal_fds) != (f.target == "wal"):
                    continue
                if f.dst is not None and (dst is None or dst.name != f.dst):
                    continue
                if f.skip > 0:
                    f.skip -= 1
                    continue
                f.hits += 1
                if f.times > 0:
                    f.times -= 1
                return f
        return None

    def open_append(self, path: Path) -> int:
        fd = super().open_append(path)
        with self._lock:
            self.wal_fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self.wal_fds.discard(fd)
        super().close(fd)

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> int:
        fault = self._trip("pwritev", fd)
        if fault is None:
            return super().pwritev(fd, parts, offset)
        if fault.partial:
            data = b"".join(bytes(p) for p in parts)
            half = data[: max(1, len(data) // 2)]
            self.partial_bytes += os.pwrite(fd, half, offset)
        raise OSError(fault.err, os.strerror(fault.err))

    def fsync(self, fd: int) -> None:
        fault = self._trip("fsync", fd)
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err))
        if fd in self.wal_fds:
            self.wal_fsyncs += 1
        super().fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        fault = self._trip("ftruncate", fd)
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err))
        super().ftruncate(fd, length)

    def replace(self, src: Path, dst: Path) -> None:
        fault = self._trip("replace", dst=dst)
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err))
        super().replace(src, dst)

    def mkdir(self, path: Path) -> None:
        fault = self._trip("mkdir")
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err))
        super().mkdir(path)

    def fsync_dir(self, path: Path) -> None:
        fault = self._trip("fsync_dir")
        if fault is not None:
            raise OSError(fault.err, os.strerror(fault.err))
        super().fsync_dir(path)

    def free_bytes(self, path: Path) -> int:
        return super().free_bytes(path) if self.free is None else self.free


# --------------------------------------------------------------------------- helpers

def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def spec(**extra: Any) -> CreateSpec:
    g = torch.Generator().manual_seed(0)
    return CreateSpec("Adam", [GroupSpec({"w": torch.randn(4, 3, generator=g),
                                          "b": torch.randn(3, generator=g)})],
                      {"lr": 0.01, "weight_decay": 0.01},
                      scheduler={"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}},
                      id=SID, **extra)


def grad(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def engine(data: Path, files: Files | None = None, durability: str = "step",
           every: int = 1000, snapshot_every_s: float = 300.0) -> Front:
    return embedded_engine("cpu", data_dir=data, durability=durability,  # type: ignore[arg-type]
                           snapshot_every_steps=every, snapshot_every_s=snapshot_every_s,
                           fsync_interval_s=0.01, files=files, warm_up=False)


class Pair:
    """The engine under test and its twin (memory only, never faulted): an operation goes to
    the twin only when the engine acknowledged it."""

    def __init__(self, eng: Front, make: Callable[[], CreateSpec] | None = None,
                 grads: Callable[[int], dict[str, torch.Tensor]] | None = None) -> None:
        self.eng = eng
        self.twin = embedded_engine("cpu", warm_up=False)
        self.make = make or spec
        self.grads = grads or grad
        self.k = 0  # the next gradient

    async def start(self) -> None:
        await self.eng.start()
        await self.twin.start()
        await self.eng.create(self.make())
        await self.twin.create(self.make())

    async def stop(self, *, snapshot: bool = False) -> None:
        await self.eng.stop(snapshot=snapshot)

    async def step(self) -> None:
        """A step both take (must succeed)."""
        await self.eng.step(SID, self.grads(self.k), return_params=False)
        await self.twin_step()

    async def twin_step(self) -> None:
        """The twin takes the step the engine acknowledged (by other means)."""
        await self.twin.step(SID, self.grads(self.k), return_params=False)
        self.k += 1

    async def refused_step(self) -> OptserveError:
        """A step the engine must refuse (the twin does not take it; its gradient is
        retried next)."""
        with pytest.raises(OptserveError) as info:
            await asyncio.wait_for(self.eng.step(SID, self.grads(self.k),
                                                 return_params=False), 30)
        return info.value

    async def assert_same(self, eng: Front | None = None) -> None:
        eng = eng or self.eng
        got, want = await eng.pull(SID, None), await self.twin.pull(SID, None)
        assert (got.version, got.step, got.lr) == (want.version, want.step, want.lr)
        assert_tree_bitwise(got.params, want.params, "params")
        assert_tree_bitwise((await eng.export_state(SID)).state_dict,
                            (await self.twin.export_state(SID)).state_dict, "state")

    async def assert_goes_on(self, data: Path) -> None:
        """After a fault: the engine holds the twin's session, takes one more step to the same
        bits, and a restart on ``data`` holds it too."""
        await self.assert_same()
        await self.step()
        await self.assert_same()
        await self.stop()
        await self.assert_restart_same(data)

    async def assert_restart_same(self, data: Path) -> None:
        """A fresh engine on the same directory (plain files) holds the twin's session, and
        takes one more step to the same bits."""
        again = engine(data)
        await again.start()
        try:
            assert await again.refused() == {}
            await self.assert_same(again)
            await again.step(SID, self.grads(self.k), return_params=False)
            await self.twin_step()
            await self.assert_same(again)
        finally:
            await again.stop(snapshot=False)
        await self.twin.stop()


def wal_of(data: Path) -> Path:
    return data / "sessions" / KEY / "wal.bin"


def assert_refusal(exc: OptserveError, err: int) -> None:
    if err in (errno.ENOSPC, errno.EDQUOT):
        assert isinstance(exc, StorageFull) and exc.status == 507
        assert exc.code == "storage_full"
    else:
        assert isinstance(exc, Unavailable) and exc.status == 503
        assert exc.code == "storage_error" and exc.retry_after > 0
    assert "nothing was applied" in exc.detail


async def wait_for(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Poll ``cond`` until true (the timeout only detects a hang)."""
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- failed writes

@pytest.mark.parametrize("durability", ["step", "interval"])
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_partial_log_write_then_error_applies_nothing(tmp_path: Path, err: int,
                                                      durability: str) -> None:
    """The write stores half the record, then fails: the operation is refused (507 for
    ENOSPC, 503 for EIO), the half record is truncated away, the session is untouched; the
    same step succeeds once the fault is gone, and a restart reproduces it."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, durability))
        await pair.start()
        for _ in range(2):
            await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        assert len(before[0]) == 3 and before[1] == wal.stat().st_size
        fault = files.arm("pwritev", err, partial=True)
        assert_refusal(await pair.refused_step(), err)
        assert fault.hits == 1 and files.partial_bytes > 0  # half a record did reach the file
        assert read_log(wal) == before  # cut back: no torn or extra record
        assert wal.stat().st_size == before[1]
        await pair.assert_same()
        # the store can write again (the fault is spent): ready, and the step goes through
        assert (await pair.eng.status()).ready
        await pair.step()
        await pair.step()
        await pair.assert_same()
        assert len(read_log(wal)[0]) == 5
        await pair.stop()  # as a crash leaves it (no snapshot on the way out)
        await pair.assert_restart_same(tmp_path)
    run(go())


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_fsync_of_a_step_record_applies_nothing(tmp_path: Path, err: int) -> None:
    """Durability ``step``: the record is written whole but its fsync fails: refused, nothing
    applied, the record cut from the log."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        fault = files.arm("fsync", err)
        assert_refusal(await pair.refused_step(), err)
        assert fault.hits == 1
        assert read_log(wal) == before and wal.stat().st_size == before[1]
        await pair.assert_goes_on(tmp_path)
    run(go())


class GatedFiles(FaultyFiles):
    """Holds the next fsync (or write) of a log at a gate until the test opens it (with an
    error or without): the window in which a step is applied but its record is not yet
    durable."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: threading.Event | None = None
        self.gate_call = "fsync"
        self.gate_err: int | None = None
        self._closed = threading.Event()
        self.held = threading.Event()

    def close_gate(self, call: str = "fsync") -> None:
        self.gate, self.gate_err, self.gate_call = threading.Event(), None, call
        self._closed = self.gate
        self.held.clear()

    def _wait_at_gate(self, call: str, fd: int) -> None:
        gate = self.gate
        if gate is not None and call == self.gate_call and fd in self.wal_fds:
            self.gate = None
            self.held.set()
            assert gate.wait(30), "the test never opened the gate"
            if self.gate_err is not None:
                raise OSError(self.gate_err, os.strerror(self.gate_err))

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> int:
        self._wait_at_gate("pwritev", fd)
        return super().pwritev(fd, parts, offset)

    def open_gate(self, err: int | None = None) -> None:
        self.gate_err = err
        self._closed.set()

    def fsync(self, fd: int) -> None:
        self._wait_at_gate("fsync", fd)
        super().fsync(fd)


def watch_applies(monkeypatch: pytest.MonkeyPatch, first: Callable[[], None] | None = None
                  ) -> threading.Event:
    """``Step.apply`` patched for the test: ``first`` runs before each apply, and the event
    returned is set after each."""
    from app.engine.ops import gradients

    applied = threading.Event()
    real_apply = gradients.Step.apply

    def apply(self: gradients.Step, s: Any, plan: Any) -> Any:
        if first is not None:
            first()
        out = real_apply(self, s, plan)
        applied.set()
        return out
    monkeypatch.setattr(gradients.Step, "apply", apply)
    return applied


@pytest.mark.parametrize("err", [None, errno.EIO, errno.ENOSPC])
def test_a_step_is_applied_during_its_fsync_and_readers_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int | None) -> None:
    """Durability ``step``: the step is applied while its record's fsync runs (the optimizer
    has stepped before the fsync returns), but nothing is acknowledged and no reader sees it
    until the fsync is done. When the fsync fails, the session is rebuilt from its store: the
    pull that waited sees the session as it was, the step is refused, and the next step and a
    restart are bitwise the twin's."""
    files = GatedFiles()
    applied = watch_applies(monkeypatch)

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        applied.clear()
        files.close_gate()
        stepping = asyncio.ensure_future(pair.eng.step(SID, grad(pair.k), return_params=True))
        assert await asyncio.to_thread(files.held.wait, 20), "the fsync never started"
        assert await asyncio.to_thread(applied.wait, 20), "the step was not applied meanwhile"
        pulling = asyncio.ensure_future(pair.eng.pull(SID, None))
        exporting = asyncio.ensure_future(pair.eng.export_state(SID))
        await asyncio.sleep(0.3)
        assert not stepping.done() and not pulling.done() and not exporting.done()
        files.open_gate(err)
        if err is None:
            got = await stepping
            await pair.twin.step(SID, grad(pair.k), return_params=False)
            pair.k += 1
            want = await pair.twin.pull(SID, None)
            assert got.version == want.version
            assert_tree_bitwise(got.params, want.params, "params")
            assert len(read_log(wal)[0]) == len(before[0]) + 1
        else:
            with pytest.raises(OptserveError) as info:
                await stepping
            assert_refusal(info.value, err)
            assert read_log(wal) == before and wal.stat().st_size == before[1]
        want = await pair.twin.pull(SID, None)
        seen = await pulling
        assert seen.version == want.version
        assert_tree_bitwise(seen.params, want.params, "params")
        assert_tree_bitwise((await exporting).state_dict,
                            (await pair.twin.export_state(SID)).state_dict, "state")
        await pair.assert_goes_on(tmp_path)
    run(go())


def test_a_small_steps_fsync_starts_before_its_inline_apply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability ``step``, a small session (its step applied inline, on the event loop's
    thread): the record's fsync is handed to an I/O thread before the step is applied, so that
    the two run at once. (It was handed over from a task's first step, which ran only after the
    inline apply: the fsync then came after the step, not beside it.) The step waits inside
    the optimizer until the fsync has started; the fsync is held until the step has run."""
    files = GatedFiles()
    seen: list[bool] = []

    def first() -> None:
        if files.gate is not None or files.held.is_set():  # (the gated step only)
            seen.append(files.held.wait(3))
    applied = watch_applies(monkeypatch, first)

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        applied.clear()
        files.close_gate()
        stepping = asyncio.ensure_future(pair.eng.step(SID, grad(pair.k), return_params=True))
        assert await asyncio.to_thread(applied.wait, 20), "the step was never applied"
        files.open_gate()
        got = await stepping
        assert seen == [True], "the step was applied before its record's fsync started"
        await pair.twin.step(SID, grad(pair.k), return_params=False)
        pair.k += 1
        want = await pair.twin.pull(SID, None)
        assert got.version == want.version
        assert_tree_bitwise(got.params, want.params, "params")
        await pair.assert_goes_on(tmp_path)
    run(go())


@pytest.mark.parametrize("err", [None, errno.EIO])
def test_a_caller_that_gives_up_mid_step_leaves_a_whole_step_or_none(tmp_path: Path,
                                                                       err: int | None) -> None:
    """The caller of a step is cancelled while the record's fsync runs (the step already
    applied): the step still ends whole, applied and logged when the fsync succeeds, rebuilt
    away when it fails; the live session and a restart then agree with the twin."""
    files = GatedFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        files.close_gate()
        stepping = asyncio.ensure_future(pair.eng.step(SID, grad(pair.k), return_params=True))
        assert await asyncio.to_thread(files.held.wait, 20), "the fsync never started"
        stepping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stepping
        files.open_gate(err)
        if err is None:
            await pair.twin.step(SID, grad(pair.k), return_params=False)
            pair.k += 1
        await pair.assert_goes_on(tmp_path)  # its first read waits until the step is settled
    run(go())


BIG = 300_000  # floats: a 1.2 MB record, written beside the step (host.OVERLAP_WRITE_BYTES)


def big_spec() -> CreateSpec:
    g = torch.Generator().manual_seed(5)
    return CreateSpec("SGD", [GroupSpec({"w": torch.randn(BIG, generator=g)})],
                      {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True}, id=SID)


def big_grad(k: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(BIG, generator=torch.Generator().manual_seed(300 + k))}


@pytest.mark.parametrize("err", [None, errno.EIO, errno.ENOSPC])
def test_a_large_steps_record_is_written_while_the_step_is_applied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int | None) -> None:
    """Durability ``step``, a record of a megabyte or more: the optimizer steps while the
    record is still being written, on copies of the gradients (foreach SGD with Nesterov
    momentum adds into its gradients: the record must hold them as they came). A write that
    fails (EIO, a full disk) after the step was applied leaves the session as it was (rebuilt
    from its store); while the store keeps failing, the next attempts apply nothing; a restart
    equals the twin."""
    from app.engine import host_restore
    from app.engine.ops import gradients

    files = GatedFiles()
    applied = threading.Event()
    real_apply = gradients.Step.apply
    rebuilds: list[str] = []
    real_rebuild = host_restore.SessionRestorer.rebuild

    def apply(self: gradients.Step, s: Any, plan: Any) -> Any:
        out = real_apply(self, s, plan)
        applied.set()
        return out

    def rebuild(self: Any, key: str, *args: Any, **kw: Any) -> Any:
        rebuilds.append(key)
        return real_rebuild(self, key, *args, **kw)
    monkeypatch.setattr(gradients.Step, "apply", apply)
    monkeypatch.setattr(host_restore.SessionRestorer, "rebuild", rebuild)

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"), big_spec, big_grad)
        await pair.start()
        for _ in range(2):
            await pair.step()
        applied.clear()
        files.close_gate("pwritev")
        stepping = asyncio.ensure_future(pair.eng.step(SID, big_grad(2), return_params=True))
        assert await asyncio.to_thread(files.held.wait, 20), "the write never started"
        assert await asyncio.to_thread(applied.wait, 20), "the step was not applied meanwhile"
        pulling = asyncio.ensure_future(pair.eng.pull(SID, None))
        await asyncio.sleep(0.2)
        assert not stepping.done() and not pulling.done()
        files.open_gate(err)
        if err is None:
            got = await stepping
            await pair.twin_step()
            want = await pair.twin.pull(SID, None)
            assert got.version == want.version == 3
            assert_tree_bitwise(got.params, want.params, "params")
            assert rebuilds == []
        else:
            with pytest.raises(OptserveError) as info:
                await stepping
            assert_refusal(info.value, err)
            assert rebuilds == [KEY]
            # the store is failing: the next attempt writes first and applies nothing
            fault = files.arm("pwritev", err)
            assert_refusal(await pair.refused_step(), err)
            assert fault.hits == 1 and rebuilds == [KEY]
            await pair.step()  # the disk is back
        seen = await pulling
        assert seen.version == (3 if err is None else 2)
        await pair.assert_goes_on(tmp_path)
    run(go())


def test_an_answer_over_the_request_body_waits_for_the_records_write(tmp_path: Path) -> None:
    """The HTTP answer is written over the request body (``params_into``: the gradients' own
    memory), and a large record is written from that same memory beside the step: the answer
    must wait for the write, or the log holds parameters where the gradients were (a damaged
    record, and a restart without the step)."""
    files = GatedFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"), big_spec, big_grad)
        await pair.start()
        wal = wal_of(tmp_path)
        for _ in range(2):
            body = big_grad(pair.k)  # the request body: the answer is written over it
            files.close_gate("pwritev")
            stepping = asyncio.ensure_future(pair.eng.step(SID, body, return_params=True,
                                                           params_into=body))
            assert await asyncio.to_thread(files.held.wait, 20), "the write never started"
            await asyncio.sleep(0.3)  # the step is applied meanwhile; the answer must wait
            files.open_gate()
            got = await stepping
            await pair.twin_step()
            want = await pair.twin.pull(SID, None)
            assert got.params is not None
            assert_tree_bitwise(dict(got.params), want.params, "answer")
            assert_tree_bitwise(body, want.params, "the body holds the answer")
        records, valid, torn = read_log(wal)
        assert not torn and valid == wal.stat().st_size
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


@pytest.mark.parametrize("failure", ["optimizer", "gradient copies"])
def test_a_step_that_fails_before_its_record_is_written_leaves_no_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A large step's record is written beside the step; when the step fails before the I/O
    thread has even begun writing (a busy I/O pool), the cut must wait for that write, or the
    log would keep a record of a step that was never applied (a restart would replay it)."""
    from app.engine import host as host_module
    from app.engine.ops import ApplyFailed, gradients
    from app.engine.store import Store

    gate, started = threading.Event(), threading.Event()
    real_append = Store.append

    def slow_append(self: Store, *args: Any, **kw: Any) -> int:
        started.set()
        assert gate.wait(30)
        return real_append(self, *args, **kw)

    real_apply = gradients.Step.apply
    failed: list[bool] = []

    def failing_apply(self: gradients.Step, s: Any, plan: Any) -> Any:
        if failed:  # the restore's replay of the earlier steps
            return real_apply(self, s, plan)
        failed.append(True)
        raise ApplyFailed("optimizer.step() raised RuntimeError: injected")

    def failing_copies(plan: Any, op: Any) -> None:
        raise RuntimeError("injected: out of memory copying the gradients")

    async def go() -> None:
        pair = Pair(engine(tmp_path), big_spec, big_grad)
        await pair.start()
        await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        with monkeypatch.context() as m:
            m.setattr(Store, "append", slow_append)
            if failure == "optimizer":
                m.setattr(gradients.Step, "apply", failing_apply)
            else:
                m.setattr(host_module, "own_gradients", failing_copies)
            stepping = asyncio.ensure_future(pair.eng.step(SID, big_grad(pair.k),
                                                           return_params=False))
            assert await asyncio.to_thread(started.wait, 20)
            await asyncio.sleep(0.3)  # the step fails meanwhile, its cut waits for the write
            assert not stepping.done()
            gate.set()
            with pytest.raises(OptserveError if failure == "optimizer" else RuntimeError):
                await stepping
        assert read_log(wal) == before and wal.stat().st_size == before[1]
        await pair.assert_same()
        await pair.step()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


def test_a_step_that_changes_its_gradients_in_place_is_logged_as_received(
        tmp_path: Path) -> None:
    """torch's foreach SGD with Nesterov momentum adds the momentum into the gradient tensors
    themselves: the record must hold the gradients as they came (written before the step is
    applied, its fsync running alongside), or a restart replays other gradients."""
    def sgd() -> CreateSpec:
        g = torch.Generator().manual_seed(3)
        return CreateSpec("SGD", [GroupSpec({"w": torch.randn(4, 3, generator=g),
                                             "b": torch.randn(3, generator=g)})],
                          {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True},
                          id=SID)

    async def go() -> None:
        pair = Pair(engine(tmp_path), sgd)
        await pair.start()
        for _ in range(4):
            await pair.step()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


def test_many_body_gradients_changed_in_place_are_logged_as_received(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with gradients as a safetensors body decodes them (views of the body, end to
    end), so many that the record is written beside the step: the record takes one copy of
    their bytes (RecordParts.own_body) and the step the body's own tensors."""
    k = 12_000  # a record over OVERLAP_WRITE_BYTES (its header alone: ~1.1 MB)

    def names() -> list[str]:
        return [f"p{i:05d}" for i in range(k)]

    def sgd() -> CreateSpec:
        g = torch.Generator().manual_seed(3)
        return CreateSpec("SGD", [GroupSpec({n: torch.randn(2, generator=g) for n in names()})],
                          {"lr": 0.1, "momentum": 0.9, "nesterov": True, "foreach": True},
                          id=SID)

    def body_grads(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(200 + step)
        raw = write_safetensors({n: torch.randn(2, generator=g) for n in names()}, None)
        return read_safetensors(bytearray(raw))[0]

    owned: list[bool] = []
    real_own = persist.RecordParts.own_body

    def own_body(self: persist.RecordParts) -> None:
        owned.append(True)
        real_own(self)
    monkeypatch.setattr(persist.RecordParts, "own_body", own_body)

    async def go() -> None:
        pair = Pair(engine(tmp_path), sgd, body_grads)
        await pair.start()
        for _ in range(3):
            await pair.step()
        assert len(owned) == 3
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


# --------------------------------------------------------------------------- background fsync

@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_failed_background_fsync_marks_the_log_suspect_and_maintenance_heals_it(
        tmp_path: Path, err: int) -> None:
    """Durability ``interval``: the flusher's fsync fails. The step was acknowledged already
    (that is what ``interval`` means); the flusher lives on, marks the log suspect, health
    (readiness) reports it until the engine's maintenance writes a fresh snapshot from memory
    (held back here by failing the snapshot's rename, so the report can be seen), then clears.
    """
    files = FaultyFiles()

    async def go() -> None:
        eng = engine(tmp_path, files, "interval", snapshot_every_s=0.5)
        pair = Pair(eng)
        await pair.start()
        store = eng.host._store
        assert store is not None
        flusher = store._flusher
        blocked = files.arm("replace", errno.EIO, target="other", times=-1, dst="snapshot.bin")
        fsync_fault = files.arm("fsync", err)
        await pair.step()  # acknowledged at once; its background fsync fails

        async def suspect() -> bool:
            return store.suspects() == [KEY]
        await wait_for(suspect, "the flusher to mark the log suspect")
        assert fsync_fault.hits == 1 and flusher.is_alive()
        status = await eng.status()
        assert not status.ready and status.reason is not None
        assert os.strerror(err) in status.reason, status.reason

        async def tried_to_heal() -> bool:
            return blocked.hits >= 1
        await wait_for(tried_to_heal, "maintenance to try a healing snapshot")
        status = await eng.status()
        assert not status.ready and store.suspects() == [KEY], status
        await pair.assert_same()  # meanwhile the session serves on, unchanged
        files.disarm()

        async def healed() -> bool:
            return not store.suspects() and (await eng.status()).ready
        await wait_for(healed, "maintenance to heal the log")
        snap = wal_of(tmp_path).parent / "snapshot.bin"
        tree = persist.decode_tree(read_snapshot(snap), persist.SNAPSHOT_KEY)
        assert tree["meta"]["version"] == 1
        # the flusher still works: the next interval record gets its fsync
        synced = files.wal_fsyncs
        await pair.step()

        async def fsynced() -> bool:
            return files.wal_fsyncs > synced
        await wait_for(fsynced, "the flusher to fsync the next record")
        assert flusher.is_alive()
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


# --------------------------------------------------------------------------- failed truncate

@pytest.mark.parametrize("then", ["next-append-repairs", "crash-before-repair"])
@pytest.mark.parametrize("failure", ["partial-write", "fsync"])
def test_failed_truncate_after_a_failed_write(tmp_path: Path, failure: str, then: str) -> None:
    """The write (half a record) or the fsync (a whole record) fails, and so does the truncate
    that should cut it: the log is marked for repair and health says so; the next append cuts
    it first; a crash before that leaves the unacknowledged record in the file, and the
    restart must not apply it."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        for _ in range(2):
            await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        if failure == "partial-write":
            files.arm("pwritev", errno.EIO, partial=True)
        else:
            files.arm("fsync", errno.EIO)
        cut = files.arm("ftruncate", errno.EIO)
        assert_refusal(await pair.refused_step(), errno.EIO)
        assert cut.hits == 1
        assert wal.stat().st_size > before[1]  # the failed record's bytes are still there
        await pair.assert_same()
        status = await pair.eng.status()
        assert not status.ready and status.reason is not None and "repair" in status.reason
        if then == "next-append-repairs":
            await pair.step()
            assert read_log(wal) == (before[0] + read_log(wal)[0][-1:], wal.stat().st_size,
                                     False)
            assert len(read_log(wal)[0]) == len(before[0]) + 1
            assert (await pair.eng.status()).ready
            await pair.assert_same()
        await pair.stop()  # a crash: nothing cut on the way out
        if then == "crash-before-repair":
            assert wal.stat().st_size > before[1]
        await pair.assert_restart_same(tmp_path)
    run(go())


def test_a_record_neither_cut_nor_spoiled_is_refused_in_doubt(tmp_path: Path) -> None:
    """The fsync of a whole record fails, then the truncate that should cut it, then the
    write zeroing its header: the session is as it was, but a restart before the repair would
    replay the record, so the refusal does not say "nothing was applied" alone: it says the
    operation may come back and to retry under its key. The next append repairs the log and
    a restart then equals torch's twin. (Cut or spoiled: the plain words, the test above.)"""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        files.arm("fsync", errno.EIO)
        cut = files.arm("ftruncate", errno.EIO)
        spoil = files.arm("pwritev", errno.EIO, skip=1)  # (the record's own write goes)
        refused = await pair.refused_step()
        assert (cut.hits, spoil.hits) == (1, 1)
        assert isinstance(refused, Unavailable) and refused.code == "storage_error"
        assert refused.detail.startswith(IN_DOUBT + ": writing the operation's log "
                                         "record: "), refused.detail
        assert "Idempotency-Key" in refused.detail
        await pair.assert_same()
        await pair.step()  # (repairs the log first)
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


# --------------------------------------------------------------------------- snapshots

@pytest.mark.parametrize("partial", [False, True])
def test_snapshot_without_space_keeps_the_old_snapshot_and_the_log(tmp_path: Path,
                                                                   partial: bool) -> None:
    """Snapshots every 3 records; the second finds no space (ENOSPC on its temp file):
    operations are still acknowledged (their records fit), the old snapshot and the log are
    left intact, readiness reports the full disk; once space returns the next snapshot is
    written and holds everything."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step", every=3))
        await pair.start()
        for _ in range(2):  # create + 2 steps = 3 records: the first snapshot
            await pair.step()
        d = wal_of(tmp_path).parent
        old = (d / "snapshot.bin").read_bytes()
        assert read_log(d / "wal.bin")[0] == []
        full = files.arm("pwritev", errno.ENOSPC, target="other", times=-1, partial=partial)
        for _ in range(4):  # records 4..7: a snapshot is due after 6 and 7, and fails
            await pair.step()
        assert full.hits >= 2
        assert (d / "snapshot.bin").read_bytes() == old
        assert not (d / "snapshot.bin.tmp").exists()
        assert len(read_log(d / "wal.bin")[0]) == 4
        status = await pair.eng.status()
        assert not status.ready and status.reason is not None
        assert "No space left on device" in status.reason
        await pair.assert_same()
        files.disarm()
        assert (await pair.eng.status()).ready  # space is back
        await pair.step()  # record 8: the snapshot is due and is written now
        tree = persist.decode_tree(read_snapshot(d / "snapshot.bin"), persist.SNAPSHOT_KEY)
        assert tree["meta"]["version"] == 7 and tree["meta"]["seq"] == 8
        assert read_log(d / "wal.bin")[0] == []
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


# --------------------------------------------------------------------------- readiness, creates

def test_readiness_waits_for_room_for_the_write_that_failed(tmp_path: Path) -> None:
    """A large record finds no space, yet a small probe still fits: readiness reports the full
    disk until the free space would take that record (or a write succeeds)."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        files.arm("pwritev", errno.ENOSPC, partial=True)
        files.free = 100
        assert_refusal(await pair.refused_step(), errno.ENOSPC)
        status = await pair.eng.status()
        assert not status.ready and status.reason is not None
        assert "full" in status.reason and "No space left on device" in status.reason
        assert "100 are free" in status.reason
        files.free = None  # space is back
        assert (await pair.eng.status()).ready
        await pair.step()
        await pair.assert_same()
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


@pytest.mark.parametrize("refusals", [1, 2, 3])
def test_a_keyed_delete_on_a_full_disk_takes_the_reserve_or_deletes_nothing(
        tmp_path: Path, refusals: int) -> None:
    """The delete of a keyed create's session whose tombstone finds no space (ENOSPC as it is
    put in place): it is tried once more in its turn among such deletes, then written into the
    delete reserve's blocks (the reserve renamed into place as the tombstone). When the second
    try fits (``refusals`` 1: the reserve is left whole) or the reserve's rename does (2) the
    session is deleted and a retried create is the 409 ``session_deleted``, also after a
    restart, and the reserve is whole again (topped up from what the delete freed: here a
    real disk with room) before the delete returns; when nothing fits (3) the delete is a 507
    that deleted nothing (no tombstone left; the session whole, the twin's, steps on, also
    after a restart), the reserve cut to the tombstone it could not place, and topped up by the
    next readiness check once the disk has room."""
    files = FaultyFiles()
    key = IdemKey("made-then-full", "create made-then-full")
    reserve = tmp_path / RESERVE

    def session_deleted(exc: BaseException) -> None:
        assert isinstance(exc, Conflict) and exc.code == "session_deleted", exc
        assert exc.extra == {"idempotency_key": key.key, "session_id": SID}, exc.extra

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.eng.start()
        await pair.twin.start()
        await pair.eng.create(spec(), idem=key)
        await pair.twin.create(spec())
        await pair.step()
        assert reserve.stat().st_size == RESERVE_BYTES
        files.free = 100  # (the disk is full: a readiness check does not top it up)
        fault = files.arm("replace", errno.ENOSPC, dst=TOMBSTONE, times=refusals)
        if refusals < 3:
            assert not await pair.eng.delete(SID)
            assert await pair.eng.list_sessions() == []
            with pytest.raises(Conflict) as info:
                await pair.eng.create(spec(), idem=key)
            session_deleted(info.value)
            assert reserve.stat().st_size == RESERVE_BYTES
        else:
            with pytest.raises(OptserveError) as refused:
                await pair.eng.delete(SID)
            assert_refusal(refused.value, errno.ENOSPC)
            assert not list((tmp_path / "sessions" / KEY).glob(f"{TOMBSTONE}*"))
            await pair.assert_same()
            await pair.step()
            assert (await pair.eng.status()).ready  # (a readiness check on the full disk...)
            assert 0 < reserve.stat().st_size < RESERVE_BYTES  # (... leaves it as it is)
        assert fault.hits == refusals
        files.free = None  # space is back: the next readiness check tops the reserve up
        assert (await pair.eng.status()).ready
        assert reserve.stat().st_size == RESERVE_BYTES
        await pair.stop()
        again = engine(tmp_path)
        await again.start()
        try:
            if refusals < 3:
                assert await again.list_sessions() == []
                with pytest.raises(Conflict) as info:
                    await again.create(spec(), idem=key)
                session_deleted(info.value)
            else:
                await pair.assert_same(again)
        finally:
            await again.stop(snapshot=False)
        await pair.twin.stop()
    run(go())


@pytest.mark.parametrize("call,err", [("mkdir", errno.ENOSPC), ("fsync_dir", errno.EIO),
                                      ("pwritev", errno.ENOSPC), ("fsync", errno.EIO)])
def test_create_that_cannot_be_stored_leaves_nothing(tmp_path: Path, call: str,
                                                     err: int) -> None:
    """Whichever call of a create fails: 507/503, no session, no directory, the id free."""
    files = FaultyFiles()

    async def go() -> None:
        eng = engine(tmp_path, files, "step")
        await eng.start()
        try:
            files.arm(call, err, partial=call == "pwritev")
            with pytest.raises(OptserveError) as info:
                await eng.create(spec())
            assert_refusal(info.value, err)
            assert not (tmp_path / "sessions" / KEY).exists()
            assert await eng.list_sessions() == []
            with pytest.raises(OptserveError, match="no session"):
                await eng.pull(SID, None)
            info2 = await eng.create(spec())  # the id is free
            assert info2.id == SID and info2.version == 0
            assert len(read_log(wal_of(tmp_path))[0]) == 1
        finally:
            await eng.stop(snapshot=False)
    run(go())


@pytest.mark.parametrize("then", ["next-append-repairs", "crash-before-repair"])
def test_refused_apply_whose_cut_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       then: str) -> None:
    """The record is written and fsynced, then the apply refuses cleanly (torch raising before
    it changed anything, simulated) and the cut of the record fails too: the log is marked
    for repair; a crash before the repair must not replay the refused step."""
    from app.engine.ops import Step

    files = FaultyFiles()
    real_apply = Step.apply
    refuse = {"next": False}

    def apply(self: Step, s: Any, plan: Any) -> Any:
        if refuse["next"]:
            refuse["next"] = False
            raise ValueError("simulated: torch refused the step")
        return real_apply(self, s, plan)
    monkeypatch.setattr(Step, "apply", apply)

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        wal = wal_of(tmp_path)
        before = read_log(wal)
        refuse["next"] = True
        cut = files.arm("ftruncate", errno.EIO)
        with pytest.raises(ValueError, match="simulated"):
            await pair.eng.step(SID, grad(pair.k), return_params=False)
        assert cut.hits == 1
        assert wal.stat().st_size > before[1]
        await pair.assert_same()
        status = await pair.eng.status()
        assert not status.ready and status.reason is not None and "repair" in status.reason
        if then == "next-append-repairs":
            await pair.step()
            assert len(read_log(wal)[0]) == len(before[0]) + 1
            assert (await pair.eng.status()).ready
        await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


def test_stop_waits_for_the_snapshot_maintenance_is_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``stop`` cancels the maintenance task while its snapshot of a session is being written
    on an I/O thread (a slow disk). The write ends before the session's lock is let go, so the
    snapshot ``stop`` then takes is not written over it at the same time (one temp file, and
    each write cuts the log after its rename); the restart restores the step and refuses
    nothing."""
    from app.engine import store as store_module
    from app.engine.host import EmbeddedHost, HostConfig

    active, most, guard = [0], [0], threading.Lock()
    write_atomic = store_module.write_atomic

    def slow_write(path: Path, parts: Sequence[Buffer], *args: Any) -> None:
        if path.name != "snapshot.bin":
            write_atomic(path, parts, *args)
            return
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.5)
            write_atomic(path, parts, *args)
        finally:
            with guard:
                active[0] -= 1
    monkeypatch.setattr(store_module, "write_atomic", slow_write)
    p0, g = torch.zeros(10), torch.ones(10)
    local = p0.clone()
    opt = torch.optim.SGD([local], lr=0.1)
    local.grad = g
    opt.step()

    async def first() -> None:
        host = EmbeddedHost(HostConfig(device="cpu", warm_up=False, data_dir=tmp_path,
                                       durability="interval", snapshot_every_s=0.01))
        await host.start()
        await host.create("t~a", CreateSpec("SGD", [GroupSpec({"w": p0.clone()})],
                                            options={"lr": 0.1}, id="a"))
        await host.step("t~a", {"w": g}, want_params=False)
        deadline = time.monotonic() + 10
        while active[0] == 0 and time.monotonic() < deadline:  # maintenance is writing
            await asyncio.sleep(0.01)
        assert active[0] == 1
        await host.stop()

    async def second() -> None:
        eng = embedded_engine("cpu", warm_up=False, data_dir=tmp_path, durability="interval")
        await eng.start()
        try:
            assert not (await eng.status()).refused
            got = await eng.pull("a", None, tenant="t")
            assert got.params is not None and torch.equal(got.params["w"], local)
        finally:
            await eng.stop()
    asyncio.run(first())
    assert most[0] == 1, f"{most[0]} snapshot writes of one session ran at once"
    asyncio.run(second())


def test_a_start_on_a_full_disk_serves_what_is_stored_and_carries_on_once_space_returns(
        tmp_path: Path) -> None:
    """A crash while the disk is full, then a start on it: the write probe finds no space.
    The server starts anyway (it stopped with a traceback): every stored session is restored
    and readable, mutations get 507 with nothing applied, readiness names the full disk, and
    once space returns the session steps on, without a restart."""
    async def go() -> None:
        pair = Pair(engine(tmp_path))
        await pair.start()
        for _ in range(3):
            await pair.step()
        await pair.stop()  # as a crash leaves it
        files = FaultyFiles()
        files.arm("pwritev", errno.ENOSPC, target="other", times=-1)  # the probe
        files.arm("pwritev", errno.ENOSPC, times=-1)  # the logs
        files.free = 0
        pair.eng = engine(tmp_path, files)
        await pair.eng.start()
        try:
            assert await pair.eng.refused() == {}
            await pair.assert_same()
            status = await pair.eng.status()
            assert not status.ready and status.reason is not None
            assert "No space left on device" in status.reason
            assert_refusal(await pair.refused_step(), errno.ENOSPC)
            await pair.assert_same()
            files.disarm()  # space is back
            files.free = None
            assert (await pair.eng.status()).ready
            await pair.step()
            await pair.assert_same()
        finally:
            await pair.stop()
        await pair.assert_restart_same(tmp_path)
    run(go())


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("err", [None, errno.EIO])
def test_views_the_client_sees_get_the_new_values_only_once_they_are_durable(
        tmp_path: Path, size: str, err: int | None) -> None:
    """The same-host transport's slots (``params_into`` with ``into_seen``): the SDK's
    parameters may live in them (``RemoteOptimizer(zero_copy=True)``), so a step whose fsync
    is still running has not written them yet, and one whose fsync fails never does (they
    were written while the fsync ran, and kept values the session took back). Records small
    (written, then fsynced beside the step) and large (written beside it)."""
    files = GatedFiles()
    make, grads = (spec, grad) if size == "small" else (big_spec, big_grad)

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"), make, grads)
        await pair.start()
        await pair.step()
        slots = {name: torch.full_like(t, 7.0)
                 for name, t in (await pair.eng.pull(SID, None)).params.items()}
        files.close_gate()
        stepping = asyncio.ensure_future(pair.eng.step(
            SID, grads(pair.k), return_params=True, params_into=slots, into_seen=True))
        assert await asyncio.to_thread(files.held.wait, 20), "the fsync never started"
        await asyncio.sleep(0.3)  # the step is applied meanwhile
        assert all(bool((t == 7.0).all()) for t in slots.values()), "written before durable"
        files.open_gate(err)
        if err is None:
            got = await stepping
            await pair.twin_step()
            want = await pair.twin.pull(SID, None)
            assert got.params is not None and got.version == want.version
            assert_tree_bitwise(dict(slots), want.params, "the slots")
            assert all(got.params[n] is slots[n] for n in slots)
        else:
            with pytest.raises(OptserveError) as info:
                await stepping
            assert_refusal(info.value, err)
            assert all(bool((t == 7.0).all()) for t in slots.values()), "a refused step's"
        await pair.assert_goes_on(tmp_path)
    run(go())
