"""The embedded persistent store: per session a snapshot plus a write-ahead log.

Layout under the data directory::

    sessions/<id>/snapshot.bin   OPTSNAP1 | u64 length | u32 crc32 | payload
    sessions/<id>/wal.bin        records: OPTR | u32 length | u32 crc32(payload)
                                          | u32 crc32(the 12 header bytes before) | payload

Snapshots are written atomically (temp file, fsync, rename, fsync the directory). Log records
are appended in order; a damaged record (bad header, length past the end of the file, payload
checksum) with no valid record anywhere after it is a torn write from a crash (that update was
never acknowledged) and is dropped; a damaged record followed by a valid one is corruption and
the session is refused. The magic and the header's own checksum make that search exact and
cheap (a damaged length field cannot pass for a torn tail, and zero-filled blocks a crash
leaves at the end of a file are not mistaken for records).

Durability levels: ``step`` (a record is fsynced before the update is acknowledged),
``interval`` (written at once, fsynced by a background flusher every ``interval_s``),
``memory`` (nothing on disk). Payloads are opaque bytes here.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger("optserve.store")
Durability = Literal["step", "interval", "memory"]
SNAP_MAGIC = b"OPTSNAP1"
_SNAP_HEAD = struct.Struct("<8sQI")
REC_MAGIC = b"OPTR"
_REC_HEAD = struct.Struct("<4sIII")  # magic, payload length, payload crc32, header crc32
_REC_HEAD_BODY = struct.Struct("<4sII")
MAX_RECORD = 1 << 32


class StoreCorrupt(Exception):
    """A snapshot or log that cannot be trusted; the session is refused, not guessed at."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | bytearray | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def frame_snapshot(payload: bytes) -> bytes:
    return _SNAP_HEAD.pack(SNAP_MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_snapshot(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < _SNAP_HEAD.size:
        raise StoreCorrupt(f"{path}: truncated snapshot header")
    magic, length, crc = _SNAP_HEAD.unpack_from(data)
    payload = data[_SNAP_HEAD.size:]
    if magic != SNAP_MAGIC:
        raise StoreCorrupt(f"{path}: not an optserve snapshot")
    if len(payload) != length:
        raise StoreCorrupt(f"{path}: snapshot holds {len(payload)} bytes, header says {length}")
    if zlib.crc32(payload) != crc:
        raise StoreCorrupt(f"{path}: snapshot checksum mismatch")
    return payload


def record_head(payload: bytes | Sequence[bytes | memoryview]) -> bytes:
    """The framing header of a record whose payload is ``payload`` (or these pieces of it)."""
    parts = [payload] if isinstance(payload, bytes) else payload
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    head = _REC_HEAD_BODY.pack(REC_MAGIC, sum(len(p) for p in parts), crc)
    return head + struct.pack("<I", zlib.crc32(head))


def frame_record(payload: bytes) -> bytes:
    return record_head(payload) + payload


def _record_at(data: memoryview, pos: int) -> int | None:
    """The end of the valid record that starts at ``pos``, or None."""
    if len(data) - pos < _REC_HEAD.size:
        return None
    magic, length, crc, head_crc = _REC_HEAD.unpack_from(data, pos)
    if magic != REC_MAGIC or zlib.crc32(data[pos:pos + _REC_HEAD_BODY.size]) != head_crc:
        return None
    start, end = pos + _REC_HEAD.size, pos + _REC_HEAD.size + int(length)
    if end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None
    return end


def _next_valid_record(data: bytes, view: memoryview, pos: int) -> int | None:
    """The offset of the first valid record at or after ``pos``, or None."""
    while (pos := data.find(REC_MAGIC, pos)) != -1:
        if _record_at(view, pos) is not None:
            return pos
        pos += 1
    return None


def read_log(path: Path) -> tuple[list[bytes], int, bool]:
    """(records, length of the valid prefix, whether a torn tail was dropped)."""
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    view = memoryview(data)
    records: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = _record_at(view, pos)
        if end is None:
            later = _next_valid_record(data, view, pos + 1)
            if later is not None:
                raise StoreCorrupt(f"{path}: record {len(records) + 1} (byte {pos}) is damaged "
                                   f"and a valid record follows it (byte {later})")
            return records, pos, True
        records.append(data[pos + _REC_HEAD.size:end])
        pos = end
    return records, pos, False


@dataclass
class _Log:
    path: Path
    file: BinaryIO
    dirty: bool = False
    waiters: list[Future[None]] = field(default_factory=list)
    io: threading.Lock = field(default_factory=threading.Lock)  # fsync vs close

    def retire(self) -> None:
        """Close a log taken out of service by a snapshot (which holds every update in it) or
        a delete: its pending updates are settled, as durable as they need to be."""
        with self.io:
            try:
                self.file.close()
            except OSError as exc:  # the snapshot has the data; the file is truncated next
                log.warning("closing %s: %s", self.path, exc)
        for w in self.waiters:
            if not w.done():
                w.set_result(None)
        self.waiters.clear()


class Store:
    """Snapshots and logs for every session, with a background fsync thread."""

    def __init__(self, root: Path, interval_s: float = 0.05) -> None:
        self.root = root
        self.sessions_dir = root / "sessions"
        self.interval_s = interval_s
        self._logs: dict[str, _Log] = {}
        self._lock = threading.Condition()
        self._stop = False
        self._flusher = threading.Thread(target=self._flush_loop, name="optserve-fsync",
                                         daemon=True)

    def open(self) -> None:
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.sessions_dir.glob(".deleted-*"):  # a crash in the middle of delete
            shutil.rmtree(leftover, ignore_errors=True)
        probe = self.root / ".write-probe"
        write_atomic(probe, b"ok")
        probe.unlink()
        self._flusher.start()

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._flusher.is_alive():
            self._flusher.join(timeout=30)
        with self._lock:
            for lg in self._logs.values():
                self._sync(lg)
                lg.file.close()
            self._logs.clear()

    def writable(self) -> bool:
        try:
            probe = self.root / ".ready-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def session_ids(self) -> Iterator[str]:
        if not self.sessions_dir.exists():
            return iter(())
        return iter(sorted(p.name for p in self.sessions_dir.iterdir() if p.is_dir()
                           and not p.name.startswith(".")))

    def _dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def incomplete(self, session_id: str) -> bool:
        """A directory a crash left in the middle of a create: no snapshot, nothing logged
        (that create was never acknowledged)."""
        d = self._dir(session_id)
        wal = d / "wal.bin"
        return not (d / "snapshot.bin").exists() and (not wal.exists() or wal.stat().st_size == 0)

    def discard(self, session_id: str) -> None:
        shutil.rmtree(self._dir(session_id), ignore_errors=True)

    # ------------------------------------------------------------- snapshots
    def write_snapshot(self, session_id: str, payload: bytes) -> None:
        """Atomically replace the session's snapshot, then start an empty log."""
        d = self._dir(session_id)
        new = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        if new:
            _fsync_dir(self.sessions_dir)
        write_atomic(d / "snapshot.bin", frame_snapshot(payload))
        with self._lock:
            lg = self._logs.pop(session_id, None)
        if lg is not None:
            lg.retire()
        # The snapshot holds every logged update: the log can go. A crash between the rename
        # above and this truncate is harmless (replay skips records the snapshot already has).
        with open(d / "wal.bin", "wb") as f:
            f.flush()
            os.fsync(f.fileno())

    def read(self, session_id: str) -> tuple[bytes, list[bytes], bool]:
        """(snapshot payload, log records, torn tail dropped)."""
        d = self._dir(session_id)
        snap = d / "snapshot.bin"
        if not snap.exists():
            raise StoreCorrupt(f"{snap}: missing snapshot")
        payload = read_snapshot(snap)
        records, valid, torn = read_log(d / "wal.bin")
        if torn:
            with open(d / "wal.bin", "r+b") as f:
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        return payload, records, torn

    def delete(self, session_id: str) -> None:
        with self._lock:
            lg = self._logs.pop(session_id, None)
        if lg is not None:
            lg.retire()  # an update still waiting for its fsync was applied before the delete
        d = self._dir(session_id)
        if d.exists():
            trash = self.sessions_dir / f".deleted-{session_id}-{os.getpid()}-{id(d)}"
            os.replace(d, trash)
            _fsync_dir(self.sessions_dir)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------- log
    def append(
        self, session_id: str, payload: bytes | Sequence[bytes | memoryview],
        durability: Durability,
    ) -> Future[None]:
        """Write one record (given whole or in pieces, which are written without being
        joined); the future resolves when it is as durable as asked."""
        done: Future[None] = Future()
        if durability == "memory":
            done.set_result(None)
            return done
        head = record_head(payload)  # written apart from the payload: no copy of a large one
        with self._lock:
            lg = self._logs.get(session_id)
            if lg is None:
                path = self._dir(session_id) / "wal.bin"
                lg = _Log(path, open(path, "ab"))  # noqa: SIM115 - kept open for appends
                self._logs[session_id] = lg
            lg.file.write(head)
            for part in [payload] if isinstance(payload, bytes) else payload:
                lg.file.write(part)
            lg.dirty = True
            if durability == "step":
                lg.waiters.append(done)
                self._lock.notify_all()
            else:
                done.set_result(None)
        return done

    def _sync(self, lg: _Log) -> None:
        if lg.dirty:
            lg.file.flush()
            os.fsync(lg.file.fileno())
            lg.dirty = False
        for w in lg.waiters:
            if not w.done():
                w.set_result(None)
        lg.waiters.clear()

    def _flush_loop(self) -> None:
        """Group commit: fsync every log with waiters at once; the rest every interval."""
        while True:
            with self._lock:
                if not self._stop and not any(lg.waiters for lg in self._logs.values()):
                    self._lock.wait(timeout=self.interval_s)
                if self._stop:
                    return
                pending = [lg for lg in self._logs.values() if lg.dirty or lg.waiters]
                for lg in pending:
                    lg.file.flush()
                batch = [(lg, lg.waiters[:], lg.dirty) for lg in pending]
                for lg in pending:
                    lg.waiters.clear()
                    lg.dirty = False
            for lg, waiters, dirty in batch:
                error: OSError | None = None
                with lg.io:
                    # A log closed meanwhile was retired by a snapshot that holds its updates,
                    # or by a delete: its records need no fsync.
                    if dirty and not lg.file.closed:
                        try:
                            os.fsync(lg.file.fileno())
                        except OSError as exc:
                            error = exc
                for w in waiters:
                    if w.done():
                        continue
                    if error is None:
                        w.set_result(None)
                    else:
                        w.set_exception(error)
