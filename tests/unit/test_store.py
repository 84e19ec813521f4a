"""The embedded store (snapshot + write-ahead log) on its own, and the engine's restore on top
of it: torn tails dropped, damage in the middle refused, snapshots replaced atomically, a crash
between a snapshot's rename and the log's truncation replayed exactly (sequence numbers)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import json
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine, persist
from app.engine.ops.gradients import Push, Step
from app.engine.store import (
    Files,
    Store,
    StoreCorrupt,
    frame_record,
    frame_snapshot,
    read_log,
    read_snapshot,
    write_atomic,
)
from app.errors import OptserveError
from app.wire.safetensors_body import read_safetensors, write_safetensors

T = TypeVar("T")
HEAD = 20  # record header: magic, u64 length, payload crc32c, header crc32c


def payloads(n: int, size: int = 100) -> list[bytes]:
    return [bytes([i % 251]) * (size + i) for i in range(n)]


def write_log(path: Path, records: list[bytes]) -> list[int]:
    """Write framed records; the byte offset of each."""
    offsets, data = [], b""
    for r in records:
        offsets.append(len(data))
        data += frame_record(r)
    path.write_bytes(data)
    return offsets


@pytest.fixture
def wal(tmp_path: Path) -> Path:
    return tmp_path / "wal.bin"


# --------------------------------------------------------------------------- log framing

def test_log_round_trip_and_empty(wal: Path) -> None:
    assert read_log(wal) == ([], 0, False)  # no file: nothing logged
    wal.write_bytes(b"")
    assert read_log(wal) == ([], 0, False)
    recs = payloads(5)
    write_log(wal, recs)
    got, valid, torn = read_log(wal)
    assert got == recs and valid == wal.stat().st_size and not torn


@pytest.mark.parametrize("cut", [1, HEAD - 1, HEAD, HEAD + 1, "half", "last-1"])
def test_torn_tail_is_dropped(wal: Path, cut: int | str) -> None:
    recs = payloads(4)
    offsets = write_log(wal, recs)
    full = frame_record(b"x" * 300)
    n = {"half": len(full) // 2, "last-1": len(full) - 1}.get(str(cut), cut)
    assert isinstance(n, int)
    with open(wal, "ab") as f:
        f.write(full[:n])
    got, valid, torn = read_log(wal)
    assert got == recs and torn
    assert valid == offsets[-1] + len(frame_record(recs[-1]))


@pytest.mark.parametrize("tail", [b"\0" * 8, b"\0" * 16, b"\0" * 4096, b"\xff" * 40,
                                  b"OPTR" + b"\0" * 12])
def test_garbage_after_the_last_record_is_a_torn_tail(wal: Path, tail: bytes) -> None:
    """A crash can leave zero-filled blocks past the last write; the old framing (length,
    crc32) read 8 zero bytes as a valid empty record, which then failed to decode."""
    recs = payloads(3)
    write_log(wal, recs)
    size = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(tail)
    assert read_log(wal) == (recs, size, True)


def test_last_record_with_a_bad_checksum_is_a_torn_tail(wal: Path) -> None:
    recs = payloads(3)
    offsets = write_log(wal, recs)
    data = bytearray(wal.read_bytes())
    data[-5] ^= 0x01
    wal.write_bytes(data)
    got, valid, torn = read_log(wal)
    assert got == recs[:2] and valid == offsets[2] and torn


@pytest.mark.parametrize("where", ["payload", "length", "payload-crc", "magic", "header-crc"])
@pytest.mark.parametrize("victim", [0, 2])
def test_damage_in_the_middle_is_refused(wal: Path, where: str, victim: int) -> None:
    """Any damaged record with a valid one after it is corruption, not a torn tail; in
    particular a damaged length field (which the old framing read as a torn tail, silently
    dropping every later, acknowledged record and truncating the file)."""
    recs = payloads(5)
    offsets = write_log(wal, recs)
    pos = offsets[victim] + {"magic": 1, "length": 6, "payload-crc": 9, "header-crc": 13,
                             "payload": HEAD + 20}[where]
    data = bytearray(wal.read_bytes())
    data[pos] ^= 0x40
    wal.write_bytes(data)
    with pytest.raises(StoreCorrupt, match=f"record {victim + 1} .*valid record follows"):
        read_log(wal)


def test_every_single_byte_flip_is_caught(wal: Path) -> None:
    """Flip each byte of a three-record log in turn: the result is never a wrong record."""
    recs = payloads(3, 20)
    write_log(wal, recs)
    clean = wal.read_bytes()
    for i in range(len(clean)):
        data = bytearray(clean)
        data[i] ^= 0xA5
        wal.write_bytes(data)
        try:
            got, _, torn = read_log(wal)
        except StoreCorrupt:
            continue
        assert torn and got == recs[:len(got)] and len(got) == 2, i  # only the last can go


def test_store_read_truncates_a_torn_tail_and_appends_continue(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.open()
    try:
        st.write_snapshot("s", b"snap")
        for p in payloads(3):
            st.append("s", p, "step")
        st.close()
        wal = tmp_path / "sessions" / "s" / "wal.bin"
        good = wal.stat().st_size
        with open(wal, "ab") as f:
            f.write(frame_record(b"never acknowledged")[:11])
        st = Store(tmp_path)
        st.open()
        snap, records, torn = st.read("s")
        assert (snap, records, torn) == (b"snap", payloads(3), True)
        assert wal.stat().st_size == good  # the torn bytes are gone for good
        st.append("s", b"after", "step")
        assert st.read("s") == (b"snap", [*payloads(3), b"after"], False)
    finally:
        st.close()


def test_store_read_leaves_a_corrupt_log_untouched(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.open()
    st.write_snapshot("s", b"snap")
    for p in payloads(3):
        st.append("s", p, "step")
    st.close()
    wal = tmp_path / "sessions" / "s" / "wal.bin"
    data = bytearray(wal.read_bytes())
    data[HEAD + 5] ^= 0xFF
    wal.write_bytes(data)
    with pytest.raises(StoreCorrupt):
        Store(tmp_path).read("s")
    assert wal.read_bytes() == data  # the evidence stays for the operator


def test_first_format_logs_and_snapshots_are_still_read(tmp_path: Path) -> None:
    """Data directories written by the first release (OPTSNAP1 / OPTR framing, zlib crc32)."""
    import struct
    import zlib

    def v1_record(payload: bytes) -> bytes:
        head = struct.pack("<4sII", b"OPTR", len(payload), zlib.crc32(payload))
        return head + struct.pack("<I", zlib.crc32(head)) + payload
    d = tmp_path / "sessions" / "s"
    d.mkdir(parents=True)
    snap = b"old snapshot"
    (d / "snapshot.bin").write_bytes(struct.pack("<8sQI", b"OPTSNAP1", len(snap),
                                                 zlib.crc32(snap)) + snap)
    (d / "wal.bin").write_bytes(v1_record(b"one") + v1_record(b"two"))
    st = Store(tmp_path)
    st.open()
    try:
        assert st.read("s") == (snap, [b"one", b"two"], False)
        st.append("s", b"three", "step")  # new records follow old ones
        assert st.read("s") == (snap, [b"one", b"two", b"three"], False)
    finally:
        st.close()


# --------------------------------------------------------------------------- records of bodies

def general_record(record: persist.Record) -> bytes:
    """A record as the general tree encoding writes it (tensor by tensor)."""
    tree: dict[str, Any] = {"op": record.op.kind, "args": record.op.to_tree(),
                            "version": record.version, "seq": record.seq,
                            "keys": [list(k) for k in record.keys]}
    if record.sync is not None:
        tree["sync"] = record.sync
    return persist.encode_tree(tree, persist.RECORD_KEY)


def body_of(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
            ) -> dict[str, torch.Tensor]:
    return read_safetensors(bytearray(write_safetensors(tensors, meta)))[0]


def test_a_record_of_body_gradients_is_the_general_encoding_byte_for_byte() -> None:
    """Gradients as a body decodes them are logged from the body's bytes and kept header
    entries: the very bytes the general encoding writes (old and new servers read each other's
    logs), and they decode to the gradients."""
    g = torch.Generator().manual_seed(5)
    odd = {f'p{i}"\\é\n': torch.randn(3, 2, generator=g) for i in range(40)}
    many = {f"t{i:05d}": torch.randn(4, generator=g) for i in range(3000)}
    half = {f"h{i}": torch.randn(5, generator=g).to(torch.bfloat16) for i in range(6)}
    token_like = persist._GRADS_TOKEN[:-1]  # (a string the token's neighbours might be)
    cases = [
        persist.Record(Step(body_of(odd, {"scalars": "{}"}), base_version=2, time=1.25,
                            scalars={"loss": 0.5, token_like: 1.0, '"q"': 2.0},
                            options={0: {"lr": 0.01, "betas": [0.8, 0.9]}}, request=True,
                            workers=["w0", 'w"1'], touched=True),
                       7, 8, [("key\"1", "fp"), ("k2", "é")],
                       {"workers": ["w0"], "expected": 2, "partial": False}),
        persist.Record(Step(body_of(many)), 1, 1, []),
        persist.Record(Step(body_of(half), upcast=True), 3, 3, []),
        persist.Record(Push(body_of(odd), scalars={"acc": 0.25}), 2, 1, [("k", "f")]),
    ]
    for record in cases:
        parts = persist.encode_record_parts(record)
        assert parts.body is not None and not parts.owned, record.op.kind
        fast = b"".join(parts)
        assert fast == general_record(record), record.op.kind
        parts.own_body()
        assert parts.owned and b"".join(parts) == fast
        back = persist.decode_record(fast)
        assert isinstance(back.op, type(record.op)) and isinstance(record.op, (Step, Push))
        assert back.op.grads.keys() == record.op.grads.keys() and all(
            back.op.grads[n].dtype == t.dtype and torch.equal(back.op.grads[n], t)
            for n, t in record.op.grads.items())
        assert (dataclasses.replace(back.op, grads={})  # type: ignore[arg-type]
                == dataclasses.replace(record.op, grads={}))
        assert (back.seq, back.version, back.keys, back.sync) == (
            record.seq, record.version, record.keys, record.sync)
    # twice more with the layout kept: the same bytes
    for record in cases[:2]:
        assert b"".join(persist.encode_record_parts(record)) == general_record(record)


def test_records_the_body_encoding_does_not_take_are_encoded_in_general() -> None:
    g = torch.Generator().manual_seed(6)
    plain = {"a": torch.randn(3, generator=g), "b": torch.randn(2, generator=g)}
    mixed = body_of({"a": torch.randn(3, generator=g),
                     "b": torch.randn(2, generator=g).to(torch.float64)})
    changed = body_of(plain)
    changed["c"] = torch.randn(1, generator=g)  # (no longer the body's tensors)
    tensor_lr = Step(body_of(plain), options={0: {"lr": torch.tensor(0.01)}})
    for op in [Step(plain), Step(mixed), Step(changed), tensor_lr, Step(body_of({}))]:
        record = persist.Record(op, 1, 1, [])
        parts = persist.encode_record_parts(record)
        assert parts.body is None
        assert b"".join(parts) == general_record(record)


# --------------------------------------------------------------------------- snapshots

def test_snapshot_frame_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.bin"
    payload = os.urandom(1000)
    framed = b"".join(frame_snapshot(payload))
    path.write_bytes(framed)
    assert read_snapshot(path) == payload
    for bad, why in [(framed[:10], "truncated snapshot header"),
                     (framed[:-1], "header says"),
                     (framed + b"x", "header says"),
                     (b"XXXXXXXX" + framed[8:], "not an optserve snapshot"),
                     (framed[:-1] + bytes([framed[-1] ^ 1]), "checksum")]:
        path.write_bytes(bad)
        with pytest.raises(StoreCorrupt, match=why):
            read_snapshot(path)


class CrashOnReplace(Files):
    def replace(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")


def test_snapshot_replace_is_atomic(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.open()
    try:
        st.write_snapshot("s", b"first")
        d = tmp_path / "sessions" / "s"
        # a crash while the new snapshot was being written leaves a temp file: ignored
        (d / "snapshot.bin.tmp").write_bytes(b"half a snap")
        assert st.read("s")[0] == b"first"
        # a failure before the rename: the old snapshot and its log are intact
        st.append("s", b"rec", "step")
        st.files = CrashOnReplace()
        with pytest.raises(OptserveError) as failed:
            st.write_snapshot("s", b"second")
        # (its words say what did not happen: the snapshot, not an operation)
        assert failed.value.detail.startswith("no snapshot was written: writing a snapshot: ")
        st.files = Files()
        assert st.read("s") == (b"first", [b"rec"], False)
        assert not (d / "snapshot.bin.tmp").exists()
        st.write_snapshot("s", b"second")
        assert st.read("s") == (b"second", [], False)
        assert sorted(p.name for p in d.iterdir()) == ["snapshot.bin", "wal.bin"]
    finally:
        st.close()


class Recording(Files):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def fsync(self, fd: int) -> None:
        self.calls.append("file")
        super().fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self.calls.append("rename")
        super().replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        self.calls.append("dir")
        super().fsync_dir(path)


def test_write_atomic_fsyncs_file_then_directory(tmp_path: Path) -> None:
    files = Recording()
    write_atomic(tmp_path / "x", [b"da", b"ta"], files)
    assert files.calls == ["file", "rename", "dir"]
    assert (tmp_path / "x").read_bytes() == b"data"


# --------------------------------------------------------------------------- durability

def test_interval_writes_at_once_and_fsyncs_in_the_background(tmp_path: Path) -> None:
    files = Recording()
    st = Store(tmp_path, interval_s=0.02, files=files)
    st.open()
    try:
        st.write_snapshot("s", b"snap")
        files.calls.clear()
        st.append("s", b"int", "interval")
        assert st.read("s")[1] == [b"int"]  # in the file at once
        deadline = time.monotonic() + 5
        while "file" not in files.calls:  # the flusher fsyncs it within the window
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        st.close()


def test_step_durability_fsyncs_before_returning(tmp_path: Path) -> None:
    files = Recording()
    st = Store(tmp_path, files=files)
    st.open()
    try:
        st.write_snapshot("s", b"snap")
        files.calls.clear()
        st.append("s", b"rec", "step")
        assert files.calls == ["file"]
    finally:
        st.close()


def test_delete_removes_the_session_and_closes_its_log(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.open()
    try:
        st.write_snapshot("s", b"snap")
        st.append("s", b"rec", "interval")
        st.delete("s")
        assert list(st.session_ids()) == []
        with pytest.raises(OptserveError):  # its log is gone with it
            st.append("s", b"more", "step")
    finally:
        st.close()


def test_open_clears_interrupted_deletes(tmp_path: Path) -> None:
    st = Store(tmp_path)
    st.open()
    st.write_snapshot("a", b"snap")
    st.close()
    os.replace(tmp_path / "sessions" / "a", tmp_path / "sessions" / ".deleted-a-1-2")
    st = Store(tmp_path)
    st.open()
    st.close()
    assert os.listdir(tmp_path / "sessions") == []


def test_a_keyed_delete_keeps_its_tombstone_whenever_the_delete_happened(tmp_path: Path
                                                                        ) -> None:
    def stone(key: str, sid: str) -> dict[str, str]:
        return {"tenant": "t", "key": key, "fingerprint": "DELETE", "id": sid}

    sessions = tmp_path / "sessions"
    st = Store(tmp_path)
    st.open()
    for sid in ("a", "b", "c"):
        st.write_snapshot(sid, b"snap")
    st.delete("a", stone("k1", "a"))
    st.close()
    # a crash after the rename that deleted b, before its tombstone reached the log
    (sessions / "b" / "tombstone").write_text(json.dumps(stone("k2", "b")))
    os.replace(sessions / "b", sessions / ".deleted-b-1-2")
    # a crash before the rename: c was not deleted, its tombstone means nothing
    (sessions / "c" / "tombstone").write_text(json.dumps(stone("k3", "c")))
    st = Store(tmp_path)
    st.open()
    try:
        assert [t["key"] for t in st.tombstones(10)] == ["k1", "k2"]
        assert st.tombstones(10)[0] == stone("k1", "a")
        assert list(st.session_ids()) == ["c"] and not (sessions / "c" / "tombstone").exists()
        for i in range(5):  # the log keeps the last ones
            st.write_snapshot(f"x{i}", b"snap")
            st.delete(f"x{i}", stone(f"x{i}", f"x{i}"))
        assert [t["key"] for t in st.tombstones(3)] == ["x2", "x3", "x4"]
        assert len((tmp_path / "tombstones.jsonl").read_bytes().splitlines()) == 3
        with open(tmp_path / "tombstones.jsonl", "ab") as f:
            f.write(b'{"tenant": "t", "ke')  # an append a crash tore
        st.write_snapshot("y", b"snap")
        st.delete("y", stone("y", "y"))
        assert [t["key"] for t in st.tombstones(10)] == ["x2", "x3", "x4", "y"]
    finally:
        st.close()


# --------------------------------------------------------------------------- engine restore

def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def spec(sid: str, **extra: Any) -> CreateSpec:
    g = torch.Generator().manual_seed(0)
    return CreateSpec("Adam", [GroupSpec({"w": torch.randn(4, 3, generator=g),
                                          "b": torch.randn(3, generator=g)})],
                      {"lr": 0.01}, scheduler={"name": "StepLR",
                                               "options": {"step_size": 2, "gamma": 0.5}},
                      id=sid, **extra)


def grad(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def reference(steps: int) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer,
                                   torch.optim.lr_scheduler.StepLR]:
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    opt = torch.optim.Adam([p["w"], p["b"]], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k in range(steps):
        gk = grad(k)
        p["w"].grad, p["b"].grad = gk["w"], gk["b"]
        opt.step()
        sched.step()
    return p, opt, sched


def engine(data: Path, every: int = 1000) -> Front:
    return embedded_engine("cpu", data_dir=data, durability="step", snapshot_every_steps=every)


async def restart(data: Path, check: Callable[[Front], Coroutine[Any, Any, None]],
                  every: int = 1000, graceful: bool = False) -> Front:
    """Start an engine on ``data``, run ``check``, stop it: ``graceful`` snapshots every
    session on the way out, else the disk stays as the test made it."""
    eng = engine(data, every)
    await eng.start()
    try:
        await check(eng)
    finally:
        await eng.stop(snapshot=graceful)
    return eng


async def make_steps(data: Path, n: int, every: int = 1000) -> None:
    async def steps(eng: Front) -> None:
        await eng.create(spec("s"))
        for k in range(n):
            await eng.step("s", grad(k), return_params=False)
    await restart(data, steps, every)


async def assert_at(eng: Front, steps: int) -> None:
    want, _, sched = reference(steps)
    got = await eng.pull("s", None)
    assert (got.version, got.step) == (steps, steps)
    for n in want:
        assert torch.equal(got.params[n], want[n]), n
    assert got.lr == sched.get_last_lr()


def test_restore_replays_the_log_bitwise(tmp_path: Path) -> None:
    async def go() -> None:
        # create + 7 steps = 8 records: snapshots after records 3 and 6, two left in the log
        await make_steps(tmp_path, 7, every=3)
        wal = tmp_path / "sessions" / "default~s" / "wal.bin"
        assert len(read_log(wal)[0]) == 2

        async def check(eng: Front) -> None:
            await assert_at(eng, 7)
            assert await eng.refused() == {}
        await restart(tmp_path, check)
    run(go())


def test_a_log_past_snapshot_every_mb_is_snapshotted(tmp_path: Path) -> None:
    """A large session's log is cut by size, not only by count: records here are ~0.5 KB
    (the create ~1 KB), the limit 1.5 KB, so a snapshot follows every few records whatever
    snapshot_every_steps says, and the restart replays what is left to the same values."""
    limit_mb = 1536 / 2**20

    async def go() -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                              snapshot_every_steps=1000, snapshot_every_mb=limit_mb)
        await eng.start()
        wal = tmp_path / "sessions" / "default~s" / "wal.bin"
        try:
            await eng.create(spec("s"))
            sizes = []
            for k in range(12):
                await eng.step("s", grad(k), return_params=False)
                sizes.append(wal.stat().st_size)
        finally:
            await eng.stop(snapshot=False)
        assert max(sizes) < 1536, sizes  # cut each time it reached the limit
        assert (tmp_path / "sessions" / "default~s" / "snapshot.bin").exists()
        assert len(read_log(wal)[0]) < 12

        async def check(eng: Front) -> None:
            await assert_at(eng, 12)
        await restart(tmp_path, check)
    run(go())


def test_crash_between_snapshot_rename_and_log_truncate(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot holds records 1..5 but the log still has them too: replay skips them by
    sequence number instead of applying them twice."""
    async def go() -> None:
        await make_steps(tmp_path, 5)
        d = tmp_path / "sessions" / "default~s"
        old_log = (d / "wal.bin").read_bytes()
        assert len(read_log(d / "wal.bin")[0]) == 6  # the create and 5 steps

        async def nothing(eng: Front) -> None:
            pass
        await restart(tmp_path, nothing, graceful=True)  # snapshots
        assert read_log(d / "wal.bin")[0] == []
        (d / "wal.bin").write_bytes(old_log)  # as if the truncate never happened

        async def check(eng: Front) -> None:
            await assert_at(eng, 5)
            await eng.step("s", grad(5), return_params=False)
            await assert_at(eng, 6)
        await restart(tmp_path, check)

        async def check_again(eng: Front) -> None:  # and the record after them too
            await assert_at(eng, 6)
        await restart(tmp_path, check_again)
    run(go())


def test_missing_record_or_wrong_version_refuses_the_session(tmp_path: Path) -> None:
    async def go() -> None:
        await make_steps(tmp_path, 4)
        wal = tmp_path / "sessions" / "default~s" / "wal.bin"
        records = read_log(wal)[0]
        write_log(wal, records[:1] + records[2:])  # record 2 gone, framing intact

        async def check(eng: Front) -> None:
            assert "a record is missing" in (await eng.refused())["s"]
            assert await eng.list_sessions() == []
        await restart(tmp_path, check)
        record = persist.decode_record(records[1])
        record.version += 7
        forged = b"".join(persist.encode_record_parts(record))
        write_log(wal, [records[0], forged, *records[2:]])

        async def check2(eng: Front) -> None:
            assert "the log says 8" in (await eng.refused())["s"]
        await restart(tmp_path, check2)
    run(go())


def test_interrupted_create_is_discarded_not_refused(tmp_path: Path) -> None:
    async def go() -> None:
        await make_steps(tmp_path, 1)
        half = tmp_path / "sessions" / "default~half"
        half.mkdir()
        (half / "snapshot.bin.tmp").write_bytes(b"partial")

        async def check(eng: Front) -> None:
            assert await eng.refused() == {}
            assert [d.id for d in await eng.list_sessions()] == ["s"]
            await eng.create(spec("half"))  # the id is free
        await restart(tmp_path, check)
        assert len(read_log(half / "wal.bin")[0]) == 1  # its create record
    run(go())


@pytest.mark.parametrize("cut", [1, HEAD, "half", "last-1"])
def test_a_create_whose_record_a_crash_tore_is_discarded_not_refused(tmp_path: Path,
                                                                     cut: int | str) -> None:
    """A crash in the middle of the create's own record: that create was never acknowledged,
    so the directory goes (the id is free again), as one with an empty log does."""
    async def go() -> None:
        async def create(eng: Front) -> None:
            await eng.create(spec("torn"))
        await restart(tmp_path, create)
        wal = tmp_path / "sessions" / "default~torn" / "wal.bin"
        data = wal.read_bytes()
        n = {"half": len(data) // 2, "last-1": len(data) - 1}.get(str(cut), cut)
        assert isinstance(n, int)
        wal.write_bytes(data[:n])

        async def check(eng: Front) -> None:
            assert await eng.refused() == {}
            assert await eng.list_sessions() == []
            await eng.create(spec("torn"))  # the id is free
        await restart(tmp_path, check)
        assert len(read_log(wal)[0]) == 1  # the new create's record
    run(go())


def test_damaged_snapshot_refuses_that_session_and_serves_the_rest(tmp_path: Path) -> None:
    async def go() -> None:
        async def two(eng: Front) -> None:
            await eng.create(spec("s"))
            await eng.create(spec("t"))
            for k in range(3):
                await eng.step("s", grad(k), return_params=False)
                await eng.step("t", grad(k), return_params=False)
        await restart(tmp_path, two, graceful=True)  # snapshots both
        snap = tmp_path / "sessions" / "default~s" / "snapshot.bin"
        data = bytearray(snap.read_bytes())
        data[len(data) // 2] ^= 0x10
        snap.write_bytes(data)

        async def check(eng: Front) -> None:
            assert "checksum" in (await eng.refused())["s"]
            assert [d.id for d in await eng.list_sessions()] == ["t"]
            want, _, _ = reference(3)
            got = await eng.pull("t", None)
            assert got.version == 3 and all(torch.equal(got.params[n], want[n]) for n in want)
        await restart(tmp_path, check)
        assert snap.read_bytes() == data  # left for the operator
    run(go())


def test_replay_is_bitwise_for_every_optimizer(tmp_path: Path) -> None:
    """Every supported optimizer (AdamW apart, below), with maximize and weight decay where it
    has them: steps, an accumulated push, a group option change; then a restart that replays
    all of it from the log (no snapshot since creation) reaches bitwise the same params and
    state. (A logged gradient that the optimizer changed in place would replay differently.)"""
    from app.engine import optimizers
    replay_every_optimizer(tmp_path, [n for n in optimizers.SUPPORTED
                                      if n not in ("AdamW", "LBFGS")])  # LBFGS: test_lbfgs*


def test_adamw_sessions_survive_a_restart(tmp_path: Path) -> None:
    replay_every_optimizer(tmp_path, ["AdamW"])


def replay_every_optimizer(tmp_path: Path, names: list[str]) -> None:
    from app.engine import optimizers
    from tests.unit.test_engine import assert_tree_bitwise

    cases: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        cls = optimizers.optimizer_class(name)
        takes = inspect.signature(cls.__init__).parameters
        for maximize in (False, True) if "maximize" in takes else (False,):
            opts: dict[str, Any] = {"lr": 0.01}
            if maximize:
                opts["maximize"] = True
            if "weight_decay" in takes:
                opts["weight_decay"] = 0.01
            cases.append((f"{name}-{int(maximize)}".lower(), opts))

    live: dict[str, Any] = {}

    async def go() -> None:
        async def work(eng: Front) -> None:
            for sid, opts in cases:
                w0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
                name = next(n for n in optimizers.SUPPORTED if n.lower() == sid.split("-")[0])

                def g(k: int, sparse: bool = name == "SparseAdam") -> dict[str, torch.Tensor]:
                    gen = torch.Generator().manual_seed(k)
                    t = torch.randn(4, 3, generator=gen)
                    if sparse:  # rows 0, 2, 2 (a duplicate): SparseAdam takes only these
                        t = torch.sparse_coo_tensor(torch.tensor([[0, 2, 2]]), t[:3], (4, 3),
                                                    check_invariants=False)
                    return {"w": t}
                await eng.create(CreateSpec(name, [GroupSpec({"w": w0})], opts, id=sid))
                await eng.step(sid, g(1), return_params=False)
                await eng.step(sid, g(2), return_params=False)
                await eng.push(sid, g(3))
                await eng.step(sid, g(4), return_params=False)
                await eng.update_param_group(sid, 0, {"lr": 0.005})
                await eng.step(sid, g(5), return_params=False)
                live[sid] = (await eng.pull(sid, None), await eng.export_state(sid))
        await restart(tmp_path, work)

        async def check(eng: Front) -> None:
            assert await eng.refused() == {}
            for sid, _ in cases:
                want_params, want_state = live[sid]
                got = await eng.pull(sid, None)
                assert got.version == want_params.version == 4, sid
                assert_tree_bitwise(got.params, want_params.params, sid)
                assert_tree_bitwise((await eng.export_state(sid)).state_dict, want_state.state_dict,
                                    sid)
        await restart(tmp_path, check)
    run(go())


def test_replay_of_every_logged_operation(tmp_path: Path) -> None:
    """Overwrite, add_param_group, group options, push / zero_grad, a manual scheduler step
    with a metric, a state import: all logged, all replayed to the same bits."""
    from tests.unit.test_engine import assert_tree_bitwise
    live: dict[str, Any] = {}

    def g(k: int, n: int = 3) -> torch.Tensor:
        return torch.randn(n, generator=torch.Generator().manual_seed(k))

    async def go() -> None:
        async def work(eng: Front) -> None:
            await eng.create(CreateSpec(
                "SGD", [GroupSpec({"a": g(0)})], {"lr": 0.1, "momentum": 0.9}, id="s",
                scheduler={"name": "ReduceLROnPlateau", "step_on": "manual",
                           "options": {"patience": 0, "factor": 0.5}}))
            await eng.step("s", {"a": g(1)}, return_params=False)
            await eng.scheduler_step("s", 1.0)
            await eng.scheduler_step("s", 2.0)  # worse: lr halves
            await eng.overwrite("s", {"a": g(2)})
            await eng.add_param_group("s", GroupSpec({"b": g(3, 2)}, {"lr": 0.3}))
            await eng.push("s", {"a": g(4), "b": g(5, 2)})
            await eng.zero_grad("s")
            await eng.push("s", {"b": g(6, 2)})
            await eng.step("s", {"a": g(7)}, return_params=False)
            state = await eng.export_state("s")
            await eng.step("s", {"a": g(8), "b": g(9, 2)}, return_params=False)
            await eng.import_state("s", state.state_dict)  # back to the earlier state
            await eng.update_param_group("s", 1, {"momentum": 0.5})
            await eng.step("s", {"a": g(10), "b": g(11, 2)}, return_params=False)
            live["params"] = await eng.pull("s", None)
            live["state"] = await eng.export_state("s")
            live["desc"] = await eng.describe("s")
        await restart(tmp_path, work)
        wal = tmp_path / "sessions" / "default~s" / "wal.bin"
        ops = [persist.decode_record(r).op.kind for r in read_log(wal)[0]]
        assert ops == ["create", "step", "scheduler_step", "scheduler_step", "overwrite",
                       "add_group", "push", "zero_grad", "push", "step", "step", "import",
                       "update_group", "step"]

        async def check(eng: Front) -> None:
            got = await eng.pull("s", None)
            assert got.version == live["params"].version
            assert_tree_bitwise(got.params, live["params"].params)
            assert_tree_bitwise((await eng.export_state("s")).state_dict, live["state"].state_dict)
            assert await eng.describe("s") == live["desc"]
        await restart(tmp_path, check)
    run(go())


def test_operations_queued_behind_a_delete_never_share_the_new_session(tmp_path: Path) -> None:
    """Steps wait behind a delete; the id is made again at once and stepped. The waiters each
    take the new session's lock, not the deleted one's: no two operations run on it side by
    side, so every acknowledged step has its own version and the log replays to it."""
    async def go() -> None:
        eng = engine(tmp_path)
        await eng.start()
        results: list[object] = []

        async def stepper(k: int) -> None:
            try:
                results.append((await eng.step("s", grad(k % 7), return_params=False)).version)
            except OptserveError as exc:
                results.append(exc.code)
            except Exception as exc:  # noqa: BLE001 - what the test looks for
                results.append(exc)
        try:
            await eng.create(spec("s"))
            first = [asyncio.create_task(stepper(k)) for k in range(20)]
            await asyncio.sleep(0)
            delete = asyncio.create_task(eng.delete("s"))
            queued = [asyncio.create_task(stepper(k)) for k in range(3000)]
            await delete
            # (made again: past the deleted session's last version, app.engine.last_versions)
            old = [r for r in results if isinstance(r, int)]  # (all the deleted session's)
            made_at = (await eng.create(spec("s"))).version
            assert made_at == max(old, default=0) + 1
            fresh = [asyncio.create_task(stepper(k)) for k in range(30)]
            await asyncio.gather(*first, *queued, *fresh)
            assert not [r for r in results if isinstance(r, Exception)]
            late = [r for r in results[20:] if isinstance(r, int)]
            version = (await eng.pull("s", [])).version
            assert sorted(late) == list(range(made_at + 1, version + 1))
        finally:
            await eng.stop(snapshot=False)

        async def check(eng: Front) -> None:
            assert await eng.refused() == {}
            assert (await eng.pull("s", [])).version == version
        await restart(tmp_path, check)
    run(go())


def test_the_lock_of_a_deleted_session_is_not_kept_by_those_that_waited(
        tmp_path: Path) -> None:
    """Steps queued behind a delete (the id not made again) each find the session gone (404);
    the lock they take in place of the deleted one is let go with them, not kept for an id
    that names no session."""
    async def go() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            await eng.create(spec("s"))
            host, key = await eng._host("default", "s")
            locks = host.embedded._locks  # type: ignore[attr-defined]
            first = [asyncio.create_task(eng.step("s", grad(k), return_params=False))
                     for k in range(5)]
            await asyncio.sleep(0)
            delete = asyncio.create_task(eng.delete("s"))
            queued = [asyncio.create_task(eng.step("s", grad(k), return_params=False))
                      for k in range(20)]
            await delete
            done = await asyncio.gather(*first, *queued, return_exceptions=True)
            assert [r.version for r in done[:5]] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
            assert all(isinstance(r, OptserveError) and r.code == "session_not_found"
                       for r in done[5:]), done[5:]
            assert key not in locks
        finally:
            await eng.stop(snapshot=False)
    run(go())


def test_short_writes_of_many_parts_write_every_byte_in_order(tmp_path: Path) -> None:
    """``_write_all`` over 3,000 parts of odd sizes, each ``pwritev`` writing at most 1,000
    bytes (ending inside a part, or exactly at a part's end): the file holds every part once,
    in order (it keeps its place in the parts by index, no longer by popping the list's head,
    which was quadratic in the parts of a many-tensor record)."""
    from collections.abc import Sequence

    from app.engine.store import _write_all

    class Short(Files):
        calls = 0

        def pwritev(self, fd: int, parts: Sequence[Any], offset: int) -> int:
            self.calls += 1
            taken, room = [], 1000 if self.calls % 2 else 1001
            for p in parts:
                view = memoryview(p).cast("B")[:room]
                taken.append(view)
                room -= len(view)
                if not room:
                    break
            return os.pwritev(fd, taken, offset)

    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(3000)] + [b""] + [b"end"]
    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        n = _write_all(Short(), fd, parts, 5)
    finally:
        os.close(fd)
    want = b"".join(parts)
    assert n == len(want)
    assert path.read_bytes() == b"\0" * 5 + want
