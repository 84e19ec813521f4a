"""The embedded persistent store: per session a snapshot plus a write-ahead log.

Layout under the data directory::

    sessions/<id>/snapshot.bin   OPTSNAP1 | u64 length | u32 crc32 | payload
    sessions/<id>/wal.bin        records: u32 length | u32 crc32 | payload

Snapshots are written atomically (temp file, fsync, rename, fsync the directory). Log records
are appended in order; a record whose length runs past the end of the file or whose checksum
fails *at the tail* is a torn write from a crash (that update was never acknowledged) and is
dropped; a bad record followed by good ones is corruption and the session is refused.

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
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

log = logging.getLogger("optserve.store")
Durability = Literal["step", "interval", "memory"]
SNAP_MAGIC = b"OPTSNAP1"
_SNAP_HEAD = struct.Struct("<8sQI")
_REC_HEAD = struct.Struct("<II")
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


def frame_record(payload: bytes) -> bytes:
    return _REC_HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def read_log(path: Path) -> tuple[list[bytes], int, bool]:
    """(records, length of the valid prefix, whether a torn tail was dropped)."""
    if not path.exists():
        return [], 0, False
    data = path.read_bytes()
    records: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _REC_HEAD.size:
            return records, pos, True
        length, crc = _REC_HEAD.unpack_from(data, pos)
        start, end = pos + _REC_HEAD.size, pos + _REC_HEAD.size + length
        if end > len(data):
            return records, pos, True
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            if _valid_record_after(data, end):
                raise StoreCorrupt(f"{path}: record at byte {pos} fails its checksum and "
                                   "valid records follow it")
            return records, pos, True
        records.append(payload)
        pos = end
    return records, pos, False


def _valid_record_after(data: bytes, pos: int) -> bool:
    if len(data) - pos < _REC_HEAD.size:
        return False
    length, crc = _REC_HEAD.unpack_from(data, pos)
    end = pos + _REC_HEAD.size + int(length)
    return end <= len(data) and zlib.crc32(data[pos + _REC_HEAD.size:end]) == int(crc)


@dataclass
class _Log:
    path: Path
    file: BinaryIO
    dirty: bool = False
    waiters: list[Future[None]] = field(default_factory=list)


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
    def incomplete(self, s): return False
    def discard(self, s): pass

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
                self._sync(lg)
                lg.file.close()
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
                lg.file.close()
        d = self._dir(session_id)
        if d.exists():
            trash = self.sessions_dir / f".deleted-{session_id}-{os.getpid()}-{id(d)}"
            os.replace(d, trash)
            _fsync_dir(self.sessions_dir)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------- log
    def append(self, session_id: str, payload: bytes, durability: Durability) -> Future[None]:
        """Write one record; the future resolves when it is as durable as asked."""
        done: Future[None] = Future()
        if durability == "memory":
            done.set_result(None)
            return done
        frame = frame_record(payload)
        with self._lock:
            lg = self._logs.get(session_id)
            if lg is None:
                path = self._dir(session_id) / "wal.bin"
                lg = _Log(path, open(path, "ab"))  # noqa: SIM115 - kept open for appends
                self._logs[session_id] = lg
            lg.file.write(frame)
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
                try:
                    if dirty:
                        os.fsync(lg.file.fileno())
                    for w in waiters:
                        w.set_result(None)
                except (OSError, ValueError) as exc:  # a closed file after delete
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
